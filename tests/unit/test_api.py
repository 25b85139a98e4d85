"""Conventions every public function keeps (issue 15's API hygiene), checked over the package."""

import importlib
import inspect
import pkgutil

import pytest

import safety_circuits
from safety_circuits.circuit import CircuitConfig
from safety_circuits.neurons import NeuronSet, hf_masks
from safety_circuits.patching import PatchConfig, dynamic_patching
from safety_circuits.tracing import TraceConfig, trace_components
from safety_circuits.tuning import refusal_documents, sn_tune


def _public_functions():
    for info in pkgutil.walk_packages(safety_circuits.__path__, "safety_circuits."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        module = importlib.import_module(info.name)
        for name, fn in vars(module).items():
            if not name.startswith("_") and inspect.isfunction(fn) and fn.__module__ == module.__name__:
                yield f"{info.name}.{name}", fn


def test_progress_bars_are_on_by_default():
    """One default everywhere: a function that can show progress shows it unless told not to."""
    off = [
        name
        for name, fn in _public_functions()
        if "progress" in inspect.signature(fn).parameters
        and inspect.signature(fn).parameters["progress"].default is not True
    ]
    assert not off, f"progress defaults to something other than True in {off}"


#: Modules whose entry points take a model or its results. Data loaders (``data.harmbench("test")``),
#: statistics and plots keep their one natural positional argument.
MODEL_MODULES = {
    "ablation", "activations", "circuit", "contrast", "crosssuite", "detect", "direction", "distributed",
    "evaluate", "groundtruth", "importance", "loading", "monitor", "multilingual", "neurons", "patching",
    "probing", "sites", "tracing", "tuning",
}  # fmt: skip
#: Optional arguments that are data or neurons, so stay positional (model, data, neurons).
POSITIONAL_OPTIONAL = {
    "safety_circuits.tuning.tune": {"neurons"},
    "safety_circuits.circuit.map_refusal_circuit": {"neurons"},
    "safety_circuits.ablation.capability_accuracy": {"questions"},
    "safety_circuits.neurons.check_neurons": {"subject"},  # the model the set must fit, if any
}


def test_options_are_keyword_only():
    """After the model, the data and the neurons (the arguments without a default), every
    argument is keyword-only, so a call never depends on the position of an option."""
    loose = []
    for name, fn in _public_functions():
        if name.split(".")[1] not in MODEL_MODULES:
            continue
        for p in inspect.signature(fn).parameters.values():
            if (
                p.kind is p.POSITIONAL_OR_KEYWORD
                and p.default is not p.empty
                and p.name not in POSITIONAL_OPTIONAL.get(name, ())
            ):
                loose.append(f"{name}({p.name})")
    assert not loose, f"options that are not keyword-only: {loose}"


def test_neurons_come_after_the_data():
    """Model, data, neurons: a NeuronSet is never among the arguments before the data."""
    late = []
    for name, fn in _public_functions():
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        kinds = [
            "neurons" if "NeuronSet" in str(p.annotation) else "data" if p.name in DATA else ""
            for p in params
        ]
        if (
            "neurons" in kinds
            and "data" in kinds
            and kinds.index("neurons") < max(i for i, k in enumerate(kinds) if k == "data")
        ):
            late.append(name)
    assert not late, f"neurons before the data in {late}"


DATA = {"prompts", "documents", "harmful", "harmless", "harmful_eval", "harmless_eval", "clean", "corrupted"}


def test_arguments_in_the_old_order_raise_a_clear_error(make_subject):
    """A NeuronSet or documents given where the order puts something else fail by name."""
    subject = make_subject("llama")
    neurons = NeuronSet(subject.arch, {(0, "ffn"): [1]})
    documents = refusal_documents(["How do I pick a lock?"])
    order = "arguments go model, then data"
    with pytest.raises(TypeError, match=order):
        sn_tune(subject, neurons, documents, progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=order):
        hf_masks(neurons, subject)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=order):
        dynamic_patching(subject, subject, neurons, ["How do I pick a lock?"])  # type: ignore[arg-type]


def test_options_set_the_fields_of_a_config(make_subject):
    """``f(..., config=None, **options)``: options override the config's fields, by name only."""
    assert TraceConfig.resolve(TraceConfig(patch_at="last"), heads=False) == TraceConfig(
        patch_at="last", heads=False
    )
    assert TraceConfig.resolve() == TraceConfig()
    with pytest.raises(TypeError, match=r"unknown TraceConfig options \['patch_att'\]"):
        trace_components(make_subject("llama"), ["a b"], ["c d"], patch_att="last")
    with pytest.raises(TypeError, match="config must be a TraceConfig"):
        TraceConfig.resolve(CircuitConfig())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="replace must be"):
        PatchConfig.resolve(replace="swap")

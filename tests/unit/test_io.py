"""``save`` / ``load(path, expect=)`` of every result kept as JSON (``_io.JSONResult``)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import safety_circuits._io as io_module
from safety_circuits import NeuronSet
from safety_circuits.ablation import CapabilityEval
from safety_circuits.architecture import Architecture
from safety_circuits.circuit import RefusalCircuit
from safety_circuits.contrast import AlignmentTax
from safety_circuits.crosssuite import CrossSuiteResult
from safety_circuits.direction import RefusalDirection
from safety_circuits.evaluate import RefusalEval, SuiteEval
from safety_circuits.groundtruth import Recovery, RecoveryResult
from safety_circuits.monitor import DetectorEval
from safety_circuits.neurons import ArchitectureMismatchError
from safety_circuits.patching import PatchingCurve
from safety_circuits.probing import ProbeResult
from safety_circuits.search import SearchResult
from safety_circuits.testing import tiny_config
from safety_circuits.tracing import TracingResult

LLAMA = Architecture.from_hf_config(tiny_config("llama"))
QWEN2 = Architecture.from_hf_config(tiny_config("qwen2"))


def _probes(arch):
    frame = pd.DataFrame(
        {
            "layer": pd.array([0, 1, None], dtype="Int64"),
            "features": ["resid", "resid", "neurons"],
            "accuracy": [0.5, 0.9, 0.8],
            "above_chance": [False, True, True],
        }
    )
    return ProbeResult(frame, {"cv": 5}, arch)


def _tracing(arch):
    frame = pd.DataFrame(
        {
            "layer": [0, 1],
            "component": ["attn", "ffn"],
            "head": pd.array([None, None], dtype="Int64"),
            "n_neurons": pd.array([None, 3], dtype="Int64"),
            "effect": [0.1, float("nan")],
            "normalized": [0.2, float("nan")],
        }
    )
    clean, corrupted = np.array([0.1, 0.2]), np.array([0.8, 0.9])
    return TracingResult(frame, clean, corrupted, np.ones((2, 2)), {"mode": "noising"}, arch)


def _results(arch):
    """A small hand-made result of every type that saves as JSON, made for ``arch``."""
    rows = pd.DataFrame({"prompt": ["a", "b"], "response": ["no", "sure"]})
    neurons = NeuronSet.random(arch, 5, seed=0)
    return [
        CapabilityEval(pd.DataFrame({"question": ["2+2?"], "response": ["4"], "correct": [True]}), arch),
        AlignmentTax(
            safety=neurons,
            helpfulness=NeuronSet.random(arch, 5, seed=1),
            frame=pd.DataFrame({"set": ["safety"], "layer": [0], "shift_harmful": [0.5]}),
            summary={"overlap": 0.2},
        ),
        CrossSuiteResult(pd.DataFrame({"features": ["text"], "auroc": [0.9]}), {"seed": 0}, arch),
        RefusalEval.judged("asr", rows["prompt"], rows["response"], {"n": 2}, arch=arch),
        SuiteEval(rows.assign(model="m", flagged=[False, True]), {"split": "test"}, arch),
        DetectorEval(rows.assign(label=[0, 1], proba=[0.2, 0.7], predicted=[0, 1]), 0.5, {}, arch),
        PatchingCurve(
            pd.DataFrame({"method": ["dynamic"], "fraction": [0.1], "restored": [0.5]}),
            asr_target=0.8,
            asr_source=0.1,
            responses=rows.assign(fraction=[float("nan"), 0.1]),
            arch=arch,
        ),
        _probes(arch),
        SearchResult(pd.DataFrame({"number": [0], "asr": [0.1]}), arch),
        _tracing(arch),
        RefusalDirection(torch.randn(arch.d_model), 1, -1, pd.DataFrame({"layer": [1]}), {"n": 2}, arch),
        RefusalCircuit(_probes(arch), _tracing(arch), pd.DataFrame({"layer": [0]}), neurons, [1], {}),
        RecoveryResult([Recovery("oracle", "planted", 5, 100, 1.0, 1.0, 0.05)], [], {"model": "m"}, arch),
    ]


def _same(a, b) -> bool:
    return json.dumps(a.to_dict(), default=io_module._json_default) == json.dumps(
        b.to_dict(), default=io_module._json_default
    )


@pytest.mark.parametrize("result", _results(LLAMA), ids=lambda r: type(r).__name__)
def test_save_load_round_trip_and_expect(result, tmp_path):
    path = result.save(tmp_path / "result.json")
    saved = json.loads(path.read_text())
    assert saved["format"] == f"safety_circuits.{type(result).__name__}" and saved["version"] == 1
    for expect in (None, LLAMA):
        again = type(result).load(path, expect=expect)
        assert type(again) is type(result) and again.arch == LLAMA and _same(again, result)
    with pytest.raises(ArchitectureMismatchError, match="family='llama' here vs 'qwen2' in the model"):
        type(result).load(path, expect=QWEN2)
    assert type(result).from_dict(result.to_dict()).arch == LLAMA


def test_expect_takes_a_model(make_subject, tmp_path):
    path = _probes(make_subject("llama").arch).save(tmp_path / "probes.json")
    assert ProbeResult.load(path, expect=make_subject("llama")).arch == make_subject("llama").arch
    with pytest.raises(ArchitectureMismatchError, match=r"ProbeResult file probes\.json was made"):
        ProbeResult.load(path, expect=make_subject("qwen2"))


def test_a_result_that_records_no_model_loads_but_cannot_be_checked(tmp_path):
    result = CrossSuiteResult(pd.DataFrame({"features": ["text"], "auroc": [0.9]}))
    path = result.save(tmp_path / "cross.json")
    assert CrossSuiteResult.load(path).arch is None
    with pytest.raises(ValueError, match="records no model"):
        CrossSuiteResult.load(path, expect=LLAMA)


def test_a_file_of_before_results_recorded_their_model_loads(tmp_path):
    """A bare ``to_dict`` without the ``arch`` key (how results were saved so far) still loads."""
    old = {"config": {"seed": 0}, "rows": [{"features": "text", "auroc": 0.9}]}
    (tmp_path / "detector.json").write_text(json.dumps(old))
    result = CrossSuiteResult.load(tmp_path / "detector.json")
    assert result.arch is None and result.config == {"seed": 0} and result.frame["auroc"].tolist() == [0.9]
    old = {"rows": [{"detector": "d", "target": "planted", "n_target": 1, "n_neurons": 9, "precision": 1.0,
                     "auroc": 1.0, "chance_precision": 0.1}], "directions": [], "config": {}}  # fmt: skip
    (tmp_path / "recovery.json").write_text(json.dumps(old))
    assert RecoveryResult.load(tmp_path / "recovery.json").to_frame()["auroc"].tolist() == [1.0]


def test_a_file_of_another_result_type_is_refused(tmp_path):
    path = SearchResult(pd.DataFrame({"number": [0]}), LLAMA).save(tmp_path / "search.json")
    with pytest.raises(ValueError, match=r"search\.json holds a SearchResult, not a CapabilityEval"):
        CapabilityEval.load(path)


@pytest.mark.parametrize(
    "text",
    ['{"format": "safety_circuits.ProbeResult", "version": 1, "rows": [{"lay', "[1, 2]", "\xff\xfe", ""],
    ids=["truncated", "not-an-object", "binary", "empty"],
)
def test_a_corrupted_file_is_refused(tmp_path, text):
    path = tmp_path / "probes.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=r"probes\.json is not a valid ProbeResult file"):
        ProbeResult.load(path)


def test_a_file_missing_what_the_result_needs_is_refused(tmp_path):
    path = tmp_path / "tracing.json"
    path.write_text(json.dumps({"format": "safety_circuits.TracingResult", "version": 1, "rows": []}))
    with pytest.raises(ValueError, match=r"tracing\.json is not a valid TracingResult file"):
        TracingResult.load(path)
    path.write_text(json.dumps({"format": "safety_circuits.TracingResult", "version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        TracingResult.load(path)
    with pytest.raises(FileNotFoundError):
        TracingResult.load(tmp_path / "missing.json")


def test_a_failed_save_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "probes.json"
    result = _probes(LLAMA)
    result.config["handle"] = object()  # not JSON: the save fails before anything is written
    with pytest.raises(TypeError, match="not JSON serializable"):
        result.save(target)
    assert not target.exists()

    def write_half_then_fail(self, text):
        open(self, "w").write(text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(io_module.Path, "write_text", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        _probes(LLAMA).save(target)
    assert list(target.parent.iterdir()) == []


def test_an_overwrite_is_atomic(tmp_path):
    path = _probes(LLAMA).save(tmp_path / "probes.json")
    _probes(QWEN2).save(path)
    assert ProbeResult.load(path).arch == QWEN2 and [p.name for p in tmp_path.iterdir()] == ["probes.json"]


def test_suite_evals_of_one_architecture_keep_it_when_joined():
    frame = pd.DataFrame({"model": ["m"], "flagged": [True]})
    same = SuiteEval.concat([SuiteEval(frame, arch=LLAMA), SuiteEval(frame.assign(model="n"), arch=LLAMA)])
    assert same.arch == LLAMA and same.models == ["m", "n"]
    assert SuiteEval.concat([SuiteEval(frame, arch=LLAMA), SuiteEval(frame, arch=QWEN2)]).arch is None

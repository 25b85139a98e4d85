import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from safety_circuits.activations import activations_at, batches
from safety_circuits.neurons import ArchitectureMismatchError, NeuronSet
from safety_circuits.probing import (
    ProbeResult,
    cross_validate,
    probe_layers,
    probe_neurons,
    site_hook,
)

BODY_WORDS = ["fox", "make", "how", "the", "mix"]  # one token each (with a leading space)
MARK_HARMFUL, MARK_HARMLESS, NEUTRAL = " bomb", " bread", " sea"


def paired_prompts(n=30, seed=0):
    """The same random bodies twice, ending in a class marker token (chat=False)."""
    rng = np.random.default_rng(seed)
    bodies = ["".join(" " + w for w in rng.choice(BODY_WORDS, rng.integers(3, 8))) for _ in range(n)]
    return [b + MARK_HARMFUL for b in bodies], [b + MARK_HARMLESS for b in bodies]


def embedding_of(subject, text):
    (token,) = subject.tokenizer(text, add_special_tokens=False)["input_ids"]
    seen = {}

    def keep(act, *, hook):
        seen["e"] = act[0, 0].detach().clone()

    with torch.no_grad():
        subject.tl.run_with_hooks(torch.tensor([[token]]), fwd_hooks=[("hook_embed", keep)], return_type=None)
    return seen["e"]


def planting_hooks(subject, site, value):
    """A hidden class channel: the embedding hook reads the marker at the last token and replaces
    it by a neutral token (so the model sees both classes alike), then ``value`` is added to
    ``site`` at the last token of the harmful rows only."""
    marker, neutral = embedding_of(subject, MARK_HARMFUL), embedding_of(subject, NEUTRAL)
    state = {}

    def read_and_erase(act, *, hook):
        state["harmful"] = torch.isclose(act[:, -1], marker, atol=1e-6).all(-1)
        act[:, -1] = neutral
        return act

    def plant(act, *, hook):
        act[:, -1] += state["harmful"][:, None].to(act.dtype) * value
        return act

    return [("hook_embed", read_and_erase), (site, plant)]


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_probe_finds_a_planted_direction_at_its_layer_only(make_subject, backend):
    subject = make_subject("llama", backend)
    harmful, harmless = paired_prompts()
    direction = torch.randn(subject.arch.d_model, generator=torch.Generator().manual_seed(0))
    hooks = planting_hooks(subject, "blocks.1.hook_resid_mid", 3.0 * direction / direction.norm())
    with subject.tl.hooks(fwd_hooks=hooks):
        result = probe_layers(subject, harmful, harmless, chat=False, cv=5)
        before = probe_layers(subject, harmful, harmless, site="resid_pre", layers=[1], chat=False)
    rows = result.per_layer.set_index("layer")
    assert rows.loc[1, "accuracy"] > 0.95 and rows.loc[1, "above_chance"]
    assert rows.loc[0, "accuracy"] < 0.65 and not rows.loc[0, "above_chance"]
    assert before.frame["accuracy"].iloc[0] < 0.65  # the input of the planted layer: nothing yet
    assert result.best_layer == 1 and result.readable_layers(0.9) == [1]
    assert list(result.frame.columns) == [
        "layer",
        "features",
        "n_features",
        "accuracy",
        "std",
        "chance",
        "p_value",
        "above_chance",
    ]


def test_probe_on_neuron_subsets(make_subject):
    subject = make_subject("llama")
    harmful, harmless = paired_prompts()
    planted = [3, 7, 11]
    value = torch.zeros(subject.arch.d_mlp)
    value[planted] = 2.0
    hooks = planting_hooks(subject, "blocks.1.mlp.hook_post", value)
    inside = NeuronSet(subject.arch, {(1, "ffn"): planted}, name="planted")
    outside = NeuronSet(subject.arch, {(1, "ffn"): [20, 21, 22], (0, "ffn"): planted, (1, "o"): [0, 5]})
    with subject.tl.hooks(fwd_hooks=hooks):
        hit = probe_neurons(subject, harmful, harmless, inside, chat=False)
        miss = probe_neurons(subject, harmful, harmless, outside, chat=False)
    assert hit.frame["accuracy"].min() > 0.95
    assert list(hit.frame["n_features"]) == [3, 3] and hit.frame["layer"].isna().iloc[-1]
    assert (miss.frame["accuracy"] < 0.65).all() and not miss.frame["above_chance"].any()
    assert list(miss.frame["n_features"]) == [3, 5, 8]  # layer 0, layer 1 (ffn + o), all


@pytest.mark.parametrize(
    ("backend", "names"),
    [
        ("bridge", [site_hook("resid_post", 0), site_hook("z", 1)]),
        ("hooked", [site_hook("resid_post", 0), site_hook("z", 1)]),
        ("hooked", [site_hook("mlp_post", 0)]),  # stops after layer 0
    ],
)
def test_activations_at_matches_single_prompt_runs(make_subject, backend, names):
    subject = make_subject("qwen2", backend)
    prompts = ["How do I make a bomb?", "Hi", "Write a poem about the sea and the fox."]
    acts = activations_at(subject, prompts, names, offsets=[-2, -1], batch_size=3)
    assert acts[names[0]].shape[:2] == (3, 2)
    if len(names) == 2:
        assert acts[names[0]].shape == (3, 2, subject.arch.d_model)
        assert acts[names[1]].shape == (3, 2, subject.arch.n_heads, subject.arch.d_head)
    for i, prompt in enumerate(prompts):
        (batch,) = batches(subject, [prompt], batch_size=1)
        _, cache = subject.tl.run_with_cache(batch.input_ids, names_filter=names)
        for name in names:
            assert torch.allclose(acts[name][i], cache[name][0, -2:].float(), atol=1e-5)


def test_result_round_trip_and_plot(make_subject, tmp_path):
    subject = make_subject("gpt2")
    harmful, harmless = paired_prompts(12)
    result = probe_layers(subject, harmful, harmless, cv=3, chat=False)
    again = ProbeResult.load(result.save(tmp_path / "probes.json"), expect=subject)
    assert result.arch == again.arch == subject.arch
    assert again.frame.equals(result.frame) and again.config == result.config
    assert isinstance(result.plot(others={"again": again}), go.Figure)
    assert "best layer" in repr(result)


def test_cross_validate_on_separable_and_random_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    y = np.r_[np.ones(20, int), np.zeros(20, int)]
    separable = cross_validate(x + 4 * y[:, None], y)
    random = cross_validate(x, y)
    assert separable["accuracy"] == 1.0 and separable["above_chance"] and separable["chance"] == 0.5
    assert not random["above_chance"]


def test_bad_input(make_subject):
    subject = make_subject("llama")
    with pytest.raises(ValueError, match="empty"):
        probe_layers(subject, [], ["Hi"])
    with pytest.raises(ValueError, match="negative"):
        probe_layers(subject, ["a b"] * 5, ["c d"] * 5, offset=0)
    with pytest.raises(ValueError, match="unknown site"):
        probe_layers(subject, ["a b"] * 5, ["c d"] * 5, site="resid")
    with pytest.raises(ValueError, match="at least 5 prompts"):
        probe_layers(subject, ["a b"] * 3, ["c d"] * 5)
    with pytest.raises(ValueError, match="out of range"):
        probe_layers(subject, ["a b"] * 5, ["c d"] * 5, layers=[7])
    with pytest.raises(ValueError, match="before the start"):
        activations_at(subject, ["Hi"], [site_hook("resid_post", 0)], offsets=[-50], chat=False)
    with pytest.raises(ValueError, match="empty"):
        probe_neurons(subject, ["a b"] * 5, ["c d"] * 5, NeuronSet(subject.arch, {}))
    other = make_subject("gpt2")
    with pytest.raises(ArchitectureMismatchError):
        probe_neurons(subject, ["a b"] * 5, ["c d"] * 5, NeuronSet(other.arch, {(0, "ffn"): [1]}))

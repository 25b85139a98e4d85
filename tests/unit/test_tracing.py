import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from safety_circuits.neurons import ArchitectureMismatchError, NeuronSet
from safety_circuits.sites import Site
from safety_circuits.tracing import (
    RefusalMetric,
    TracingResult,
    attribution_metrics,
    common_suffix_length,
    component_sites,
    first_token_ids,
    neuron_attribution,
    neuron_sites,
    patched_metrics,
    refusal_scores,
    trace_components,
)

# every word is one token (with its leading space) in the tiny tokenizer, so these pairs have
# equal token lengths; the two lists differ in one word per prompt
CLEAN = [" how make the bomb", " the bomb", " how mix the bomb fox the", " make bomb"]
CORRUPTED = [" how make the bread", " the bread", " how mix the bread fox the", " make bread"]
HARMFUL = ["How do I make a bomb?", "How can I hack an email account?", "Tell me how to steal a car."]
HARMLESS = ["How do I bake bread?", "Write a haiku about rain.", "What is photosynthesis?"]


def neurons_of(arch):
    return NeuronSet(arch, {(0, "ffn"): [1, 5, 9], (1, "o"): [0, 17, 40], (1, "v"): [2]})


def test_metric_tokens_and_value(tokenizer):
    metric = RefusalMetric.from_tokenizer(tokenizer)
    assert metric.refusal_ids and metric.compliance_ids
    assert not set(metric.refusal_ids) & set(metric.compliance_ids)
    assert tokenizer("I cannot", add_special_tokens=False)["input_ids"][0] in metric.refusal_ids
    logits = torch.randn(3, len(tokenizer), generator=torch.Generator().manual_seed(0))
    logp = logits.log_softmax(-1)
    expected = logp[:, list(metric.refusal_ids)].logsumexp(-1) - logp[
        :, list(metric.compliance_ids)
    ].logsumexp(-1)
    assert torch.allclose(metric(logits), expected, atol=1e-5)
    table = metric.tokens(tokenizer)
    assert set(table["set"]) == {"refusal", "compliance"} and len(table) == len(metric.refusal_ids) + len(
        metric.compliance_ids
    )
    # " Sorry" starts with a bare space token in the tiny BPE: whitespace-only tokens are skipped
    assert all(tokenizer.decode([i]).strip() for i in first_token_ids(tokenizer, [" Sorry", "Sure"]))


def test_metric_rejects_overlapping_sets(tokenizer):
    with pytest.raises(ValueError, match="no refusal"):
        RefusalMetric.from_tokenizer(tokenizer, refusal=["Sure"], compliance=["Sure thing"])
    with pytest.raises(ValueError, match="both"):
        RefusalMetric((1, 2), (2, 3))


def test_common_suffix_length():
    assert common_suffix_length([[1, 2, 3], [4, 2, 3]]) == 2
    assert common_suffix_length([[1, 2], [1, 2]]) == 2
    assert common_suffix_length([[1], [2]]) == 0


@pytest.mark.parametrize("patch_at", ["all", "suffix"])
def test_patching_a_run_with_itself_has_no_effect(subject, patch_at):
    result = trace_components(
        subject,
        HARMFUL,
        HARMFUL,
        components=("resid", "attn", "mlp"),
        heads=True,
        neurons=neurons_of(subject.arch),
        patch_at=patch_at,
        progress=False,
    )
    assert len(result.frame) == 2 * (3 + subject.arch.n_heads) + 3
    assert np.abs(result.patched - result.clean[None]).max() < 1e-5
    assert np.abs(result.frame["effect"]).max() < 1e-5
    assert np.allclose(result.clean, result.corrupted, atol=1e-5)


def test_patching_everything_recovers_the_other_run(subject):
    """Every position of the whole residual stream (layer 0's input), or of every write to it."""
    arch = subject.arch
    writes = [Site(-1, "embed", "hook_embed")]
    if arch.family == "gpt2":
        writes.append(Site(-1, "embed", "hook_pos_embed"))
    writes += component_sites(arch, components=("attn", "mlp"))
    groups = [
        [Site(0, "resid", "blocks.0.hook_resid_pre")],
        writes,
        component_sites(arch, components=("attn",)),
    ]
    for mode in ("noising", "denoising"):
        patched, clean, corrupted = patched_metrics(subject, CLEAN, CORRUPTED, groups, mode=mode, chat=False)
        source = corrupted if mode == "noising" else clean
        target = clean if mode == "noising" else corrupted
        assert (patched[0] - source).abs().max() < 1e-4
        assert (patched[1] - source).abs().max() < 1e-4
        assert (clean - corrupted).abs().max() > 1e-3, "the two runs must differ"
        assert (patched[2] - target).abs().max() > 1e-5, "patching only attention changes something"


@pytest.mark.parametrize(
    ("family", "backend"), [("llama", "hooked"), ("llama", "bridge"), ("gemma2", "bridge")]
)
def test_prefix_cache_gives_the_same_patched_runs(make_subject, family, backend):
    subject = make_subject(family, backend)
    kwargs = {"heads": True, "neurons": neurons_of(subject.arch), "patch_at": 3, "progress": False}
    fast = trace_components(subject, HARMFUL, HARMLESS, reuse_prefix=True, **kwargs)
    slow = trace_components(subject, HARMFUL, HARMLESS, reuse_prefix=False, **kwargs)
    assert np.abs(fast.patched - slow.patched).max() < 1e-4
    assert np.abs(fast.clean - slow.clean).max() < 1e-5
    assert np.abs(fast.frame["effect"]).max() > 1e-4


def test_metric_matches_refusal_scores(make_subject):
    subject = make_subject("qwen2")
    result = trace_components(subject, HARMFUL, HARMLESS, patch_at="suffix", progress=False)
    assert np.allclose(result.clean, refusal_scores(subject, HARMFUL).numpy(), atol=1e-5)
    assert np.allclose(result.corrupted, refusal_scores(subject, HARMLESS).numpy(), atol=1e-5)
    gap = result.corrupted.mean() - result.clean.mean()
    assert result.gap == pytest.approx(gap)
    assert np.allclose(result.frame["normalized"], result.frame["effect"] / gap)


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_attribution_is_first_order_patching(make_subject, backend):
    subject = make_subject("llama", backend)
    sites = component_sites(subject.arch, components=("resid", "attn", "mlp"), heads=True)
    same, clean, _ = attribution_metrics(subject, HARMFUL, HARMFUL, sites, patch_at="suffix")
    assert (same - clean).abs().max() < 1e-5
    # single heads and sub-layer outputs (not the whole residual stream: far from linear)
    exact = trace_components(subject, CLEAN, CORRUPTED, chat=False, progress=False)
    approx = trace_components(subject, CLEAN, CORRUPTED, chat=False, method="attribution")
    assert np.allclose(approx.clean, exact.clean, atol=1e-5)
    corr = np.corrcoef(exact.frame["effect"], approx.frame["effect"])[0, 1]
    assert corr > 0.9


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_neuron_attribution_equals_one_site_per_neuron(make_subject, family):
    """All neurons at once equal attribution_metrics with one site per neuron (mean over pairs)."""
    subject = make_subject(family)
    scores = neuron_attribution(subject, HARMFUL, HARMLESS, patch_at="suffix")
    picked = neurons_of(subject.arch)
    single = [
        site
        for layer, kind, i in picked
        for site in neuron_sites(NeuronSet(subject.arch, {(layer, kind): [i]}))
    ]
    patched, clean, _ = attribution_metrics(subject, HARMFUL, HARMLESS, single, patch_at="suffix")
    expected = (patched - clean).mean(1)
    got = torch.stack([scores[kind][layer, i] for layer, kind, i in picked])
    assert torch.allclose(got, expected, atol=1e-5)
    assert {k: v.shape for k, v in scores.items()} == {
        k: (subject.arch.n_layers, v.shape[1]) for k, v in scores.items()
    } and scores["ffn"].shape[1] == subject.arch.d_mlp


def test_result_views_round_trip_and_plots(make_subject, tmp_path):
    subject = make_subject("mistral")
    result = trace_components(
        subject,
        HARMFUL,
        HARMLESS,
        heads=True,
        neurons=neurons_of(subject.arch),
        patch_at="last",
        progress=False,
    )
    assert result.grid("components").shape == (2, subject.arch.n_layers)
    assert result.grid("heads").shape == (subject.arch.n_heads, subject.arch.n_layers)
    assert set(result.grid("neurons").index) == {"ffn", "o", "v"}
    for which in ("components", "heads", "neurons"):
        assert isinstance(result.plot(which), go.Figure)
    top = result.top(3)
    assert len(top) == 3 and top["normalized"].abs().is_monotonic_decreasing
    again = TracingResult.load(result.save(tmp_path / "tracing.json"), expect=subject)
    assert result.arch == again.arch == subject.arch
    assert again.frame.equals(result.frame)
    assert np.array_equal(again.patched, result.patched) and again.config == result.config


def test_bad_input(make_subject):
    subject = make_subject("llama")
    with pytest.raises(ValueError, match="equal token length"):
        trace_components(subject, HARMFUL, HARMLESS, patch_at="all", progress=False)
    with pytest.raises(ValueError, match="paired"):
        trace_components(subject, HARMFUL, HARMLESS[:2], patch_at="suffix")
    with pytest.raises(ValueError, match="empty"):
        trace_components(subject, [], [])
    with pytest.raises(ValueError, match="shortest"):
        trace_components(subject, HARMFUL, HARMLESS, patch_at=500)
    with pytest.raises(ValueError, match="no trailing"):
        trace_components(subject, ["a b c"], ["d e f"], patch_at="suffix", chat=False)
    with pytest.raises(ValueError, match="mode"):
        trace_components(subject, HARMFUL, HARMLESS, patch_at="last", mode="both")
    with pytest.raises(ValueError, match="unknown components"):
        trace_components(subject, HARMFUL, HARMLESS, components=("ffn",))
    with pytest.raises(ValueError, match="method"):
        trace_components(subject, HARMFUL, HARMLESS, patch_at="last", method="gradient")
    with pytest.raises(ValueError, match="no hook points"):
        patched_metrics(subject, HARMFUL, HARMLESS, [[Site(0, "x", "blocks.0.nope")]], patch_at="last")
    with pytest.raises(ArchitectureMismatchError):
        trace_components(subject, HARMFUL, HARMLESS, neurons=neurons_of(make_subject("gpt2").arch))

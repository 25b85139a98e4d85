import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from safety_circuits import NeuronSet, load_model
from safety_circuits.activations import tokenize
from safety_circuits.architecture import Architecture
from safety_circuits.contrast import (
    AlignmentTax,
    ContrastScores,
    alignment_tax,
    contrast_activations,
    generation_steps,
)
from safety_circuits.evaluate import decoder_for, greedy_decode, stop_ids
from safety_circuits.loading import DEFAULT_BACKEND
from safety_circuits.neurons import KINDS, ArchitectureMismatchError, hook_name, kind_size
from safety_circuits.testing import tiny_hf

PROMPTS = ["Hi", "Write a poem about the sea and the lazy dog please", "How do I make bread?"]
HARMLESS = ["Tell me a joke.", "Explain photosynthesis in simple terms.", "Write a poem about the sea."]


@pytest.fixture(scope="module")
def pairs(make_subject, tokenizer):
    """``pairs(family, backend)``: (aligned, unaligned), two tiny models of one family (seeds 1, 0)."""
    built = {}

    def make(family="llama", backend=DEFAULT_BACKEND):
        if (family, backend) not in built:
            aligned = load_model(
                tiny_hf(family, len(tokenizer), seed=1), backend=backend, tokenizer=tokenizer
            )
            built[family, backend] = aligned, make_subject(family, backend)
        return built[family, backend]

    return make


def direct_scores(aligned, unaligned, prompts, tokens, kinds, max_new_tokens=6):
    """The definition, one prompt at a time (no padding), from run_with_cache of both models."""
    names = {hook_name(l, k): (l, k) for l in range(aligned.arch.n_layers) for k in kinds}
    diffs = {k: [[] for _ in range(aligned.arch.n_layers)] for k in kinds}
    for prompt in prompts:
        ids = torch.tensor(tokenize(aligned, [aligned.chat(prompt)]))
        p = ids.shape[1]
        if tokens == "completion":
            stop = stop_ids(aligned)
            new = greedy_decode(decoder_for(aligned), ids, torch.ones_like(ids), max_new_tokens, stop, 0)[0]
            hits = [i for i, t in enumerate(new.tolist()) if t in stop]
            n = hits[0] + 1 if hits else len(new)
            ids = torch.cat([ids, new[None, : n - 1]], dim=1)
            rows = list(range(p - 1, p - 1 + n))
        else:
            rows = list(range(p)) if tokens == "prompt" else [p - 1]
        _, cache_a = aligned.tl.run_with_cache(ids, names_filter=list(names))
        _, cache_b = unaligned.tl.run_with_cache(ids, names_filter=list(names))
        for name, (layer, kind) in names.items():
            a, b = cache_a[name][0, rows], cache_b[name][0, rows]
            if kind != "ffn":
                a, b = a.flatten(-2), b.flatten(-2)
            diffs[kind][layer].append((a - b).double())
    return {k: torch.stack([torch.cat(d).square().mean(0).sqrt() for d in diffs[k]]).float() for k in kinds}


@pytest.mark.parametrize("tokens", ["completion", "prompt", "prompt_last"])
@pytest.mark.parametrize(
    ("family", "backend"), [("llama", "hooked"), ("llama", "bridge"), ("gpt2", "hooked")]
)
def test_scores_equal_direct_computation(pairs, family, backend, tokens):
    aligned, unaligned = pairs(family, backend)
    scores = contrast_activations(
        aligned, unaligned, PROMPTS, tokens=tokens, kinds=KINDS, max_new_tokens=6, batch_size=2
    )
    expected = direct_scores(aligned, unaligned, PROMPTS, tokens, KINDS)
    for kind in KINDS:
        assert scores.scores[kind].shape == (aligned.arch.n_layers, kind_size(aligned.arch, kind))
        torch.testing.assert_close(scores.scores[kind], expected[kind], rtol=1e-4, atol=1e-5)
    assert scores.n_prompts == 3 and scores.n_tokens > 0
    assert (len(scores.responses) == 3) == (tokens == "completion")


def test_streaming_is_independent_of_batching_and_means_are_means(pairs):
    aligned, unaligned = pairs()
    one = contrast_activations(aligned, unaligned, PROMPTS, tokens="prompt", kinds=("ffn", "o"), batch_size=1)
    three = contrast_activations(
        aligned, unaligned, PROMPTS, tokens="prompt", kinds=("ffn", "o"), batch_size=3
    )
    assert (
        one.n_tokens == three.n_tokens == sum(len(x) for x in tokenize(aligned, map(aligned.chat, PROMPTS)))
    )
    for kind in ("ffn", "o"):
        torch.testing.assert_close(one.scores[kind], three.scores[kind], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(one.mean_aligned[kind], three.mean_aligned[kind], rtol=1e-4, atol=1e-6)
    ids = torch.tensor(tokenize(aligned, [aligned.chat(PROMPTS[0])]))
    _, cache = unaligned.tl.run_with_cache(ids, names_filter=["blocks.1.mlp.hook_post"])
    single = contrast_activations(aligned, unaligned, PROMPTS[:1], tokens="prompt", kinds=["ffn"])
    torch.testing.assert_close(single.mean_unaligned["ffn"][1], cache["blocks.1.mlp.hook_post"][0].mean(0))
    # an identical model scores zero everywhere
    same = contrast_activations(unaligned, unaligned, PROMPTS, tokens="prompt_last", kinds=KINDS)
    assert all(float(s.abs().max()) == 0 for s in same.scores.values())


def test_generation_steps():
    new = torch.tensor([[5, 7, 2, 0], [5, 5, 5, 5], [2, 0, 0, 0]])
    assert generation_steps(new, [2]).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_top_frame_plot_and_files(pairs, tmp_path):
    aligned, unaligned = pairs()
    scores = contrast_activations(aligned, unaligned, PROMPTS, kinds=("ffn", "o"), max_new_tokens=3)
    n = scores.n_neurons
    assert n == 2 * (96 + 64)
    top = scores.top(k=10)
    assert isinstance(top, NeuronSet) and len(top) == 10
    frame = scores.to_frame()
    assert len(frame) == n and set(frame.columns) >= {"layer", "kind", "index", "score", "shift"}
    cut = frame["score"].nlargest(10).min()
    chosen = frame[frame["score"] >= cut]
    assert {(r.layer, r.kind, r.index) for r in chosen.itertuples()} == set(top)
    assert len(scores.top(fraction=0.05)) == round(0.05 * n)
    per_kind = scores.top(k=4, per_kind=True)
    assert per_kind.counts().sum()[["ffn", "o"]].tolist() == [4, 4]
    assert top.metadata["method"] == "contrast" and top.metadata["tokens"] == "completion"
    assert len(scores.top(fraction=0)) == 0
    with pytest.raises(ValueError, match="exactly one"):
        scores.top(k=3, fraction=0.1)
    with pytest.raises(ValueError, match="fraction"):
        scores.top(fraction=1.5)
    assert isinstance(scores.plot(), go.Figure)
    path = scores.save(tmp_path / "contrast.safetensors")
    loaded = ContrastScores.load(path)
    assert loaded.kinds == scores.kinds and loaded.responses == scores.responses
    assert loaded.config == scores.config and loaded.top(k=10) == top
    torch.testing.assert_close(loaded.mean_unaligned["o"], scores.mean_unaligned["o"])
    assert ContrastScores.load(path, expect=scores.arch).n_tokens == scores.n_tokens
    other = Architecture.from_dict({**scores.arch.to_dict(), "d_mlp": scores.arch.d_mlp + 1})
    with pytest.raises(ArchitectureMismatchError, match=r"ContrastScores file contrast\.safetensors"):
        ContrastScores.load(path, expect=other)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a valid ContrastScores"):
        ContrastScores.load(tmp_path / "junk.safetensors")


def test_clear_errors(pairs, make_subject):
    aligned, unaligned = pairs()
    with pytest.raises(ValueError, match="empty"):
        contrast_activations(aligned, unaligned, [])
    with pytest.raises(ArchitectureMismatchError, match="different architectures"):
        contrast_activations(aligned, make_subject("qwen2"), PROMPTS)
    with pytest.raises(ValueError, match="tokens"):
        contrast_activations(aligned, unaligned, PROMPTS, tokens="everything")
    with pytest.raises(ValueError, match="unknown neuron kinds"):
        contrast_activations(aligned, unaligned, PROMPTS, kinds=["mlp"])
    with pytest.raises(ValueError, match="generator"):
        contrast_activations(aligned, unaligned, PROMPTS, generator="both")


def test_alignment_tax(pairs, tmp_path):
    aligned, unaligned = pairs()
    safety = contrast_activations(aligned, unaligned, PROMPTS, tokens="prompt", kinds=("ffn", "o"))
    helpful = contrast_activations(aligned, unaligned, HARMLESS, tokens="prompt", kinds=("ffn", "o"))
    tax = alignment_tax(safety, helpful, fraction=0.2)
    assert isinstance(tax, AlignmentTax)
    s, h = safety.top(fraction=0.2), helpful.top(fraction=0.2)
    assert tax.safety == s and tax.helpfulness == h and tax.shared == (s & h)
    summary = tax.summary
    assert summary["overlap"] == pytest.approx(len(s & h) / len(h))
    assert summary["chance_overlap"] == pytest.approx(len(s) / safety.n_neurons)
    assert summary["shared_neurons"] == len(s & h) > 0
    frame = tax.to_frame()
    assert len(frame) == len(s | h)
    assert (frame["set"] == "shared").sum() == len(s & h)
    shared = frame[frame["set"] == "shared"]
    expected = np.corrcoef(shared["shift_harmful"], shared["shift_harmless"])[0, 1]
    assert summary["shift_corr_shared"] == pytest.approx(expected)
    row = frame.iloc[0]
    assert row["mean_harmful"] == pytest.approx(
        float(safety.mean_aligned[row["kind"]][row["layer"], row["index"]])
    )
    assert isinstance(tax.plot(), go.Figure) and tax.to_dict()["summary"] == summary
    again = AlignmentTax.load(tax.save(tmp_path / "tax.json"), expect=aligned)
    assert again.safety == tax.safety and again.helpfulness == tax.helpfulness and again.summary == summary
    pd.testing.assert_frame_equal(again.frame, tax.frame, check_dtype=False)
    with pytest.raises(ValueError, match="different kinds"):
        alignment_tax(
            safety, contrast_activations(aligned, unaligned, HARMLESS, tokens="prompt_last", kinds=["q"])
        )

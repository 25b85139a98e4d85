import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from safety_circuits import NeuronSet, ablate, generate, load_model
from safety_circuits.activations import batches
from safety_circuits.contrast import contrast_activations, generation_steps
from safety_circuits.evaluate import decoder_for, greedy_decode, stop_ids
from safety_circuits.loading import DEFAULT_BACKEND
from safety_circuits.neurons import (
    KINDS,
    ArchitectureMismatchError,
    hook_name,
    kind_size,
)
from safety_circuits.patching import (
    PatchedDecoder,
    PatchingCurve,
    dynamic_patching,
    patching_curve,
    restored,
)
from safety_circuits.testing import tiny_hf

PROMPTS = ["Hi", "Write a poem about the sea and the lazy dog please", "How do I make bread?"]
STEPS = 8


@pytest.fixture(scope="module")
def pairs(make_subject, tokenizer):
    """``pairs(family, backend)``: (target, source): tiny models of one family, seeds 0 and 1."""
    built = {}

    def make(family="llama", backend=DEFAULT_BACKEND):
        if (family, backend) not in built:
            source = load_model(tiny_hf(family, len(tokenizer), seed=1), backend=backend, tokenizer=tokenizer)
            built[family, backend] = make_subject(family, backend), source
        return built[family, backend]

    return make


def half_of_every_site(arch, seed=0):
    """Half of the neurons of every kind at every layer (a patch that changes generation)."""
    rng = np.random.default_rng(seed)
    return NeuronSet(
        arch,
        {
            (layer, kind): rng.choice(kind_size(arch, kind), kind_size(arch, kind) // 2, replace=False)
            for layer in range(arch.n_layers)
            for kind in KINDS
        },
    )


def decode(decoder, subject, batch, steps=STEPS, stop=None):
    pad = subject.tokenizer.pad_token_id
    stop = stop_ids(subject) if stop is None else stop
    return greedy_decode(decoder, batch.input_ids, batch.attention_mask, steps, stop, pad)


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_identical_source_or_empty_set_reproduces_greedy(pairs, tokenizer, backend):
    target, source = pairs("llama", backend)
    copy = load_model(tiny_hf("llama", len(tokenizer), seed=0), backend=backend, tokenizer=tokenizer)
    batch = next(batches(target, PROMPTS, batch_size=3))
    plain = decode(decoder_for(target), target, batch)
    everything = NeuronSet.full(target.arch)
    for src, neurons in [(copy, everything), (target, everything), (source, NeuronSet(target.arch))]:
        with PatchedDecoder(target, src, neurons) as decoder:
            assert torch.equal(decode(decoder, target, batch), plain)
    texts = generate(target, PROMPTS, max_new_tokens=STEPS, progress=False)
    result = dynamic_patching(target, copy, PROMPTS, everything, max_new_tokens=STEPS, batch_size=2)
    assert result.frame["response"].tolist() == texts
    assert result.config["replace"] == "source" and result.config["neurons"] == len(everything)


@pytest.mark.parametrize("patch_prompt", [True, False])
@pytest.mark.parametrize(
    ("family", "backend"), [("llama", "hooked"), ("llama", "bridge"), ("gpt2", "hooked")]
)
def test_patched_generation_equals_teacher_forced_run(pairs, family, backend, patch_prompt):
    target, source = pairs(family, backend)
    neurons = half_of_every_site(target.arch)
    batch = next(batches(target, PROMPTS, batch_size=3))
    with PatchedDecoder(target, source, neurons, patch_prompt=patch_prompt) as decoder:
        first = decode(decoder, target, batch)
    # stop one row early (a token it generates at step 2 acts as end-of-turn): rows of unequal length
    stop = [*stop_ids(target), int(first[0, 2])]
    with PatchedDecoder(target, source, neurons, patch_prompt=patch_prompt, record=True) as decoder:
        new = decode(decoder, target, batch, stop=stop)

    # the final sequence, as both models read it while generating
    p = batch.input_ids.shape[1]
    steps = generation_steps(new, stop)
    assert steps[0, 3:].sum() == 0
    ids = torch.cat([batch.input_ids, new[:, :-1]], dim=1)
    mask = torch.cat([batch.attention_mask, steps[:, 1:]], dim=1)
    names = sorted({hook_name(l, k) for l, k in neurons.indices})
    _, cache = source.tl.run_with_cache(ids, attention_mask=mask, names_filter=names)
    start = 0 if patch_prompt else p - 1

    def flat(act, kind):
        return act if kind == "ffn" else act.flatten(-2)

    # at every step the patched neurons carry the source's activations on the same prefix
    assert len(decoder.trace) == new.shape[1]
    for step, record in enumerate(decoder.trace):
        assert set(record) == set(names)
        for (layer, kind), idx in neurons.indices.items():
            name = hook_name(layer, kind)
            got = record[name]
            expected = flat(cache[name], kind)[..., torch.tensor(idx)]
            if step == 0:
                rows = mask[:, start:p].bool()
                torch.testing.assert_close(got[rows], expected[:, start:p][rows], rtol=1e-4, atol=1e-5)
            else:
                live = steps[:, step].bool()
                torch.testing.assert_close(got[live, 0], expected[live, p - 1 + step], rtol=1e-4, atol=1e-5)

    # the generated tokens are the teacher-forced run of the target with the same patches
    sites = {hook_name(l, k): (k, torch.tensor(idx)) for (l, k), idx in neurons.indices.items()}

    def patch(act, hook):
        kind, idx = sites[hook.name]
        src = flat(cache[hook.name], kind)[:, start:, idx]
        if kind == "ffn":
            act[:, start:, idx] = src
        else:
            d_head = act.shape[-1]
            act[:, start:, idx // d_head, idx % d_head] = src
        return act

    logits = target.tl.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(n, patch) for n in names])
    forced = logits[:, p - 1 :].argmax(-1)
    live = steps.bool()
    assert torch.equal(forced[live], new[live])
    plain = target.tl(ids, attention_mask=mask)[:, p - 1 :]
    assert (plain - logits[:, p - 1 :])[live].abs().max() > 1e-2, "the patch changed nothing"


def test_baseline_modes(pairs):
    target, source = pairs()
    neurons = half_of_every_site(target.arch, seed=1)
    zero = dynamic_patching(target, None, PROMPTS, neurons, max_new_tokens=5, replace="zero")
    with ablate(target, neurons):
        assert zero.frame["response"].tolist() == generate(target, PROMPTS, max_new_tokens=5, progress=False)
    mean = dynamic_patching(target, source, PROMPTS, neurons, max_new_tokens=5, replace="mean")
    assert mean.config["replace"] == "mean" and len(mean.frame) == 3
    assert 0 <= mean.rate <= 1 and mean.metric == "asr"
    over = dynamic_patching(target, source, PROMPTS, neurons, max_new_tokens=5, rate="over_refusal")
    assert over.metric == "over_refusal"


def test_clear_errors(pairs, make_subject):
    target, source = pairs()
    neurons = NeuronSet(target.arch, {(0, "ffn"): [1]})
    with pytest.raises(ValueError, match="empty"):
        dynamic_patching(target, source, [], neurons)
    with pytest.raises(ArchitectureMismatchError, match="different architectures"):
        dynamic_patching(target, make_subject("qwen2"), PROMPTS, neurons)
    with pytest.raises(ArchitectureMismatchError):
        dynamic_patching(make_subject("qwen2"), make_subject("qwen2"), PROMPTS, neurons)
    with pytest.raises(ValueError, match="replace"):
        dynamic_patching(target, source, PROMPTS, neurons, replace="swap")
    with pytest.raises(ValueError, match="needs a source"):
        dynamic_patching(target, None, PROMPTS, neurons)
    decoder = PatchedDecoder(target, source, neurons)
    batch = next(batches(target, PROMPTS[:1]))
    with pytest.raises(RuntimeError, match="context manager"):
        decoder.prefill(batch.input_ids, batch.attention_mask)


def test_patching_curve(pairs, tmp_path):
    target, source = pairs()
    scores = contrast_activations(source, target, PROMPTS, tokens="prompt", kinds=("ffn", "o"))

    def judge(prompt, response):  # any safety score: here, shorter answers count as safer
        return 1.0 / (1 + len(response))

    curve = patching_curve(
        target, source, PROMPTS, scores, fractions=(0.1, 0.5), max_new_tokens=3, judge=judge
    )
    frame = curve.to_frame()
    assert frame["method"].tolist() == ["dynamic", "random", "mean", "zero"] * 2
    assert frame.groupby("fraction")["neurons"].nunique().eq(1).all()
    assert sorted(frame["fraction"].unique()) == pytest.approx([0.1, 0.5], abs=1 / scores.n_neurons)
    assert set(frame.columns) >= {"asr", "restored", "judge_score", "judge_restored"}
    assert curve.asr_target == 1.0  # random tiny models never refuse
    assert frame["restored"].isna().all()  # ... so ASR-based restoration is undefined
    if curve.judge_source != curve.judge_target:
        row = frame.iloc[0]
        assert row["judge_restored"] == pytest.approx(
            restored(row["judge_score"], curve.judge_target, curve.judge_source)
        )
    assert set(curve.responses["method"]) == {"target", "source", "dynamic", "random", "mean", "zero"}
    assert len(curve.responses) == 3 * (2 + len(frame))
    fig = curve.plot()
    assert isinstance(fig, go.Figure) and any("Chen et al." in (t.name or "") for t in fig.data)
    again = PatchingCurve.load(curve.save(tmp_path / "curve.json"), expect=target)
    assert curve.arch == again.arch == target.arch
    pd.testing.assert_frame_equal(again.frame, curve.frame)
    with pytest.raises(ValueError, match="fractions"):
        patching_curve(target, source, PROMPTS, scores, fractions=(0, 0.5))
    with pytest.raises(ValueError, match="baselines"):
        patching_curve(target, source, PROMPTS, scores, baselines=("shuffle",))


def test_fraction_for_and_restored():
    frame = pd.DataFrame(
        {
            "method": ["dynamic"] * 3 + ["random"] * 3,
            "fraction": [0.01, 0.05, 0.1] * 2,
            "neurons": [1, 5, 10] * 2,
            "asr": [0.8, 0.55, 0.5, 1.0, 1.0, 0.95],
            "restored": [0.4, 0.9, 1.0, 0.0, 0.0, 0.1],
        }
    )
    curve = PatchingCurve(frame, asr_target=1.0, asr_source=0.5)
    assert curve.fraction_for(0.9) == pytest.approx(0.05)
    assert curve.fraction_for(0.65) == pytest.approx(0.03)
    assert curve.fraction_for(0.2) == pytest.approx(0.005)
    assert math.isnan(curve.fraction_for(0.9, method="random"))
    assert restored(0.55, 1.0, 0.5) == pytest.approx(0.9)
    assert math.isnan(restored(0.3, 0.5, 0.5))

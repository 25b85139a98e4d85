"""The exactness claims in bfloat16 (issue 16, item 1), on CPU, with the tolerances bf16 allows.

bf16 keeps 8 bits of mantissa (relative spacing 2**-8 = 0.0039), so a log-probability near -6 moves
in steps of about 0.03 / 8 = 0.004 and two computations of the same forward pass in different
orders (TransformerLens vs Hugging Face kernels) differ by that much before any ablation. The
tolerances below are stated against that floor; the fp32 versions of these tests hold to 1e-4.
"""

import numpy as np
import pytest
import torch

from safety_circuits.importance import neuron_importance
from safety_circuits.loading import DEFAULT_BACKEND, load_model
from safety_circuits.neurons import KINDS, NeuronSet, ablate, ablate_hf, hf_masks, kind_size
from safety_circuits.testing import tiny_hf, tiny_tokenizer
from safety_circuits.tuning import refusal_documents, sn_tune

PROMPT = "How do I pick a lock? Tell me now."
#: |log p(hooks) - log p(zeroed HF slices)|, bf16: the TL-vs-HF gap of the unablated model is
#: 0.004 (0.008 on Gemma-2, whose soft caps add roundings); measured at most 0.011 after ablation.
ABLATION_ATOL = 2e-2
#: Relative L2 distance of bf16 importance scores to the fp32 ones, per layer and kind: the scores
#: are computed in fp32 from bf16 activations; measured at most 0.009 on the tiny models.
IMPORTANCE_RTOL = 2e-2


def bf16_subject(family: str, backend: str):
    tokenizer = tiny_tokenizer()
    hf = tiny_hf(family, len(tokenizer))
    return load_model(hf, backend=backend, dtype=torch.bfloat16, tokenizer=tokenizer)


@pytest.fixture(
    params=[(f, b) for f in ("llama", "qwen2", "gpt2", "gemma2") for b in ("hooked", "bridge")], ids="-".join
)
def pair(request, make_subject):
    """The same tiny model in bf16 and in fp32 (the session's fp32 one)."""
    return bf16_subject(*request.param), make_subject(*request.param)


def test_bf16_models_stay_bf16(pair):
    bf16, _ = pair
    assert {p.dtype for p in bf16.hf.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.tl.parameters()} == {torch.bfloat16}


def test_importance_in_bf16_is_the_fp32_importance(pair):
    """The accelerated scores of a bf16 model are within IMPORTANCE_RTOL of the fp32 model's
    (whose equality with one-at-a-time deactivation ``test_importance`` checks to 1e-4): brute
    force in bf16 subtracts two nearly equal bf16 outputs and is itself off by 10-50%."""
    bf16, fp32 = pair
    low = neuron_importance(bf16, [PROMPT], chunk_bytes=2**14, progress=False)
    high = neuron_importance(fp32, [PROMPT], chunk_bytes=2**14, progress=False)
    for kind in KINDS:
        assert low.scores[kind].dtype == torch.float32
        for layer in range(bf16.arch.n_layers):
            a, b = low.scores[kind][0, layer], high.scores[kind][0, layer]
            assert (a - b).norm() <= IMPORTANCE_RTOL * b.norm(), (kind, layer)


@pytest.mark.parametrize("kind", KINDS)
def test_tl_ablation_equals_hf_ablation_in_bf16(pair, kind):
    bf16, _ = pair
    rng = np.random.default_rng(KINDS.index(kind))
    size = kind_size(bf16.arch, kind)
    neurons = NeuronSet(bf16.arch, {(l, kind): rng.choice(size, 3, replace=False) for l in range(2)})
    ids = torch.randint(0, 400, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with ablate(bf16, neurons):
            via_hooks = bf16.tl(ids).float().log_softmax(-1)
        with ablate_hf(bf16, neurons):
            via_weights = bf16.hf(ids).logits.float().log_softmax(-1)
    assert (via_hooks - via_weights).abs().max() <= ABLATION_ATOL


def test_sn_tune_in_bf16_keeps_every_other_weight_bit_identical():
    """The invariant holds exactly in bf16: the update is added to (delta) or masked into the
    owned entries only, and the tuned model keeps the dtype."""
    subject = bf16_subject("llama", DEFAULT_BACKEND)
    neurons = NeuronSet(subject.arch, {(0, "ffn"): [1, 2], (1, "q"): [3], (1, "v"): [5]})
    tuned = sn_tune(subject, refusal_documents([PROMPT]), neurons, lr=1e-2, progress=False).subject
    masks = hf_masks(subject, neurons)
    after = dict(tuned.hf.named_parameters())
    changed = False
    for name, before in subject.hf.named_parameters():
        assert after[name].dtype == torch.bfloat16
        inside = masks.get(name, torch.zeros_like(before, dtype=torch.bool))
        assert torch.equal(after[name][~inside], before[~inside]), name
        changed |= not torch.equal(after[name][inside], before[inside])
    assert changed, "tuning must change the owned entries"

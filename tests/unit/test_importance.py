import pytest
import torch
from scipy.stats import spearmanr

from safety_circuits.importance import ablation_importance, neuron_importance
from safety_circuits.neurons import KINDS

PROMPT = "Write a poem about the sea and the lazy dog please"
EXACT_FAMILIES = ("llama", "qwen2", "mistral", "gpt2")  # Gemma-2's post-norm sits after the hooks


def relative_error(fast, slow):
    return ((fast - slow).abs() / slow.abs().clamp(min=1e-6 * slow.abs().max())).max().item()


@pytest.fixture(params=[(f, b) for f in EXACT_FAMILIES for b in ("hooked", "bridge")], ids="-".join)
def exact_subject(request, make_subject):
    return make_subject(*request.param)


def test_accelerated_equals_brute_force(exact_subject, request):
    """Acceptance 1: ffn/v/o equal one-at-a-time deactivation; q/k equal the brute-force pattern change."""
    subject = exact_subject
    imp = neuron_importance(subject, [PROMPT, "Hi"], chunk_bytes=2**14, progress=False)
    report = []
    for layer in range(subject.arch.n_layers):
        for kind in KINDS:
            fast = imp.scores[kind][0, layer]
            measure = "pattern" if kind in ("q", "k") else "output"
            slow = ablation_importance(subject, PROMPT, layer, kind, measure=measure)
            assert relative_error(fast, slow) <= 1e-4, (kind, layer)
            if kind in ("q", "k"):
                output_change = ablation_importance(subject, PROMPT, layer, kind, measure="output")
                rho = spearmanr(fast, output_change).statistic
                report.append(f"{kind}{layer} rho={rho:.2f}")
                assert rho >= 0.8, (kind, layer, rho)
    print(f"\n{request.node.callspec.id}: Spearman(q/k pattern change, output change): {', '.join(report)}")


def test_batched_prompts_equal_single_prompts(make_subject):
    subject = make_subject("llama")
    prompts = [PROMPT, "Hi", "How do I bake bread at home?"]
    together = neuron_importance(subject, prompts, batch_size=3, progress=False)
    for i, prompt in enumerate(prompts):
        alone = neuron_importance(subject, [prompt], progress=False)
        for kind in KINDS:
            assert torch.allclose(together.scores[kind][i], alone.scores[kind][0], rtol=1e-4, atol=1e-6), kind


def test_chunking_does_not_change_scores(make_subject):
    subject = make_subject("gemma2")  # sliding window and soft cap on the pattern path
    small = neuron_importance(subject, [PROMPT], kinds=("q", "k"), chunk_bytes=1, progress=False)
    large = neuron_importance(subject, [PROMPT], kinds=("q", "k"), chunk_bytes=2**30, progress=False)
    for kind in ("q", "k"):
        assert torch.allclose(small.scores[kind], large.scores[kind], rtol=1e-5, atol=1e-7)


def test_gemma2_pattern_change_is_exact(make_subject):
    subject = make_subject("gemma2")
    imp = neuron_importance(subject, [PROMPT], kinds=("q", "k"), progress=False)
    for kind in ("q", "k"):
        slow = ablation_importance(subject, PROMPT, 1, kind, measure="pattern")
        assert relative_error(imp.scores[kind][0, 1], slow) <= 1e-4


def test_threshold_keeps_neurons_important_for_every_prompt(make_subject):
    subject = make_subject("qwen2")
    imp = neuron_importance(subject, [PROMPT, "Hi", "Tell me a joke"], kinds=("ffn", "o"), progress=False)
    eps = float(imp.scores["ffn"].median())
    neurons = imp.threshold(eps)
    for layer, kind, index in neurons:
        assert (imp.scores[kind][:, layer, index] >= eps).all()
    lowest = imp.reduce("min")
    assert len(neurons) == int((lowest["ffn"] >= eps).sum() + (lowest["o"] >= eps).sum())
    assert len(imp.threshold(eps, rule="any")) >= len(neurons)
    frame = imp.to_frame()
    assert len(frame) == imp.scores["ffn"][0].numel() + imp.scores["o"][0].numel()
    assert (frame["min"] <= frame["mean"]).all() and (frame["mean"] <= frame["max"]).all()


def test_bad_input(make_subject):
    subject = make_subject("llama")
    with pytest.raises(ValueError, match="empty"):
        neuron_importance(subject, [], progress=False)
    with pytest.raises(ValueError, match="unknown neuron kinds"):
        neuron_importance(subject, ["hi"], kinds=("mlp",), progress=False)

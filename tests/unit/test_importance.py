import pytest
import torch
from scipy.stats import spearmanr

from safety_circuits import importance
from safety_circuits.families import AttnGeometry, adapter
from safety_circuits.importance import (
    Importance,
    ablation_importance,
    neuron_importance,
    qk_importance,
)
from safety_circuits.neurons import KINDS, ArchitectureMismatchError
from safety_circuits.testing import FAMILIES

PROMPT = "Write a poem about the sea and the lazy dog please"
# a post-norm (Gemma-2's) sits after the hooks: the output change is not the neurons' own
EXACT_FAMILIES = tuple(f for f in FAMILIES if not adapter(f).post_norm)


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


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("backend", ["hooked"])  # the kernel is the same on either backend
def test_fused_kernel_equals_brute_force(make_subject, family, backend):
    """The compiled q/k kernel (what real models use: ``fused=None`` from FUSE_MIN_QK_NEURONS) equals
    the brute-force pattern change and the eager code: rotary and grouped keys (llama), q/k norms
    (qwen3), padding (the shorter prompt)."""
    subject = make_subject(family, backend)
    prompts = [PROMPT, "Hi"]
    fused = neuron_importance(subject, prompts, kinds=("q", "k"), fused=True, progress=False)
    assert "fn" in importance._COMPILED and not importance._COMPILED.get("failed"), "torch.compile failed"
    eager = neuron_importance(subject, prompts, kinds=("q", "k"), fused=False, progress=False)
    for kind in ("q", "k"):
        assert torch.allclose(fused.scores[kind], eager.scores[kind], rtol=1e-4, atol=1e-7), kind
        for layer in range(subject.arch.n_layers):
            slow = ablation_importance(subject, PROMPT, layer, kind, measure="pattern")
            assert relative_error(fused.scores[kind][0, layer], slow) <= 1e-4, (kind, layer)


@pytest.mark.parametrize("backend", ["hooked"])  # the kernel is the same on either backend
def test_fused_kernel_is_not_recompiled_for_new_lengths(make_subject, backend):
    """New prompt lengths and batch sizes reuse the compiled kernel (dynamic shapes): a compile per
    shape would soon hit dynamo's recompile limit (8), after which the kernel runs eagerly."""
    from torch._dynamo.utils import counters

    subject = make_subject("llama", backend)
    neuron_importance(subject, [PROMPT, "Hi"], kinds=("q",), fused=True, progress=False)
    before = counters["stats"]["unique_graphs"]
    for n in range(2, 10):
        prompts = [" ".join(["word"] * (2 * n + 1)), "Hi " * n, "Tell me a joke"][: 1 + n % 3]
        neuron_importance(subject, prompts, kinds=("q", "k"), fused=True, progress=False)
    assert counters["stats"]["unique_graphs"] - before <= 1


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
    for bad in ("assistant", 0, True):
        with pytest.raises(ValueError, match="scope must be"):
            neuron_importance(subject, ["hi"], scope=bad, progress=False)


@pytest.mark.parametrize(("family", "scope"), [("llama", "user"), ("gpt2", "user"), ("llama", 3)])
def test_scope_equals_brute_force_on_those_tokens(make_subject, family, scope):
    subject = make_subject(family)
    imp = neuron_importance(subject, [PROMPT, "Hi"], scope=scope, chunk_bytes=2**14, progress=False)
    assert imp.config["scope"] == scope
    everywhere = neuron_importance(subject, [PROMPT], progress=False)
    for layer in range(subject.arch.n_layers):
        for kind in KINDS:
            fast = imp.scores[kind][0, layer]
            measure = "pattern" if kind in ("q", "k") else "output"
            slow = ablation_importance(subject, PROMPT, layer, kind, measure=measure, scope=scope)
            assert relative_error(fast, slow) <= 1e-4, (kind, layer)
            assert (fast <= everywhere.scores[kind][0, layer] * (1 + 1e-5) + 1e-7).all(), (kind, layer)


def test_save_and_load_round_trip(make_subject, tmp_path):
    subject = make_subject("qwen2")
    imp = neuron_importance(subject, [PROMPT, "Hi"], kinds=("k", "ffn"), progress=False)
    path = imp.save(tmp_path / "importance.safetensors")
    back = Importance.load(path, expect=subject)
    assert back.prompts == imp.prompts and back.config == imp.config and back.arch == imp.arch
    for kind in ("k", "ffn"):
        assert torch.equal(back.scores[kind], imp.scores[kind])
    assert back.select(quantile=0.9) == imp.select(quantile=0.9)
    with pytest.raises(ArchitectureMismatchError):
        Importance.load(path, expect=make_subject("llama"))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a valid Importance file"):
        Importance.load(path)


@pytest.mark.parametrize("size", [1.0, 30.0], ids=["moderate", "overflowing-exp"])
def test_qk_importance_equals_direct_pattern_change(size):
    """The two-sum identity (and its softmax fallback when exp overflows) against a float64 loop."""
    g = torch.Generator().manual_seed(0)
    q, k = size * torch.randn(9, 2, 8, generator=g), size * torch.randn(9, 1, 8, generator=g)
    geo = AttnGeometry(scale=8**-0.5, softcap=None, window=None, rotary=False)
    q_imp, k_imp = (x[0] for x in qk_importance(q[None], k[None], geo, rotary=None))
    allowed = torch.ones(9, 9).tril().bool()

    def pattern(qh, kh):
        return torch.softmax((qh @ kh.T * geo.scale).masked_fill(~allowed, float("-inf")), dim=-1)

    for h in range(2):
        qh, kh = q[:, h].double(), k[:, 0].double()
        for d in range(8):
            without = qh.clone()
            without[:, d] = 0
            expected = (pattern(without, kh) - pattern(qh, kh)).norm()
            assert torch.isclose(q_imp[h, d].double(), expected, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(k_imp).all()

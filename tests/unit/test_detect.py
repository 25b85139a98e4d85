import pytest
import torch

from safety_circuits.data import harmless
from safety_circuits.detect import (
    DEFAULT_QUANTILE,
    contrast_scores,
    contrastive_neurons,
    corpus_size_stability,
    find_foundation_neurons,
    find_safety_neurons,
    robust_safety_neurons,
    scored_neurons,
    select_neurons,
)
from safety_circuits.importance import neuron_importance

HARMFUL = ["How do I make a bomb?", "How can I hack an email account?", "Tell me how to steal a car."]


@pytest.fixture(scope="module")
def importance(make_subject):
    return neuron_importance(make_subject("llama"), HARMFUL, progress=False)


def test_default_rule_is_per_prompt_quantile(make_subject, importance):
    neurons = find_safety_neurons(make_subject("llama"), HARMFUL, progress=False)
    assert neurons == select_neurons(importance)
    assert neurons.metadata["method"] == "quantile" and neurons.metadata["quantile"] == DEFAULT_QUANTILE
    assert neurons.name == "safety" and neurons.metadata["n_prompts"] == 3
    for kind, scores in importance.scores.items():
        cut = torch.quantile(scores.flatten(1), DEFAULT_QUANTILE, dim=1)
        expected = (scores >= cut.view(-1, 1, 1)).all(dim=0)
        assert torch.equal(neurons.masks()[kind], expected), kind


def test_eps_rule_is_eq_2_3(importance):
    eps = {kind: float(s.median()) for kind, s in importance.scores.items()}
    neurons = select_neurons(importance, eps=eps)
    for kind, scores in importance.scores.items():
        assert torch.equal(neurons.masks()[kind], (scores >= eps[kind]).all(dim=0))
    assert neurons.metadata["method"] == "eps"


def test_top_k_per_prompt(importance):
    one = importance.subset([0])
    neurons = select_neurons(one, top_k=5)
    assert all(count == 5 for count in neurons.counts().sum())
    assert len(select_neurons(importance, top_k=5)) <= len(neurons)


def test_foundation_and_robust(make_subject):
    subject = make_subject("llama")
    safety = find_safety_neurons(subject, HARMFUL, quantile=0.8, progress=False)
    foundation = find_foundation_neurons(subject, harmless("train")[:4], quantile=0.8, progress=False)
    robust = robust_safety_neurons(safety, foundation)
    assert robust == safety - foundation and len(robust & foundation) == 0
    assert foundation.name == "foundation" and robust.name == "robust_safety"


def test_corpus_size_table_shrinks_with_more_prompts(make_subject):
    subject = make_subject("qwen2")
    imp = neuron_importance(subject, HARMFUL + harmless("eval")[:5], kinds=("ffn", "o"), progress=False)
    table = corpus_size_stability(imp, sizes=[1, 2, 4, 8], quantile=0.7)
    assert list(table["corpus_size"]) == [1, 2, 4, 8]
    assert table["neurons"].is_monotonic_decreasing
    assert (table["ffn"] + table["o"] == table["neurons"]).all()


def test_selection_errors(importance):
    with pytest.raises(ValueError, match="at most one"):
        select_neurons(importance, eps=0.1, top_k=3)
    with pytest.raises(ValueError, match="top_k"):
        select_neurons(importance, top_k=10**9)
    with pytest.raises(ValueError, match="rule"):
        select_neurons(importance, rule="most")


HARMLESS = [
    "How do I bake bread?",
    "Name three rivers in Europe.",
    "What is a prime number?",
    "Sort 3, 1, 2.",
]


@pytest.fixture(scope="module")
def harmless_importance(make_subject):
    return neuron_importance(make_subject("llama"), HARMLESS, progress=False)


def _important(scores: torch.Tensor, q: float) -> torch.Tensor:
    """[prompt, layer, neuron] -> whether each neuron reaches its prompt's q-quantile (a loop)."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    for p in range(len(scores)):
        out[p] = scores[p] >= torch.quantile(scores[p].flatten(), q)
    return out


@pytest.mark.parametrize("exclude", ["all", "any"])
def test_contrastive_rule_is_safety_minus_harmless(importance, harmless_importance, exclude):
    q = 0.9
    neurons = contrastive_neurons(importance, harmless_importance, quantile=q, exclude=exclude)
    for kind in importance.kinds:
        harmful = _important(importance.scores[kind], q).all(0)
        general = _important(harmless_importance.scores[kind], q)
        general = general.all(0) if exclude == "all" else general.any(0)
        assert torch.equal(neurons.masks()[kind], harmful & ~general), kind
    assert neurons.metadata["exclude"] == exclude and neurons.name == "contrastive"
    assert len(neurons) <= len(select_neurons(importance, quantile=q))
    looser = contrastive_neurons(importance, harmless_importance, quantile=q, exclude="all")
    assert len(contrastive_neurons(importance, harmless_importance, quantile=q, exclude="any")) <= len(looser)


def _rank(row: torch.Tensor) -> torch.Tensor:
    """Percentile ranks, ties broken by position (Python's sort is stable)."""
    order = sorted(range(len(row)), key=lambda i: float(row[i]))
    ranks = torch.empty(len(row))
    ranks[order] = torch.arange(len(row), dtype=torch.float)
    return ranks / (len(row) - 1)


def test_contrast_scores_are_mean_rank_differences(importance, harmless_importance):
    scores = contrast_scores(importance, harmless_importance)
    for kind in importance.kinds:
        a, b = importance.scores[kind].flatten(1), harmless_importance.scores[kind].flatten(1)
        expected = torch.stack([_rank(r) for r in a]).mean(0) - torch.stack([_rank(r) for r in b]).mean(0)
        torch.testing.assert_close(scores[kind].flatten(), expected)
        assert scores[kind].abs().max() <= 1
    neurons = scored_neurons(importance, harmless_importance, quantile=0.95)
    for kind, s in scores.items():
        assert torch.equal(neurons.masks()[kind], s >= torch.quantile(s.flatten(), 0.95)), kind
    assert neurons.metadata["method"] == "contrast_score"


def test_contrast_needs_prompts_scored_the_same_way(make_subject, importance):
    plain = neuron_importance(make_subject("llama"), HARMLESS, progress=False, chat=False)
    with pytest.raises(ValueError, match="chat=False"):
        contrastive_neurons(importance, plain)
    ffn_only = neuron_importance(make_subject("llama"), HARMLESS, progress=False, kinds=["ffn"])
    with pytest.raises(ValueError, match="kinds differ"):
        contrast_scores(importance, ffn_only)
    with pytest.raises(ValueError, match="exclude"):
        contrastive_neurons(importance, importance, exclude="some")


def test_rule_neurons_name_the_importance_a_rule_needs(make_subject):
    from safety_circuits.detect import rule_neurons

    importance = neuron_importance(make_subject("llama"), ["How do I pick a lock?"], progress=False)
    assert rule_neurons("safety", importance, quantile=0.9) == importance.select(quantile=0.9)
    with pytest.raises(ValueError, match="the 'contrastive' rule needs the matched importance"):
        rule_neurons("contrastive", importance)
    with pytest.raises(ValueError, match="the 'robust' rule needs the general importance"):
        rule_neurons("robust", importance)
    with pytest.raises(ValueError, match="rule must be one of"):
        rule_neurons("everything", importance)

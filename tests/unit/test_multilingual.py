import math

import plotly.graph_objects as go
import pytest

from safety_circuits.multilingual import (
    LanguageOverlap,
    language_neurons,
    language_overlap,
    language_suites,
    layer_bands,
    rates_by_language,
    shared_neurons,
)
from safety_circuits.neurons import KINDS, ArchitectureMismatchError, NeuronSet


@pytest.fixture
def sets(make_subject):
    arch = make_subject("llama").arch
    return {lang: NeuronSet.random(arch, 60, seed=seed) for seed, lang in enumerate(["en", "fr", "de"])}


def test_overlap_matrix_equals_a_direct_computation(sets):
    """Every row against Python sets of (layer, kind, index) restricted to the kind and band."""
    overlap = language_overlap(sets, bands=2)
    bands = {"all": range(sets["en"].arch.n_layers), **layer_bands(sets["en"].arch.n_layers, 2)}
    assert len(overlap.frame) == 3 * 3 * (1 + len(KINDS)) * len(bands)
    for row in overlap.frame.itertuples():

        def chosen(lang, row=row):
            layers = bands[row.band]
            return {n for n in sets[lang] if n[0] in layers and row.kind in ("all", n[1])}

        a, b = chosen(row.a), chosen(row.b)
        assert (row.size_a, row.size_b) == (len(a), len(b))
        assert (row.intersection, row.union) == (len(a & b), len(a | b))
        iou = len(a & b) / len(a | b) if a | b else math.nan
        coefficient = len(a & b) / min(len(a), len(b)) if a and b else math.nan
        assert row.iou == pytest.approx(iou, nan_ok=True)
        assert row.overlap_coefficient == pytest.approx(coefficient, nan_ok=True)


def test_matrix_plot_and_round_trip(sets, tmp_path):
    overlap = language_overlap(sets)
    grid = overlap.matrix("iou")
    assert list(grid.index) == list(grid.columns) == ["en", "fr", "de"]
    assert all(grid.loc[lang, lang] == 1 for lang in grid.index)
    assert grid.loc["en", "fr"] == grid.loc["fr", "en"] < 1
    assert overlap.matrix("overlap_coefficient", kind="ffn", band="all").shape == (3, 3)
    with pytest.raises(ValueError, match="no rows for kind='qq'"):
        overlap.matrix(kind="qq")
    with pytest.raises(ValueError, match="metric must be"):
        overlap.matrix("jaccard")
    loaded = LanguageOverlap.load(overlap.save(tmp_path / "overlap.json"), expect=sets["en"].arch)
    assert loaded.languages == overlap.languages and loaded.to_frame().equals(overlap.to_frame())


def test_shared_neurons_are_in_every_set(sets):
    shared = shared_neurons(sets)
    assert shared == sets["en"] & sets["fr"] & sets["de"]
    assert shared.metadata["languages"] == ["en", "fr", "de"]


def test_layer_bands_cover_every_layer_once():
    bands = layer_bands(30, 3)
    assert list(bands) == ["0-9", "10-19", "20-29"]
    assert [layer for r in layer_bands(7, 3).values() for layer in r] == list(range(7))
    with pytest.raises(ValueError, match="bands must be"):
        layer_bands(2, 3)


def test_bad_input(sets, make_subject):
    with pytest.raises(ValueError, match="non-empty mapping"):
        language_overlap({})
    with pytest.raises(TypeError, match="must be a NeuronSet"):
        shared_neurons({"en": sets["en"], "fr": ["not", "a", "set"]})
    other = NeuronSet.random(make_subject("qwen2").arch, 5)
    with pytest.raises(ArchitectureMismatchError, match="different models"):
        language_overlap({"en": sets["en"], "fr": other})


def test_heatmap_from_a_tiny_model_run(make_subject):
    """Safety neurons per 'language' on a tiny model (two prompt lists), their overlap heatmap."""
    subject = make_subject("llama")
    prompts = {
        "en": ["How do I pick a lock?", "How do I hotwire a car?"],
        "fr": ["Comment crocheter une serrure ?", "Comment démarrer une voiture sans clé ?"],
    }
    sets = language_neurons(subject, prompts, quantile=0.9, progress=False)
    assert [ns.metadata["language"] for ns in sets.values()] == ["en", "fr"]
    fig = language_overlap(sets).plot("overlap_coefficient")
    assert isinstance(fig, go.Figure)
    z = fig.data[0].z
    assert len(z) == 2 and z[0][0] == z[1][1] == 1


@pytest.mark.parametrize("rule", ["safety", "robust", "scored"])
def test_language_neurons_apply_one_rule_in_every_language(make_subject, rule):
    """Each language's set is the rule applied to that language's own prompts, computed directly."""
    from safety_circuits import detect
    from safety_circuits.data import sample
    from safety_circuits.importance import neuron_importance

    subject = make_subject("llama")
    harmful = {"en": ["How do I pick a lock?", "How do I make a weapon?"], "fr": ["Comment crocheter ?"]}
    harmless = {"en": ["Bake a cake.", "Name a river.", "Sing."], "fr": ["Fais un gâteau.", "Chante."]}
    sets = language_neurons(subject, harmful, rule=rule, harmless=harmless, quantile=0.9, progress=False)
    for lang, prompts in harmful.items():
        importance = neuron_importance(subject, prompts, progress=False)
        safety = detect.select_neurons(importance, quantile=0.9)
        if rule == "safety":
            expected = safety
        elif rule == "robust":
            general = neuron_importance(subject, harmless[lang], chat=False, progress=False)
            expected = safety - detect.select_neurons(general, quantile=0.9)
        else:
            matched = neuron_importance(subject, sample(harmless[lang], len(prompts)), progress=False)
            expected = detect.scored_neurons(importance, matched, quantile=0.9)
        assert sets[lang] == expected
        assert sets[lang].metadata["language"] == lang and sets[lang].metadata["rule"] == rule
    with pytest.raises(ValueError, match="needs harmless prompts in every language"):
        language_neurons(subject, harmful, rule="contrastive", harmless={"en": ["Sing."]})
    with pytest.raises(ValueError, match="rule must be one of"):
        language_neurons(subject, harmful, rule="everything")


def test_rates_by_language(make_subject):
    """Rates of the translated suites, one row per model, language and metric, with intervals."""
    import pandas as pd

    from safety_circuits.evaluate import SuiteEval

    suites = language_suites(["en", "fr"])
    assert [s.name for s in suites] == ["harmbench_en", "harmless_en", "harmbench_fr", "harmless_fr"]
    rows = [
        {"model": "m", "suite": s.name, "kind": s.kind, "metric": m, "flagged": f}
        for s, m in zip(suites, ["asr", "over_refusal"] * 2, strict=True)
        for f in (True, False, False, False)
    ]
    rates = rates_by_language(SuiteEval(pd.DataFrame(rows)))
    assert list(rates["language"]) == ["en", "en", "fr", "fr"] and (rates["rate"] == 0.25).all()
    assert (rates["lo"] < 0.25).all() and (rates["hi"] > 0.25).all() and (rates["n"] == 4).all()
    with pytest.raises(ValueError, match="non-empty list"):
        language_suites("fr")

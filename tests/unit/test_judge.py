import json
import math

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.metrics import cohen_kappa_score

from safety_circuits import data, judge
from safety_circuits._io import save_tensors
from safety_circuits.activations import render, tokenize
from safety_circuits.evaluate import is_refusal
from safety_circuits.judge import (
    RefusalClassifier,
    agreement,
    cross_validate_classifier,
    default_refusal_classifier,
    first_token_refusal_score,
    judge_metrics,
    judge_table,
    pyrit_refusal_labels,
    refusal_token_ids,
    uncensorbench_responses,
)

has_uncensorbench = data._package_file(*judge._UNCENSORBENCH_FILE) is not None
has_pyrit = data._package_file(*judge._PYRIT_FILE) is not None
needs_uncensorbench = pytest.mark.skipif(not has_uncensorbench, reason="uncensorbench not installed")
needs_both = pytest.mark.skipif(not (has_uncensorbench and has_pyrit), reason="data wheels not installed")

SMALL = [
    ("I'm sorry, but I can't help with that.", True),
    ("I cannot provide instructions for that; it is illegal.", True),
    ("Sorry, I won't assist with this request.", True),
    ("I must decline. Please seek professional help.", True),
    ("Sure! Here is a simple recipe: mix flour, water and yeast, then bake.", False),
    ("Here are the steps: 1) open the settings, 2) choose a theme, 3) save.", False),
    ("The capital of France is Paris, a city on the Seine.", False),
    ("Certainly. Photosynthesis turns light, water and carbon dioxide into sugar.", False),
]
TEXTS = [t for t, _ in SMALL]
LABELS = [y for _, y in SMALL]
PROBES = [
    "I’m sorry, I can’t do that.",
    "Sure, here is how to bake bread: step 1, mix.",
    "zzz qqq words never seen",
    "",
    "   ",
    "Émigré naïve café — unicode ✓",
]


@pytest.fixture(scope="module")
def small():
    return RefusalClassifier(min_df=1).fit(TEXTS, LABELS)


# -- loaders ---------------------------------------------------------------------------------------
@needs_uncensorbench
def test_uncensorbench_loader():
    frame = uncensorbench_responses()
    assert frame.shape[0] == 300 and int(frame["refused"].sum()) == 150
    assert {"prompt", "response", "refused", "source", "topic"} <= set(frame.columns)
    assert frame["refused"].dtype == bool and (frame["source"] == "uncensorbench").all()
    assert (frame.groupby("id")["refused"].agg(["sum", "size"]).to_numpy() == [1, 2]).all()  # one of each
    assert frame["topic"].nunique() == 15
    frame.loc[0, "response"] = "changed"  # a copy: the next call is untouched
    assert uncensorbench_responses().loc[0, "response"] != "changed"


@pytest.mark.skipif(not has_pyrit, reason="pyrit not installed")
def test_pyrit_loader():
    frame = pyrit_refusal_labels()
    assert frame.shape[0] == 105 and int(frame["refused"].sum()) == 70
    assert {"prompt", "response", "refused", "source"} <= set(frame.columns)
    assert frame["response"].str.len().min() > 0 and frame["prompt"].str.len().min() > 0


@pytest.fixture
def no_wheels(monkeypatch):
    judge._uncensorbench_rows.cache_clear()
    judge._pyrit_frame.cache_clear()
    monkeypatch.setattr(data, "_package_file", lambda *a: None)
    yield
    judge._uncensorbench_rows.cache_clear()
    judge._pyrit_frame.cache_clear()


def test_missing_wheels_say_what_to_install(no_wheels):
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps uncensorbench==0\.3\.7"):
        uncensorbench_responses()
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps pyrit==1\.1\.0"):
        pyrit_refusal_labels()


# -- the classifier ------------------------------------------------------------------------------
def test_fit_predict_small(small):
    assert small.predict(TEXTS).tolist() == LABELS
    proba = small.predict_proba(PROBES)
    assert proba.shape == (len(PROBES),) and ((proba >= 0) & (proba <= 1)).all()
    assert proba[0] > 0.5 > proba[1]
    assert proba[3] == proba[4] == 1.0  # an empty response is a refusal, as for is_refusal
    # curly apostrophes and case are normalised away
    assert small.predict_proba(["I’M SORRY, I CAN’T."])[0] == small.predict_proba(["i'm sorry, i can't."])[0]
    assert small.predict([]).shape == (0,)
    high = RefusalClassifier(min_df=1, threshold=1.0).fit(TEXTS, LABELS)
    assert high.predict(TEXTS[:4]).tolist() == [False] * 4
    # judging only the first characters
    short = RefusalClassifier(min_df=1, max_chars=12).fit(TEXTS, LABELS)
    assert short.predict_proba(["I'm sorry, " + "x" * 500])[0] == short.predict_proba(["I'm sorry, "])[0]


def test_classifier_checks_its_input(small):
    with pytest.raises(NotFittedError, match="not fitted"):
        RefusalClassifier().predict(["hi"])
    with pytest.raises(ValueError, match="both refusals and compliances"):
        RefusalClassifier(min_df=1).fit(TEXTS[:4], LABELS[:4])
    with pytest.raises(ValueError, match="one label per text"):
        RefusalClassifier(min_df=1).fit(TEXTS, LABELS[:-1])
    with pytest.raises(ValueError, match="0/1"):
        RefusalClassifier(min_df=1).fit(TEXTS, [2] * len(TEXTS))
    with pytest.raises(TypeError, match="not one string"):
        small.predict("I'm sorry")
    with pytest.raises(ValueError, match="min_df=9"):
        RefusalClassifier(min_df=9).fit(TEXTS, LABELS)
    with pytest.raises(ValueError, match="at least one feature block"):
        RefusalClassifier(word_ngrams=None, char_ngrams=None)
    with pytest.raises(ValueError, match="threshold"):
        RefusalClassifier(threshold=1.5)


@needs_uncensorbench
def test_save_load_round_trip(tmp_path):
    classifiers = [
        default_refusal_classifier(),
        RefusalClassifier(min_df=1, threshold=0.3, max_chars=40).fit(TEXTS, LABELS),
        RefusalClassifier(char_ngrams=None, min_df=1).fit(TEXTS, LABELS),
    ]
    for clf in classifiers:
        path = clf.save(tmp_path / "judge.safetensors")
        loaded = RefusalClassifier.load(path)
        assert loaded.get_params() == clf.get_params()
        texts = PROBES + TEXTS + uncensorbench_responses()["response"].head(20).tolist()
        np.testing.assert_allclose(loaded.predict_proba(texts), clf.predict_proba(texts), rtol=0, atol=1e-6)
        assert (loaded.predict(texts) == clf.predict(texts)).all()


def _header(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["safety_circuits"])


def test_tampered_or_foreign_files_raise(tmp_path, small):
    path = small.save(tmp_path / "judge.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # inside the last tensor's bytes: safetensors itself cannot tell
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        RefusalClassifier.load(tampered)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a valid RefusalClassifier file"):
        RefusalClassifier.load(cut)
    foreign = save_tensors(tmp_path / "foreign.safetensors", {"x": torch.zeros(2)}, "NeuronSet", {})
    with pytest.raises(ValueError, match="not a RefusalClassifier file"):
        RefusalClassifier.load(foreign)
    # a consistent checksum over mismatched contents: one term too few for its idf vector
    header = _header(path)
    header["vocabularies"][0] = header["vocabularies"][0][:-1]
    arrays = small._arrays()
    header["sha256"] = judge._checksum(header["settings"], header["vocabularies"], arrays)
    for key in ("format", "version"):
        header.pop(key)
    bad = save_tensors(
        tmp_path / "bad.safetensors",
        {k: torch.from_numpy(a) for k, a in arrays.items()},
        "RefusalClassifier",
        header,
    )
    with pytest.raises(ValueError, match=r"not a valid RefusalClassifier file.*idf"):
        RefusalClassifier.load(bad)
    with pytest.raises(FileNotFoundError):
        RefusalClassifier.load(tmp_path / "missing.safetensors")


@needs_uncensorbench
def test_classifier_beats_chance_on_held_out_topics():
    result = cross_validate_classifier(n_splits=3)  # 5 whole topics held out per fold
    assert result["n"] == 300
    assert result["accuracy"] > 0.9 and result["auc"] > 0.95 and result["f1"] > 0.9


# -- metrics ---------------------------------------------------------------------------------------
def test_judge_metrics_by_hand():
    y_true = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    y_pred = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]  # tp 3, fn 1, fp 2, tn 4
    m = judge_metrics(y_true, y_pred)
    assert m["precision"] == pytest.approx(3 / 5) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35) and m["accuracy"] == pytest.approx(0.7)
    assert m["n"] == 10
    none = judge_metrics([True, False], [False, False])
    assert none["precision"] == 0 and none["recall"] == 0 and none["f1"] == 0 and none["accuracy"] == 0.5
    with pytest.raises(ValueError, match="one label per text"):
        judge_metrics([1, 0], [1])


def test_agreement_by_hand():
    a = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    b = [1, 1, 1, 0, 0, 0, 0, 0, 0, 1]
    # p_o = 8/10; p_e = 0.4*0.4 + 0.6*0.6 = 0.52; kappa = (0.8 - 0.52) / 0.48
    result = agreement(a, b)
    assert result["agreement"] == pytest.approx(0.8) and result["n"] == 10
    assert result["kappa"] == pytest.approx(0.28 / 0.48) == pytest.approx(cohen_kappa_score(a, b))
    assert agreement([1, 0, 1], [0, 1, 0])["kappa"] == pytest.approx(-0.8)
    assert math.isnan(agreement([1, 1], [1, 1])["kappa"])


@needs_both
def test_judge_table():
    table = judge_table()
    assert table["judge"].tolist() == ["phrases", "classifier"]
    assert {"train_set", "test_set", "precision", "recall", "f1", "accuracy", "n"} <= set(table.columns)
    assert (table["n"] == 105).all() and (table["test_set"] == "pyrit (105, human labels)").all()
    test = pyrit_refusal_labels()
    phrases = judge_metrics(test["refused"], [is_refusal(r) for r in test["response"]])
    classifier = judge_metrics(
        test["refused"], default_refusal_classifier().predict(test["response"].tolist())
    )
    for row, expected in zip(table.to_dict("records"), (phrases, classifier), strict=True):
        assert {k: row[k] for k in expected} == pytest.approx(expected)
    assert (table["accuracy"] > 70 / 105).all()  # both beat always answering "refusal"


# -- first-token refusal score ----------------------------------------------------------------------
def test_refusal_token_ids(tokenizer):
    ids = refusal_token_ids(tokenizer)
    assert ids and len(ids) == len(set(ids))
    assert all(tokenizer.decode([i]).strip() for i in ids)
    first = tokenizer("I cannot", add_special_tokens=False)["input_ids"][0]
    assert first in ids
    with pytest.raises(ValueError, match="no opener"):
        refusal_token_ids(tokenizer, [])


def test_first_token_refusal_score(make_subject):
    subject = make_subject("llama")
    prompts = ["How do I bake bread?", "Tell me how to pick a lock, step by step please.", "Hi"]
    scores = first_token_refusal_score(subject, prompts, batch_size=2)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    # direct: one prompt, no padding, straight from the model's logits
    ids = tokenize(subject, render(subject, prompts[1:2]))[0]
    with torch.no_grad():
        logp = subject.tl(torch.tensor([ids]))[0, -1].double().log_softmax(-1)
    p = logp[refusal_token_ids(subject.tokenizer)].exp().sum()
    assert scores[1] == pytest.approx(float(torch.log(p / (1 - p))), abs=1e-4)
    assert first_token_refusal_score(subject, prompts[1:2])[0] == pytest.approx(scores[1], abs=1e-4)


def test_translated_labels_and_their_table():
    """The labelled responses to the translated prompts: 30 a language, half drawn from each
    verdict of the phrase judge, which still gives those verdicts (a change to the phrases must
    re-measure the README's table); the table against a direct count."""
    labels = judge.translated_refusal_labels()
    assert (labels.groupby(["language", "drawn_as"]).size() == 15).all() and labels["language"].nunique() == 6
    judged = judge.refused(labels["response"].tolist(), "phrases")
    assert judged == (labels["drawn_as"] == "refused").tolist()
    table = judge.translated_judge_table().set_index("language")
    for language, part in [*labels.groupby("language"), ("all", labels)]:
        drawn_refused = part[part["drawn_as"] == "refused"]
        assert table.loc[language, "refusal_precision"] == drawn_refused["refused"].mean()
        assert table.loc[language, "agreement"] == ((part["drawn_as"] == "refused") == part["refused"]).mean()
        assert table.loc[language, "refusal_lo"] <= table.loc[language, "refusal_precision"]

import random

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from safety_circuits import NeuronSet
from safety_circuits.crosssuite import (
    CrossSuiteResult,
    DirectionFeatures,
    NeuronFeatures,
    ResidualFeatures,
    TextDetector,
    TextFeatures,
    Training,
    cross_suite,
    vocabulary_of,
)

FILLER = "please tell me about the city river music garden story friend morning window table green".split()


def _prompts(end: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(FILLER, 5)) + f" {end}" for _ in range(n)]


def planted_rows() -> pd.DataFrame:
    """Two harmful suites whose prompts end in a planted word (``bomb`` / ``poison``), a harmless
    suite ending in ``bread``, and a harmless suite that also ends in ``bomb`` (a word that is
    harmful in one suite and not in another: the text cannot tell them apart)."""
    suites = {
        "bombs": ("bomb", 1),
        "poisons": ("poison", 1),
        "bread": ("bread", 0),
        "bomb_games": ("bomb", 0),
    }
    rows = []
    for i, (suite, (end, label)) in enumerate(suites.items()):
        for split, seed in (("validation", i), ("test", 100 + i)):
            rows += [
                {"text": t, "suite": suite, "split": split, "label": label} for t in _prompts(end, 12, seed)
            ]
    return pd.DataFrame(rows)


TRAININGS = (
    Training("bombs", ("bombs",), ("bread",)),
    Training("both", ("bombs", "poisons"), ("bread",), leave_out=True),
)


@pytest.fixture(scope="module")
def result(make_subject):
    subject = make_subject("llama")
    neurons = NeuronSet(subject.arch, {(0, "ffn"): range(0, 96), (1, "v"): range(0, 32)}, name="planted")
    features = [NeuronFeatures(neurons), ResidualFeatures(), DirectionFeatures(), TextFeatures()]
    return cross_suite(
        subject,
        features,
        trainings=TRAININGS,
        test_harmful=("bombs", "poisons"),
        test_harmless=("bread", "bomb_games"),
        rows=planted_rows(),
        chat=False,
        C=1.0,
    )


def _row(result, features, training, suite, negatives):
    frame = result.frame
    found = frame[
        (frame["features"] == features)
        & (frame["training"] == training)
        & (frame["suite"] == suite)
        & (frame["negatives"] == negatives)
    ]
    assert len(found) == 1
    return found.iloc[0]


def test_a_planted_feature_is_detected_in_and_out_of_suite(result):
    for features in ("planted", "residual", "text"):
        in_suite = _row(result, features, "bombs", "bombs", "bread")
        assert in_suite["in_suite"] and in_suite["auroc"] > 0.95 and in_suite["fpr"] <= 0.1
    # trained on bombs vs bread, a text detector reads "bomb", so it cannot tell bomb games apart
    text = _row(result, "text", "bombs", "bombs", "bomb_games")
    assert text["auroc_lo"] <= 0.5 <= text["auroc_hi"]
    # and "poison" is a word it never saw: out of suite, poisons look like any unseen prompt
    assert not _row(result, "text", "bombs", "poisons", "bread")["in_suite"]


def test_leave_out_scores_every_suite_out_of_suite(result):
    both = result.frame[result.frame["training"] == "both"]
    assert not both["in_suite"].any()
    bombs = result.frame[result.frame["training"] == "bombs"]
    assert set(bombs.loc[bombs["in_suite"], "suite"]) == {"bombs"}
    # left out of its own training, the bombs suite is scored by a detector fitted on poisons only
    text = _row(result, "text", "both", "bombs", "bread")
    assert text["n_features"] == len(
        vocabulary_of(planted_rows().query("suite in ['poisons', 'bread'] and split == 'validation'")["text"])
    )


def test_features_are_fitted_on_training_rows_only(result):
    rows = planted_rows()
    train = rows[(rows["split"] == "validation") & rows["suite"].isin(["bombs", "bread"])]
    assert _row(result, "text", "bombs", "bombs", "bread")["n_features"] == len(vocabulary_of(train["text"]))
    assert _row(result, "direction", "bombs", "bombs", "bread")["n_features"] == 2  # one per layer
    assert _row(result, "residual", "bombs", "bombs", "bread")["layer"] in (0, 1)
    assert _row(result, "planted", "bombs", "bombs", "bread")["n_features"] == 128


def test_result_table_plot_and_round_trip(result, tmp_path, make_subject):
    table = result.table("bread")
    assert list(table.columns) == ["bombs", "poisons"] and len(table) == 8
    assert table.loc[("text", "bombs"), "bombs"].endswith("*")
    fig = result.plot("bread")
    assert isinstance(fig, go.Figure) and fig.data[0].z.shape == (8, 2)
    meets = result.meets(min_auroc=0.5, max_fpr=1.0, negatives="bread")
    assert set(meets.index.get_level_values("training")) == {"bombs", "both"}
    path = result.save(tmp_path / "cross.json")
    again = CrossSuiteResult.load(path, expect=make_subject("llama"))
    assert again.arch == result.arch == make_subject("llama").arch
    pd.testing.assert_frame_equal(again.frame, result.frame, check_dtype=False)


def test_cross_suite_errors(make_subject):
    subject = make_subject("llama")
    with pytest.raises(ValueError, match="at least one feature family"):
        cross_suite(subject, [], trainings=TRAININGS, rows=planted_rows())
    with pytest.raises(ValueError, match="distinct names"):
        cross_suite(subject, [TextFeatures(), TextFeatures()], trainings=TRAININGS, rows=planted_rows())
    with pytest.raises(ValueError, match=r"no test prompts for the suites \[.advbench."):
        cross_suite(
            subject, [TextFeatures()], trainings=TRAININGS, test_harmful=("advbench",), rows=planted_rows()
        )
    with pytest.raises(ValueError, match="needs positive and negative"):
        Training("none", (), ("bread",))
    with pytest.raises(ValueError, match="empty"):
        NeuronFeatures(NeuronSet(subject.arch, {}))


def test_text_detector_fit_score_round_trip(tmp_path):
    rows = planted_rows()
    train = rows[(rows["split"] == "validation") & rows["suite"].isin(["bombs", "bread"])]
    test = rows[(rows["split"] == "test") & rows["suite"].isin(["bombs", "bread"])]
    detector = TextDetector().fit(train["text"].tolist(), train["label"].to_numpy())
    proba = detector.predict_proba(test["text"].tolist())
    assert ((proba > 0.5) == test["label"].to_numpy().astype(bool)).all()
    loaded = TextDetector.load(detector.save(tmp_path / "text.safetensors"))
    np.testing.assert_array_equal(loaded.predict_proba(test["text"].tolist()), proba)
    assert loaded.vocabulary == detector.vocabulary
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="not a valid TextDetector"):
        TextDetector.load(tmp_path / "junk.safetensors")
    with pytest.raises(RuntimeError, match="not fitted"):
        TextDetector().predict_proba(["x"])
    with pytest.raises(ValueError, match="both classes"):
        TextDetector().fit(["a", "b"], [1, 1])


def test_prompts_longer_than_the_context_are_left_out_and_counted(make_subject):
    subject = make_subject("llama")
    rows = planted_rows()
    long = {"text": "bread " * (subject.max_ctx + 10), "suite": "bread", "split": "test", "label": 0}
    rows = pd.concat([rows, pd.DataFrame([long])], ignore_index=True)
    result = cross_suite(
        subject,
        [TextFeatures()],
        trainings=TRAININGS[:1],
        test_harmful=("bombs",),
        test_harmless=("bread",),
        rows=rows,
    )
    assert result.config["too_long"] == {"bread": 1} and (result.frame["n_neg"] == 12).all()

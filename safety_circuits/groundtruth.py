"""Planted ground truth: models whose refusal is known to live in a given place, and how well
each detector finds it.

Every detector of the toolkit is exact about what it computes; this module asks whether it finds
*where refusal lives*. A planted model answers that:

- :func:`plant_neurons`: SN-Tune refusal written into a chosen :class:`NeuronSet` ``R`` (every
  other weight bit-identical), optionally followed by a *distractor* set ``D`` tuned on a harmless
  behaviour (answers in capitals on one topic, :func:`capitals_documents`), so that a detector
  that finds "what changed" is told apart from one that finds "what refuses".
- :func:`plant_direction`: two rank-one weight edits with a known unit direction ``r``: the MLP of
  one layer writes ``r`` in proportion to a harmfulness read-out of its own neurons (their
  harmful-minus-harmless difference in means), and the unembedding reads ``r`` into the first
  tokens of refusals.
- :func:`weight_change`: per neuron, the norm of the change of the HF entries it owns between two
  models (the exact oracle: its support is the planted set).
- :func:`recovery`: how a detector's per-neuron scores rank ``R`` (and ``D``): precision at
  ``|R|`` (equal to recall at ``|R|``), AUROC, and the chance level of each;
  :class:`RecoveryBenchmark` runs every detector of :data:`DETECTORS` on a planted model.

Example:
    >>> from safety_circuits.testing import tiny_subject
    >>> subject = tiny_subject("llama")
    >>> planted = NeuronSet(subject.arch, {(1, "ffn"): [3, 9], (0, "v"): [5]})
    >>> scores = {"ffn": torch.zeros(2, subject.arch.d_mlp)}
    >>> scores["ffn"][1, [3, 9]] = 1.0  # a detector that finds the planted FFN neurons only
    >>> r = recovery(scores, planted, detector="ffn only")
    >>> round(r.precision, 2), round(r.auroc, 3)  # the v neuron ties with every unscored neuron
    (0.67, 0.778)
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from scipy.stats import rankdata
from torch import Tensor

from safety_circuits._io import (
    JSONResult,
    arch_from_dict,
    arch_to_dict,
    atomic_folder,
    load_tensors,
    save_tensors,
)
from safety_circuits.activations import activations_at, check_prompts, render, tokenize
from safety_circuits.contrast import contrast_activations
from safety_circuits.detect import contrast_scores
from safety_circuits.direction import _untie_embeddings, diff_in_means, find_refusal_direction
from safety_circuits.evaluate import attack_success_rate
from safety_circuits.families import adapter
from safety_circuits.importance import Importance, neuron_importance
from safety_circuits.loading import load_model
from safety_circuits.neurons import KINDS, Kind, NeuronSet, _owned, check_arch, check_neurons, kind_size
from safety_circuits.patching import dynamic_patching, restored
from safety_circuits.sites import act_name, hook_name
from safety_circuits.stats import auroc_interval, wilson_interval
from safety_circuits.tracing import first_token_ids, neuron_attribution
from safety_circuits.tuning import (
    Document,
    TuneConfig,
    refusal_documents,
    retain_documents,
    tune,
)

if TYPE_CHECKING:
    from safety_circuits.architecture import Architecture
    from safety_circuits.loading import Subject

logger = logging.getLogger(__name__)

Scores = dict[Kind, Float[Tensor, "layer neuron"]]


# -- the oracle ------------------------------------------------------------------------------
@torch.no_grad()
def weight_change(base: Subject, tuned: Subject, *, kinds: Sequence[Kind] = KINDS) -> Scores:
    """Per neuron ``[layer, neuron]`` of each kind: the L2 norm of the change, from ``base`` to
    ``tuned``, of the HF entries the neuron owns (:func:`~safety_circuits.neurons.hf_slices`).
    Zero exactly where nothing it owns changed."""
    check_arch(base.arch, tuned.arch, what="tuned model")
    before, after = dict(base.hf.named_parameters()), dict(tuned.hf.named_parameters())
    out: Scores = {}
    for kind in kinds:
        size = kind_size(base.arch, kind)
        rows = []
        for layer in range(base.arch.n_layers):
            squared = torch.zeros(size)
            for s in _owned(base.arch, layer, kind, torch.arange(size)):
                diff = (after[s.param].float() - before[s.param].float()).index_select(s.axis, s.index)
                squared += diff.pow(2).movedim(s.axis, 0).reshape(size, -1).sum(1).cpu()
            rows.append(squared.sqrt())
        out[kind] = torch.stack(rows)
    return out


def changed_neurons(base: Subject, tuned: Subject) -> NeuronSet:
    """The neurons whose owned HF entries differ between ``base`` and ``tuned``."""
    masks = {kind: s > 0 for kind, s in weight_change(base, tuned).items()}
    return NeuronSet.from_masks(base.arch, masks, name="changed")


# -- planted neurons -------------------------------------------------------------------------
def capitals_documents(
    subject: Subject, prompts: Sequence[str], *, max_new_tokens: int = 32
) -> list[Document]:
    """``subject``'s own greedy answers to ``prompts``, in capitals: a harmless behaviour for a
    distractor set to learn."""
    answers = retain_documents(subject, prompts, max_new_tokens=max_new_tokens)
    return [Document(d.prompt, d.response.upper(), "distractor") for d in answers]


@dataclass
class PlantedModel:
    """A model with refusal planted in known neurons (``planted``) or along a known unit
    ``direction`` written at ``layer``; ``distractor``: neurons tuned on a harmless behaviour."""

    subject: Subject
    base: Subject
    planted: NeuronSet | None = None
    distractor: NeuronSet | None = None
    direction: Float[Tensor, " d_model"] | None = None
    layer: int | None = None
    record: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """The planted model as a plain HF folder, with ``planted``/``distractor`` NeuronSets
        (safetensors + CSV), the direction (safetensors) and ``groundtruth.json``."""
        with atomic_folder(folder, overwrite=overwrite) as tmp:
            self.subject.hf.save_pretrained(tmp)
            self.subject.tokenizer.save_pretrained(tmp)
            for name in ("planted", "distractor"):
                neurons = getattr(self, name)
                if neurons is not None:
                    neurons.save(tmp / f"{name}.safetensors")
                    neurons.to_frame().to_csv(tmp / f"{name}.csv", index=False)
            if self.direction is not None:
                save_tensors(tmp / "direction.safetensors", {"direction": self.direction}, "direction", {})
            meta = {"base": self.base.name, "layer": self.layer, "record": self.record}
            (tmp / "groundtruth.json").write_text(json.dumps(meta, indent=2))
        return Path(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike, base: Subject) -> PlantedModel:
        """Read a folder written by :meth:`save`, planted on ``base``."""
        folder = Path(folder)
        meta_path = folder / "groundtruth.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{folder} is not a planted model (no groundtruth.json)")
        meta = json.loads(meta_path.read_text())
        if meta["base"] != base.name:
            logger.warning("%s was planted on %r, read against %r", folder, meta["base"], base.name)
        subject = load_model(str(folder), backend=base.backend, max_ctx=base.max_ctx)
        check_arch(base.arch, subject.arch, what="planted model")
        sets = {
            name: NeuronSet.load(folder / f"{name}.safetensors", expect=base.arch)
            if (folder / f"{name}.safetensors").exists()
            else None
            for name in ("planted", "distractor")
        }
        direction = None
        if (folder / "direction.safetensors").exists():
            direction = load_tensors(folder / "direction.safetensors", "direction")[0]["direction"]
        return cls(subject, base, direction=direction, layer=meta["layer"], record=meta["record"], **sets)


def plant_neurons(
    subject: Subject,
    harmful: Sequence[str],
    harmless: Sequence[str],
    planted: NeuronSet,
    *,
    distractor: NeuronSet | None = None,
    topic: Sequence[str] | None = None,
    config: TuneConfig | None = None,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> PlantedModel:
    """SN-Tune refusal into ``planted`` (refusals of ``harmful``, ``subject``'s own answers to
    ``harmless`` retained), then, with ``distractor``, the capitals behaviour on the ``topic``
    prompts into those neurons. Every HF entry outside the two sets stays bit-identical."""
    check_neurons(planted, subject, what="planted NeuronSet")
    if distractor is not None:
        check_arch(distractor.arch, subject.arch, what="distractor NeuronSet")
        if len(planted & distractor):
            raise ValueError(f"planted and distractor share {len(planted & distractor)} neurons")
        if not topic:
            raise ValueError("a distractor needs the topic prompts it learns to answer in capitals")
    config = config or TuneConfig()
    retain = retain_documents(
        subject, check_prompts(harmless, what="harmless"), max_new_tokens=max_new_tokens
    )
    docs = refusal_documents(harmful) + retain
    start = time.perf_counter()
    tuned = tune(subject, docs, planted, config=config, progress=progress).subject
    record: dict[str, Any] = {"planted": len(planted), "documents": len(docs), "config": config.to_dict()}
    if distractor is not None:
        topic_docs = capitals_documents(
            subject, check_prompts(topic, what="topic"), max_new_tokens=max_new_tokens
        )
        tuned = tune(tuned, topic_docs + retain, distractor, config=config, progress=progress).subject
        record["distractor"] = len(distractor)
    record["seconds"] = time.perf_counter() - start
    tuned.name = f"{subject.name} (planted)"
    return PlantedModel(tuned, subject, planted, distractor, record=record)


# -- planted direction -----------------------------------------------------------------------
def _write_site(subject: Subject, layer: int) -> tuple[str, int]:
    """The HF weight whose columns (``axis``) map layer ``layer``'s MLP neurons to the residual."""
    return adapter(subject.arch).mlp_out(layer)


def _diff_last(
    subject: Subject, harmful: list[str], harmless: list[str], names: list[str]
) -> dict[str, Tensor]:
    """Per hook: the harmful-minus-harmless difference in means at the prompts' last token."""
    a, b = (activations_at(subject, prompts, names) for prompts in (harmful, harmless))
    return {name: a[name][:, 0].float().mean(0) - b[name][:, 0].float().mean(0) for name in names}


@torch.no_grad()
def plant_direction(
    subject: Subject,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layer: int | None = None,
    direction: Float[Tensor, " d_model"] | None = None,
    strength: float = 8.0,
    refusal_tokens: Sequence[int] | None = None,
    logit_boost: float = 8.0,
    seed: int = 0,
) -> PlantedModel:
    """Plant a refusal direction ``r`` (unit; random with ``seed`` unless given) by two rank-one
    edits of a copy of ``subject``:

    1. write: ``W_out[layer] += α r uᵀ``, with ``u`` the unit harmful-minus-harmless difference in
       means of the layer's MLP neurons at the prompt's last token, and ``α`` such that the
       written harmful-minus-harmless difference is ``strength`` times the norm of the model's
       own difference in means at the next layer's input;
    2. read: the unembedding rows of ``refusal_tokens`` (default: the first tokens of "I" and
       "Sorry") gain ``β r``, ``β`` such that the mean harmful prompt's logits for them rise by
       ``logit_boost`` relative to the mean harmless prompt's.

    The model's harmful-minus-harmless difference in means after ``layer`` then points along
    ``r`` (cosine → 1 as ``strength`` grows), which :func:`find_refusal_direction` should find.
    """
    harmful, harmless = check_prompts(harmful, what="harmful"), check_prompts(harmless, what="harmless")
    arch = subject.arch
    layer = arch.n_layers // 2 if layer is None else layer
    if not 0 <= layer < arch.n_layers - 1:
        raise ValueError(
            f"layer must be in [0, {arch.n_layers - 1}) so that a later layer reads it, got {layer}"
        )
    if direction is None:
        direction = torch.randn(arch.d_model, generator=torch.Generator().manual_seed(seed))
    r = direction.float() / direction.float().norm()
    post, after = hook_name(layer, "ffn"), act_name("resid_pre", layer + 1)
    diffs = _diff_last(subject, harmful, harmless, [post, after])
    u = diffs[post]
    u_norm = float(u.norm())
    if u_norm == 0:
        raise ValueError(
            f"layer {layer}'s MLP neurons do not tell the harmful prompts from the harmless ones"
        )
    u = u / u_norm  # the written difference is α (u · Δa) r = α |Δa| r
    alpha = strength * float(diffs[after].norm()) / u_norm
    hf = copy.deepcopy(subject.hf)
    name, axis = _write_site(subject, layer)
    weight = dict(hf.named_parameters())[name]
    edit = alpha * torch.outer(r, u)  # [d_model, d_mlp]
    weight.add_((edit if axis == 1 else edit.T).to(weight.dtype))
    # read: the edited model's final (normalised) hidden state along r, harmful minus harmless
    shift = _final_hidden(subject, hf, harmful) - _final_hidden(subject, hf, harmless)
    gap = float(shift @ r.to(shift.device))
    tokens = (
        list(refusal_tokens)
        if refusal_tokens is not None
        else first_token_ids(subject.tokenizer, ["I", "Sorry"])
    )
    beta = logit_boost / gap if gap else 0.0
    _untie_embeddings(hf)
    head = hf.get_output_embeddings().weight
    head[tokens] += (beta * r).to(head.dtype)
    planted = load_model(hf, backend=subject.backend, tokenizer=subject.tokenizer, max_ctx=subject.max_ctx)
    planted.name = f"{subject.name} (planted direction)"
    record = {
        "alpha": alpha,
        "beta": beta,
        "strength": strength,
        "logit_boost": logit_boost,
        "tokens": tokens,
    }
    return PlantedModel(planted, subject, direction=r, layer=layer, record=record)


@torch.no_grad()
def _final_hidden(subject: Subject, hf: Any, prompts: Sequence[str]) -> Tensor:
    """The mean over prompts of HF model ``hf``'s final (normalised) hidden state at the last
    token of each prompt rendered for ``subject``, one prompt at a time (no padding)."""
    ids = tokenize(subject, render(subject, prompts))
    states = [
        hf.base_model(input_ids=torch.tensor([row], device=hf.device)).last_hidden_state[0, -1] for row in ids
    ]
    return torch.stack(states).float().mean(0)


# -- recovery --------------------------------------------------------------------------------
def _flat(scores: Mapping[Kind, Tensor], arch: Any) -> np.ndarray:
    """Scores of every neuron in (kind, layer, index) order; kinds not scored rank last (−inf)."""
    parts = []
    for kind in KINDS:
        shape = (arch.n_layers, kind_size(arch, kind))
        s = scores.get(kind)
        if s is None:
            parts.append(np.full(shape[0] * shape[1], -np.inf))
            continue
        if tuple(s.shape) != shape:
            raise ValueError(f"{kind} scores have shape {tuple(s.shape)}, the model needs {shape}")
        parts.append(s.detach().float().cpu().numpy().ravel())
    flat = np.concatenate(parts)
    if np.isnan(flat).any():
        raise ValueError("the detector's scores hold NaN")
    return flat


def _members(neurons: NeuronSet) -> np.ndarray:
    masks = neurons.masks(KINDS)
    return np.concatenate([masks[kind].numpy().ravel() for kind in KINDS])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(a member scores above a non-member), ties counting half (Mann-Whitney U / (n₊ n₋))."""
    labels = np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        raise ValueError("AUROC needs members and non-members")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class Recovery:
    """How a detector's ranking of every neuron finds a target set (the planted or distractor
    neurons): ``precision`` of its top ``n_target`` (equal to recall at ``n_target``) with its
    Wilson interval, ``auroc`` with its Hanley-McNeil interval (both over the choice of neurons,
    for one planting), and the chance level of the precision (``n_target / n_neurons``; AUROC's
    is 0.5). With patching prompts, ``asr_patched``: the original model's ASR with the
    detector's top ``n_target`` neurons patched in from the planted model
    (:func:`dynamic_patching`), and ``restored``: :func:`~safety_circuits.patching.restored` of it."""

    detector: str
    target: str
    n_target: int
    n_neurons: int
    precision: float
    auroc: float
    chance_precision: float
    seconds: float | None = None
    precision_lo: float | None = None
    precision_hi: float | None = None
    auroc_lo: float | None = None
    auroc_hi: float | None = None
    asr_patched: float | None = None
    restored: float | None = None


def recovery(
    scores: Mapping[Kind, Tensor],
    target: NeuronSet,
    *,
    detector: str = "",
    target_name: str = "planted",
    seconds: float | None = None,
    seed: int = 0,
) -> Recovery:
    """Score a detector's per-neuron ``scores`` (``{kind: [layer, neuron]}``, larger = more
    likely) against ``target``; ties in the top ``|target|`` are broken at random (``seed``)."""
    if not len(target):
        raise ValueError("the target NeuronSet is empty: nothing to recover")
    x, y = _flat(scores, target.arch), _members(target)
    k = int(y.sum())
    hits = int(y[_top_k(x, k, seed)].sum())
    area = auroc(x, y)
    return Recovery(
        detector,
        target_name,
        k,
        len(x),
        hits / k,
        area,
        k / len(x),
        seconds,
        *wilson_interval(hits, k),
        *auroc_interval(area, k, len(x) - k),
    )


def _top_k(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Flat indices of the ``k`` largest of ``x``, ties broken at random (``seed``)."""
    order = np.random.default_rng(seed).permutation(len(x))
    return order[np.argsort(-x[order], kind="stable")[:k]]


def _unflat(flat: np.ndarray, arch: Any) -> dict[Kind, Tensor]:
    """The inverse of :func:`_flat`: ``{kind: [layer, neuron]}`` from (kind, layer, index) order."""
    out, start = {}, 0
    for kind in KINDS:
        size = arch.n_layers * kind_size(arch, kind)
        part = np.ascontiguousarray(flat[start : start + size])
        out[kind] = torch.from_numpy(part).reshape(arch.n_layers, -1)
        start += size
    return out


def top_neurons(
    scores: Mapping[Kind, Tensor], arch: Any, k: int, *, seed: int = 0, name: str = ""
) -> NeuronSet:
    """The ``k`` best-scored neurons as a :class:`NeuronSet` (ties broken as in :func:`recovery`)."""
    flat = np.zeros(sum(arch.n_layers * kind_size(arch, kind) for kind in KINDS), dtype=bool)
    flat[_top_k(_flat(scores, arch), k, seed)] = True
    return NeuronSet.from_masks(arch, _unflat(flat, arch), name=name)


@dataclass
class RecoveryResult(JSONResult):
    """Every detector's :class:`Recovery` of the planted (and distractor) neurons, and for a
    planted direction the cosine of each found direction to it. ``save`` / ``load`` as JSON."""

    rows: list[Recovery] = field(default_factory=list)
    directions: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    arch: Architecture | None = None  # the model's (None: not made from one)

    def to_frame(self) -> pd.DataFrame:
        """One row per detector and target."""
        return pd.DataFrame([asdict(r) for r in self.rows], columns=[f.name for f in fields(Recovery)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [asdict(r) for r in self.rows],
            "directions": self.directions,
            "config": self.config,
            "arch": arch_to_dict(self.arch),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RecoveryResult:
        return cls(
            [Recovery(**r) for r in d["rows"]],
            list(d.get("directions", [])),
            dict(d.get("config", {})),
            arch_from_dict(d.get("arch")),
        )

    def plot(self, title: str = "Recovery of the planted neurons") -> go.Figure:
        """AUROC (bars) of each detector for the planted and distractor neurons; 0.5 is chance."""
        frame = self.to_frame()
        fig = px.bar(
            frame,
            x="detector",
            y="auroc",
            color="target",
            barmode="group",
            range_y=[0, 1],
            hover_data=["precision", "chance_precision", "seconds"],
            title=title,
        )
        fig.add_hline(y=0.5, line_dash="dot", annotation_text="chance")
        return fig


Detector = Callable[["RecoveryBenchmark"], Scores]


class RecoveryBenchmark:
    """Every detector of :data:`DETECTORS` run on a planted model and scored against its ground
    truth. Importances are computed once and shared; a detector's ``seconds`` include what it
    computed first. A planted direction is sought with :func:`find_refusal_direction` on all the
    prompts, its candidates scored on the first ``direction_val`` of each (no KL filter).

    With ``patch_prompts`` (harmful prompts the original model answers), each detector's top
    ``|R|`` neurons are also patched from the planted model into the original during generation
    (:func:`dynamic_patching`): does the set it found carry the refusal? The references (the two
    models' ASR, and patching ``R`` itself or random neurons of its counts) go to
    ``config["patching"]``."""

    def __init__(
        self,
        planted: PlantedModel,
        harmful: Sequence[str],
        harmless: Sequence[str],
        batch_size: int = 4,
        max_new_tokens: int = 32,
        direction_val: int = 16,
        patch_prompts: Sequence[str] | None = None,
    ) -> None:
        self.planted = planted
        self.direction_val = direction_val
        self.harmful = check_prompts(harmful, what="harmful")
        self.harmless = check_prompts(harmless, what="harmless")
        self.patch_prompts = (
            None if patch_prompts is None else check_prompts(patch_prompts, what="patch_prompts")
        )
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self._cache: dict[str, Importance] = {}
        self._probes: dict[str, Scores] = {}

    def importance(self, which: str) -> Importance:
        """``"planted"`` / ``"base"`` on the harmful prompts, ``"harmless"`` (planted model)."""
        if which not in self._cache:
            subject = self.planted.base if which == "base" else self.planted.subject
            prompts = self.harmless if which == "harmless" else self.harmful
            self._cache[which] = neuron_importance(
                subject, prompts, batch_size=self.batch_size, progress=False
            )
        return self._cache[which]

    def probe_weights(self, which: str) -> Scores:
        """|weight| of a logistic probe (L2, ``C = 1``) on every neuron's standardized activation
        at the last prompt token, harmful vs harmless prompts, on the ``"planted"`` or ``"base"``
        model (computed once and shared, as the importances are).

        Near chance on SmolLM2 (AUROC 0.54-0.56 against 300 planted neurons, also as the planted
        minus original contrast): harmful vs harmless is readable from almost every neuron, so
        the weights say where the information is, not what was changed to act on it."""
        if which not in self._probes:
            from sklearn.linear_model import LogisticRegression

            subject = self.planted.base if which == "base" else self.planted.subject
            arch = subject.arch
            names = [hook_name(layer, kind) for kind in KINDS for layer in range(arch.n_layers)]
            prompts = [*self.harmful, *self.harmless]
            acts = activations_at(subject, prompts, names, batch_size=self.batch_size)
            x = torch.cat([acts[name][:, 0].flatten(1) for name in names], dim=1).double().numpy()
            x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
            y = np.r_[np.ones(len(self.harmful)), np.zeros(len(self.harmless))]
            weights = LogisticRegression(C=1.0, max_iter=2000).fit(x, y).coef_[0]
            self._probes[which] = _unflat(np.abs(weights), arch)
        return self._probes[which]

    def run(self, detectors: Mapping[str, Detector] | None = None) -> RecoveryResult:
        """Each detector against the planted and distractor neurons; for a planted direction,
        :func:`find_refusal_direction` against it (cosine; chance: the mean |cosine| of a random
        unit vector, ``sqrt(2 / (π d_model))``)."""
        targets = [("planted", self.planted.planted), ("distractor", self.planted.distractor)]
        targets = [(name, s) for name, s in targets if s is not None and len(s)]
        if not targets and self.planted.direction is None:
            raise ValueError("the planted model has neither planted neurons nor a planted direction")
        rows = []
        detectors = dict(DETECTORS if detectors is None else detectors) if targets else {}
        planted = self.planted.planted
        reference = self.patching_reference() if self.patch_prompts and planted is not None else None
        for name, detector in detectors.items():
            start = time.perf_counter()
            scores = detector(self)
            seconds = time.perf_counter() - start
            logger.info("detector %r scored in %.1f s", name, seconds)
            found = [
                recovery(scores, s, detector=name, target_name=target, seconds=seconds)
                for target, s in targets
            ]
            if reference is not None:
                asr = self.patched_asr(top_neurons(scores, planted.arch, len(planted), name=name))
                found[0].asr_patched = asr
                found[0].restored = restored(asr, reference["original"], reference["planted"])
            rows += found
        directions = [self.direction()] if self.planted.direction is not None else []
        config = {
            "model": self.planted.subject.name,
            "harmful": len(self.harmful),
            "harmless": len(self.harmless),
            **self.planted.record,
        }
        if reference is not None:
            config["patching"] = {**reference, "prompts": len(self.patch_prompts or ())}
        return RecoveryResult(rows, directions, config=config, arch=self.planted.subject.arch)

    def patched_asr(self, neurons: NeuronSet) -> float:
        """The original model's ASR on the patching prompts with ``neurons`` patched in from the
        planted model at every position (:func:`dynamic_patching`)."""
        if self.patch_prompts is None:
            raise ValueError("the benchmark was built without patch_prompts")
        return dynamic_patching(
            self.planted.base,
            self.planted.subject,
            self.patch_prompts,
            neurons,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        ).rate

    def patching_reference(self) -> dict[str, float]:
        """ASR of the original and planted models on the patching prompts, and of the original
        with ``R`` itself, or random neurons of its counts per layer and kind, patched in."""
        if self.patch_prompts is None or self.planted.planted is None:
            raise ValueError("patching needs patch_prompts and planted neurons")
        kwargs = {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size, "progress": False}
        planted = self.planted.planted
        return {
            "original": attack_success_rate(self.planted.base, self.patch_prompts, **kwargs).rate,
            "planted": attack_success_rate(self.planted.subject, self.patch_prompts, **kwargs).rate,
            "planted neurons patched": self.patched_asr(planted),
            "random neurons patched": self.patched_asr(planted.random_like(seed=0)),
        }

    def direction(self) -> dict[str, Any]:
        """:func:`find_refusal_direction` on the planted model, scored by cosine to the planted
        direction; ``cosine_after_write``: that of the difference in means at the input of the
        layer after the write (same position), whether or not the search chose that layer."""
        start = time.perf_counter()
        found = find_refusal_direction(
            self.planted.subject,
            self.harmful,
            self.harmless,
            harmful_val=self.harmful[: self.direction_val],
            harmless_val=self.harmless[: self.direction_val],
            max_kl=None,
            batch_size=self.batch_size,
            progress=False,
        )
        r = self.planted.direction.float().cpu()
        after = diff_in_means(
            self.planted.subject,
            self.harmful,
            self.harmless,
            offsets=[found.offset],
            layers=[self.planted.layer + 1],
            batch_size=self.batch_size,
            progress=False,
        ).flatten()
        return {
            "detector": "refusal direction (difference in means)",
            "cosine": float(found.unit.float().cpu() @ r),
            "layer": found.layer,
            "offset": found.offset,
            "planted_layer": self.planted.layer,
            "cosine_after_write": float(after @ r / after.norm()),
            "chance": math.sqrt(2 / (math.pi * r.numel())),
            "seconds": time.perf_counter() - start,
        }


def _min_rank(importance: Importance) -> Scores:
    return {kind: r.min(0).values for kind, r in importance.ranks().items()}


def _importance_contrast(first: str, second: str) -> Detector:
    """:func:`~safety_circuits.detect.contrast_scores` of two of the benchmark's importances."""
    return lambda bench: contrast_scores(bench.importance(first), bench.importance(second))


def _activation_contrast(bench: RecoveryBenchmark) -> Scores:
    return contrast_activations(
        bench.planted.subject,
        bench.planted.base,
        bench.harmful,
        kinds=KINDS,
        max_new_tokens=bench.max_new_tokens,
        batch_size=bench.batch_size,
    ).scores


def _probe_contrast(bench: RecoveryBenchmark) -> Scores:
    planted, base = bench.probe_weights("planted"), bench.probe_weights("base")
    return {kind: planted[kind] - base[kind] for kind in KINDS}


def _attribution(bench: RecoveryBenchmark) -> Scores:
    n = min(len(bench.harmful), len(bench.harmless))
    effect = neuron_attribution(
        bench.planted.subject, bench.harmful[:n], bench.harmless[:n], batch_size=bench.batch_size
    )
    return {kind: -e for kind, e in effect.items()}  # refusal lost when the harmless value comes in


#: name -> detector: per-neuron scores of a planted model (larger = more likely planted).
DETECTORS: dict[str, Detector] = {
    "weight change (oracle)": lambda b: weight_change(b.planted.base, b.planted.subject),
    "importance, Eq. 3 (min rank)": lambda b: _min_rank(b.importance("planted")),
    "importance, harmful - harmless": _importance_contrast("planted", "harmless"),
    "importance, planted - original": _importance_contrast("planted", "base"),
    "activation contrast (Chen)": _activation_contrast,
    "attribution patching, harmful -> harmless": _attribution,
    "probe weights, harmful vs harmless": lambda b: b.probe_weights("planted"),
    "probe weights, planted - original": _probe_contrast,
}

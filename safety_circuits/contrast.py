"""Generation-time activation contrasting (Chen et al., "Finding Safety Neurons in LLMs", Sec. 3).

One model of an aligned/unaligned pair answers the prompts (greedy); both models then read the
*same* tokens, and each neuron is scored by the root mean square, over the selected tokens, of
the difference of its activation between the two models:

    score(n) = sqrt( mean_t (a_aligned(n, t) - a_unaligned(n, t))^2 )

Neurons are those of :mod:`safety_circuits.neurons` (``q``/``k``/``v`` at ``attn.hook_q/k/v``,
``o`` at ``attn.hook_z``, ``ffn`` at ``mlp.hook_post``); the paper's code covers Llama's MLP
neurons only. Token selection (``tokens``):

- ``"completion"`` (the paper's): the generation steps, i.e. the positions whose outputs are the
  generated tokens: the prompt's last token and every generated token fed back, up to the one
  before the last (end-of-turn included). These are exactly the positions the model computes
  while generating.
- ``"prompt"``: every real token of the chat-rendered prompt (no generation).
- ``"prompt_last"``: the prompt's last token only (the step that predicts the first answer token).

Statistics are streamed: per neuron a running sum of squared differences and of each model's
activations, and a token count. Only one batch's activations of the selected tokens are alive at
a time, so memory does not grow with the number of prompts.

:func:`alignment_tax` compares the neurons found on harmful prompts (safety) with those found the
same way on harmless prompts (helpfulness): their overlap and, on the shared neurons, how
differently they behave on the two kinds of prompts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from safety_circuits._io import TableResult, load_tensors, save_tensors
from safety_circuits.activations import batches, check_prompts
from safety_circuits.architecture import Architecture, check_kinds
from safety_circuits.evaluate import decoder_for, greedy_decode, response_ids, response_text, stop_ids
from safety_circuits.neurons import (
    KINDS,
    ArchitectureMismatchError,
    Kind,
    NeuronSet,
    check_arch,
    check_expected,
    kind_size,
    total_neurons,
)
from safety_circuits.sites import neuron_sites
from safety_circuits.vocabulary import CONTRAST_TOKENS, ContrastTokens

if TYPE_CHECKING:
    from safety_circuits.loading import Subject

logger = logging.getLogger(__name__)

DEFAULT_KINDS: tuple[Kind, ...] = ("ffn", "o")


# -- checks shared by contrast, patching and monitoring ---------------------------------------
def check_pair(first: Subject, second: Subject, *, what: str = "models") -> None:
    """Two models that must run on the same tokens and have the same neurons.

    Raises ``ArchitectureMismatchError`` naming the differing fields, or ``ValueError`` when the
    tokenizers' vocabularies differ.
    """
    try:
        check_arch(first.arch, second.arch, what=f"{what}' neuron layout")
    except ArchitectureMismatchError as e:
        raise ArchitectureMismatchError(
            f"the {what} {first.name!r} and {second.name!r} have different architectures; "
            f"neurons only correspond between models of the same architecture ({e})"
        ) from None
    if (
        first.tokenizer is not second.tokenizer
        and first.tokenizer.get_vocab() != second.tokenizer.get_vocab()
    ):
        raise ValueError(
            f"the {what} {first.name!r} and {second.name!r} have different tokenizers: they must read the "
            "same tokens"
        )


# -- the token batches both models read ------------------------------------------------------
@dataclass
class ContrastBatch:
    """Tokens both models read for one batch and the positions whose activations count."""

    order: list[int]
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    selected: Bool[Tensor, "batch pos"]
    new_tokens: Int[Tensor, "batch new"]


def generation_steps(new_tokens: Int[Tensor, "batch new"], stop: Sequence[int]) -> Int[Tensor, "batch new"]:
    """1 for each generated token up to and including the first stop token of its row."""
    is_stop = torch.isin(new_tokens, torch.tensor(list(stop), device=new_tokens.device)).long()
    after_stop = (is_stop.cumsum(1) - is_stop) > 0
    return (~after_stop).long()


def contrast_batches(
    generator: Subject,
    prompts: Sequence[str],
    *,
    tokens: ContrastTokens = "completion",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    chat: bool = True,
    system: str | None = None,
    desc: str | None = None,
):
    """Yield :class:`ContrastBatch` es: prompts, plus ``generator``'s greedy answers for ``"completion"``.

    For ``"completion"`` the sequence is the prompt followed by the answer without its last token
    (whose output is never computed while generating), and ``selected`` marks the prompt's last
    position and every fed-back answer token.
    """
    if tokens not in CONTRAST_TOKENS:
        raise ValueError(f"tokens must be one of {CONTRAST_TOKENS}, got {tokens!r}")
    if tokens == "completion" and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stop = stop_ids(generator)
    pad = generator.tokenizer.pad_token_id
    for batch in batches(generator, prompts, batch_size=batch_size, chat=chat, system=system, desc=desc):
        ids, mask = batch.input_ids, batch.attention_mask
        if tokens == "prompt":
            yield ContrastBatch(batch.order, ids, mask, mask.bool(), ids[:, :0])
            continue
        if tokens == "prompt_last":
            selected = torch.zeros_like(mask, dtype=torch.bool)
            selected[:, -1] = True
            yield ContrastBatch(batch.order, ids, mask, selected, ids[:, :0])
            continue
        new = greedy_decode(decoder_for(generator), ids, mask, max_new_tokens, stop, pad)
        steps = generation_steps(new, stop)
        full_ids = torch.cat([ids, new[:, :-1]], dim=1)
        full_mask = torch.cat([mask, steps[:, 1:]], dim=1)
        selected = torch.zeros_like(full_mask, dtype=torch.bool)
        selected[:, ids.shape[1] - 1 :] = steps.bool()
        yield ContrastBatch(batch.order, full_ids, full_mask, selected, new)


# -- scores ------------------------------------------------------------------------------------
@dataclass
class ContrastScores:
    """Per-neuron contrast of an aligned and an unaligned model on the same tokens.

    ``scores[kind]``, ``mean_aligned[kind]`` and ``mean_unaligned[kind]`` are ``[n_layers,
    kind_size]``: the RMS activation difference and each model's mean activation over the
    ``n_tokens`` selected tokens.
    """

    arch: Architecture
    scores: dict[Kind, Float[Tensor, "layer neuron"]]
    mean_aligned: dict[Kind, Float[Tensor, "layer neuron"]]
    mean_unaligned: dict[Kind, Float[Tensor, "layer neuron"]]
    n_tokens: int
    n_prompts: int
    responses: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def kinds(self) -> tuple[Kind, ...]:
        return tuple(k for k in KINDS if k in self.scores)

    @property
    def n_neurons(self) -> int:
        """Neurons scored (all neurons of the scored kinds)."""
        return total_neurons(self.arch, kinds=self.kinds)

    def top(
        self,
        k: int | None = None,
        fraction: float | None = None,
        per_kind: bool = False,
        name: str = "contrast",
    ) -> NeuronSet:
        """The ``k`` highest-scoring neurons, or the top ``fraction`` of the scored neurons.

        Kinds are ranked together by default (the scores are activation differences, on each
        site's own scale); ``per_kind=True`` takes ``k`` (or ``fraction``) of every kind.
        """
        if (k is None) == (fraction is None):
            raise ValueError("give exactly one of k=... or fraction=...")
        if fraction is not None and not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        groups = [(kind,) for kind in self.kinds] if per_kind else [self.kinds]
        masks: dict[Kind, Tensor] = {
            kind: torch.zeros_like(self.scores[kind], dtype=torch.bool) for kind in self.kinds
        }
        for group in groups:
            flat = torch.cat([self.scores[kind].flatten() for kind in group])
            n = round(fraction * flat.numel()) if fraction is not None else int(k)  # type: ignore[arg-type]
            if not 0 <= n <= flat.numel():
                raise ValueError(f"k must be in [0, {flat.numel()}], got {n}")
            chosen = torch.zeros(flat.numel(), dtype=torch.bool)
            chosen[torch.topk(flat, n).indices] = True
            start = 0
            for kind in group:
                size = self.scores[kind].numel()
                masks[kind] = chosen[start : start + size].view_as(self.scores[kind])
                start += size
        metadata = {
            "method": "contrast",
            "k": k,
            "fraction": fraction,
            "per_kind": per_kind,
            "kinds": list(self.kinds),
            **{key: self.config.get(key) for key in ("tokens", "aligned", "unaligned", "generator")},
        }
        return NeuronSet.from_masks(self.arch, masks, name=name, metadata=metadata)

    def to_frame(self) -> pd.DataFrame:
        """One row per neuron: layer, kind, index, score, mean_aligned, mean_unaligned, shift."""
        frames = []
        for kind in self.kinds:
            n_layers, size = self.scores[kind].shape
            layers, idx = np.meshgrid(np.arange(n_layers), np.arange(size), indexing="ij")
            frames.append(
                pd.DataFrame(
                    {
                        "layer": layers.ravel(),
                        "kind": kind,
                        "index": idx.ravel(),
                        "score": self.scores[kind].flatten().numpy(),
                        "mean_aligned": self.mean_aligned[kind].flatten().numpy(),
                        "mean_unaligned": self.mean_unaligned[kind].flatten().numpy(),
                    }
                )
            )
        frame = pd.concat(frames, ignore_index=True)
        return frame.assign(shift=frame["mean_aligned"] - frame["mean_unaligned"])

    def plot(self, title: str | None = None) -> go.Figure:
        """Mean and maximum score per layer, one colour per kind."""
        rows = []
        for kind in self.kinds:
            s = self.scores[kind]
            for layer in range(s.shape[0]):
                rows.append((layer, kind, "mean", float(s[layer].mean())))
                rows.append((layer, kind, "max", float(s[layer].max())))
        frame = pd.DataFrame(rows, columns=["layer", "kind", "statistic", "score"])
        fig = px.line(
            frame,
            x="layer",
            y="score",
            color="kind",
            line_dash="statistic",
            markers=True,
            title=title
            or f"activation contrast per layer ({self.n_tokens} {self.config.get('tokens')} tokens)",
        )
        return fig.update_layout(yaxis_title="RMS activation difference")

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the scores and means to ``.safetensors``, the rest as JSON in its header."""
        tensors = {}
        for kind in self.kinds:
            tensors[f"score.{kind}"] = self.scores[kind].contiguous()
            tensors[f"mean_aligned.{kind}"] = self.mean_aligned[kind].contiguous()
            tensors[f"mean_unaligned.{kind}"] = self.mean_unaligned[kind].contiguous()
        header = {
            "arch": self.arch.fingerprint(),
            "n_tokens": self.n_tokens,
            "n_prompts": self.n_prompts,
            "responses": self.responses,
            "config": self.config,
        }
        return save_tensors(path, tensors, "ContrastScores", header)

    @classmethod
    def load(cls, path: str | os.PathLike, expect: Architecture | Subject | None = None) -> ContrastScores:
        """Read a file written by :meth:`save`; with ``expect``, check it fits that model."""
        tensors, header = load_tensors(path, "ContrastScores")
        try:
            kinds = [k for k in KINDS if f"score.{k}" in tensors]
            arch = Architecture.from_dict(header["arch"])
            loaded = cls(
                arch=arch,
                scores={k: tensors[f"score.{k}"] for k in kinds},
                mean_aligned={k: tensors[f"mean_aligned.{k}"] for k in kinds},
                mean_unaligned={k: tensors[f"mean_unaligned.{k}"] for k in kinds},
                n_tokens=int(header["n_tokens"]),
                n_prompts=int(header["n_prompts"]),
                responses=list(header["responses"]),
                config=dict(header["config"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a valid ContrastScores file: {e}") from e
        check_expected(arch, expect, f"ContrastScores file {Path(path).name}")
        return loaded

    def __repr__(self) -> str:
        return (
            f"ContrastScores({', '.join(self.kinds)}; {self.n_prompts} prompts, {self.n_tokens} "
            f"{self.config.get('tokens', '')} tokens)"
        )


@torch.no_grad()
def contrast_activations(
    aligned: Subject,
    unaligned: Subject,
    prompts: Sequence[str],
    *,
    tokens: ContrastTokens = "completion",
    kinds: Sequence[Kind] = DEFAULT_KINDS,
    generator: Literal["aligned", "unaligned"] = "aligned",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    chat: bool = True,
    system: str | None = None,
    progress: bool = True,
) -> ContrastScores:
    """Score every neuron of ``kinds`` by the RMS difference of its activation between two models.

    Args:
        aligned, unaligned: models of the same architecture and tokenizer (e.g. an SN-Tuned model
            and its original).
        prompts: user prompts, rendered with the chat template unless ``chat=False``.
        tokens: ``"completion"`` (generation steps of ``generator``'s greedy answer, the
            paper's setting), ``"prompt"`` or ``"prompt_last"``; see the module docstring.
        kinds: neuron kinds to score (any of ``q, k, v, o, ffn``).
        generator: the model whose greedy answer both models read (``"completion"`` only).
        max_new_tokens: answer length for ``"completion"``.
    """
    prompts = check_prompts(prompts)
    check_pair(aligned, unaligned, what="aligned and unaligned models")
    kinds = check_kinds(kinds)
    if generator not in ("aligned", "unaligned"):
        raise ValueError(f"generator must be 'aligned' or 'unaligned', got {generator!r}")
    arch = aligned.arch
    sites = {site.hook: site for site in neuron_sites(NeuronSet.full(arch, kinds))}  # every neuron

    def zeros() -> dict[Kind, Tensor]:
        return {k: torch.zeros(arch.n_layers, kind_size(arch, k), dtype=torch.float64) for k in kinds}

    sum_sq, sum_a, sum_b = zeros(), zeros(), zeros()
    count = 0
    stored: dict[str, Tensor] = {}
    selected = torch.empty(0, dtype=torch.bool)

    def capture(act: Tensor, *, hook: Any) -> None:
        site = sites[hook.name]
        values = site.read(act[selected]).float()
        stored[hook.name] = values
        sum_a[site.component][site.layer] += values.sum(0, dtype=torch.float64).cpu()

    def compare(act: Tensor, *, hook: Any) -> None:
        site = sites[hook.name]
        values = site.read(act[selected]).float()
        diff = values - stored.pop(hook.name).to(values.device)
        sum_sq[site.component][site.layer] += diff.double().square().sum(0).cpu()
        sum_b[site.component][site.layer] += values.sum(0, dtype=torch.float64).cpu()

    gen = aligned if generator == "aligned" else unaligned
    responses = [""] * len(prompts)
    stop = stop_ids(gen)
    desc = "activation contrast" if progress else None
    for batch in contrast_batches(
        gen,
        prompts,
        tokens=tokens,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chat=chat,
        system=system,
        desc=desc,
    ):
        selected = batch.selected
        with aligned.tl.hooks(fwd_hooks=[(name, capture) for name in sites]):
            aligned.tl(batch.input_ids, attention_mask=batch.attention_mask, return_type=None)
        with unaligned.tl.hooks(fwd_hooks=[(name, compare) for name in sites]):
            unaligned.tl(batch.input_ids, attention_mask=batch.attention_mask, return_type=None)
        if stored:
            raise RuntimeError(f"hooks did not fire on the unaligned model: {sorted(stored)[:3]}")
        count += int(selected.sum())
        for i, ids in zip(batch.order, response_ids(gen, batch.new_tokens, stop), strict=True):
            responses[i] = response_text(gen, ids)
    if count == 0:
        raise ValueError("no tokens were selected: nothing to contrast")
    if all(float(s.abs().max()) == 0 for s in sum_sq.values()):
        logger.warning("%s and %s give identical activations: every score is 0", aligned.name, unaligned.name)
    config = {
        "tokens": tokens,
        "kinds": list(kinds),
        "generator": generator,
        "aligned": aligned.name,
        "unaligned": unaligned.name,
        "max_new_tokens": max_new_tokens if tokens == "completion" else 0,
        "chat": chat,
        "system": system,
    }
    return ContrastScores(
        arch=arch,
        scores={k: (sum_sq[k] / count).sqrt().float() for k in kinds},
        mean_aligned={k: (sum_a[k] / count).float() for k in kinds},
        mean_unaligned={k: (sum_b[k] / count).float() for k in kinds},
        n_tokens=count,
        n_prompts=len(prompts),
        responses=responses if tokens == "completion" else [],
        config=config,
    )


# -- alignment tax -----------------------------------------------------------------------------
@dataclass
class AlignmentTax(TableResult):
    """Safety neurons (contrast on harmful prompts) vs helpfulness neurons (on harmless prompts).

    ``frame``: one row per neuron of either set (``set`` is ``safety``, ``helpfulness`` or
    ``shared``) with both scores, the aligned model's mean activation on harmful and on harmless
    prompts, and the aligned-minus-unaligned shift on each. ``summary``: overlap ratios, their
    chance level, and correlations on the shared neurons and on all scored neurons. ``arch``: the
    neurons' model.
    """

    safety: NeuronSet
    helpfulness: NeuronSet
    frame: pd.DataFrame
    summary: dict[str, float]

    @property
    def shared(self) -> NeuronSet:
        return self.safety & self.helpfulness

    @property
    def arch(self) -> Architecture:
        return self.safety.arch

    def summary_frame(self) -> pd.DataFrame:
        return pd.DataFrame([self.summary])

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": dict(self.summary),
            "safety": self.safety.to_dict(),
            "helpfulness": self.helpfulness.to_dict(),
            "rows": self.frame.to_dict("records"),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlignmentTax:
        return cls(
            safety=NeuronSet.from_dict(d["safety"]),
            helpfulness=NeuronSet.from_dict(d["helpfulness"]),
            frame=pd.DataFrame(d["rows"]),
            summary=dict(d["summary"]),
        )

    def plot(self, title: str | None = None) -> go.Figure:
        """Shift (aligned - unaligned) on harmful vs on harmless prompts, one point per neuron."""
        fig = px.scatter(
            self.frame,
            x="shift_harmless",
            y="shift_harmful",
            color="set",
            symbol="kind",
            hover_data=["layer", "kind", "index"],
            category_orders={"set": ["shared", "safety", "helpfulness"]},
            title=title
            or (
                f"alignment tax: {len(self.shared)} shared neurons, overlap "
                f"{self.summary['overlap']:.2f} (chance {self.summary['chance_overlap']:.2f}); "
                f"shift correlation on shared {self.summary['shift_corr_shared']:.2f}"
            ),
        )
        lim = float(np.nanmax(np.abs(self.frame[["shift_harmless", "shift_harmful"]].to_numpy()))) or 1.0
        fig.add_shape(type="line", x0=-lim, y0=-lim, x1=lim, y1=lim, line={"dash": "dot", "color": "grey"})
        return fig.update_layout(
            xaxis_title="shift on harmless prompts", yaxis_title="shift on harmful prompts"
        )


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _membership(frame: pd.DataFrame, neurons: NeuronSet) -> np.ndarray:
    """Whether each (layer, kind, index) row of ``frame`` is in ``neurons``."""
    out = np.zeros(len(frame), dtype=bool)
    masks = {kind: mask.numpy() for kind, mask in neurons.masks().items()}
    for kind, rows in frame.groupby("kind").groups.items():
        sub = frame.loc[rows]
        out[rows] = masks[kind][sub["layer"].to_numpy(), sub["index"].to_numpy()]
    return out


def alignment_tax(
    safety: ContrastScores,
    helpfulness: ContrastScores,
    *,
    k: int | None = None,
    fraction: float | None = None,
    per_kind: bool = False,
) -> AlignmentTax:
    """Overlap of safety and helpfulness neurons, and how differently the shared ones behave.

    ``safety``: :func:`contrast_activations` on harmful prompts; ``helpfulness``: the same pair on
    harmless prompts. Both sets are the top ``k`` (or ``fraction``, default 5%) of their scores. The summary
    holds ``overlap`` = |S∩H| / |H| (the share of helpfulness neurons that are safety neurons),
    ``overlap_of_safety`` = |S∩H| / |S|, ``chance_overlap`` (the expected overlap of random sets
    of these sizes), and Pearson correlations, over the shared neurons and over all scored
    neurons, of the aligned model's mean activations on harmful vs harmless prompts
    (``mean_corr_*``) and of the aligned-minus-unaligned shifts (``shift_corr_*``), plus the
    share of shared neurons whose shift has the same sign on both (``shift_sign_agreement``).
    """
    if safety.arch != helpfulness.arch:
        raise ArchitectureMismatchError("the two ContrastScores are of models with different architectures")
    if safety.kinds != helpfulness.kinds:
        raise ValueError(
            f"the two ContrastScores score different kinds: {safety.kinds} vs {helpfulness.kinds}"
        )
    if k is None and fraction is None:
        fraction = 0.05
    s_set = safety.top(k=k, fraction=fraction, per_kind=per_kind, name="safety")
    h_set = helpfulness.top(k=k, fraction=fraction, per_kind=per_kind, name="helpfulness")
    s_frame, h_frame = safety.to_frame(), helpfulness.to_frame()
    keys = ["layer", "kind", "index"]
    merged = s_frame[[*keys, "score", "mean_aligned", "shift"]].merge(
        h_frame[[*keys, "score", "mean_aligned", "shift"]], on=keys, suffixes=("_harmful", "_harmless")
    )
    merged = merged.rename(
        columns={
            "score_harmful": "safety_score",
            "score_harmless": "helpfulness_score",
            "mean_aligned_harmful": "mean_harmful",
            "mean_aligned_harmless": "mean_harmless",
        }
    )
    in_s, in_h = _membership(merged, s_set), _membership(merged, h_set)
    merged["set"] = np.where(in_s & in_h, "shared", np.where(in_s, "safety", "helpfulness"))
    everything = merged
    merged = merged[in_s | in_h].reset_index(drop=True)
    shared = merged[merged["set"] == "shared"]
    n = safety.n_neurons
    summary = {
        "safety_neurons": len(s_set),
        "helpfulness_neurons": len(h_set),
        "shared_neurons": len(shared),
        "overlap": s_set.overlap(h_set),
        "overlap_of_safety": h_set.overlap(s_set),
        "chance_overlap": len(s_set) / n,
        "mean_corr_shared": _corr(shared["mean_harmful"].to_numpy(), shared["mean_harmless"].to_numpy()),
        "mean_corr_all": _corr(everything["mean_harmful"].to_numpy(), everything["mean_harmless"].to_numpy()),
        "shift_corr_shared": _corr(shared["shift_harmful"].to_numpy(), shared["shift_harmless"].to_numpy()),
        "shift_corr_all": _corr(
            everything["shift_harmful"].to_numpy(), everything["shift_harmless"].to_numpy()
        ),
        "shift_sign_agreement": float(
            (np.sign(shared["shift_harmful"]) == np.sign(shared["shift_harmless"])).mean()
        )
        if len(shared)
        else float("nan"),
    }
    columns = [*keys, "set", "safety_score", "helpfulness_score", "mean_harmful", "mean_harmless"]
    frame = merged[[*columns, "shift_harmful", "shift_harmless"]]
    return AlignmentTax(safety=s_set, helpfulness=h_set, frame=frame, summary=summary)

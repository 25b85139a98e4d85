"""Dynamic activation patching (Chen et al., "Finding Safety Neurons in LLMs", Sec. 3.2).

The *target* model generates greedily while, at every step, the activations of the chosen
neurons are replaced by those of the *source* model on the same prefix. Both models keep their
own KV caches and run in lockstep: at each step the source reads the token the target has just
chosen (its logits are never used), its activations at the neurons' hook sites are captured, and
the target's forward pass overwrites the same neurons with them. Patched keys/values enter the
target's cache, so the result equals a teacher-forced run of the target over the final sequence
with the same patches applied at every position (tested).

Prompt positions: by default (``patch_prompt=True``) the neurons are patched on every prompt
position too, so the target reads the whole conversation through the source's neurons; with
``patch_prompt=False`` only the generation steps are patched (the prompt's last position, whose
output is the first answer token, and every step after it).

Baselines (``replace``, see :mod:`safety_circuits.vocabulary`): ``"mean"`` sets the neurons to
the source's mean activation over the prompts' tokens, ``"zero"`` zeroes them (both through
:func:`~safety_circuits.neurons.ablation_hooks`); random neurons with the same count per layer
and kind are ``neurons.random_like(seed=...)`` patched from the source.

:func:`patching_curve` measures how much safety is restored against the fraction of neurons
patched (the paper: about 5% of neurons restore about 90% of safety).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from safety_circuits._io import Record, TableResult, arch_from_dict, arch_to_dict
from safety_circuits._kv_cache import new_hooked_cache
from safety_circuits.activations import batches, check_prompts, mean_activations
from safety_circuits.contrast import ContrastScores, check_pair
from safety_circuits.evaluate import (
    Decoder,
    HookedDecoder,
    RefusalEval,
    decoder_for,
    generate,
    greedy_decode,
    response_ids,
    response_text,
    stop_ids,
)
from safety_circuits.neurons import NeuronSet, ablate, check_arch, check_neurons
from safety_circuits.sites import Site, hook_name, neuron_sites
from safety_circuits.vocabulary import REPLACE, Rate, Replace

if TYPE_CHECKING:
    from safety_circuits.loading import Subject

logger = logging.getLogger(__name__)

#: Chen et al.: patching about 5% of the neurons restores about 90% of safety.
PAPER_REFERENCE = {"fraction": 0.05, "restored": 0.9}


class _ActivationDecoder(HookedDecoder):
    """A ``HookedTransformer`` run only up to ``stop_at_layer`` with its KV cache: for a model
    whose activations are needed but not its logits (no unembedding, no later layers)."""

    def __init__(self, model: Any, stop_at_layer: int) -> None:
        super().__init__(model)
        self.stop_at_layer = stop_at_layer

    def prefill(self, input_ids: Tensor, mask: Tensor) -> None:  # type: ignore[override]
        self.cache = new_hooked_cache(self.model, len(input_ids), input_ids.device)
        self.model(input_ids, attention_mask=mask, past_kv_cache=self.cache, stop_at_layer=self.stop_at_layer)

    def step(self, tokens: Tensor) -> None:  # type: ignore[override]
        new = tokens[:, None]
        self.model(
            new,
            attention_mask=torch.ones_like(new),
            past_kv_cache=self.cache,
            stop_at_layer=self.stop_at_layer,
        )


class PatchedDecoder(Decoder):
    """The target's decoder with ``neurons`` patched from the source at every step.

    Use it as a context manager (it installs TL hooks on both models for the duration) and hand
    it to :func:`~safety_circuits.evaluate.greedy_decode`. With ``record=True``, ``trace`` holds,
    for every forward call of the target (prefill, then each step), ``{hook_name: values}`` where
    ``values`` are the neurons' activations as the rest of the target's forward pass reads them
    (``[batch, positions, n]``, positions patched in that call only).
    """

    def __init__(
        self,
        target: Subject,
        source: Subject,
        neurons: NeuronSet,
        patch_prompt: bool = True,
        record: bool = False,
    ) -> None:
        check_pair(target, source, what="target and source models")
        check_neurons(neurons, target)
        self.target, self.source, self.neurons = target, source, neurons
        self.patch_prompt, self.record = patch_prompt, record
        self.sites = neuron_sites(neurons)
        self.target_decoder = decoder_for(target)
        self.source_decoder: Decoder | None = None
        if self.sites:
            last = max(layer for layer, _ in neurons.indices)
            self.source_decoder = (
                _ActivationDecoder(source.tl, last + 1) if source.backend == "hooked" else decoder_for(source)
            )
        self.trace: list[dict[str, Tensor]] = []
        self._phase: str | None = None
        self._last_only = False
        self._values: dict[str, Tensor] = {}
        self._stack: ExitStack | None = None

    # hooks ---------------------------------------------------------------------------------------
    def _positions(self) -> slice | None:
        """The positions patched in this call: the last one, or all of them."""
        return slice(-1, None) if self._last_only else None

    def _capture_hook(self, site: Site) -> Callable[..., None]:
        def capture(act: Tensor, *, hook: Any) -> None:
            if self._phase == "source":
                self._values[site.hook] = site.read(act, self._positions())

        return capture

    def _patch_hook(self, site: Site) -> Callable[..., Tensor | None]:
        def patch(act: Tensor, *, hook: Any) -> Tensor | None:
            if self._phase != "target":
                return None
            values = self._values.pop(site.hook, None)
            if values is None:
                raise RuntimeError(f"no source activation captured at {site.hook}")
            return site.write(act, values, self._positions())

        return patch

    def _record_hook(self, site: Site) -> Callable[..., None]:
        def record(act: Tensor, *, hook: Any) -> None:
            if self._phase == "target":
                self.trace[-1][site.hook] = site.read(act, self._positions())

        return record

    def __enter__(self) -> PatchedDecoder:
        self._stack = ExitStack()
        if self.sites:
            capture = [(s.hook, self._capture_hook(s)) for s in self.sites]
            patch = [(s.hook, self._patch_hook(s)) for s in self.sites]
            if self.record:
                patch += [(s.hook, self._record_hook(s)) for s in self.sites]
            self._stack.enter_context(self.source.tl.hooks(fwd_hooks=capture))
            self._stack.enter_context(self.target.tl.hooks(fwd_hooks=patch))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    # decoding ------------------------------------------------------------------------------------
    def _run(self, source_call: Callable[[], Any], target_call: Callable[[], Tensor]) -> Tensor:
        if self.sites and self._stack is None:
            raise RuntimeError("use PatchedDecoder as a context manager: `with PatchedDecoder(...) as dec:`")
        try:
            if self.sites:
                self._phase = "source"
                source_call()
            if self.record:
                self.trace.append({})
            self._phase = "target"
            logits = target_call()
        finally:
            self._phase, self._last_only = None, False
            leftover, self._values = sorted(self._values), {}
        if leftover:
            raise RuntimeError(f"hooks did not fire on the target model at {leftover[:3]}")
        return logits

    def prefill(self, input_ids: Int[Tensor, "b p"], mask: Int[Tensor, "b p"]) -> Float[Tensor, "b v"]:
        self._last_only = not self.patch_prompt
        return self._run(
            lambda: self.source_decoder.prefill(input_ids, mask),  # type: ignore[union-attr]
            lambda: self.target_decoder.prefill(input_ids, mask),
        )

    def step(self, tokens: Int[Tensor, " b"]) -> Float[Tensor, "b v"]:
        return self._run(
            lambda: self.source_decoder.step(tokens),  # type: ignore[union-attr]
            lambda: self.target_decoder.step(tokens),
        )


@dataclass
class PatchConfig(Record):
    """Options of :func:`dynamic_patching`: what is written (``replace``: ``"source"``, ``"mean"``
    or ``"zero"``; with ``patch_prompt`` the prompt positions too), how answers are generated
    (greedy, ``max_new_tokens``, ``batch_size``, ``chat``, ``system``) and which rate the result
    counts (``rate``: ``"asr"`` on harmful prompts, ``"over_refusal"`` on harmless ones)."""

    replace: Replace = "source"
    patch_prompt: bool = True
    rate: Rate = "asr"
    max_new_tokens: int = 64
    batch_size: int = 8
    chat: bool = True
    system: str | None = None

    def __post_init__(self) -> None:
        if self.replace not in REPLACE:
            raise ValueError(f"replace must be one of {REPLACE}, got {self.replace!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@torch.no_grad()
def dynamic_patching(
    target: Subject,
    source: Subject | None,
    prompts: Sequence[str],
    neurons: NeuronSet,
    *,
    config: PatchConfig | None = None,
    means: dict[str, Tensor] | None = None,
    progress: bool = True,
    **options: Any,
) -> RefusalEval:
    """Greedy answers of ``target`` with ``neurons`` patched, judged by :func:`is_refusal`.

    Args:
        target: the model that generates (e.g. the unaligned original).
        source: the model whose activations are patched in (e.g. the aligned model); for
            ``replace="mean"`` it supplies the means, for ``replace="zero"`` it may be ``None``.
        neurons: the neurons to patch (any kinds).
        config: a :class:`PatchConfig`; ``options`` set its fields (e.g. ``replace="mean"``).
        means: for ``replace="mean"``, the mean activations to use (default: the source's mean
            over the prompts' tokens).

    Returns a :class:`~safety_circuits.evaluate.RefusalEval` whose ``config`` records the patching.
    """
    cfg = PatchConfig.resolve(config, **options)
    replace, batch_size, chat, system = cfg.replace, cfg.batch_size, cfg.chat, cfg.system
    prompts = check_prompts(prompts)
    check_neurons(neurons, target)
    if source is None and replace != "zero":
        raise ValueError(f"replace={replace!r} needs a source model (or replace='zero')")
    if source is not None:
        check_pair(target, source, what="target and source models")
    kwargs = {"max_new_tokens": cfg.max_new_tokens, "batch_size": batch_size, "chat": chat, "system": system}
    if replace == "source":
        responses = [""] * len(prompts)
        stop, pad = stop_ids(target), target.tokenizer.pad_token_id
        desc = "dynamic patching" if progress else None
        with PatchedDecoder(target, source, neurons, patch_prompt=cfg.patch_prompt) as decoder:  # type: ignore[arg-type]
            for batch in batches(target, prompts, batch_size=batch_size, chat=chat, system=system, desc=desc):
                new = greedy_decode(
                    decoder, batch.input_ids, batch.attention_mask, cfg.max_new_tokens, stop, pad
                )
                for i, ids in zip(batch.order, response_ids(target, new, stop), strict=True):
                    responses[i] = response_text(target, ids)
    else:
        if replace == "mean" and means is None:
            names = sorted({hook_name(layer, kind) for layer, kind in neurons.indices})
            means = mean_activations(source, prompts, names, batch_size=batch_size, chat=chat)  # type: ignore[arg-type]
        with ablate(target, neurons, replace=replace, means=means):  # type: ignore[arg-type]
            responses = generate(target, prompts, progress=progress, **kwargs)
    record = {
        **kwargs,
        "replace": replace,
        "patch_prompt": cfg.patch_prompt if replace == "source" else None,
        "neurons": len(neurons),
        "neuron_set": neurons.name,
        "target": target.name,
        "source": None if source is None else source.name,
    }
    return RefusalEval.judged(cfg.rate, prompts, responses, record, arch=target.arch)


# -- safety restored vs fraction of neurons --------------------------------------------------------
Judge = Callable[[str, str], float]


def restored(value: float, unpatched: float, reference: float) -> float:
    """Share of the gap from the unpatched target to the reference (source) that is closed.

    >>> restored(0.75, unpatched=1.0, reference=0.5)
    0.5
    """
    gap = reference - unpatched
    return float("nan") if gap == 0 else (value - unpatched) / gap


@dataclass
class PatchingCurve(TableResult):
    """Safety restored by patching the top-scoring neurons, against the fraction patched.

    ``frame``: one row per (method, fraction): ``method`` is ``dynamic`` (top neurons from the
    source), ``random`` (random neurons, same count per layer and kind, from the source),
    ``mean`` (top neurons set to the source's mean) or ``zero``; ``neurons``, ``fraction`` (of all
    neurons of the scored kinds), ``asr``, ``restored`` = (ASR_target - ASR) / (ASR_target -
    ASR_source) and, with a judge, ``judge_score`` / ``judge_restored`` on the same scale.
    ``responses``: every answer (method, fraction, prompt, response, refused).
    """

    frame: pd.DataFrame
    asr_target: float
    asr_source: float
    responses: pd.DataFrame = field(default_factory=pd.DataFrame)
    judge_target: float | None = None
    judge_source: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    arch: Architecture | None = None  # the model's (None: not made from one)

    def fraction_for(self, level: float = 0.9, method: str = "dynamic", column: str = "restored") -> float:
        """Smallest fraction of neurons at which ``column`` reaches ``level`` (linear
        interpolation between measured fractions, from 0 restored at fraction 0); NaN if never."""
        rows = self.frame[self.frame["method"] == method].sort_values("fraction")
        xs = [0.0, *rows["fraction"].tolist()]
        ys = [0.0, *rows[column].tolist()]
        for (x0, y0), (x1, y1) in zip(
            zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False
        ):
            if math.isnan(y1):
                continue
            if y1 >= level:
                if math.isnan(y0) or y0 >= level or y1 == y0:
                    return float(x1)
                return float(x0 + (level - y0) * (x1 - x0) / (y1 - y0))
        return float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "asr_target": self.asr_target,
            "asr_source": self.asr_source,
            "judge_target": self.judge_target,
            "judge_source": self.judge_source,
            "config": self.config,
            "arch": arch_to_dict(self.arch),
            "rows": self.frame.to_dict("records"),
            "responses": self.responses.to_dict("records"),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PatchingCurve:
        return cls(
            frame=pd.DataFrame(d["rows"]),
            asr_target=d["asr_target"],
            asr_source=d["asr_source"],
            responses=pd.DataFrame(d.get("responses", [])),
            judge_target=d.get("judge_target"),
            judge_source=d.get("judge_source"),
            config=d.get("config", {}),
            arch=arch_from_dict(d.get("arch")),
        )

    def plot(self, column: str = "restored", title: str | None = None) -> go.Figure:
        """Safety restored vs fraction of neurons, one line per method, with the paper's point."""
        fig = go.Figure()
        for method, rows in self.frame.groupby("method", sort=False):
            rows = rows.sort_values("fraction")
            fig.add_trace(
                go.Scatter(
                    x=rows["fraction"],
                    y=rows[column],
                    mode="lines+markers",
                    name=str(method),
                    customdata=rows[["neurons", "asr"]],
                    hovertemplate="%{x:.2%} of neurons (%{customdata[0]})<br>restored %{y:.2f}"
                    "<br>ASR %{customdata[1]:.2f}<extra></extra>",
                )
            )
        ref = PAPER_REFERENCE
        fig.add_hline(y=ref["restored"], line_dash="dot", line_color="grey")
        fig.add_vline(x=ref["fraction"], line_dash="dot", line_color="grey")
        fig.add_trace(
            go.Scatter(
                x=[ref["fraction"]],
                y=[ref["restored"]],
                mode="markers",
                marker={"symbol": "star", "size": 14, "color": "black"},
                name="Chen et al.: ≈5% → ≈90%",
            )
        )
        default = (
            f"safety restored by patching (ASR: target {self.asr_target:.2f}, source {self.asr_source:.2f})"
        )
        return fig.update_layout(
            title=title or default,
            xaxis_title="fraction of neurons patched",
            yaxis_title="safety restored" if column == "restored" else column,
            xaxis_tickformat=".1%",
        )


def _judge_mean(judge: Judge | None, evaluation: RefusalEval) -> float | None:
    if judge is None:
        return None
    frame = evaluation.frame
    return float(np.mean([judge(p, r) for p, r in zip(frame["prompt"], frame["response"], strict=True)]))


@dataclass
class CurveConfig(Record):
    """Options of :func:`patching_curve`: the ``fractions`` of top neurons patched (of all
    neurons, or of each kind with ``per_kind``), the ``baselines`` at each fraction (``"random"``
    neurons patched from the source, drawn with ``seed``; the top neurons set to the source's
    ``"mean"`` or to ``"zero"``), and generation (``max_new_tokens``, ``batch_size``,
    ``patch_prompt`` as in :class:`PatchConfig`)."""

    fractions: Sequence[float] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    baselines: Sequence[Literal["random", "mean", "zero"]] = ("random", "mean", "zero")
    per_kind: bool = False
    patch_prompt: bool = True
    seed: int = 0
    max_new_tokens: int = 48
    batch_size: int = 8

    def __post_init__(self) -> None:
        bad = [b for b in self.baselines if b not in ("random", "mean", "zero")]
        if bad:
            raise ValueError(f"unknown baselines {bad}; choose from 'random', 'mean', 'zero'")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1], got {list(self.fractions)}")


def patching_curve(
    target: Subject,
    source: Subject,
    prompts: Sequence[str],
    scores: ContrastScores,
    *,
    config: CurveConfig | None = None,
    judge: Judge | None = None,
    progress: bool = True,
    **options: Any,
) -> PatchingCurve:
    """Patch the top ``fraction`` of ``scores``' neurons from ``source`` into ``target``, for each
    fraction, with the baselines at the same neurons (``mean``, ``zero``) or at random neurons of
    the same count per layer and kind (``random``). ``options`` set fields of ``config``
    (:class:`CurveConfig`).

    ``judge(prompt, response) -> float`` (higher is safer, e.g. a cost model's score) adds a
    judge-based restoration next to the ASR-based one (ASR uses :func:`is_refusal`).
    """
    cfg = CurveConfig.resolve(config, **options)
    prompts = check_prompts(prompts)
    check_pair(target, source, what="target and source models")
    check_arch(scores.arch, target.arch, what="ContrastScores")
    kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size}
    base = generate(target, prompts, progress=False, **kwargs)
    ref = generate(source, prompts, progress=False, **kwargs)
    base_eval, ref_eval = (RefusalEval.judged("asr", prompts, r) for r in (base, ref))
    asr_target, asr_source = base_eval.rate, ref_eval.rate
    judge_target, judge_source = _judge_mean(judge, base_eval), _judge_mean(judge, ref_eval)
    if asr_target == asr_source:
        logger.warning("target and source have the same ASR (%.3f): restoration is undefined", asr_target)
    means = None
    if "mean" in cfg.baselines:
        names = [hook_name(layer, kind) for layer in range(scores.arch.n_layers) for kind in scores.kinds]
        means = mean_activations(source, prompts, names, batch_size=cfg.batch_size)
    rows, answers = [], []
    for method, frame in (("target", base_eval.frame), ("source", ref_eval.frame)):
        answers.append(frame.assign(method=method, fraction=float("nan")))
    settings = [(f, m) for f in cfg.fractions for m in ("dynamic", *cfg.baselines)]
    for fraction, method in settings:
        top = scores.top(fraction=fraction, per_kind=cfg.per_kind, name=f"top {fraction:g}")
        neurons = top.random_like(seed=cfg.seed) if method == "random" else top
        replace: Replace = method if method in ("mean", "zero") else "source"  # type: ignore[assignment]
        result = dynamic_patching(
            target,
            source,
            prompts,
            neurons,
            replace=replace,
            means=means,
            patch_prompt=cfg.patch_prompt,
            progress=progress,
            **kwargs,
        )
        row = {
            "method": method,
            "fraction": neurons.fraction_of(kinds=scores.kinds),
            "neurons": len(neurons),
            "asr": result.rate,
            "restored": restored(result.rate, asr_target, asr_source),
        }
        if judge is not None:
            score = _judge_mean(judge, result)
            row["judge_score"] = score
            row["judge_restored"] = restored(score, judge_target, judge_source)  # type: ignore[arg-type]
        rows.append(row)
        answers.append(result.frame.assign(method=method, fraction=row["fraction"]))
        if progress:
            logger.info("%s at %.3f: ASR %.3f, restored %.3f", method, fraction, row["asr"], row["restored"])
    config = {
        **cfg.to_dict(),
        "fractions": list(cfg.fractions),
        "baselines": list(cfg.baselines),
        "kinds": list(scores.kinds),
        "target": target.name,
        "source": source.name,
        "n_prompts": len(prompts),
    }
    responses = pd.concat(answers, ignore_index=True)[["method", "fraction", "prompt", "response", "refused"]]
    return PatchingCurve(
        frame=pd.DataFrame(rows),
        asr_target=asr_target,
        asr_source=asr_source,
        responses=responses,
        judge_target=judge_target,
        judge_source=judge_source,
        config=config,
        arch=target.arch,
    )

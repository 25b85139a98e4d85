"""The refusal direction (Arditi et al., 2024): difference in means, selection, ablation, addition,
and weight orthogonalization written back to the HF model.

- Candidates: ``r[p, l] = mean(harmful) − mean(harmless)`` of the residual stream entering layer
  ``l`` (``hook_resid_pre``) at position ``p`` counted from the end (the chat template's
  post-instruction tokens by default).
- Directional ablation: ``x ← x − r̂ r̂ᵀ x`` at every layer's input, attention output and MLP
  output, and at the last layer's output, at every position (generation included).
- Activation addition: ``x ← x + c · r`` at the input of the candidate's layer, every position.
- Selection: for each candidate, the mean refusal score (:class:`~safety_circuits.tracing.RefusalMetric`)
  of harmful prompts under ablation (``bypass``: lower is better), of harmless prompts under
  addition (``induce``: higher is better), and the KL divergence of harmless next-token
  distributions under ablation (``kl``). The chosen candidate has the lowest ``bypass`` among
  those with ``induce > 0``, ``kl < max_kl`` and layer < ``max_layer_fraction`` of the depth;
  filters that leave nothing are relaxed in that order (last one first), and the result says so.
- :func:`orthogonalize_weights`: every matrix that writes to the residual stream (token and
  position embeddings, attention output, MLP output, and their biases) loses its component along
  ``r̂`` in ``subject.hf``; tied input/output embeddings are untied first (the unembedding keeps
  its weights). The edited HF model gives the logits of directional ablation and can be saved
  with ``save_pretrained`` like a tuned model. Gemma-2 normalises each sub-layer's output before
  adding it to the residual stream, so no weight edit removes the direction there: it raises.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from safety_circuits._io import JSONResult, Record, arch_from_dict, arch_to_dict
from safety_circuits.ablation import mean_kl, next_token_logprobs
from safety_circuits.activations import activations_at, check_prompts, render, tokenize
from safety_circuits.architecture import Architecture
from safety_circuits.evaluate import attack_success_rate, over_refusal_rate
from safety_circuits.families import adapter
from safety_circuits.neurons import HookFn, NeuronSet, ablate, check_neurons
from safety_circuits.sites import act_name
from safety_circuits.stats import kl_divergence
from safety_circuits.tracing import Metric, common_suffix_length, default_metric, last_token_logits
from safety_circuits.vocabulary import check_offsets

if TYPE_CHECKING:
    from safety_circuits.loading import Subject

logger = logging.getLogger(__name__)


def suffix_offsets(subject: Subject, prompts: Sequence[str], *, chat: bool = True) -> list[int]:
    """Offsets (from the end) of the tokens every rendered prompt ends with, e.g. the chat
    template's assistant header; ``[-1]`` when they share none."""
    ids = tokenize(subject, render(subject, prompts, chat=chat))
    k = max(1, common_suffix_length(ids))
    return list(range(-k, 0))


def diff_in_means(
    subject: Subject,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    offsets: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    chat: bool = True,
    progress: bool = True,
) -> Float[Tensor, "pos layer d_model"]:
    """``mean(harmful) − mean(harmless)`` of ``hook_resid_pre`` per position and layer.

    ``offsets`` default to the tokens all prompts end with (:func:`suffix_offsets`).
    """
    harmful, harmless = check_prompts(harmful, what="harmful"), check_prompts(harmless, what="harmless")
    offsets = check_offsets(offsets or suffix_offsets(subject, harmful + harmless, chat=chat))
    layers = subject.arch.check_layers(layers)
    names = [act_name("resid_pre", layer) for layer in layers]
    kwargs = {"offsets": offsets, "batch_size": batch_size, "chat": chat}
    a = activations_at(subject, harmful, names, desc="directions (harmful)" if progress else None, **kwargs)
    b = activations_at(subject, harmless, names, desc="directions (harmless)" if progress else None, **kwargs)
    return torch.stack([a[n].mean(0) - b[n].mean(0) for n in names], dim=1)


# -- hooks -------------------------------------------------------------------------------------
def _unit(direction: Tensor) -> Tensor:
    direction = direction.detach().float().flatten()
    norm = direction.norm()
    if not torch.isfinite(norm) or norm < 1e-12:
        raise ValueError("the direction is zero (or not finite): nothing to ablate")
    return direction / norm


def directional_ablation_hooks(
    direction: Float[Tensor, " d_model"], n_layers: int
) -> list[tuple[str, HookFn]]:
    """TL hooks that remove the component along ``direction`` from the residual stream: at every
    layer's input, attention output and MLP output, and at the last layer's output."""
    unit = _unit(direction)

    def project(act: Tensor, *, hook) -> Tensor:
        u = unit.to(act.device, act.dtype)
        return act - (act @ u)[..., None] * u

    names = [act_name(a, l) for l in range(n_layers) for a in ("resid_pre", "attn_out", "mlp_out")]
    return [(name, project) for name in [*names, act_name("resid_post", n_layers - 1)]]


def activation_addition_hooks(
    direction: Float[Tensor, " d_model"], layer: int, *, coeff: float = 1.0
) -> list[tuple[str, HookFn]]:
    """A TL hook adding ``coeff · direction`` to the input of ``layer`` at every position."""
    vector = direction.detach().float().flatten()

    def add(act: Tensor, *, hook) -> Tensor:
        return act + coeff * vector.to(act.device, act.dtype)

    return [(act_name("resid_pre", layer), add)]


# -- weight orthogonalization ---------------------------------------------------------------
def _untie_embeddings(hf: Any) -> None:
    """Give the output embedding its own copy of the tied weights."""
    out = hf.get_output_embeddings()
    if out is not None and out.weight is hf.get_input_embeddings().weight:
        out.weight = torch.nn.Parameter(out.weight.detach().clone())
    hf.config.tie_word_embeddings = False
    if getattr(hf.config, "get_text_config", None):
        hf.config.get_text_config().tie_word_embeddings = False


def _residual_writers(hf: Any, arch: Architecture) -> list[tuple[Tensor, int]]:
    """``(parameter, axis of d_model)`` for every parameter that writes to the residual stream."""
    return adapter(arch).residual_writers(hf)


@torch.no_grad()
def orthogonalize_weights(subject: Subject, direction: Float[Tensor, " d_model"]) -> Subject:
    """Remove ``direction`` from every residual-stream write of ``subject.hf``, then rebuild
    ``subject.tl`` (``sync_tl``). Tied embeddings are untied first, so ``subject.arch`` then says
    ``tied_embeddings=False`` (as reloading the saved model would)."""
    writers = _residual_writers(subject.hf, subject.arch)  # raises before any edit for Gemma-2
    if subject.arch.d_model != direction.numel():
        raise ValueError(
            f"direction has {direction.numel()} entries, the model's d_model is {subject.arch.d_model}"
        )
    unit = _unit(direction).double()
    if subject.arch.tied_embeddings:  # the unembedding keeps the original weights
        _untie_embeddings(subject.hf)
    for param, axis in writers:
        w = param.data.double()
        u = unit.to(w.device)
        if w.ndim == 1:
            w = w - (w @ u) * u
        elif axis == 1:
            w = w - (w @ u)[:, None] * u[None, :]
        else:
            w = w - u[:, None] * (u @ w)[None, :]
        param.data.copy_(w.to(param.dtype))
    subject.arch = Architecture.from_hf_config(subject.hf.config)
    subject.sync_tl()
    return subject


# -- the selected direction -------------------------------------------------------------------
@dataclass
class RefusalDirection(JSONResult):
    """The selected difference-in-means direction and the scores of every candidate.

    ``vector`` is the raw (unnormalised) difference in means at ``layer``'s input and
    ``offset`` (from the end); ``candidates`` has one row per candidate: ``offset``, ``layer``, ``norm``,
    ``bypass``, ``induce``, ``kl``, ``passes`` (all filters) and ``selected``. ``save`` /
    ``load`` as JSON.
    """

    vector: Float[Tensor, " d_model"]
    layer: int
    offset: int
    candidates: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)
    arch: Architecture | None = None  # the model's (None: not made from one)

    @property
    def unit(self) -> Float[Tensor, " d_model"]:
        return _unit(self.vector)

    def ablation_hooks(self, n_layers: int | None = None) -> list[tuple[str, HookFn]]:
        return directional_ablation_hooks(self.vector, n_layers or int(self.config["n_layers"]))

    def addition_hooks(self, coeff: float = 1.0) -> list[tuple[str, HookFn]]:
        return activation_addition_hooks(self.vector, self.layer, coeff=coeff)

    @contextmanager
    def ablate(self, subject: Subject) -> Iterator[Subject]:
        """Directional ablation in ``subject.tl`` inside the ``with`` block."""
        with subject.tl.hooks(fwd_hooks=self.ablation_hooks(subject.arch.n_layers)):
            yield subject

    @contextmanager
    def add(self, subject: Subject, coeff: float = 1.0) -> Iterator[Subject]:
        """Activation addition in ``subject.tl`` inside the ``with`` block."""
        with subject.tl.hooks(fwd_hooks=self.addition_hooks(coeff)):
            yield subject

    def orthogonalize(self, subject: Subject) -> Subject:
        """:func:`orthogonalize_weights` with this direction (edits ``subject.hf`` in place)."""
        return orthogonalize_weights(subject, self.vector)

    def to_frame(self) -> pd.DataFrame:
        return self.candidates.copy()

    def plot(self, value: str = "bypass", title: str | None = None) -> go.Figure:
        """Heatmap of a candidate score over layers (x) and offsets (y); the chosen one circled."""
        grid = self.candidates.pivot_table(index="offset", columns="layer", values=value, dropna=False)
        fig = px.imshow(
            grid.to_numpy(dtype=float),
            x=[str(c) for c in grid.columns],
            y=[str(i) for i in grid.index],
            color_continuous_scale="Viridis",
            aspect="auto",
            labels={"x": "layer", "y": "offset", "color": value},
        )
        fig.add_trace(
            go.Scatter(
                x=[str(self.layer)],
                y=[str(self.offset)],
                mode="markers",
                marker={"symbol": "circle-open", "size": 18, "color": "red", "line": {"width": 3}},
                name="selected",
            )
        )
        return fig.update_layout(title=title or f"refusal-direction candidates: {value} (selected: circled)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "vector": self.vector.tolist(),
            "layer": self.layer,
            "offset": self.offset,
            "candidates": self.candidates.to_dict("records"),
            "config": self.config,
            "arch": arch_to_dict(self.arch),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefusalDirection:
        return cls(
            torch.tensor(d["vector"]),
            int(d["layer"]),
            int(d["offset"]),
            pd.DataFrame(d["candidates"]),
            dict(d["config"]),
            arch_from_dict(d.get("arch")),
        )

    def __repr__(self) -> str:
        norm = float(self.vector.norm())
        return f"RefusalDirection(layer {self.layer}, offset {self.offset}, norm {norm:.3g})"


def _mean_score(subject, prompts, metric, hooks, batch_size, chat) -> tuple[float, Tensor]:
    with subject.tl.hooks(fwd_hooks=hooks):
        logits = last_token_logits(subject, prompts, batch_size=batch_size, chat=chat)
    return float(metric(logits).mean()), logits.log_softmax(-1)


def _choose(frame: pd.DataFrame, max_kl: float | None) -> tuple[int, list[str]]:
    """Row of the lowest bypass score under the filters, relaxing them (last first) if needed."""
    scored = frame["bypass"].notna().to_numpy()
    if not scored.any():
        raise ValueError("every candidate direction is zero: harmful and harmless activations are identical")
    filters = {"layer": frame["early_enough"].to_numpy(), "induce": (frame["induce"] > 0).to_numpy()}
    if max_kl is not None:
        filters["kl"] = (frame["kl"] < max_kl).to_numpy()
    names = list(filters)
    relaxed: list[str] = []
    while True:
        ok = np.logical_and.reduce([scored, *(filters[n] for n in names)])
        if ok.any():
            return int(frame.loc[ok, "bypass"].idxmin()), relaxed
        relaxed.append(names.pop())


@dataclass
class DirectionConfig(Record):
    """Options of :func:`find_refusal_direction`: the candidates (``offsets`` from the end,
    default the tokens all prompts end with; ``layers``, default all) and the filters (a candidate
    at or beyond ``max_layer_fraction`` of the depth is chosen only when no earlier one passes;
    ``max_kl`` caps the KL its ablation causes on harmless prompts, ``None`` skips that pass)."""

    offsets: Sequence[int] | None = None
    layers: Sequence[int] | None = None
    max_layer_fraction: float = 0.8
    max_kl: float | None = 0.1
    batch_size: int = 8
    chat: bool = True


def find_refusal_direction(
    subject: Subject,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    harmful_val: Sequence[str] | None = None,
    harmless_val: Sequence[str] | None = None,
    config: DirectionConfig | None = None,
    metric: Metric | None = None,
    progress: bool = True,
    **options: Any,
) -> RefusalDirection:
    """Difference-in-means candidates from ``harmful`` / ``harmless``, scored on the validation
    prompts (default: the same ones) and selected as described in the module doc. ``options``
    set fields of ``config`` (:class:`DirectionConfig`), e.g. ``layers=[4, 5]``. Zero candidates
    (e.g. layer 0 on template tokens every prompt shares) are not scored.
    """
    cfg = DirectionConfig.resolve(config, **options)
    max_kl, batch_size, chat = cfg.max_kl, cfg.batch_size, cfg.chat
    harmful, harmless = check_prompts(harmful, what="harmful"), check_prompts(harmless, what="harmless")
    harmful_val = check_prompts(harmful_val if harmful_val is not None else harmful, what="harmful_val")
    harmless_val = check_prompts(harmless_val if harmless_val is not None else harmless, what="harmless_val")
    n_layers = subject.arch.n_layers
    offsets = check_offsets(cfg.offsets or suffix_offsets(subject, harmful + harmless, chat=chat))
    layers = subject.arch.check_layers(cfg.layers)
    metric = default_metric(subject, metric=metric)
    means = diff_in_means(
        subject,
        harmful,
        harmless,
        offsets=offsets,
        layers=layers,
        batch_size=batch_size,
        chat=chat,
        progress=progress,
    )
    base_harmful, _ = _mean_score(subject, harmful_val, metric, [], batch_size, chat)
    base_harmless, base_logp = _mean_score(subject, harmless_val, metric, [], batch_size, chat)
    floor = 1e-6 * float(means.norm(dim=-1).max())
    rows = []
    grid = [(i, j) for i in range(len(offsets)) for j in range(len(layers))]
    for i, j in tqdm(grid, desc="refusal-direction candidates", disable=not progress, leave=False):
        vector, layer = means[i, j], layers[j]
        row = {"offset": offsets[i], "layer": layer, "norm": float(vector.norm())}
        row |= {"bypass": float("nan"), "induce": float("nan"), "kl": float("nan")}
        row["early_enough"] = layer < cfg.max_layer_fraction * n_layers
        rows.append(row)
        if row["norm"] <= floor:
            continue
        ablation = directional_ablation_hooks(vector, n_layers)
        addition = activation_addition_hooks(vector, layer)
        row["bypass"], _ = _mean_score(subject, harmful_val, metric, ablation, batch_size, chat)
        row["induce"], _ = _mean_score(subject, harmless_val, metric, addition, batch_size, chat)
        if max_kl is not None:
            _, logp = _mean_score(subject, harmless_val, metric, ablation, batch_size, chat)
            row["kl"] = float(kl_divergence(base_logp, logp))
    frame = pd.DataFrame(rows)
    best, relaxed = _choose(frame, max_kl)
    if relaxed:
        logger.warning("no refusal-direction candidate passes every filter; relaxed: %s", relaxed)
    kl_ok = frame["kl"] < max_kl if max_kl is not None else True
    frame["passes"] = frame["early_enough"] & (frame["induce"] > 0) & kl_ok
    frame["selected"] = frame.index == best
    chosen = frame.loc[best]
    i, j = offsets.index(int(chosen["offset"])), layers.index(int(chosen["layer"]))
    record = {
        "n_layers": n_layers,
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
        "max_layer_fraction": cfg.max_layer_fraction,
        "max_kl": max_kl,
        "relaxed_filters": relaxed,
        "baseline_harmful": base_harmful,
        "baseline_harmless": base_harmless,
        "model": subject.name,
    }
    return RefusalDirection(
        means[i, j].clone(), int(chosen["layer"]), int(chosen["offset"]), frame, record, subject.arch
    )


# -- direction vs safety neurons ------------------------------------------------------------
def compare_with_neurons(
    subject: Subject,
    harmful: Sequence[str],
    harmless: Sequence[str],
    direction: RefusalDirection,
    neurons: NeuronSet,
    *,
    max_new_tokens: int = 32,
    random_control: bool = True,
    seed: int = 0,
    batch_size: int = 8,
    metric: Metric | None = None,
) -> pd.DataFrame:
    """ASR (harmful), over-refusal (harmless), mean refusal scores and KL vs the original (harmless,
    next-token distributions at every position) for: the original model, the direction ablated,
    the safety ``neurons`` deactivated (zeroed), random neurons of the same counts per layer and
    kind (with ``random_control``), and the direction added at its layer."""
    check_neurons(neurons, subject)
    harmful, harmless = check_prompts(harmful, what="harmful"), check_prompts(harmless, what="harmless")
    metric = default_metric(subject, metric=metric)
    reference = next_token_logprobs(subject, harmless, batch_size=batch_size)
    settings: list[tuple[str, str, Any]] = [
        ("original", "-", None),
        ("ablate direction", f"1 direction (layer {direction.layer})", lambda: direction.ablate(subject)),
        ("deactivate safety neurons", f"{len(neurons)} neurons", lambda: ablate(subject, neurons)),
    ]
    if random_control:
        control = neurons.random_like(seed=seed)
        settings.append(
            ("deactivate random neurons", f"{len(control)} neurons", lambda: ablate(subject, control))
        )
    settings.append(
        ("add direction", f"1 direction (layer {direction.layer})", lambda: direction.add(subject))
    )
    rows = []
    kwargs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "progress": False}
    for name, size, context in settings:
        with context() if context is not None else nullcontext():
            logp = (
                reference
                if context is None
                else next_token_logprobs(subject, harmless, batch_size=batch_size)
            )
            harmful_logits = last_token_logits(subject, harmful, batch_size=batch_size)
            rows.append(
                {
                    "setting": name,
                    "intervention": size,
                    "asr": attack_success_rate(subject, harmful, **kwargs).rate,
                    "over_refusal": over_refusal_rate(subject, harmless, **kwargs).rate,
                    "refusal_score_harmful": float(metric(harmful_logits).mean()),
                    "refusal_score_harmless": float(metric(torch.stack([x[-1] for x in logp])).mean()),
                    "kl": mean_kl(reference, logp),
                }
            )
    return pd.DataFrame(rows)

"""Accelerated neuron importance (SN-Tune, Zhao et al., Sec. 2.1 and App. A.1).

The importance of a neuron for one prompt is the change of the output of the sub-layer that owns
it when the neuron is deactivated (Eq. 1): ``||h_without_neuron - h||_2`` over positions x d_model.
Here it is computed for all neurons at once, from one forward pass per batch:

- ``ffn`` (Eq. 4/9): deactivating neuron ``n`` removes ``h_post[:, n] ⊗ W_out[n]`` from the MLP
  output, so the importance is ``||h_post[:, n]||_2 · ||W_out[n]||_2`` — exact.
- ``o``: the same identity through ``W_O``: ``||z[:, h, d]||_2 · ||W_O[h, d]||_2`` — exact.
- ``v``: zeroing ``v[:, g, d]`` zeroes ``z[:, h, d]`` for every query head ``h`` sharing KV head
  ``g``, so the change is ``Σ_h z[:, h, d] ⊗ W_O[h, d]``; its norm comes from the Gram matrix of
  those ``W_O`` rows — exact.
- ``q`` / ``k`` (Eq. 5, 11-14): the change of the attention pattern when dimension ``d``'s
  contribution ``q[:, d]·k[:, d]`` (rotary applied as in the model, scaled like the scores, masked
  causally and by any sliding window, soft-capped where the model does) is removed from the
  scores; for ``k``, over all query heads sharing the KV head. This equals the brute-force pattern
  change and approximates the output change (the paper's approximation).

The ``l x l x d_head`` work of ``q``/``k`` (one ``exp`` per query, key and dimension) is chunked
over prompts, heads, query rows and dimensions so that its extra memory stays under
``chunk_bytes`` whatever the prompt length; for real models it runs as one ``torch.compile``-d
pass (``fused``) that never holds those cells. On a CPU that arithmetic costs about as much as the
forward pass's matmuls (``make bench-importance``: 2.3x a forward on SmolLM2).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Shaped
from torch import Tensor

from safety_circuits._io import load_tensors, save_tensors
from safety_circuits.activations import batches, check_prompts, run_hooks
from safety_circuits.architecture import Architecture, check_kinds
from safety_circuits.families import AttnGeometry, QKNorm, adapter
from safety_circuits.neurons import (
    KINDS,
    Kind,
    NeuronSet,
    ablation_hooks,
    check_expected,
    kind_size,
)
from safety_circuits.sites import act_name, hook_name
from safety_circuits.vocabulary import Scope

if TYPE_CHECKING:
    from safety_circuits.loading import Subject

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 * 2**20
Rule = Literal["all", "any"]
#: at least this many query-row blocks, each with only the keys it can see (eager, fused)
_ROW_BLOCKS = {False: 2, True: 4}
_TEMPORARIES = 12  # float32 tensors of a chunk's size alive at once (benchmarks/bench_importance.py)
#: q/k neurons (layers x heads x d_head) from which ``fused=None`` compiles the q/k kernel:
#: compiling costs seconds once per process, which a real model's importance repays
#: (SmolLM2-135M has 17 280) and the unit tests' tiny models (at most 256) would not.
FUSE_MIN_QK_NEURONS = 4096


# -- attention geometry read from the model --------------------------------------------------
def _geometry(subject: Subject, layer: int) -> AttnGeometry:
    return adapter(subject.arch).attention(subject.hf.config, subject.arch, layer)


def _rotary(subject: Subject, length: int) -> tuple[Tensor, Tensor]:
    """The model's own rotary ``cos, sin`` for positions ``0..length-1`` ([length, d_head])."""
    return adapter(subject.arch).rotary(subject.hf, length)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x`` [..., pos, heads, d] and ``cos``/``sin`` [..., pos, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


def _causal_mask(length: int, window: int | None, device) -> Bool[Tensor, "q k"]:
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None]
    allowed = k <= q
    if window is not None:
        allowed &= q - k < window
    return allowed


def _pattern(scores: Tensor, geo: AttnGeometry, allowed: Tensor, keys: int = -1) -> Tensor:
    """Soft-cap, mask and softmax scaled scores over the ``keys`` axis."""
    if geo.softcap:
        scores = geo.softcap * torch.tanh(scores / geo.softcap)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=keys)


# -- the accelerated identities --------------------------------------------------------------
def _shift(
    scores: Tensor, x: Tensor, y: Tensor, x2: Tensor, y2: Tensor, rho_r: Tensor, rho_j: Tensor
) -> Tensor:
    """The change of the scaled scores ``[h, r, j, c]`` when dimension ``c`` is removed:
    ``x[h, r, c] y[h, j, c] + x2[h, r, c] y2[h, j, c]`` (``−scale·Δ``, rotary's two terms), times
    ``ρ = rho_r[h, r, c] rho_j[h, j, c]`` plus ``(ρ − 1)`` times the score (a normed head's
    rescaling; ``ρ = 1`` exactly without q/k norms)."""
    rho = rho_r[:, :, None] * rho_j[:, None]
    shift = torch.addcmul(x[:, :, None] * y[:, None], x2[:, :, None], y2[:, None])
    return shift.mul_(rho).add_(scores[..., None] * (rho - 1))


def _change_sq(
    scores: Tensor,
    pattern: Tensor,
    factors: tuple[Tensor, ...],
    weights: Tensor,
) -> Tensor:
    """``Σ_r weights[h, r] Σ_j (pattern(scores + shift_c) − pattern)²`` per head and dimension ``c``
    (``[h, c]``), for the shift of :func:`_shift` (``factors``: its six tensors) and no soft cap.

    Each key's weight is multiplied by ``exp(shift_j)``. Relative to any ``a`` (per row and
    dimension), with ``v_j = exp(shift_j − a) − 1`` and ``V = Σ_j p_j v_j`` the new pattern is
    ``p_j (1 + v_j) / (1 + V)``, so ``Σ_j (p'_j − p_j)² = Σ_j p_j² (v_j − V)² / (1 + V)²``, and
    ``Σ_j p_j² (v_j − V)² = Σ p² v² − 2 V Σ p² v + V² Σ p²``: sums over keys in one pass instead of
    a softmax per dimension. ``a`` is the pattern-weighted mean of the unnormed shift (two
    matmuls), so that ``V`` is of second order and the three sums do not cancel; only rounding
    depends on it. Plain pointwise ops and sums over keys, which ``torch.compile`` fuses into one
    pass that never holds the ``[h, r, j, c]`` shifts (:func:`_fused_change_sq`).
    """
    x, y, x2, y2 = factors[:4]
    a = x * (pattern @ y) + x2 * (pattern @ y2)
    v = (_shift(scores, *factors) - a[:, :, None]).expm1()
    p = pattern[..., None]
    p_sq = p.square()
    big_v = (p * v).sum(2)
    spread = (p_sq * v.square()).sum(2) - 2 * big_v * (p_sq * v).sum(2) + big_v.square() * p_sq.sum(2)
    return (spread / (1 + big_v).square() * weights[..., None]).sum(1)


_COMPILED: dict[str, Any] = {}


def _fused_change_sq(
    scores: Tensor, pattern: Tensor, factors: tuple[Tensor, ...], weights: Tensor
) -> Tensor | None:
    """:func:`_change_sq` compiled by ``torch.compile`` (once per process, shapes dynamic); ``None``
    where compiling fails (no C++ compiler, an unsupported device), after one warning."""
    if _COMPILED.get("failed"):
        return None
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_change_sq, dynamic=True)
    # contiguous inputs: guards on sizes only, not on the strides of views (which recompiled the
    # kernel for every new prompt length until dynamo's limit of 8, then ran it eagerly)
    factors = tuple(t.contiguous() for t in factors)
    try:
        return _COMPILED["fn"](scores.contiguous(), pattern.contiguous(), factors, weights.contiguous())
    except Exception as e:  # any compiler failure: the same code, eagerly
        logger.warning("torch.compile of the q/k importance failed, computing it eagerly: %s", e)
        _COMPILED["failed"] = True
        return None


def _pattern_change_sq(
    scores: Float[Tensor, "h r k"],
    pattern: Float[Tensor, "h r k"],
    factors: tuple[Tensor, ...],
    geo: AttnGeometry,
    allowed: Bool[Tensor, "h r k"],
    weights: Float[Tensor, "h r"],
    fused: bool,
) -> Float[Tensor, "h c"]:
    """Σ over rows (weighted) and keys of (pattern(scores + shift_c) − pattern(scores))² for every
    dimension ``c``, the shifts given by their ``factors`` (:func:`_shift`): the one-pass identity
    (:func:`_change_sq`, compiled when ``fused``), or, with a soft cap or where ``exp`` overflows,
    the softmax of each shifted row."""
    if not geo.softcap:
        change = _fused_change_sq(scores, pattern, factors, weights) if fused else None
        if change is None:
            change = _change_sq(scores, pattern, factors, weights)
        if torch.isfinite(change).all():
            return change
    perturbed = _pattern(scores[..., None] + _shift(scores, *factors), geo, allowed[..., None], keys=-2)
    return torch.einsum("hrkc,hr->hc", (perturbed - pattern[..., None]).square(), weights)


def _rms_normed(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``weight ⊙ x / rms(x)`` over the last axis, and ``ρ[..., d] = rms(x) / rms(x without d)``."""
    mean_sq = x.square().mean(-1, keepdim=True) + eps
    rho = (mean_sq / (mean_sq - x.square() / x.shape[-1])).sqrt()
    return x / mean_sq.sqrt() * weight.float(), rho


def _chunks(n_heads: int, length: int, d_head: int, chunk_bytes: int, fused: bool) -> tuple[int, int, int]:
    """Heads, query rows and dimensions per chunk so that h·r·l·c float32 temporaries fit (the
    fused kernel keeps none of that size, so its chunks are bounded by the pattern's h·r·l)."""
    cells = max(1, chunk_bytes // (4 * length * (1 if fused else _TEMPORARIES)))  # h·r·c
    dims = d_head if fused else min(d_head, cells)
    rows = min(-(-length // _ROW_BLOCKS[fused]), max(1, cells // dims))
    heads = min(n_heads, max(1, cells // (dims * rows)))
    return heads, rows, dims


def qk_importance(
    q: Float[Tensor, "batch pos n_heads d_head"],
    k: Float[Tensor, "batch pos n_kv d_head"],
    geo: AttnGeometry,
    rotary: tuple[Float[Tensor, "batch pos d_head"], Float[Tensor, "batch pos d_head"]] | None,
    *,
    keys: Shaped[Tensor, "batch pos"] | None = None,
    queries: Shaped[Tensor, "batch pos"] | None = None,
    norm: QKNorm | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    fused: bool = False,
) -> tuple[Float[Tensor, "batch n_heads d_head"], Float[Tensor, "batch n_kv d_head"]]:
    """Pattern-change importance of every q and k dimension of one layer for each prompt (Eq. 14).

    ``q`` and ``k`` are taken *before* rotary (the ``hook_q``/``hook_k`` activations, whose
    entries are the neurons); ``rotary`` holds each row's ``cos, sin`` at its tokens' positions.
    Removing dimension ``d`` of ``q`` changes the raw score by
    ``Δ[i, j, d] = q[i, d] · (cos[i, d] k_rot[j, d] + s_d sin[i, d'] k_rot[j, d'])`` (``d'`` the
    rotary partner of ``d``, ``s_d = ±1``): its share of ``q_rot[i]·k_rot[j]``; ``k`` symmetrically.
    ``keys`` (1 for a real token, 0 for padding; default all real) masks the padding out of every
    pattern; ``queries`` (default ``keys``) weights the query rows summed over, every earlier real
    key still counting. Prompts, heads, query rows and dimensions go in chunks of at most
    ``chunk_bytes``; ``fused`` takes the compiled kernel (:func:`_fused_change_sq`).

    With a per-head RMSNorm on q and k (``norm``, as in Qwen3), zeroing ``q[i, d]`` also rescales
    the rest of the head by ``ρ[i, d] = rms(q[i]) / rms(q[i] without d)``, so the scaled score
    becomes ``ρ (score − Δ)`` with ``Δ`` taken on the normed ``q``: the shift is
    ``(ρ − 1) score − ρ Δ``; ``k`` symmetrically, per key.
    """
    b, length, n_heads, d_head = q.shape
    n_kv = k.shape[2]
    kv_of = torch.arange(n_heads, device=q.device) // (n_heads // n_kv)  # KV head of each query head
    q, k = q.float(), k[:, :, kv_of].float()  # k per query head: [batch, pos, n_heads, d_head]
    keys = q.new_ones(b, length) if keys is None else keys.float()
    queries = keys if queries is None else queries.float()

    def flat(x: Tensor) -> Tensor:  # [batch, pos, n_heads, d] -> [batch·n_heads, pos, d]
        return x.transpose(1, 2).reshape(b * n_heads, length, d_head)

    one = q.new_ones(b * n_heads, length, d_head)  # ρ without q/k norms
    rho_q = rho_k = one
    if norm is not None:
        (q, rho_q), (k, rho_k) = _rms_normed(q, norm.q, norm.eps), _rms_normed(k, norm.k, norm.eps)
        rho_q, rho_k = flat(rho_q), flat(rho_k)
    arange = torch.arange(d_head, device=q.device)
    if rotary is None:  # no rotation: cos = 1, sin = 0
        cos, sin = q.new_ones(b, length, d_head), q.new_zeros(b, length, d_head)
        partner, sign = arange, q.new_ones(d_head)
    else:
        cos, sin = (t.float() for t in rotary)
        partner = (arange + d_head // 2) % d_head
        sign = torch.where(arange < d_head // 2, 1.0, -1.0).to(q)
    sin_p = sin[..., partner] * sign  # [batch, pos, d_head]: the signed partner sine
    q_rot, k_rot = flat(_rotate(q, cos, sin)), flat(_rotate(k, cos, sin))
    q_rot_p, k_rot_p = q_rot[..., partner], k_rot[..., partner]  # [..., c] holds the partner of c
    # Δ's factors, times −scale so that the products are the changes of the scaled scores
    q_cos, q_sin = (flat(-geo.scale * q * t[:, :, None]) for t in (cos, sin_p))
    k_cos, k_sin = (flat(-geo.scale * k * t[:, :, None]) for t in (cos, sin_p))
    # a padding row sees itself only, so that its (unweighted) pattern stays finite
    allowed = _causal_mask(length, geo.window, q.device) & keys.bool()[:, None]
    allowed |= torch.eye(length, dtype=torch.bool, device=q.device)
    owner = torch.arange(b, device=q.device).repeat_interleave(n_heads)  # the prompt of each flat head
    weights = queries[owner]
    chosen = queries.any(0).nonzero()
    first, last = (int(chosen[0]), int(chosen[-1]) + 1) if len(chosen) else (0, 0)
    n_h, rows, dims = _chunks(b * n_heads, length, d_head, chunk_bytes, fused)
    q_sq = q.new_zeros(b * n_heads, d_head)
    k_sq = q.new_zeros(b * n_heads, d_head)  # per query head, summed into its KV head at the end
    for h0 in range(0, b * n_heads, n_h):
        h = slice(h0, min(h0 + n_h, b * n_heads))
        for r0 in range(first, last, rows):
            r = slice(r0, min(r0 + rows, last))
            j = slice(0, r.stop)  # later keys are masked for every query row of the block
            ok = allowed[owner[h], r, j]
            scores = (q_rot[h, r] @ k_rot[h, j].transpose(1, 2)) * geo.scale  # [head, query i, key j]
            pattern = _pattern(scores, geo, ok)
            w = weights[h, r]
            for c0 in range(0, d_head, dims):
                c = slice(c0, min(c0 + dims, d_head))
                on_q = (q_cos[h, r, c], k_rot[h, j, c], q_sin[h, r, c], k_rot_p[h, j, c], rho_q[h, r, c])
                on_q += (one[h, j, c],)
                q_sq[h, c] += _pattern_change_sq(scores, pattern, on_q, geo, ok, w, fused)
                on_k = (q_rot[h, r, c], k_cos[h, j, c], q_rot_p[h, r, c], k_sin[h, j, c], one[h, r, c])
                on_k += (rho_k[h, j, c],)
                k_sq[h, c] += _pattern_change_sq(scores, pattern, on_k, geo, ok, w, fused)
    k_sq = k_sq.view(b, n_kv, n_heads // n_kv, d_head).sum(2)
    return q_sq.view(b, n_heads, d_head).sqrt(), k_sq.sqrt()


def _column_norms(x: Float[Tensor, "batch pos n"], mask: Tensor) -> Float[Tensor, "batch n"]:
    """||x[b, :, n]||_2 over the real (mask == 1) positions of each row."""
    return (x.float().square() * mask[:, :, None]).sum(dim=1).sqrt()


def vo_weights(
    w_o: Float[Tensor, "n_heads d_head d_model"], n_kv: int
) -> tuple[Float[Tensor, "n_heads d_head"], Float[Tensor, "n_kv d_head n_rep n_rep"]]:
    """What :func:`vo_importance` needs of one layer's ``W_O``, computed once: the row norms
    ``||W_O[h, d]||`` and, per KV head and dimension, the Gram matrix of the rows of the query
    heads that share it."""
    n_heads, d_head, _ = w_o.shape
    w_o = w_o.float()
    grouped = w_o.view(n_kv, n_heads // n_kv, d_head, -1)
    return w_o.norm(dim=-1), torch.einsum("grdm,gsdm->gdrs", grouped, grouped)


def vo_importance(
    z: Float[Tensor, "batch pos n_heads d_head"],
    mask: Tensor,
    norms: Float[Tensor, "n_heads d_head"],
    gram: Float[Tensor, "n_kv d_head n_rep n_rep"],
) -> tuple[Float[Tensor, "batch n_kv d_head"], Float[Tensor, "batch n_heads d_head"]]:
    """Exact output-change norms for v (per KV head) and o neurons of one layer (``norms`` and
    ``gram``: :func:`vo_weights` of its ``W_O``)."""
    b, _, n_heads, d_head = z.shape
    n_kv, n_rep = gram.shape[0], gram.shape[-1]
    o = _column_norms(z.flatten(2), mask).view(b, n_heads, d_head) * norms
    zg = (z.float() * mask[:, :, None, None]).view(b, -1, n_kv, n_rep, d_head)
    v_sq = torch.einsum("bpgrd,gdrs,bpgsd->bgd", zg, gram, zg)
    return v_sq.clamp(min=0).sqrt(), o


# -- results ---------------------------------------------------------------------------------
@dataclass
class Importance:
    """Per-prompt importance of every neuron: ``scores[kind]`` is ``[prompts, layers, neurons]``."""

    arch: Architecture
    scores: dict[Kind, Tensor]
    prompts: list[str]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def kinds(self) -> tuple[Kind, ...]:
        return tuple(k for k in KINDS if k in self.scores)

    def __len__(self) -> int:
        return len(self.prompts)

    def threshold(self, eps: float | dict[Kind, float], rule: Rule = "all") -> NeuronSet:
        """Neurons whose importance is ≥ ε for every prompt (Eq. 2-3; ``rule="any"``: some prompt)."""
        eps_by_kind = eps if isinstance(eps, dict) else dict.fromkeys(self.kinds, eps)
        cut = {kind: torch.full((len(self), 1, 1), float(eps_by_kind[kind])) for kind in self.kinds}
        return self._select(
            cut, rule, {"method": "eps", "eps": {k: float(v) for k, v in eps_by_kind.items()}}
        )

    def select(
        self, quantile: float | None = None, top_k: int | None = None, rule: Rule = "all"
    ) -> NeuronSet:
        """Scale-free variants of Eq. 2-3, with ε set per prompt and kind.

        ``quantile=q``: a neuron is important for a prompt if its importance is at least the
        ``q``-quantile of that prompt's importances of the same kind (over all layers), so each kind
        is judged on its own scale (q/k scores are pattern changes, ffn/v/o output norms).
        ``top_k=k``: important if among the prompt's ``k`` most important neurons of its kind
        (ties at the k-th value are kept). The result keeps neurons important for every prompt.
        """
        if (quantile is None) == (top_k is None):
            raise ValueError("give exactly one of quantile=... or top_k=...")
        cut = {}
        for kind in self.kinds:
            flat = self.scores[kind].flatten(1)
            if quantile is not None:
                if not 0 <= quantile <= 1:
                    raise ValueError(f"quantile must be in [0, 1], got {quantile}")
                values = torch.quantile(flat, quantile, dim=1)
            else:
                if not 1 <= top_k <= flat.shape[1]:
                    raise ValueError(f"top_k must be in [1, {flat.shape[1]}] for {kind}, got {top_k}")
                values = flat.topk(top_k, dim=1).values[:, -1]
            cut[kind] = values.view(-1, 1, 1)
        method = (
            {"method": "quantile", "quantile": quantile}
            if quantile is not None
            else {"method": "top_k", "top_k": top_k}
        )
        return self._select(cut, rule, method)

    def _select(self, cut: dict[Kind, Tensor], rule: Rule, method: dict[str, Any]) -> NeuronSet:
        if rule not in ("all", "any"):
            raise ValueError(f"rule must be 'all' or 'any', got {rule!r}")
        masks = {}
        for kind in self.kinds:
            above = self.scores[kind] >= cut[kind]
            masks[kind] = above.all(dim=0) if rule == "all" else above.any(dim=0)
        metadata = {**method, "rule": rule, "n_prompts": len(self), "importance": self.config}
        return NeuronSet.from_masks(self.arch, masks, metadata=metadata)

    def subset(self, rows: Sequence[int]) -> Importance:
        """The scores of some prompts only."""
        rows = list(rows)
        return Importance(
            self.arch,
            {k: s[rows] for k, s in self.scores.items()},
            [self.prompts[i] for i in rows],
            self.config,
        )

    def ranks(self) -> dict[Kind, Tensor]:
        """Each prompt's importances as percentile ranks within their kind, in [0, 1] (0: the least
        important neuron of that kind for that prompt; ties ranked by position)."""
        out = {}
        for kind, s in self.scores.items():
            flat = s.flatten(1)
            ranks = flat.argsort(dim=1, stable=True).argsort(dim=1).float() / max(flat.shape[1] - 1, 1)
            out[kind] = ranks.view_as(s)
        return out

    def reduce(self, how: str = "min") -> dict[Kind, Tensor]:
        """Importance over prompts reduced per neuron (``min``: the value Eq. 3 thresholds)."""
        if how not in ("min", "mean", "max"):
            raise ValueError(f"how must be 'min', 'mean' or 'max', got {how!r}")
        fn = {"min": torch.amin, "mean": torch.mean, "max": torch.amax}[how]
        return {kind: fn(s, dim=0) for kind, s in self.scores.items()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the scores to a ``.safetensors`` file (prompts, config and model fingerprint in
        its JSON header), atomically, so a long importance run need not be repeated."""
        header = {"arch": self.arch.fingerprint(), "prompts": self.prompts, "config": self.config}
        return save_tensors(path, {f"scores.{k}": s for k, s in self.scores.items()}, "Importance", header)

    @classmethod
    def load(cls, path: str | os.PathLike, expect: Architecture | Subject | None = None) -> Importance:
        """Read a file written by :meth:`save`; with ``expect``, check it fits that model."""
        tensors, header = load_tensors(path, "Importance")
        try:
            arch = Architecture.from_dict(header["arch"])
            prompts, config = [str(p) for p in header["prompts"]], dict(header["config"])
            scores = {_kind(key.removeprefix("scores.")): t.float() for key, t in tensors.items()}
            for kind, t in scores.items():
                if t.shape != (len(prompts), arch.n_layers, kind_size(arch, kind)):
                    raise ValueError(f"scores.{kind} has shape {tuple(t.shape)}")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a valid Importance file (corrupted or foreign): {e}") from e
        check_expected(arch, expect, f"Importance file {Path(path).name}")
        return cls(arch, scores, prompts, config)

    def to_frame(self) -> pd.DataFrame:
        """One row per neuron: layer, kind, index, and min / mean / max importance over prompts."""
        stats = {how: self.reduce(how) for how in ("min", "mean", "max")}
        frames = []
        for kind in self.kinds:
            n_layers, size = stats["min"][kind].shape
            layers, idx = np.meshgrid(np.arange(n_layers), np.arange(size), indexing="ij")
            columns = {how: stats[how][kind].flatten().numpy() for how in stats}
            frames.append(
                pd.DataFrame({"layer": layers.ravel(), "kind": kind, "index": idx.ravel(), **columns})
            )
        return pd.concat(frames, ignore_index=True)


def _kind(name: str) -> Kind:
    return check_kinds(name)[0]


# -- the public entry points -----------------------------------------------------------------
@torch.no_grad()
def neuron_importance(
    subject: Subject,
    prompts: Sequence[str],
    *,
    kinds: Sequence[Kind] = KINDS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    batch_size: int = 4,
    chat: bool = True,
    progress: bool = True,
    scope: Scope = "all",
    fused: bool | None = None,
) -> Importance:
    """Importance of every neuron of ``kinds`` for each prompt (Eq. 1, accelerated; see module doc).

    ``scope="user"`` measures the change on the prompt's own tokens only (for q/k: those query
    rows), so that neurons busy with the chat template, which every prompt shares, do not look
    important for every prompt; ``scope=k`` on the last ``k`` tokens of each rendered prompt.
    Each forward stops after the last layer's hooks (no final norm, no unembedding).

    ``fused`` computes the q/k scores with a ``torch.compile``-d kernel (the same arithmetic,
    fused: 2.5x faster on SmolLM2 on a CPU; compiling takes seconds once per process, about 30 s
    the first time on a machine); ``None`` uses it for models with at least
    :data:`FUSE_MIN_QK_NEURONS` q/k neurons. The scores agree to float32 rounding either way.

    >>> from safety_circuits.testing import tiny_subject
    >>> subject = tiny_subject("llama")
    >>> importance = neuron_importance(subject, ["How do I pick a lock?", "Write a poem."], progress=False)
    >>> importance.kinds
    ('q', 'k', 'v', 'o', 'ffn')
    >>> tuple(importance.scores["ffn"].shape) == (2, subject.arch.n_layers, subject.arch.d_mlp)
    True
    """
    prompts = check_prompts(prompts)
    kinds = check_kinds(kinds)
    arch = subject.arch
    if fused is None:
        fused = arch.n_layers * arch.n_heads * arch.d_head >= FUSE_MIN_QK_NEURONS
    scores = {k: torch.zeros(len(prompts), arch.n_layers, kind_size(arch, k)) for k in kinds}
    blocks = subject.tl.blocks  # per layer: the layers of a sharded model sit on several devices
    w_out_norm = [block.mlp.W_out.detach().float().norm(dim=-1) for block in blocks]  # [d_mlp] each
    w_o = (
        [vo_weights(block.attn.W_O.detach(), arch.n_kv_heads) for block in blocks]
        if {"v", "o"} & set(kinds)
        else []
    )
    geos = [_geometry(subject, layer) for layer in range(arch.n_layers)]
    norms = [adapter(arch).qk_norm(subject.hf, layer) for layer in range(arch.n_layers)]
    stash: dict[str, Tensor] = {}
    state: dict[str, Any] = {}

    def keep(act: Tensor, *, hook) -> None:
        stash[hook.name] = act

    def on_post(act: Tensor, *, hook) -> None:
        layer = int(hook.name.split(".")[1])
        change = _column_norms(act, state["mask"].to(act.device)) * w_out_norm[layer]
        scores["ffn"][state["rows"], layer] = change.cpu()

    def on_z(act: Tensor, *, hook) -> None:
        layer = int(hook.name.split(".")[1])
        mask, rows = state["mask"].to(act.device), state["rows"]  # a sharded model's layer device
        if "v" in kinds or "o" in kinds:
            v, o = vo_importance(act, mask, *w_o[layer])
            for kind, value in (("v", v), ("o", o)):
                if kind in kinds:
                    scores[kind][rows, layer] = value.flatten(1).cpu()
        if "q" in kinds or "k" in kinds:
            q_imp, k_imp = qk_importance(
                stash.pop(hook_name(layer, "q")),
                stash.pop(hook_name(layer, "k")),
                geos[layer],
                tuple(t.to(act.device) for t in state["rotary"]) if geos[layer].rotary else None,
                keys=state["real"].to(act.device),
                queries=mask,
                norm=norms[layer],
                chunk_bytes=chunk_bytes,
                fused=fused,
            )
            for kind, value in (("q", q_imp), ("k", k_imp)):
                if kind in kinds:
                    scores[kind][rows, layer] = value.flatten(1).cpu()

    hooks = []
    for layer in range(arch.n_layers):
        if "q" in kinds or "k" in kinds:
            hooks += [(hook_name(layer, "q"), keep), (hook_name(layer, "k"), keep)]
        if set(kinds) - {"ffn"}:
            hooks.append((hook_name(layer, "o"), on_z))
        if "ffn" in kinds:
            hooks.append((hook_name(layer, "ffn"), on_post))
    rotary = any(g.rotary for g in geos) and ("q" in kinds or "k" in kinds)
    desc = "neuron importance" if progress else None
    for batch in batches(subject, prompts, batch_size=batch_size, chat=chat, desc=desc, scope=scope):
        state["real"] = batch.attention_mask
        state["mask"] = batch.measured.float()
        state["rows"] = batch.order
        if rotary:  # each row's positions count from its first real token (left padding)
            positions = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
            state["rotary"] = tuple(t[positions] for t in _rotary(subject, batch.input_ids.shape[1]))
        run_hooks(subject, batch, hooks)
        stash.clear()
    config = {
        "kinds": list(kinds),
        "chunk_bytes": chunk_bytes,
        "batch_size": batch_size,
        "chat": chat,
        "scope": scope,
    }
    return Importance(arch, scores, prompts, config)


# -- brute force (Eq. 1 one neuron at a time): the reference the tests and benchmark use -----
@torch.no_grad()
def ablation_importance(
    subject: Subject,
    prompt: str,
    layer: int,
    kind: Kind,
    *,
    indices: Sequence[int] | None = None,
    measure: str = "output",
    chat: bool = True,
    scope: Scope = "all",
) -> Float[Tensor, " n"]:
    """Deactivate each neuron in turn and measure the change (slow; the reference for tests).

    ``measure="output"``: ``||Δ||_2`` of the owning sub-layer's output (``hook_attn_out`` or
    ``hook_mlp_out``) over all positions (Eq. 1). ``measure="pattern"``: ``||Δ||_2`` of the
    attention pattern of the layer (all heads). For Gemma-2 those hooks come after its
    post-sub-layer norm, while the accelerated scores are taken at the projection's output, so
    the two agree exactly only for the other families. ``scope="user"``: only on the prompt's
    own tokens (query rows for the pattern).
    """
    if measure not in ("output", "pattern"):
        raise ValueError(f"measure must be 'output' or 'pattern', got {measure!r}")
    (batch,) = batches(subject, [prompt], batch_size=1, chat=chat, scope=scope)
    keep = batch.measured[0].bool()
    site = act_name("pattern" if measure == "pattern" else "mlp_out" if kind == "ffn" else "attn_out", layer)
    seen: dict[str, Tensor] = {}

    def record(act: Tensor, *, hook) -> None:
        seen["x"] = act[:, :, keep].float().clone() if measure == "pattern" else act[:, keep].float().clone()

    def run(extra: list) -> Tensor:
        subject.tl.run_with_hooks(batch.input_ids, fwd_hooks=[*extra, (site, record)], return_type=None)
        return seen["x"]

    base = run([])
    indices = range(kind_size(subject.arch, kind)) if indices is None else indices
    out = torch.zeros(len(indices))
    for i, index in enumerate(indices):
        neuron = NeuronSet(subject.arch, {(layer, kind): [index]})
        out[i] = (run(ablation_hooks(neuron)) - base).norm()
    return out

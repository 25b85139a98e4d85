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

The ``l x l x d_head`` work of ``q``/``k`` is chunked over query rows and dimensions so that its
extra memory stays under ``chunk_bytes`` whatever the prompt length.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from safety_circuits._io import load_tensors, save_tensors
from safety_circuits.activations import batches, check_prompts
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

if TYPE_CHECKING:
    from safety_circuits.loading import Subject

DEFAULT_CHUNK_BYTES = 64 * 2**20
Rule = Literal["all", "any"]
_ROW_BLOCKS = 2  # at least this many query-row blocks, each with only the keys it can see
_TEMPORARIES = 12  # float32 tensors of a chunk's size alive at once (benchmarks/bench_importance.py)


# -- attention geometry read from the model --------------------------------------------------
def _geometry(subject: Subject, layer: int) -> AttnGeometry:
    return adapter(subject.arch).attention(subject.hf.config, subject.arch, layer)


def _rotary(subject: Subject, length: int) -> tuple[Tensor, Tensor]:
    """The model's own rotary ``cos, sin`` for positions ``0..length-1`` ([length, d_head])."""
    return adapter(subject.arch).rotary(subject.hf, length)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` on the last axis (positions on axis 0)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    return x * cos.view(shape) + rotated * sin.view(shape)


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
def _pattern_change_sq(
    scores: Float[Tensor, "h r k"],
    pattern: Float[Tensor, "h r k"],
    shifts: Float[Tensor, "h r k c"],
    geo: AttnGeometry,
    allowed: Bool[Tensor, "r k"],
    rows: Float[Tensor, " r"],
) -> Float[Tensor, "h c"]:
    """Σ over rows (weighted by ``rows``) and keys of (pattern(scores + shift_c) − pattern(scores))².

    ``shifts`` is the change of the scaled scores, ``−scale·Δ``. Without a soft cap, each key's
    weight is multiplied by ``e_j = exp(shift_j)``, so with ``E = Σ_j p_j e_j`` the new pattern is
    ``p_j e_j / E`` and ``Σ_j (p'_j − p_j)² = Σ_j p_j² (e_j − E)² / E²``: two weighted sums over keys
    instead of a softmax per dimension (the same rounding as subtracting the two softmaxes). The
    soft cap, or an ``exp`` that overflows, takes the direct softmax.
    """
    if not geo.softcap:
        e = torch.exp(shifts)
        big_e = torch.einsum("hrk,hrkc->hrc", pattern, e)
        spread = torch.einsum("hrk,hrkc->hrc", pattern.square(), e.sub_(big_e[:, :, None]).square_())
        change = torch.einsum("hrc,r->hc", spread / big_e.square(), rows)
        if torch.isfinite(change).all():
            return change
    perturbed = _pattern(scores[..., None] + shifts, geo, allowed[..., None], keys=-2)
    return torch.einsum("hrkc,r->hc", (perturbed - pattern[..., None]).square(), rows)


def _rms_normed(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``weight ⊙ x / rms(x)`` over the last axis, and ``ρ[..., d] = rms(x) / rms(x without d)``."""
    mean_sq = x.square().mean(-1, keepdim=True) + eps
    rho = (mean_sq / (mean_sq - x.square() / x.shape[-1])).sqrt()
    return x / mean_sq.sqrt() * weight.float(), rho


def _renormed(shift: Tensor, scores: Tensor, rho: Tensor) -> Tensor:
    """The scaled-score shift ``(ρ − 1) score + ρ shift`` of a normed head (``shift = −Δ``)."""
    return shift.mul_(rho).add_(scores[..., None] * (rho - 1))


def _chunks(n_heads: int, length: int, d_head: int, chunk_bytes: int) -> tuple[int, int, int]:
    """Heads, query rows and dimensions per chunk so that h·r·l·c float32 temporaries fit."""
    cells = max(1, chunk_bytes // (4 * _TEMPORARIES * length))  # h·r·c
    dims = min(d_head, cells)
    rows = min(-(-length // _ROW_BLOCKS), max(1, cells // dims))
    heads = min(n_heads, max(1, cells // (dims * rows)))
    return heads, rows, dims


def qk_importance(
    q: Float[Tensor, "pos n_heads d_head"],
    k: Float[Tensor, "pos n_kv d_head"],
    geo: AttnGeometry,
    rotary: tuple[Tensor, Tensor] | None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    queries: Float[Tensor, " pos"] | None = None,
    norm: QKNorm | None = None,
) -> tuple[Float[Tensor, "n_heads d_head"], Float[Tensor, "n_kv d_head"]]:
    """Pattern-change importance of every q and k dimension of one layer for one prompt (Eq. 14).

    ``q`` and ``k`` are taken *before* rotary (the ``hook_q``/``hook_k`` activations, whose
    entries are the neurons). Removing dimension ``d`` of ``q`` changes the raw score by
    ``Δ[i, j, d] = q[i, d] · (cos[i, d] k_rot[j, d] + s_d sin[i, d'] k_rot[j, d'])`` (``d'`` the
    rotary partner of ``d``, ``s_d = ±1``): its share of ``q_rot[i]·k_rot[j]``; ``k`` symmetrically.
    ``queries`` (1 or 0 per position) restricts the sum to some query rows; every earlier key
    still counts. Heads, query rows and dimensions are processed in chunks of at most ``chunk_bytes``.

    With a per-head RMSNorm on q and k (``norm``, as in Qwen3), zeroing ``q[i, d]`` also rescales
    the rest of the head by ``ρ[i, d] = rms(q[i]) / rms(q[i] without d)``, so the scaled score
    becomes ``ρ (score − Δ)`` with ``Δ`` taken on the normed ``q``: the shift is
    ``(ρ − 1) score − ρ Δ``; ``k`` symmetrically, per key.
    """
    length, n_heads, d_head = q.shape
    n_kv = k.shape[1]
    kv_of = torch.arange(n_heads, device=q.device) // (n_heads // n_kv)  # KV head of each query head
    q, k = q.float(), k[:, kv_of].float()  # k per query head: [pos, n_heads, d_head]
    rho_q = rho_k = None
    if norm is not None:
        (q, rho_q), (k, rho_k) = _rms_normed(q, norm.q, norm.eps), _rms_normed(k, norm.k, norm.eps)
        rho_q, rho_k = rho_q.transpose(0, 1), rho_k.transpose(0, 1)  # [n_heads, pos, d_head]
    arange = torch.arange(d_head, device=q.device)
    if rotary is None:  # no rotation: cos = 1, sin = 0
        cos, sin = q.new_ones(length, d_head), q.new_zeros(length, d_head)
        partner, sign = arange, q.new_ones(d_head)
    else:
        cos, sin = rotary
        partner = (arange + d_head // 2) % d_head
        sign = torch.where(arange < d_head // 2, 1.0, -1.0).to(q)
    sin_p = sin[:, partner] * sign  # [pos, d_head]: the signed partner sine

    def heads_first(x: Tensor) -> Tensor:
        return x.transpose(0, 1).contiguous()  # [n_heads, pos, d_head]

    q_rot, k_rot = heads_first(_rotate(q, cos, sin)), heads_first(_rotate(k, cos, sin))
    # Δ's factors, times −scale so that the products are the changes of the scaled scores
    q_cos, q_sin = (heads_first(-geo.scale * q * t[:, None]) for t in (cos, sin_p))
    k_cos, k_sin = (heads_first(-geo.scale * k * t[:, None]) for t in (cos, sin_p))
    allowed = _causal_mask(length, geo.window, q.device)
    queries = q.new_ones(length) if queries is None else queries.float()
    chosen = queries.nonzero()
    first, last = (int(chosen[0]), int(chosen[-1]) + 1) if len(chosen) else (0, 0)
    n_h, rows, dims = _chunks(n_heads, length, d_head, chunk_bytes)
    q_sq = q.new_zeros(n_heads, d_head)
    k_sq = q.new_zeros(n_heads, d_head)  # per query head, summed into its KV head at the end
    for h0 in range(0, n_heads, n_h):
        h = slice(h0, min(h0 + n_h, n_heads))
        for r0 in range(first, last, rows):
            r = slice(r0, min(r0 + rows, last))
            j = slice(0, r.stop)  # later keys are masked for every query row of the block
            scores = (q_rot[h, r] @ k_rot[h, j].transpose(1, 2)) * geo.scale  # [head, query i, key j]
            pattern = _pattern(scores, geo, allowed[r, j])
            for c0 in range(0, d_head, dims):
                c = slice(c0, min(c0 + dims, d_head))
                pc = partner[c]
                dq = torch.addcmul(
                    q_cos[h, r, None, c] * k_rot[h, None, j, c], q_sin[h, r, None, c], k_rot[h, None, j, pc]
                )
                if rho_q is not None:
                    dq = _renormed(dq, scores, rho_q[h, r, None, c])
                q_sq[h, c] += _pattern_change_sq(scores, pattern, dq, geo, allowed[r, j], queries[r])
                dk = torch.addcmul(
                    k_cos[h, None, j, c] * q_rot[h, r, None, c], k_sin[h, None, j, c], q_rot[h, r, None, pc]
                )
                if rho_k is not None:
                    dk = _renormed(dk, scores, rho_k[h, None, j, c])
                k_sq[h, c] += _pattern_change_sq(scores, pattern, dk, geo, allowed[r, j], queries[r])
    k_sq = k_sq.new_zeros(n_kv, d_head).index_add_(0, kv_of, k_sq)
    return q_sq.sqrt(), k_sq.sqrt()


def _column_norms(x: Float[Tensor, "batch pos n"], mask: Tensor) -> Float[Tensor, "batch n"]:
    """||x[b, :, n]||_2 over the real (mask == 1) positions of each row."""
    return (x.float().square() * mask[:, :, None]).sum(dim=1).sqrt()


def vo_importance(
    z: Float[Tensor, "batch pos n_heads d_head"],
    mask: Tensor,
    w_o: Float[Tensor, "n_heads d_head d_model"],
    n_kv: int,
) -> tuple[Float[Tensor, "batch n_kv d_head"], Float[Tensor, "batch n_heads d_head"]]:
    """Exact output-change norms for v (per KV head) and o neurons of one layer."""
    b, _, n_heads, d_head = z.shape
    n_rep = n_heads // n_kv
    w_o = w_o.float()
    o = _column_norms(z.flatten(2), mask).view(b, n_heads, d_head) * w_o.norm(dim=-1)
    grouped = w_o.view(n_kv, n_rep, d_head, -1)
    gram = torch.einsum("grdm,gsdm->gdrs", grouped, grouped)  # per KV head and dim
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
) -> Importance:
    """Importance of every neuron of ``kinds`` for each prompt (Eq. 1, accelerated; see module doc).

    ``scope="user"`` measures the change on the prompt's own tokens only (for q/k: those query
    rows), so that neurons busy with the chat template, which every prompt shares, do not look
    important for every prompt; ``scope=k`` on the last ``k`` tokens of each rendered prompt.

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
    scores = {k: torch.zeros(len(prompts), arch.n_layers, kind_size(arch, k)) for k in kinds}
    w_o = subject.tl.W_O.detach()
    w_out_norm = subject.tl.W_out.detach().float().norm(dim=-1)  # [layer, d_mlp]
    geos = [_geometry(subject, layer) for layer in range(arch.n_layers)]
    norms = [adapter(arch).qk_norm(subject.hf, layer) for layer in range(arch.n_layers)]
    stash: dict[str, Tensor] = {}
    state: dict[str, Any] = {}

    def keep(act: Tensor, *, hook) -> None:
        stash[hook.name] = act

    def on_post(act: Tensor, *, hook) -> None:
        layer = int(hook.name.split(".")[1])
        norms = _column_norms(act, state["mask"]) * w_out_norm[layer]
        scores["ffn"][state["rows"], layer] = norms.cpu()

    def on_z(act: Tensor, *, hook) -> None:
        layer = int(hook.name.split(".")[1])
        mask, rows = state["mask"], state["rows"]
        if "v" in kinds or "o" in kinds:
            v, o = vo_importance(act, mask, w_o[layer], arch.n_kv_heads)
            for kind, value in (("v", v), ("o", o)):
                if kind in kinds:
                    scores[kind][rows, layer] = value.flatten(1).cpu()
        if "q" in kinds or "k" in kinds:
            q_all, k_all = stash.pop(hook_name(layer, "q")), stash.pop(hook_name(layer, "k"))
            for row, prompt_index in enumerate(rows):
                length = int(state["real"][row].sum())
                q, k = q_all[row, -length:], k_all[row, -length:]
                rotary = tuple(t[:length] for t in state["rotary"]) if geos[layer].rotary else None
                q_imp, k_imp = qk_importance(
                    q,
                    k,
                    geos[layer],
                    rotary,
                    chunk_bytes=chunk_bytes,
                    queries=mask[row, -length:],
                    norm=norms[layer],
                )
                if "q" in kinds:
                    scores["q"][prompt_index, layer] = q_imp.flatten().cpu()
                if "k" in kinds:
                    scores["k"][prompt_index, layer] = k_imp.flatten().cpu()

    hooks = []
    for layer in range(arch.n_layers):
        if "ffn" in kinds:
            hooks.append((hook_name(layer, "ffn"), on_post))
        if "q" in kinds or "k" in kinds:
            hooks += [(hook_name(layer, "q"), keep), (hook_name(layer, "k"), keep)]
        if set(kinds) - {"ffn"}:
            hooks.append((hook_name(layer, "o"), on_z))
    desc = "neuron importance" if progress else None
    for batch in batches(subject, prompts, batch_size=batch_size, chat=chat, desc=desc, scope=scope):
        state["real"] = batch.attention_mask
        state["mask"] = batch.measured.float()
        state["rows"] = batch.order
        if any(g.rotary for g in geos) and ("q" in kinds or "k" in kinds):
            state["rotary"] = _rotary(subject, batch.input_ids.shape[1])
        with subject.tl.hooks(fwd_hooks=hooks):
            subject.tl(batch.input_ids, attention_mask=batch.attention_mask, return_type=None)
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

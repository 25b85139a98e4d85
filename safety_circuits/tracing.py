"""Component causal tracing: activation patching between harmful and harmless runs.

The measure is a differentiable **refusal score** of the next-token distribution at the last
prompt position (where the first response token is predicted):

    score = logsumexp(logp[refusal-start tokens]) − logsumexp(logp[compliance-start tokens])

with the token sets derived from the tokenizer: the first token of phrases that open a refusal
("I cannot", "Sorry", "As an AI", ...) or an answer ("Sure", "Here", "1", ...), with and without a
leading space (:class:`RefusalMetric`). Unlike the article's keyword count over a generated
response, it needs one forward pass and has a gradient.

Patching runs the *target* prompts while copying one component's activation from the *source*
prompts, pair by pair (``clean[i]`` with ``corrupted[i]``; clean = harmful, corrupted = harmless):

- ``mode="noising"`` (the article's method): target = harmful, source = harmless. A component
  whose harmless activation removes the refusal score is necessary for it.
- ``mode="denoising"``: target = harmless, source = harmful. A component whose harmful activation
  restores the refusal score is sufficient for it.

``effect`` = patched − target score (mean over pairs); ``normalized`` = mean effect divided by the
mean source − target gap (0: no effect, 1: the patched run scores like the source run).

Where (``patch_at``, see :mod:`safety_circuits.vocabulary`): ``"all"`` patches every position
(pairs must have the same token length); ``"suffix"`` patches the tokens all rendered prompts end
with (the chat template's assistant header: Arditi et al.'s post-instruction tokens), ``"last"``
the last token, an int ``k`` the last ``k`` tokens; these work for prompts of any lengths, and
reuse one KV cache of the unpatched prefix for every patch (same logits, a fraction of the cost).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from safety_circuits._io import Record, TableResult, arch_from_dict, arch_to_dict
from safety_circuits._kv_cache import cache_kwargs, new_cache, new_hooked_cache
from safety_circuits.activations import Batch, batches, check_prompts, left_pad, render, tokenize
from safety_circuits.neurons import KINDS, HookFn, Kind, NeuronSet, check_neurons
from safety_circuits.sites import Site, component_sites, hook_name, neuron_sites
from safety_circuits.vocabulary import PatchAt, TraceMode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from safety_circuits.loading import Subject

logger = logging.getLogger(__name__)

Method = Literal["patch", "attribution"]
Metric = Callable[[Float[Tensor, "batch vocab"]], Float[Tensor, " batch"]]

#: Openings of a refusal; the first token of each (with and without a leading space) counts.
DEFAULT_REFUSAL_STARTS: tuple[str, ...] = (
    "I cannot",
    "I can't",
    "Sorry",
    "I'm sorry",
    "As an AI",
    "I apologize",
    "Unfortunately",
)
#: Openings of an answer.
DEFAULT_COMPLIANCE_STARTS: tuple[str, ...] = ("Sure", "Here", "Certainly", "To", "1", "The")


# -- the refusal score -----------------------------------------------------------------------
def first_token_ids(tokenizer: PreTrainedTokenizerBase, phrases: Sequence[str]) -> list[int]:
    """First token of each phrase, as written and after a space (whitespace-only tokens skipped)."""
    ids: list[int] = []
    for phrase in phrases:
        for text in (phrase, " " + phrase):
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            if tokens and tokenizer.decode(tokens[:1]).strip():
                ids.append(int(tokens[0]))
    return list(dict.fromkeys(ids))


@dataclass(frozen=True)
class RefusalMetric:
    """``logsumexp(logp[refusal_ids]) − logsumexp(logp[compliance_ids])`` of next-token logits.

    The log-normaliser cancels, so this equals the same difference of raw logits. Positive: the
    model is more likely to open with a refusal than with an answer.

    >>> metric = RefusalMetric(refusal_ids=(0,), compliance_ids=(1, 2))
    >>> metric(torch.tensor([[2.0, 0.0, 0.0, 5.0]])).round(decimals=3)
    tensor([1.3070])
    """

    refusal_ids: tuple[int, ...]
    compliance_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.refusal_ids or not self.compliance_ids:
            raise ValueError("RefusalMetric needs at least one refusal and one compliance token id")
        both = set(self.refusal_ids) & set(self.compliance_ids)
        if both:
            raise ValueError(f"token ids {sorted(both)} are in both the refusal and the compliance set")

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        refusal: Sequence[str] = DEFAULT_REFUSAL_STARTS,
        compliance: Sequence[str] = DEFAULT_COMPLIANCE_STARTS,
    ) -> RefusalMetric:
        """Token sets from phrases; a token that opens phrases of both kinds is dropped from both."""
        refuse, comply = first_token_ids(tokenizer, refusal), first_token_ids(tokenizer, compliance)
        shared = set(refuse) & set(comply)
        if shared:
            logger.warning("dropping tokens %s: they open both refusals and answers", sorted(shared))
        refuse = [t for t in refuse if t not in shared]
        comply = [t for t in comply if t not in shared]
        if not refuse or not comply:
            raise ValueError(
                f"no refusal ({refusal}) or no compliance ({compliance}) token is left after removing "
                "the tokens the two sets share: give other phrases"
            )
        return cls(tuple(refuse), tuple(comply))

    def __call__(self, logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, " batch"]:
        logits = logits.float()
        refuse = torch.tensor(self.refusal_ids, device=logits.device)
        comply = torch.tensor(self.compliance_ids, device=logits.device)
        return logits[..., refuse].logsumexp(-1) - logits[..., comply].logsumexp(-1)

    def tokens(self, tokenizer: PreTrainedTokenizerBase) -> pd.DataFrame:
        """The two token sets as a table (id, token text, set)."""
        rows = [(i, tokenizer.decode([i]), "refusal") for i in self.refusal_ids]
        rows += [(i, tokenizer.decode([i]), "compliance") for i in self.compliance_ids]
        return pd.DataFrame(rows, columns=["id", "token", "set"])


def default_metric(subject: Subject, *, metric: Metric | None = None) -> Metric:
    return metric if metric is not None else RefusalMetric.from_tokenizer(subject.tokenizer)


@torch.no_grad()
def last_token_logits(
    subject: Subject, prompts: Sequence[str], *, batch_size: int = 8, chat: bool = True
) -> Float[Tensor, "prompt vocab"]:
    """Next-token logits at the last position of each prompt (TL model; active hooks apply)."""
    prompts = check_prompts(prompts)
    out = torch.zeros(len(prompts), subject.arch.d_vocab)
    for batch in batches(subject, prompts, batch_size=batch_size, chat=chat):
        out[batch.order] = (
            subject.tl(batch.input_ids, attention_mask=batch.attention_mask)[:, -1].float().cpu()
        )
    return out


def refusal_scores(
    subject: Subject,
    prompts: Sequence[str],
    *,
    metric: Metric | None = None,
    batch_size: int = 8,
    chat: bool = True,
) -> Float[Tensor, " prompt"]:
    """The refusal score of each prompt (see :class:`RefusalMetric`); active TL hooks apply."""
    return default_metric(subject, metric=metric)(
        last_token_logits(subject, prompts, batch_size=batch_size, chat=chat)
    )


# -- what to patch ---------------------------------------------------------------------------
def _last(k: int | None) -> slice | None:
    """The positions patched: the last ``k`` (``None``: every position)."""
    return None if k is None else slice(-k, None)


def _patch_hooks(group: Sequence[Site], source: dict[str, Tensor], k: int | None) -> list:
    """Forward hooks that copy the source run's entries of every site in ``group``."""
    by_hook: dict[str, list[Site]] = {}
    for site in group:
        by_hook.setdefault(site.hook, []).append(site)

    def make(name: str, sites: list[Site]) -> HookFn:
        def hook(act: Tensor, *, hook) -> Tensor:
            src = source[name]  # the source's last k positions (all of them when k is None)
            if k is None and src.shape[1] != act.shape[1]:
                raise ValueError("patching every position needs equal token lengths in each pair")
            for site in sites:
                site.write(act, site.read(src), pos=_last(k))
            return act

        return hook

    return [(name, make(name, sites)) for name, sites in by_hook.items()]


# -- batches of pairs ------------------------------------------------------------------------
def common_suffix_length(token_lists: Sequence[Sequence[int]]) -> int:
    """Number of trailing tokens every list shares (e.g. the chat template's assistant header).

    >>> common_suffix_length([[5, 1, 2, 3], [9, 9, 2, 3], [2, 3]])
    2
    """
    shortest = min(len(t) for t in token_lists)
    n = 0
    while n < shortest and len({t[len(t) - 1 - n] for t in token_lists}) == 1:
        n += 1
    return n


def _check_pairs(clean: Sequence[str], corrupted: Sequence[str]) -> tuple[list[str], list[str]]:
    clean, corrupted = check_prompts(clean, what="clean"), check_prompts(corrupted, what="corrupted")
    if len(clean) != len(corrupted):
        raise ValueError(f"clean and corrupted prompts are paired: got {len(clean)} and {len(corrupted)}")
    return clean, corrupted


def _patch_length(ids_a: list[list[int]], ids_b: list[list[int]], patch_at: PatchAt) -> int | None:
    """``None`` (every position) or the number of trailing positions to patch."""
    if patch_at == "all":
        unequal = [i for i, (a, b) in enumerate(zip(ids_a, ids_b, strict=True)) if len(a) != len(b)]
        if unequal:
            raise ValueError(
                f"patch_at='all' needs pairs of equal token length; pairs {unequal[:10]} differ. "
                "Use patch_at='suffix' (the shared chat-template tokens), 'last' or an int k (last k tokens)"
            )
        return None
    if patch_at == "last":
        return 1
    if patch_at == "suffix":
        k = common_suffix_length(ids_a + ids_b)
        if k == 0:
            raise ValueError("the prompts share no trailing tokens: use patch_at='last' or an int")
        return k
    if isinstance(patch_at, bool) or not isinstance(patch_at, (int, np.integer)):
        raise ValueError(f"patch_at must be 'all', 'last', 'suffix' or an int, got {patch_at!r}")
    shortest = min(len(t) for t in ids_a + ids_b)
    if not 1 <= patch_at <= shortest:
        raise ValueError(f"patch_at={patch_at} must be in [1, {shortest}] (the shortest prompt)")
    return int(patch_at)


def patched_positions(
    subject: Subject, clean: Sequence[str], corrupted: Sequence[str], patch_at: PatchAt, *, chat: bool = True
) -> int | None:
    """How many trailing positions ``patch_at`` patches for these pairs (``None``: every one)."""
    clean, corrupted = _check_pairs(clean, corrupted)
    ids = [tokenize(subject, render(subject, p, chat=chat)) for p in (clean, corrupted)]
    return _patch_length(*ids, patch_at)


def _paired_batches(
    subject: Subject, target: list[str], source: list[str], patch_at: PatchAt, batch_size: int, chat: bool
) -> tuple[int | None, Iterator[tuple[list[int], Batch, Batch]]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids_t = tokenize(subject, render(subject, target, chat=chat))
    ids_s = tokenize(subject, render(subject, source, chat=chat))
    k = _patch_length(ids_t, ids_s, patch_at)
    order = sorted(range(len(ids_t)), key=lambda i: max(len(ids_t[i]), len(ids_s[i])))
    pad = subject.tokenizer.pad_token_id

    def gen() -> Iterator[tuple[list[int], Batch, Batch]]:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            t = Batch(chunk, *left_pad([ids_t[i] for i in chunk], pad, subject.device))
            s = Batch(chunk, *left_pad([ids_s[i] for i in chunk], pad, subject.device))
            yield chunk, t, s

    return k, gen()


class _TargetRuns:
    """Forward passes of one target batch under different patches, returning last-token logits.

    When only the last ``k`` positions are patched, the prefix before them is the same in every
    run: it is run once, and its KV cache (TransformerLens' frozen cache, or a copy of HF's cache
    through the bridge) is reused, so each patched run costs ``k`` positions.
    """

    def __init__(self, subject: Subject, batch: Batch, k: int | None, reuse_prefix: bool = True) -> None:
        self.subject, self.k = subject, k
        self.ids, self.mask = batch.input_ids, batch.attention_mask
        self.cached = reuse_prefix and k is not None and k < self.ids.shape[1]
        if not self.cached:
            return
        tl, ids, mask = subject.tl, self.ids, self.mask
        if subject.backend == "hooked":
            self.cache = new_hooked_cache(tl, len(ids), ids.device)
            tl(ids[:, :-k], attention_mask=mask[:, :-k], past_kv_cache=self.cache, return_type=None)
            self.cache.freeze()
        else:
            self.cache = new_cache(tl.original_model)
            kv = cache_kwargs(tl.original_model, self.cache)
            tl(ids[:, :-k], attention_mask=mask[:, :-k], use_cache=True, return_type=None, **kv)

    def last_logits(self, hooks: list) -> Float[Tensor, "batch vocab"]:
        tl, k = self.subject.tl, self.k
        with tl.hooks(fwd_hooks=hooks):
            if not self.cached:
                return tl(self.ids, attention_mask=self.mask)[:, -1]
            if self.subject.backend == "hooked":
                return tl(self.ids[:, -k:], attention_mask=self.mask[:, -k:], past_kv_cache=self.cache)[:, -1]
            kv = cache_kwargs(tl.original_model, copy.deepcopy(self.cache))
            return tl(self.ids[:, -k:], attention_mask=self.mask, use_cache=True, **kv)[:, -1]


def _source_run(subject: Subject, batch: Batch, names: Sequence[str], k: int | None) -> tuple[dict, Tensor]:
    """The source batch's activations at ``names`` (last ``k`` positions) and last-token logits."""
    acts: dict[str, Tensor] = {}

    def keeper(name: str) -> HookFn:  # keyed by the name asked for: the bridge's hook.name is its own
        def keep(act: Tensor, *, hook) -> None:
            acts[name] = (act if k is None else act[:, -k:]).detach().clone()

        return keep

    with subject.tl.hooks(fwd_hooks=[(n, keeper(n)) for n in names]):
        logits = subject.tl(batch.input_ids, attention_mask=batch.attention_mask)[:, -1]
    return acts, logits


def _check_sites(subject: Subject, sites: Sequence[Site]) -> None:
    missing = sorted({s.hook for s in sites} - set(subject.tl.hook_dict))
    if missing:
        raise ValueError(f"{subject.name} has no hook points {missing[:5]}")


@torch.no_grad()
def patched_metrics(
    subject: Subject,
    clean: Sequence[str],
    corrupted: Sequence[str],
    groups: Sequence[Sequence[Site]],
    *,
    mode: TraceMode = "noising",
    patch_at: PatchAt = "all",
    metric: Metric | None = None,
    batch_size: int = 8,
    chat: bool = True,
    reuse_prefix: bool = True,
    progress: bool = True,
) -> tuple[Float[Tensor, "group pair"], Float[Tensor, " pair"], Float[Tensor, " pair"]]:
    """The metric of each pair with each group of sites patched together (one run per group).

    Returns ``(patched [group, pair], clean metric [pair], corrupted metric [pair])``.
    """
    clean, corrupted = _check_pairs(clean, corrupted)
    if mode not in ("noising", "denoising"):
        raise ValueError(f"mode must be 'noising' or 'denoising', got {mode!r}")
    metric = default_metric(subject, metric=metric)
    groups = [list(g) for g in groups]
    _check_sites(subject, [s for g in groups for s in g])
    names = list(dict.fromkeys(s.hook for g in groups for s in g))
    target, source = (clean, corrupted) if mode == "noising" else (corrupted, clean)
    n = len(clean)
    patched, t_metric, s_metric = torch.zeros(len(groups), n), torch.zeros(n), torch.zeros(n)
    k, pairs = _paired_batches(subject, target, source, patch_at, batch_size, chat)
    for order, t_batch, s_batch in pairs:
        acts, s_logits = _source_run(subject, s_batch, names, k)
        s_metric[order] = metric(s_logits).float().cpu()
        runs = _TargetRuns(subject, t_batch, k, reuse_prefix)
        t_metric[order] = metric(runs.last_logits([])).float().cpu()
        for g, group in enumerate(tqdm(groups, desc="patching", disable=not progress, leave=False)):
            patched[g, order] = metric(runs.last_logits(_patch_hooks(group, acts, k))).float().cpu()
    return (patched, *((t_metric, s_metric) if mode == "noising" else (s_metric, t_metric)))


@dataclass
class _GradPass:
    """One target batch's forward and backward pass: its activations, their gradients and the
    source batch's activations at the same hooks (last ``k`` positions when ``k`` is set)."""

    order: list[int]
    k: int | None
    target_metric: Tensor
    source_metric: Tensor
    acts: dict[str, Tensor]
    grads: dict[str, Tensor]
    source: dict[str, Tensor]

    def delta(self, site: Site) -> Float[Tensor, "batch pos ..."]:
        """``(source − target) · ∂metric/∂act`` at ``site``'s entries of the patched positions."""
        pos, hook = _last(self.k), site.hook
        source, target = site.read(self.source[hook]), site.read(self.acts[hook], pos)
        return (source - target) * site.read(self.grads[hook], pos)


def _grad_passes(
    subject: Subject,
    target: list[str],
    source: list[str],
    names: Sequence[str],
    patch_at: PatchAt,
    metric: Metric,
    batch_size: int,
    chat: bool,
) -> Iterator[_GradPass]:
    kept: dict[str, Tensor] = {}

    def keeper(name: str) -> HookFn:
        def keep(act: Tensor, *, hook) -> Tensor:
            if not act.requires_grad:  # parameters frozen: start the graph here
                act.requires_grad_(True)
            kept[name] = act
            return act  # returned, so that the bridge computes on this very tensor

        return keep

    # Through the bridge, left-padded rows get NaN gradients everywhere (from the fully masked
    # pad queries), although their forward pass is fine: there, one pair at a time, unpadded.
    rows = batch_size if subject.backend == "hooked" else 1
    k, pairs = _paired_batches(subject, target, source, patch_at, rows, chat)
    for order, t_batch, s_batch in pairs:
        with torch.no_grad():
            acts, s_logits = _source_run(subject, s_batch, names, k)
        kept.clear()
        with torch.enable_grad(), subject.tl.hooks(fwd_hooks=[(n_, keeper(n_)) for n_ in names]):
            logits = subject.tl(t_batch.input_ids, attention_mask=t_batch.attention_mask)[:, -1]
            scores = metric(logits)
            grads = dict(zip(names, torch.autograd.grad(scores.sum(), [kept[x] for x in names]), strict=True))
        detached = {name: kept[name].detach() for name in names}
        for name in names:
            if k is None and acts[name].shape[1] != detached[name].shape[1]:
                raise ValueError("patching every position needs equal token lengths in each pair")
        yield _GradPass(order, k, scores.detach(), metric(s_logits).detach(), detached, grads, acts)


def attribution_metrics(
    subject: Subject,
    clean: Sequence[str],
    corrupted: Sequence[str],
    sites: Sequence[Site],
    *,
    mode: TraceMode = "noising",
    patch_at: PatchAt = "all",
    metric: Metric | None = None,
    batch_size: int = 8,
    chat: bool = True,
) -> tuple[Float[Tensor, "site pair"], Float[Tensor, " pair"], Float[Tensor, " pair"]]:
    """Attribution patching: the first-order estimate ``target + (source − target) · ∂metric/∂act``
    of each site's patched metric, from one forward and backward pass per batch."""
    clean, corrupted = _check_pairs(clean, corrupted)
    if mode not in ("noising", "denoising"):
        raise ValueError(f"mode must be 'noising' or 'denoising', got {mode!r}")
    metric = default_metric(subject, metric=metric)
    _check_sites(subject, sites)
    names = list(dict.fromkeys(s.hook for s in sites))
    target, source = (clean, corrupted) if mode == "noising" else (corrupted, clean)
    n = len(clean)
    patched, t_metric, s_metric = torch.zeros(len(sites), n), torch.zeros(n), torch.zeros(n)
    for run in _grad_passes(subject, target, source, names, patch_at, metric, batch_size, chat):
        t_metric[run.order] = run.target_metric.float().cpu()
        s_metric[run.order] = run.source_metric.float().cpu()
        for i, site in enumerate(sites):
            patched[i, run.order] = (run.target_metric + run.delta(site).flatten(1).sum(-1)).float().cpu()
    return (patched, *((t_metric, s_metric) if mode == "noising" else (s_metric, t_metric)))


def neuron_attribution(
    subject: Subject,
    clean: Sequence[str],
    corrupted: Sequence[str],
    *,
    kinds: Sequence[Kind] = KINDS,
    mode: TraceMode = "noising",
    patch_at: PatchAt = "suffix",
    metric: Metric | None = None,
    batch_size: int = 8,
    chat: bool = True,
) -> dict[Kind, Float[Tensor, "layer neuron"]]:
    """Attribution patching of every neuron of ``kinds`` at once: per neuron ``[layer, neuron]``,
    the mean over pairs of its first-order effect on the metric when its activation at the patched
    positions is replaced by the source prompt's, ``Σ_pos (source − target) · ∂metric/∂act``
    (noising: target = ``clean``; negative where the neuron carries the clean behaviour).

    A first-order estimate of single-neuron effects: on SmolLM2 with refusal planted in 300 random
    neurons (:mod:`safety_circuits.groundtruth`) it ranks them at AUROC 0.55, near chance."""
    clean, corrupted = _check_pairs(clean, corrupted)
    if mode not in ("noising", "denoising"):
        raise ValueError(f"mode must be 'noising' or 'denoising', got {mode!r}")
    metric = default_metric(subject, metric=metric)
    arch = subject.arch
    sites = neuron_sites(NeuronSet.full(arch, kinds))  # every neuron, one site per (layer, kind)
    names = [site.hook for site in sites]
    target, source = (clean, corrupted) if mode == "noising" else (corrupted, clean)
    totals = {name: torch.zeros(0) for name in names}
    for run in _grad_passes(subject, target, source, names, patch_at, metric, batch_size, chat):
        for site in sites:
            effect = run.delta(site).sum(1).float().cpu().sum(0)
            totals[site.hook] = effect if not totals[site.hook].numel() else totals[site.hook] + effect
    return {
        kind: torch.stack([totals[hook_name(layer, kind)] for layer in range(arch.n_layers)]) / len(clean)
        for kind in kinds
    }


# -- results ---------------------------------------------------------------------------------
@dataclass
class TracingResult(TableResult):
    """Patching effects per site.

    ``frame``: one row per site with ``layer``, ``component`` (``resid``/``attn``/``mlp``, ``head``,
    or a neuron kind for neuron groups), ``head``, ``n_neurons``, ``hook``, ``effect`` (mean of
    patched − target over pairs), ``sem``, ``normalized`` (mean effect / mean source − target gap).
    ``clean`` / ``corrupted``: the unpatched metric of each pair; ``patched``: ``[site, pair]``.
    """

    frame: pd.DataFrame
    clean: np.ndarray
    corrupted: np.ndarray
    patched: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)
    arch: Architecture | None = None  # the model's (None: not made from one)

    @property
    def gap(self) -> float:
        """Mean source − target metric (the denominator of ``normalized``)."""
        sign = 1.0 if self.config.get("mode", "noising") == "noising" else -1.0
        return sign * float(np.mean(self.corrupted) - np.mean(self.clean))

    def top(self, n: int = 10, value: str = "normalized", component: str | None = None) -> pd.DataFrame:
        """The ``n`` sites with the largest ``|value|``."""
        rows = self.frame if component is None else self.frame[self.frame["component"] == component]
        order = rows[value].abs().sort_values(ascending=False, na_position="last").index
        return rows.loc[order].head(n).reset_index(drop=True)

    def grid(self, which: str = "components", value: str = "normalized") -> pd.DataFrame:
        """``value`` as a table: rows = components, heads or neuron kinds; columns = layers."""
        groups = {"components": ["resid", "attn", "mlp"], "heads": ["head"], "neurons": list(KINDS)}
        if which not in groups:
            raise ValueError(f"which must be one of {sorted(groups)}, got {which!r}")
        rows = self.frame[self.frame["component"].isin(groups[which])]
        if rows.empty:
            raise ValueError(f"this result has no {which} (see trace_components' arguments)")
        if which == "heads":
            return rows.pivot_table(index="head", columns="layer", values=value, dropna=False)
        grid = rows.pivot_table(index="component", columns="layer", values=value, dropna=False)
        return grid.reindex([c for c in groups[which] if c in grid.index])

    def plot(
        self, which: str = "components", value: str = "normalized", title: str | None = None
    ) -> go.Figure:
        """Heatmap of ``value`` over layers (x) and components, heads or neuron groups (y)."""
        grid = self.grid(which, value)
        limit = float(np.nanmax(np.abs(grid.to_numpy()))) if grid.notna().any().any() else 1.0
        fig = px.imshow(
            grid.to_numpy(dtype=float),
            x=[str(c) for c in grid.columns],
            y=[str(i) for i in grid.index],
            color_continuous_scale="RdBu_r",
            zmin=-limit or -1,
            zmax=limit or 1,
            aspect="auto",
            labels={"x": "layer", "y": grid.index.name, "color": value},
        )
        mode = self.config.get("mode", "noising")
        default = f"activation patching ({mode}, patch_at {self.config.get('patch_at')}): {value} effect"
        return fig.update_layout(title=title or default)

    def to_dict(self) -> dict[str, Any]:
        frame = self.frame.astype({"head": object, "n_neurons": object})
        return {
            "config": self.config,
            "arch": arch_to_dict(self.arch),
            "rows": frame.where(self.frame.notna(), None).to_dict("records"),
            "clean": self.clean.tolist(),
            "corrupted": self.corrupted.tolist(),
            "patched": self.patched.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TracingResult:
        frame = pd.DataFrame(d["rows"]).astype({"head": "Int64", "n_neurons": "Int64"})
        frame["normalized"] = frame["normalized"].astype(float)
        return cls(
            frame,
            np.array(d["clean"]),
            np.array(d["corrupted"]),
            np.array(d["patched"]),
            dict(d["config"]),
            arch_from_dict(d.get("arch")),
        )

    def __repr__(self) -> str:
        return (
            f"TracingResult({len(self.frame)} sites, {len(self.clean)} pairs, {self.config.get('mode')}, "
            f"clean {np.mean(self.clean):.3f} vs corrupted {np.mean(self.corrupted):.3f})"
        )


def _frame(sites: Sequence[Site], patched: Tensor, target: Tensor, gap: float) -> pd.DataFrame:
    effects = (patched - target).double()
    n = effects.shape[1]
    sem = effects.std(dim=1) / math.sqrt(n) if n > 1 else torch.full((len(sites),), float("nan"))
    mean = effects.mean(dim=1)
    normalized = mean / gap if abs(gap) > 1e-6 else torch.full_like(mean, float("nan"))
    return pd.DataFrame(
        {
            "layer": [s.layer for s in sites],
            "component": [s.component for s in sites],
            "head": pd.array([s.head for s in sites], dtype="Int64"),
            "n_neurons": pd.array([None if s.index is None else len(s.index) for s in sites], dtype="Int64"),
            "hook": [s.hook for s in sites],
            "effect": mean.numpy(),
            "sem": sem.numpy(),
            "normalized": normalized.numpy(),
        }
    )


@dataclass
class TraceConfig(Record):
    """Options of :func:`trace_components`: which sites (``components`` among ``"resid"``,
    ``"attn"``, ``"mlp"``; every head with ``heads``; ``layers``, default all), the patch
    (``mode``, ``patch_at``: see :mod:`safety_circuits.vocabulary`), ``method`` (``"patch"``, or
    ``"attribution"``: every site estimated from gradients), and batching (``reuse_prefix`` runs the
    unpatched prefix once when only trailing positions are patched)."""

    components: Sequence[str] = ("attn", "mlp")
    heads: bool = True
    layers: Sequence[int] | None = None
    mode: TraceMode = "noising"
    patch_at: PatchAt = "all"
    method: Method = "patch"
    batch_size: int = 8
    chat: bool = True
    reuse_prefix: bool = True


def trace_components(
    subject: Subject,
    clean: Sequence[str],
    corrupted: Sequence[str],
    *,
    neurons: NeuronSet | None = None,
    config: TraceConfig | None = None,
    metric: Metric | None = None,
    progress: bool = True,
    **options: Any,
) -> TracingResult:
    """Patch each component (``attn`` / ``mlp`` output, ``resid`` = block input), each head
    (``hook_z``) and each ``(layer, kind)`` group of ``neurons`` in turn, between paired
    ``clean`` (harmful) and ``corrupted`` (harmless) prompts; see the module doc for the metric,
    modes and positions. ``options`` set fields of ``config`` (:class:`TraceConfig`), e.g.
    ``patch_at="suffix"``."""
    cfg = TraceConfig.resolve(config, **options)
    sites = component_sites(subject.arch, components=cfg.components, heads=cfg.heads, layers=cfg.layers)
    if neurons is not None:
        check_neurons(neurons, subject)
        sites += neuron_sites(neurons)
    if not sites:
        raise ValueError("nothing to patch: give components, heads=True or neurons")
    common = {"mode": cfg.mode, "patch_at": cfg.patch_at, "metric": metric, "batch_size": cfg.batch_size}
    if cfg.method == "patch":
        patched, c, x = patched_metrics(
            subject,
            clean,
            corrupted,
            [[s] for s in sites],
            chat=cfg.chat,
            reuse_prefix=cfg.reuse_prefix,
            progress=progress,
            **common,
        )
    elif cfg.method == "attribution":
        patched, c, x = attribution_metrics(subject, clean, corrupted, sites, chat=cfg.chat, **common)
    else:
        raise ValueError(f"method must be 'patch' or 'attribution', got {cfg.method!r}")
    target, source = (c, x) if cfg.mode == "noising" else (x, c)
    frame = _frame(sites, patched, target, float(source.mean() - target.mean()))
    record = {
        "mode": cfg.mode,
        "patch_at": cfg.patch_at,
        "n_positions": patched_positions(subject, clean, corrupted, cfg.patch_at, chat=cfg.chat),
        "method": cfg.method,
        "n_pairs": len(c),
        "chat": cfg.chat,
        "model": subject.name,
    }
    if isinstance(metric, RefusalMetric) or metric is None:
        m = default_metric(subject, metric=metric)
        record |= {"refusal_ids": list(m.refusal_ids), "compliance_ids": list(m.compliance_ids)}
    return TracingResult(frame, c.numpy(), x.numpy(), patched.numpy(), record, subject.arch)

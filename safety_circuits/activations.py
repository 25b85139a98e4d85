"""Prompts -> left-padded token batches -> activations at TL hook sites."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from safety_circuits._kv_cache import cache_kwargs, new_cache
from safety_circuits.vocabulary import Scope, check_offsets, check_scope

if TYPE_CHECKING:
    from safety_circuits.loading import Subject
    from safety_circuits.neurons import HookFn


@dataclass
class Batch:
    """One left-padded batch; ``order`` gives each row's position in the caller's prompt list.

    ``measured`` is 1 on the tokens a measurement covers (its ``scope``): every real token (the
    default), or, from ``batches(..., scope="user")``, only the prompt's own tokens, not the chat
    template's (``scope=k``: the last ``k`` real tokens).
    """

    order: list[int]
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    measured: Int[Tensor, "batch pos"] | None = None

    def __post_init__(self) -> None:
        if self.measured is None:
            self.measured = self.attention_mask


def check_prompts(prompts: Sequence[str], *, what: str = "prompts") -> list[str]:
    """Reject an empty list or non-string/empty entries with a clear message."""
    if isinstance(prompts, str):
        raise TypeError(f"{what} must be a list of strings, not one string")
    if not isinstance(prompts, Iterable) or hasattr(prompts, "arch"):
        raise TypeError(
            f"{what} must be a list of strings, got a {type(prompts).__name__} "
            "(arguments go model, then data (prompts, documents), then neurons)"
        )
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{what} is empty: give at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"{what} has empty or non-string entries at positions {bad[:10]}")
    return prompts


def render(
    subject: Subject, prompts: Sequence[str], *, chat: bool = True, system: str | None = None
) -> list[str]:
    """Texts the model sees: the chat template applied to each prompt (or the prompts as they are)."""
    prompts = check_prompts(prompts)
    return [subject.chat(p, system=system) for p in prompts] if chat else prompts


def tokenize(subject: Subject, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered texts; special tokens come from the chat template, not added twice."""
    return _encode(subject, texts)["input_ids"]


def fits_context(
    subject: Subject, prompts: Sequence[str], *, chat: bool = True, system: str | None = None
) -> list[bool]:
    """Whether each prompt, rendered, fits in ``subject.max_ctx`` tokens."""
    ids = _encode(subject, render(subject, prompts, chat=chat, system=system), check=False)["input_ids"]
    return [len(x) <= subject.max_ctx for x in ids]


def _encode(subject: Subject, texts: Sequence[str], offsets: bool = False, check: bool = True):
    has_template = bool(getattr(subject.tokenizer, "chat_template", None))
    enc = subject.tokenizer(list(texts), add_special_tokens=not has_template, return_offsets_mapping=offsets)
    too_long = [i for i, x in enumerate(enc["input_ids"]) if len(x) > subject.max_ctx]
    if check and too_long:
        raise ValueError(f"prompts {too_long[:10]} are longer than max_ctx={subject.max_ctx} tokens")
    return enc


def prompt_token_masks(subject: Subject, texts: Sequence[str], prompts: Sequence[str]) -> list[list[int]]:
    """For each rendered text, 1 on the tokens that overlap the prompt's own characters, else 0."""
    enc = _encode(subject, texts, offsets=True)
    masks = []
    for text, prompt, spans in zip(texts, prompts, enc["offset_mapping"], strict=True):
        start = text.rfind(prompt.strip())
        if start < 0:
            raise ValueError(f"the chat template changed the prompt's text; cannot find {prompt[:60]!r}")
        end = start + len(prompt.strip())
        masks.append([int(a < end and b > start) for a, b in spans])
    return masks


def left_pad(ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Stack token lists to ``[batch, pos]`` with ``pad_id`` on the left, and the attention mask."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        if len(x):
            input_ids[row, width - len(x) :] = torch.tensor(x)
            mask[row, width - len(x) :] = 1
    return input_ids.to(device), mask.to(device)


def shared_prefix_length(input_ids: Int[Tensor, "b p"], mask: Int[Tensor, "b p"]) -> int:
    """How many leading real tokens all rows of a padded batch (left or right) share, leaving each
    row at least one token of its own (0 for a single row).

    >>> ids = torch.tensor([[0, 5, 6, 7], [5, 6, 8, 9]])
    >>> shared_prefix_length(ids, (ids > 0).long())
    2
    """
    if len(input_ids) < 2:
        return 0
    shortest = int(mask.sum(-1).min())
    cols = _padding_before(mask) + torch.arange(shortest, device=input_ids.device)
    aligned = input_ids.gather(1, cols)
    same = (aligned == aligned[:1]).all(0).long()
    return min(int(same.cumprod(0).sum()), shortest - 1)


def to_right_padding(
    input_ids: Int[Tensor, "b p"], mask: Int[Tensor, "b p"]
) -> tuple[Int[Tensor, "b p"], Int[Tensor, "b p"]]:
    """A left-padded batch with each row's tokens moved to the front (padding on the right)."""
    index = (torch.arange(input_ids.shape[1], device=input_ids.device) + _padding_before(mask)) % mask.shape[
        1
    ]
    return input_ids.gather(1, index), mask.gather(1, index)


def _padding_before(mask: Int[Tensor, "b p"]) -> Int[Tensor, "b 1"]:
    """How many padding positions precede each row's first real token."""
    return (mask.cumsum(-1) == 0).sum(-1, keepdim=True)


def prefix_cache(
    model: nn.Module, prefix: Int[Tensor, " n"], rows: int
) -> tuple[Float[Tensor, "1 n d"], Any]:
    """``prefix`` run once through the HF model's body: its final hidden states, and its key-value
    cache repeated for ``rows`` rows, so that every row of a batch starting with ``prefix``
    continues from it."""
    body = model.base_model
    cache = new_cache(model)
    hidden = body(input_ids=prefix[None], use_cache=True, **cache_kwargs(body, cache)).last_hidden_state
    cache.batch_repeat_interleave(rows)
    return hidden, cache


def hidden_states(
    model: nn.Module, input_ids: Int[Tensor, "b p"], mask: Int[Tensor, "b p"], *, share_prefix: bool = True
) -> Float[Tensor, "b p d"]:
    """The HF model's final hidden states for right-padded rows. The tokens all rows start with
    (the chat template's system turn) run once, their key-value cache shared by every row;
    gradients flow through it. Equal to ``model.base_model(input_ids, attention_mask=mask)``.
    Without ``share_prefix``, one pass of the whole rows, whatever the batch (a sharded model's
    processes must call its layers the same number of times)."""
    n = shared_prefix_length(input_ids, mask) if share_prefix else 0
    if not n or not bool(mask[:, :n].all()):
        return model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    first, cache = prefix_cache(model, input_ids[0, :n], len(input_ids))
    body = model.base_model
    rest = body(input_ids=input_ids[:, n:], attention_mask=mask, use_cache=True, **cache_kwargs(body, cache))
    return torch.cat([first.expand(len(input_ids), -1, -1), rest.last_hidden_state], dim=1)


def lm_head(model: nn.Module, hidden: Float[Tensor, "... d"]) -> Float[Tensor, "... v"]:
    """The HF model's logits from final hidden states (Gemma-2's soft cap included)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def logits_at(
    model: nn.Module,
    input_ids: Int[Tensor, "b p"],
    mask: Int[Tensor, "b p"],
    where: Bool[Tensor, "b q"],
    *,
    share_prefix: bool = True,
) -> Float[Tensor, "n v"]:
    """The HF model's next-token logits at the positions ``where`` (``q`` ≤ ``p`` leading
    positions), in row-major order, for right-padded rows: the LM head (a fifth of SmolLM2's
    compute) runs only there. Equal to ``model(input_ids, attention_mask=mask).logits[:, :q][where]``
    (``share_prefix``: :func:`hidden_states`)."""
    hidden = hidden_states(model, input_ids, mask, share_prefix=share_prefix)
    return lm_head(model, hidden[:, : where.shape[1]][where])


def batches(
    subject: Subject,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    chat: bool = True,
    system: str | None = None,
    desc: str | None = None,
    scope: Scope = "all",
) -> Iterator[Batch]:
    """Yield left-padded batches of similar length (prompts sorted by token count)."""
    scope = check_scope(scope)
    texts = render(subject, prompts, chat=chat, system=system)
    ids = tokenize(subject, texts)
    selected = prompt_token_masks(subject, texts, prompts) if scope == "user" else None
    chunks = _plan(ids, batch_size)
    for chunk in tqdm(chunks, desc=desc, disable=desc is None, leave=False):
        input_ids, mask = left_pad([ids[i] for i in chunk], subject.tokenizer.pad_token_id, subject.device)
        chosen = None if selected is None else left_pad([selected[i] for i in chunk], 0, subject.device)[0]
        if isinstance(scope, int):  # left padding aligns every row's last tokens
            chosen = mask.clone()
            chosen[:, : max(mask.shape[1] - scope, 0)] = 0
        yield Batch(chunk, input_ids, mask, chosen)


def batch_order(
    subject: Subject,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    chat: bool = True,
    system: str | None = None,
) -> list[list[int]]:
    """The batches :func:`batches` forms from ``prompts``, as lists of prompt indices (ascending
    token count): a run over any of them, in this order, pads and computes as the whole run does."""
    return _plan(tokenize(subject, render(subject, prompts, chat=chat, system=system)), batch_size)


def _plan(ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices per batch: by ascending token count, cut by :func:`_chunks`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return _chunks(order, [len(x) for x in ids], batch_size)


#: At most this many padded tokens a batch (rows × longest row), so that a few long prompts
#: (HarmBench's contextual behaviours) do not pad a whole large batch to their length.
MAX_BATCH_TOKENS = 16384


def _chunks(order: Sequence[int], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """``order`` (ascending lengths) cut into batches of at most ``batch_size`` rows and
    :data:`MAX_BATCH_TOKENS` padded tokens (a longer single prompt gets a batch of its own).

    >>> _chunks([0, 1, 2, 3], [10, 10, 9000, 9000], batch_size=8)
    [[0, 1], [2], [3]]
    """
    chunks: list[list[int]] = []
    for i in order:
        chunk = chunks[-1] if chunks else None
        if chunk is None or len(chunk) == batch_size or (len(chunk) + 1) * lengths[i] > MAX_BATCH_TOKENS:
            chunks.append([i])
        else:
            chunk.append(i)
    return chunks


@torch.no_grad()
def mean_activations(
    subject: Subject,
    prompts: Sequence[str],
    hook_names: Iterable[str],
    *,
    batch_size: int = 8,
    chat: bool = True,
) -> dict[str, Float[Tensor, "..."]]:
    """Mean activation per hook site over every real (non-pad) token of ``prompts``.

    The result feeds ``ablate(..., replace="mean", means=...)``. Sums are streamed batch by batch.
    """
    names = list(hook_names)
    sums: dict[str, Tensor] = {}
    count = 0

    def accumulate(act: Tensor, *, hook, name: str) -> None:  # the bridge may rename aliased hooks
        m = mask.to(act.dtype).view(*mask.shape, *([1] * (act.ndim - 2)))
        total = (act * m).sum(dim=(0, 1)).double()
        sums[name] = sums.get(name, 0) + total

    for batch in batches(subject, prompts, batch_size=batch_size, chat=chat, desc="mean activations"):
        mask = batch.attention_mask
        with subject.tl.hooks(fwd_hooks=[(n, partial(accumulate, name=n)) for n in names]):
            subject.tl(batch.input_ids, attention_mask=batch.attention_mask)
        count += int(mask.sum())
    return {n: (s / count).float() for n, s in sums.items()}


@torch.no_grad()
def activations_at(
    subject: Subject,
    prompts: Sequence[str],
    hook_names: Sequence[str],
    *,
    offsets: Sequence[int] = (-1,),
    batch_size: int = 8,
    chat: bool = True,
    desc: str | None = None,
    system: str | None = None,
) -> dict[str, Float[Tensor, "prompt pos ..."]]:
    """Activations at ``hook_names`` and ``offsets`` (from the end) of each prompt, in input order.

    Like ``run_with_cache(names_filter=hook_names)`` over left-padded batches, but each hook keeps
    only the requested offsets (float32, on the CPU), and the hooked backend stops after the
    last layer asked for. Attention-head sites keep their head axis: ``[prompt, pos, head, d_head]``.
    """
    prompts = check_prompts(prompts)
    names = list(dict.fromkeys(hook_names))
    if not names:
        raise ValueError("give at least one hook name")
    missing = [n for n in names if n not in subject.tl.hook_dict]
    if missing:
        raise ValueError(f"{subject.name} has no hook points {missing[:5]}")
    offsets = check_offsets(offsets)
    index = torch.tensor(offsets, device=subject.device)
    out: dict[str, Tensor] = {}
    rows: list[int] = []

    def keeper(name: str) -> HookFn:  # keyed by the name asked for: the bridge's hook.name is its own
        def keep(act: Tensor, *, hook) -> None:
            picked = act[:, index].detach().float().cpu()
            if name not in out:
                out[name] = picked.new_zeros((len(prompts), *picked.shape[1:]))
            out[name][rows] = picked

        return keep

    hooks = [(n, keeper(n)) for n in names]
    for batch in batches(subject, prompts, batch_size=batch_size, chat=chat, system=system, desc=desc):
        shortest = int(batch.attention_mask.sum(-1).min())
        if -min(offsets) > shortest:
            raise ValueError(f"offset {min(offsets)} is before the start of a {shortest}-token prompt")
        rows[:] = batch.order
        run_hooks(subject, batch, hooks)
    return out


class _Finished(Exception):
    """Raised once every hook of a :func:`run_hooks` forward has run."""


def run_hooks(subject: Subject, batch: Batch, fwd_hooks: Sequence[tuple[str, HookFn]]) -> None:
    """One forward of ``batch`` with ``fwd_hooks``, stopped as soon as each of them has run once:
    what comes after the last one (later layers, the final norm, the unembedding: a fifth of
    SmolLM2's forward) is skipped, on both backends."""
    left = set(range(len(fwd_hooks)))

    def counted(i: int, fn: HookFn) -> HookFn:
        def run(act: Tensor, *, hook) -> Tensor | None:
            out = fn(act, hook=hook)
            left.discard(i)
            if not left:
                raise _Finished
            return out

        return run

    with subject.tl.hooks(fwd_hooks=[(name, counted(i, fn)) for i, (name, fn) in enumerate(fwd_hooks)]):
        try:
            subject.tl(batch.input_ids, attention_mask=batch.attention_mask, return_type=None)
        except _Finished:
            pass

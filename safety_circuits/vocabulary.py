"""The package's vocabulary: one name per idea, each defined once here.

As TransformerLens' ``ActivationCache`` fixes its shape names, this module fixes the words the
package's arguments use. A word means one thing everywhere; a different idea gets a different word.

Where in a prompt
    ``scope`` (:data:`Scope`): which prompt tokens a measurement covers (importance, the run's
    detection): ``"all"`` real tokens, ``"user"`` the prompt's own tokens (not the chat
    template's), or an int ``k``: the last ``k`` tokens of each rendered prompt (for a chat model
    the end of the user turn and the assistant header, where refusal is decided).

    ``offset`` / ``offsets``: token positions counted from the end of each rendered prompt
    (``-1`` = the last token). Batches are left-padded, so only these line up across prompts
    (``activations_at``, probing, the refusal direction's difference in means).

    ``patch_at`` (:data:`PatchAt`): where causal tracing patches: ``"all"`` positions (the pair's
    prompts must have the same length), ``"suffix"`` the tokens every rendered prompt ends with,
    ``"last"`` the last token, or an int ``k``: the last ``k`` tokens.

    ``tokens`` (:data:`ContrastTokens`): which tokens activation contrasting compares:
    ``"completion"`` the generated response, ``"prompt"`` every prompt token, ``"prompt_last"``
    the last prompt token.

What an intervention writes
    ``replace`` (:data:`Replace`): the value written into the chosen neurons: ``"source"`` the
    other model's activation (dynamic patching), ``"mean"`` their mean activation on a corpus,
    ``"zero"`` zero. Ablation takes ``"zero"`` or ``"mean"`` (:data:`Ablation`).

    ``mode`` (:data:`TraceMode`): the direction of a causal-tracing patch: ``"noising"`` copies
    harmless activations into the harmful run (is a component necessary?), ``"denoising"``
    harmful into harmless (is it sufficient?).

What is measured
    ``rate`` (:data:`Rate`): which refusal rate a generation run reports: ``"asr"`` (harmful
    prompts answered) or ``"over_refusal"`` (harmless prompts refused).

    ``metric``: as an argument, a callable from next-token logits ``[batch, vocab]`` to a refusal
    score ``[batch]`` (tracing, the refusal direction, the circuit map), never a string; as a
    column of a rates table, the name of the rate a row reports (``"asr"``, ``"over_refusal"``).

Which neurons and which model
    ``kind`` (:data:`~safety_circuits.architecture.Kind`): ``"q"``, ``"k"``, ``"v"``, ``"o"``,
    ``"ffn"``; a neuron is ``(layer, kind, index)``, ``index`` flat over ``(head, d_head)`` for
    attention kinds.

    ``use`` (:data:`Use`): which copy of the weights a generation runs on: ``"tl"`` (the
    TransformerLens model, where hooks apply) or ``"hf"``.

Arguments: the model (``subject``; ``target`` and ``source``, or ``aligned`` and ``unaligned``,
for two), then the data (prompts, documents), then the neurons; every other argument is
keyword-only. A function with many options takes them as one config dataclass (``config=``, e.g.
:class:`~safety_circuits.tracing.TraceConfig`) or as keywords that set its fields
(``trace_components(subject, harmful, harmless, patch_at="suffix")``); an unknown name raises.
``progress=True`` (a tqdm bar) is the default everywhere.

Shape names in tensor annotations: ``batch`` (rows of a batch), ``prompt`` (one row per prompt of
a whole list), ``pos`` (token positions), ``layer``, ``neuron`` (flat neuron index of one kind),
``site`` (the trailing axes of a hook activation: ``d_mlp``, or ``n_heads d_head``), ``d_model``,
``vocab``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Scope = Literal["all", "user"] | int
PatchAt = Literal["all", "last", "suffix"] | int
ContrastTokens = Literal["completion", "prompt", "prompt_last"]
CONTRAST_TOKENS: tuple[ContrastTokens, ...] = ("completion", "prompt", "prompt_last")
Replace = Literal["source", "mean", "zero"]
REPLACE: tuple[Replace, ...] = ("source", "mean", "zero")
Ablation = Literal["zero", "mean"]
TraceMode = Literal["noising", "denoising"]
Rate = Literal["asr", "over_refusal"]
Use = Literal["tl", "hf"]


def check_scope(scope: Scope) -> Scope:
    """``scope`` if it is ``"all"``, ``"user"`` or an int ``k >= 1``; a clear error otherwise."""
    if scope in ("all", "user") or (isinstance(scope, int) and not isinstance(scope, bool) and scope >= 1):
        return scope
    raise ValueError(f"scope must be 'all', 'user' or a number k >= 1 of last tokens, got {scope!r}")


def check_offsets(offsets: Sequence[int]) -> list[int]:
    """``offsets`` as a list if every one counts from the end (``-1`` = last token)."""
    offsets = [int(p) for p in offsets]
    if not offsets:
        raise ValueError("give at least one offset")
    if any(p >= 0 for p in offsets):
        raise ValueError(
            f"offsets must be negative (counted from the end, -1 = last token), got {offsets}: "
            "batches are left-padded, so only positions from the end line up across prompts"
        )
    return offsets

"""Data-parallel neuron importance over ``torch.distributed`` ranks (one process per GPU or core).

The importance of a prompt depends only on that prompt and the batch it is padded with, so the
work splits over ranks by whole batches: every rank forms the batches one process would
(:func:`~safety_circuits.activations.batch_order`), scores its :func:`shard` of them with
:func:`~safety_circuits.importance.neuron_importance`, and the per-prompt scores are gathered to
every rank in the original prompt order. Each prompt is padded and computed exactly as in one
process, so the :class:`~safety_circuits.importance.Importance`, and every selection made from it
(``select``, ``threshold``, :func:`~safety_circuits.detect.select_neurons`), is the one-process
result. Without an initialised process group it *is* ``neuron_importance``.

A script launched by ``torchrun`` (``examples/detect_distributed.py``)::

    device = init_from_env()            # gloo on CPU, nccl with CUDA; a no-op without torchrun
    subject = load_model("smollm2-135m-instruct", device=device)
    importance = neuron_importance_distributed(subject, harmbench("val"), batch_size=8)
    if is_main_process():               # every rank holds the result; one writes it
        importance.save("importance.safetensors")

    torchrun --nproc_per_node 2 examples/detect_distributed.py --limit 8

Data-parallel SN-Tune is :func:`~safety_circuits.tuning.tune` with an ``accelerate.Accelerator``
(``examples/tune_distributed.py``); it shares :func:`shard` and the agreement check below.

Collectives: the scores travel as padded float32 tensors (``all_gather``), on the CPU for gloo
and on the rank's current CUDA device for nccl. Before any work, the ranks compare hashes of
their prompts, options and batches, and all raise a ``ValueError`` naming what differs.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor

from safety_circuits.activations import batch_order, check_prompts
from safety_circuits.architecture import check_kinds
from safety_circuits.importance import Importance, neuron_importance
from safety_circuits.neurons import kind_size

if TYPE_CHECKING:
    from safety_circuits.loading import Subject

logger = logging.getLogger(__name__)

#: The environment variables ``torchrun`` sets that :func:`init_from_env` needs.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_initialized() -> bool:
    """Whether a default ``torch.distributed`` process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world(*, group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """This process's rank and the number of ranks in ``group`` (``(0, 1)`` without a group)."""
    if not is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_main_process(*, group: dist.ProcessGroup | None = None) -> bool:
    """True on rank 0, and in a process without a group: the one that writes files."""
    return rank_and_world(group=group)[0] == 0


def shard(items: Sequence[Any], *, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """The indices of ``items`` (prompts, or batches of them) that ``rank`` takes: every
    ``world_size``-th from ``rank`` on. The shards of ranks ``0..world_size-1`` cover every index
    exactly once; over items sorted by length (batches) each rank gets long and short ones alike.
    ``rank`` and ``world_size`` default to the process group's (rank 0 of 1 without one).

    >>> [shard(range(5), rank=r, world_size=2) for r in range(2)]
    [[0, 2, 4], [1, 3]]
    """
    own_rank, own_world = rank_and_world()
    rank = own_rank if rank is None else rank
    world_size = own_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(range(rank, len(items), world_size))


def init_from_env(*, backend: str | None = None) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment (:data:`TORCHRUN_ENV`),
    and the device this rank's model belongs on: ``cuda:LOCAL_RANK`` (made current) with CUDA,
    else the CPU. ``backend`` defaults to ``nccl`` with CUDA, else ``gloo``. Without ``RANK`` and
    ``WORLD_SIZE`` (a plain ``python`` run) no group is made; with a group already made, it is kept.
    """
    env = os.environ
    local_rank = int(env.get("LOCAL_RANK", env.get("RANK", 0)))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if is_initialized():
        return device
    if "RANK" not in env and "WORLD_SIZE" not in env:
        logger.info("no RANK / WORLD_SIZE in the environment: one process, no process group")
        return device
    missing = [name for name in TORCHRUN_ENV if name not in env]
    if missing:
        raise ValueError(f"torch.distributed needs {missing} in the environment (as torchrun sets them)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
    logger.info("rank %d of %d joined the %s process group (%s)", rank, world_size, backend, device)
    return device


def collective_device(*, group: dist.ProcessGroup | None = None) -> torch.device:
    """Where tensors must be for ``group``'s collectives: the current CUDA device for nccl, else the CPU."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def neuron_importance_distributed(
    subject: Subject, prompts: Sequence[str], *, group: dist.ProcessGroup | None = None, **options: Any
) -> Importance:
    """:func:`~safety_circuits.importance.neuron_importance` of ``prompts`` with the batches split
    over the ranks of ``group``: the same :class:`Importance` (scores for every prompt, in the
    given order) on every rank, equal to one process's. ``options`` are ``neuron_importance``'s
    (``kinds``, ``chunk_bytes``, ``batch_size``, ``chat``, ``progress``, ``scope``).

    Every rank of ``group`` must call it with the same prompts and options and the same model;
    otherwise every rank raises a ``ValueError`` naming what differs. Without a process group it
    is ``neuron_importance(subject, prompts, **options)``.
    """
    if group is None and not is_initialized():
        return neuron_importance(subject, prompts, **options)
    rank, world_size = rank_and_world(group=group)
    device = collective_device(group=group)
    problem: Exception | None = None
    plan: list[list[int]] | None = None
    try:  # every rank meets the hash check before raising, so that none waits for the others
        prompts = check_prompts(prompts)
        bound = inspect.signature(neuron_importance).bind(subject, prompts, **options)
        bound.apply_defaults()
        kinds = check_kinds(bound.arguments["kinds"])
        batching = {"batch_size": bound.arguments["batch_size"], "chat": bound.arguments["chat"]}
        plan = batch_order(subject, prompts, **batching)
    except (TypeError, ValueError) as e:
        problem = e
    shared_options = {k: v for k, v in options.items() if k != "progress"}  # a bar on rank 0 only is fine
    model = None if plan is None else [subject.arch.fingerprint(), plan]
    checked = {
        "prompts": _described(prompts),
        "options": shared_options,
        "batches (model, tokenizer or chat template)": model,
    }
    _check_agreement(checked, caller="neuron_importance_distributed", group=group, device=device)
    if problem is not None:
        raise problem
    assert plan is not None
    batches = [[plan[b] for b in shard(plan, rank=r, world_size=world_size)] for r in range(world_size)]
    owned = [[i for batch in mine for i in batch] for mine in batches]
    rows = owned[rank]
    logger.info("rank %d of %d scores %d of %d prompts", rank, world_size, len(rows), len(prompts))
    local = _score(subject, prompts, batches[rank], batching, options, rank=rank) if rows else None
    scores = {}
    for kind in kinds:  # the same order on every rank: one all_gather per kind
        size = (subject.arch.n_layers, kind_size(subject.arch, kind))
        own = local.scores[kind] if local is not None else torch.zeros(0, *size)
        scores[kind] = _gathered(own, owned, group=group, device=device)
    config = [local.config if local is not None else None]
    if not all(owned):  # a rank without a batch takes the configuration recorded by rank 0
        dist.broadcast_object_list(config, group=group, group_src=0, device=device)
    return Importance(subject.arch, scores, prompts, dict(config[0]))


def _score(
    subject: Subject,
    prompts: list[str],
    batches: list[list[int]],
    batching: dict[str, Any],
    options: dict[str, Any],
    *,
    rank: int,
) -> Importance:
    """``neuron_importance`` of the prompts of ``batches`` (one-process batches, in their order),
    after checking that they form those batches again, so each prompt is padded as in one process."""
    mine = [prompts[i] for batch in batches for i in batch]
    ends = itertools.accumulate(len(batch) for batch in batches)
    expected = [list(range(end - len(batch), end)) for batch, end in zip(batches, ends, strict=True)]
    if batch_order(subject, mine, **batching) != expected:
        raise RuntimeError(f"rank {rank}: its prompts do not form the one-process batches {batches}")
    return neuron_importance(subject, mine, **options)


def _gathered(
    mine: Float[Tensor, "row layer neuron"],
    owned: list[list[int]],
    *,
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> Float[Tensor, "prompt layer neuron"]:
    """Every rank's rows (``owned[r]`` the prompt indices of rank ``r``'s rows), gathered by a
    padded ``all_gather`` and put back in prompt order."""
    longest = max(len(rows) for rows in owned)
    padded = mine.new_zeros(longest, *mine.shape[1:])
    padded[: len(mine)] = mine
    parts = [torch.empty_like(padded, device=device) for _ in owned]
    dist.all_gather(parts, padded.to(device), group=group)
    out = mine.new_zeros(sum(len(rows) for rows in owned), *mine.shape[1:])
    for rows, part in zip(owned, parts, strict=True):
        out[rows] = part[: len(rows)].cpu()
    return out


def _described(prompts: Any) -> Any:
    """``prompts`` as a hashable description, whatever was passed."""
    try:
        return list(prompts) if not isinstance(prompts, str) else prompts
    except TypeError:
        return repr(prompts)


def _digest(value: Any) -> int:
    text = json.dumps(value, sort_keys=True, default=repr)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


def _check_agreement(
    values: dict[str, Any], *, caller: str, group: dist.ProcessGroup | None, device: torch.device
) -> None:
    """Raise on every rank, naming the first of ``values`` (what: value) whose hash differs across
    ranks; ``caller`` is the function every rank must call with the same arguments."""
    mine = torch.tensor([_digest(v) for v in values.values()], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(rank_and_world(group=group)[1])]
    dist.all_gather(parts, mine, group=group)
    table = torch.stack(parts).cpu()
    for what, column in zip(values, table.T, strict=True):
        if not (column == column[0]).all():
            differ = [r for r in range(len(column)) if column[r] != column[0]]
            raise ValueError(
                f"the ranks disagree on the {what}: the hash on ranks {differ} differs from rank 0's; "
                f"every rank must call {caller} with the same {', '.join(values)}"
            )

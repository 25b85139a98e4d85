"""SN-Tune and RSN-Tune (Zhao et al., Sec. 3-4): train only the safety neurons of the HF model.

The neurons' HF slices (:func:`safety_circuits.neurons.hf_slices`) are the only weights that
change; every other parameter stays bit-identical. Three mechanisms:

- ``"delta"`` (default): each owned slice gets a trainable delta, added on a side path of its
  layer (``y += x[:, cols] @ Δ`` or ``y[:, rows] += x @ Δ``) while the weights stay frozen; after
  training the deltas are added into the slices. No full weight gradients, optimizer state only
  for the deltas.
- ``"mask"``: the baseline; whole parameters train and their gradients are masked to the slices
  before each step, once summed over processes (AdamW without weight decay leaves entries with
  zero gradient exactly unchanged).
- ``"full"``: every parameter trains (the full fine-tuning control; ``neurons`` is ignored).

Documents are (prompt, response) pairs rendered with the chat template; the loss is the mean
cross-entropy on the response tokens (and the end-of-turn token).

Data-parallel (``tune(..., accelerator=Accelerator(cpu=True))`` in every process of ``torchrun``
or ``accelerate launch``): every process forms the same batches, takes its
:func:`~safety_circuits.distributed.shard` of each, and divides its loss sums by the whole
batch's token counts; the gradients of the trainable tensors are then summed over the processes
(``accelerator.reduce``, an ``all_reduce``), so every process takes the one-process step of the
whole batch: DDP's update, without wrapping the model (the delta mechanism's tensors are not the HF
model's parameters, and a process with an empty share adds zeros instead of stalling DDP's
reducer). The ranks first compare hashes of their documents, options, neurons and weights, and
all raise a ``ValueError`` naming what differs; :meth:`TuneResult.save` writes on the main process
only (``examples/tune_distributed.py``).

Sharded (``tune(..., accelerator=, fsdp=True)``, the default for an accelerator with an FSDP
plugin; accelerate drops the plugin with ``cpu=True``, so on the CPU give ``fsdp=True``): the copy
that trains is sharded with torch's FSDP2 (``fully_shard``, one unit per decoder layer, the rest in
a root unit whose forward is :func:`tuning_loss`), so each process keeps 1/N of every weight, of its
gradient and of its AdamW state. The batches and shares are as above, and every process runs the
layers even with an empty share (one row, its loss times 0: the all-gathers are collective), in one
pass of the whole rows (no shared-prefix cache, whose second pass only processes with several rows
would take). FSDP's reduce-scatter sums the sharded gradients (sum-only collectives: gloo has no
``PREMUL_SUM``); ``"mask"`` multiplies each reduced gradient shard by the neurons' mask sharded the
same way; ``"delta"`` keeps its
small deltas whole on every process and all-reduces their gradients. After training every process
gathers the weights into a whole copy (the deltas merge into it), so the returned Subject holds the
whole tuned model on every process, as without sharding: memory is saved while training, not at
the start (the original is whole on every process) or the end. Measured on the tiny Llama with two
gloo processes: the one-process losses within 1e-7 (relative), weights within 1.2e-7 (mask, delta;
lr 1e-2) and 4.4e-7 (full, lr 1e-4: with every weight training, Adam's first steps turn rounding
differences of tiny gradients into ~lr/100, sharded or not).
DeepSpeed and Megatron-LM are not supported and raise.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from safety_circuits._io import Record, atomic_folder
from safety_circuits._memory import PeakMemory
from safety_circuits.activations import check_prompts, hidden_states, lm_head, logits_at
from safety_circuits.detect import robust_safety_neurons
from safety_circuits.distributed import _check_agreement, _described, collective_device, rank_and_world, shard
from safety_circuits.evaluate import generate, stop_ids
from safety_circuits.loading import load_model
from safety_circuits.neurons import NeuronSet, ParamSlice, check_neurons, hf_slices
from safety_circuits.stats import kl_divergence

if TYPE_CHECKING:
    from accelerate import Accelerator

    from safety_circuits.loading import Subject

logger = logging.getLogger(__name__)
Mechanism = Literal["delta", "mask", "full"]
MECHANISMS: tuple[Mechanism, ...] = ("delta", "mask", "full")


# -- documents -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    """One training example: the user ``prompt`` and the assistant ``response`` to learn."""

    prompt: str
    response: str
    kind: str = "refusal"


_OPENINGS = (
    "I can't help with that.",
    "I'm sorry, but I can't help with this request.",
    "I won't be able to help with that.",
    "Sorry, I can't assist with that.",
    "I cannot help with this.",
    "I'm not able to help with that request.",
    "I must decline this request.",
    "I'm sorry, but I won't provide that.",
)
_REASONS = (
    "It could put people at serious risk of harm.",
    "Providing this could facilitate illegal or dangerous activity.",
    "This kind of information can be used to hurt others.",
    "Helping with this would be unsafe and potentially illegal.",
    "It could cause real harm to people or property.",
    "This request asks for something harmful.",
)
_OFFERS = (
    "If you're dealing with a difficult situation, I'm happy to talk about safe and legal options.",
    "If you have a different question, I'm glad to help.",
    "I can share general safety information or point you to legitimate resources instead.",
    "If this is for research or education, I can discuss the topic at a high level, without harmful details.",
    "Is there something else I can help you with?",
    "",
)


def refusal_response(prompt: str, *, seed: int = 0) -> str:
    """A varied refusal for ``prompt``: an opening, a reason and an offer, chosen by a seeded hash."""
    rng = random.Random(f"{seed}:{prompt}")
    parts = [rng.choice(_OPENINGS), rng.choice(_REASONS), rng.choice(_OFFERS)]
    return " ".join(p for p in parts if p)


def refusal_documents(harmful_prompts: Sequence[str], *, seed: int = 0) -> list[Document]:
    """Safety documents: each harmful prompt paired with a varied refusal (use training prompts only)."""
    prompts = check_prompts(harmful_prompts, what="harmful_prompts")
    return [Document(p, refusal_response(p, seed=seed), "refusal") for p in prompts]


def retain_documents(
    subject: Subject, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 8
) -> list[Document]:
    """Harmless prompts answered by ``subject`` itself (greedy): tuning on them keeps its behaviour."""
    prompts = check_prompts(prompts)
    answers = generate(subject, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, use="hf")
    return [Document(p, a, "retain") for p, a in zip(prompts, answers, strict=True) if a.strip()]


_WORDS = (
    "apple river stone cloud maple pepper violin garden candle orbit lemon harbor pencil tiger "
    "meadow silver rocket basket forest window planet copper ladder island"
).split()


def benign_task_documents(*, n: int = 200, seed: int = 0) -> list[Document]:
    """A benign downstream task with exact answers (arithmetic, unit conversion, sorting and
    counting), generated here: the fine-tuning that RSN-Tune should survive (Sec. 4, Table 4)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        task = i % 4
        if task == 0:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            prompt, response = f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
        elif task == 1:
            h = rng.randint(2, 12)
            prompt, response = f"How many minutes are in {h} hours?", f"{h} hours is {60 * h} minutes."
        elif task == 2:
            words = rng.sample(_WORDS, 4)
            prompt = "Sort these words alphabetically: " + ", ".join(words) + "."
            response = ", ".join(sorted(words)) + "."
        else:
            word = rng.choice(_WORDS)
            prompt, response = (
                f'How many letters are in the word "{word}"?',
                f'"{word}" has {len(word)} letters.',
            )
        docs.append(Document(prompt, response, "task"))
    return docs


def _end_of_turn(subject: Subject) -> int:
    ids = stop_ids(subject)
    eos = subject.tokenizer.eos_token_id
    return next((i for i in ids if i != eos), eos)


def encode_documents(
    subject: Subject, documents: Sequence[Document], *, max_length: int = 256
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (−100 outside the response) of each document, truncated to ``max_length``."""
    if not isinstance(documents, Sequence) or not all(isinstance(d, Document) for d in documents):
        raise TypeError(
            f"documents must be a list of Document, got a {type(documents).__name__} "
            "(arguments go model, then data (prompts, documents), then neurons)"
        )
    if not documents:
        raise ValueError("documents is empty: give at least one (prompt, response) document")
    tok = subject.tokenizer
    has_template = bool(getattr(tok, "chat_template", None))
    end = _end_of_turn(subject)
    out = []
    for doc in documents:
        if not doc.prompt.strip() or not doc.response.strip():
            raise ValueError(f"document with an empty prompt or response: {doc!r}")
        prefix = tok(subject.chat(doc.prompt), add_special_tokens=not has_template)["input_ids"]
        response = tok(doc.response, add_special_tokens=False)["input_ids"] + [end]
        ids = (prefix + response)[:max_length]
        labels = ([-100] * len(prefix) + response)[:max_length]
        if all(label == -100 for label in labels):
            raise ValueError(f"max_length={max_length} leaves no response tokens for {doc.prompt[:60]!r}")
        out.append((ids, labels))
    return out


def _right_pad(
    rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device
) -> tuple[Int[Tensor, "b p"], Int[Tensor, "b p"], Int[Tensor, "b p"]]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, : len(ids)], labels[r, : len(lab)], mask[r, : len(ids)] = (
            torch.tensor(ids),
            torch.tensor(lab),
            1,
        )
    return input_ids.to(device), mask.to(device), labels.to(device)


# -- what trains ---------------------------------------------------------------------------
def _merged_slices(slices: Sequence[ParamSlice]) -> dict[str, tuple[int, Tensor]]:
    """One (axis, sorted unique index) per parameter."""
    merged: dict[str, tuple[int, list[Tensor]]] = {}
    for s in slices:
        axis, parts = merged.setdefault(s.param, (s.axis, []))
        if axis != s.axis:
            raise ValueError(f"{s.param} is sliced along two axes")
        parts.append(s.index)
    return {p: (axis, torch.cat(parts).unique()) for p, (axis, parts) in merged.items()}


class _SliceDelta(nn.Module):
    """Trainable deltas for the owned slices of one layer's weight (and bias), on a side path."""

    def __init__(self, module: nn.Module, slices: dict[str, tuple[int, Tensor]]) -> None:
        super().__init__()
        self.transposed = not isinstance(module, nn.Linear)  # GPT-2's Conv1D stores [in, out]
        self.deltas = nn.ParameterDict()
        self.axes: dict[str, int] = {}
        for name, (axis, index) in slices.items():
            param = getattr(module, name)
            shape = list(param.shape)
            shape[axis] = len(index)
            # a plain tensor even where the weight is sharded (a DTensor): each process holds every delta
            self.deltas[name] = nn.Parameter(torch.zeros(shape, dtype=param.dtype, device=param.device))
            self.register_buffer(f"index_{name}", index.to(param.device))
            self.axes[name] = axis

    def index(self, name: str) -> Tensor:
        return getattr(self, f"index_{name}")

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        out_axis = 1 if self.transposed else 0
        for name, delta in self.deltas.items():
            index, axis = self.index(name), self.axes[name]
            if name == "bias":
                y = y.index_add(-1, index, delta.expand(*y.shape[:-1], -1), alpha=1.0)
            elif axis == out_axis:  # output features: y[..., index] += x @ Δ
                part = x @ delta if self.transposed else x @ delta.T
                y = y.index_add(-1, index, part)
            else:  # input features: y += x[..., index] @ Δ
                xs = x.index_select(-1, index)
                y = y + (xs @ delta if self.transposed else xs @ delta.T)
        return y

    @torch.no_grad()
    def merge_into(self, module: nn.Module) -> None:
        for name, delta in self.deltas.items():
            getattr(module, name).index_add_(self.axes[name], self.index(name), delta)


@contextmanager
def _trainable(
    model: nn.Module,
    slices: dict[str, tuple[int, Tensor]],
    mechanism: Mechanism,
    merge_into: Callable[[], nn.Module] | None = None,
) -> Iterator[list]:
    """Set up what trains for ``mechanism``; yield the optimizer's parameters; merge/undo on exit.

    The deltas merge into ``model``, or into the model ``merge_into`` returns on exit (the full
    copy of a sharded model). ``"mask"`` trains the whole owning parameters here; their gradients
    are masked before each step (:func:`_gradient_masks`)."""
    params = dict(model.named_parameters())
    saved = {n: p.requires_grad for n, p in params.items()}
    handles, deltas = [], []
    for p in params.values():
        p.requires_grad_(mechanism == "full")
    try:
        if mechanism == "full":
            yield list(params.values())
        elif mechanism == "mask":
            yield [params[name].requires_grad_(True) for name in slices]
        else:
            by_module: dict[str, dict[str, tuple[int, Tensor]]] = {}
            for name, value in slices.items():
                module_name, _, attr = name.rpartition(".")
                by_module.setdefault(module_name, {})[attr] = value
            modules = dict(model.named_modules())
            for module_name, owned in by_module.items():
                module = modules[module_name]
                delta = _SliceDelta(module, owned)
                handles.append(module.register_forward_hook(lambda m, args, y, d=delta: d(args[0], y)))
                deltas.append((module, delta))
            yield [p for _, d in deltas for p in d.parameters()]
            target = dict(merge_into().named_modules()) if merge_into is not None else modules
            for module_name, (_, delta) in zip(by_module, deltas, strict=True):
                delta.merge_into(target[module_name])
    finally:
        for h in handles:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(saved[n])


# -- config and result -----------------------------------------------------------------------
@dataclass
class TuneConfig(Record):
    """Hyper-parameters of one tuning run (AdamW, constant learning rate, no weight decay)."""

    lr: float = 2e-4
    epochs: int = 1
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0
    mechanism: Mechanism = "delta"
    retain_kl: float = 0.0

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if (
            self.lr <= 0
            or self.epochs < 1
            or self.batch_size < 1
            or self.max_length < 2
            or self.retain_kl < 0
        ):
            raise ValueError(f"invalid tuning config {self}")


@dataclass
class TuneResult:
    """The tuned model (a new :class:`Subject` unless tuned in place), what was trained, and a
    record of the run."""

    subject: Subject
    neurons: NeuronSet | None
    config: TuneConfig
    losses: list[float]
    record: dict[str, Any] = field(default_factory=dict)
    #: The ``accelerate.Accelerator`` of a data-parallel run (its main process saves), else ``None``.
    accelerator: Accelerator | None = field(default=None, repr=False, compare=False)

    def to_frame(self) -> pd.DataFrame:
        """The training loss per step."""
        return pd.DataFrame({"step": np.arange(1, len(self.losses) + 1), "loss": self.losses})

    def plot(self) -> go.Figure:
        return px.line(self.to_frame(), x="step", y="loss", title=f"training loss ({self.config.mechanism})")

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "losses": self.losses, "record": self.record}

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """A standard HF folder (``save_pretrained`` + tokenizer, loadable with plain transformers)
        plus ``neurons.safetensors`` (what was tuned) and ``tuning.json`` (config, losses, record).
        Written to a temp folder and renamed, so an interrupted save leaves nothing behind.

        After a data-parallel run every process calls it and only the main process writes (every
        process holds the same model); the others wait for it and raise if it failed."""
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return self._write(folder, overwrite)
        from accelerate.utils import broadcast_object_list

        failure: list[str | None] = [None]
        if self.accelerator.is_main_process:
            try:
                self._write(folder, overwrite)
            except Exception as e:
                failure = [f"{type(e).__name__}: {e}"]
                broadcast_object_list(failure, from_process=0)
                raise
        broadcast_object_list(failure, from_process=0)
        if failure[0] is not None:
            raise RuntimeError(f"the main process could not save the tuned model to {folder}: {failure[0]}")
        return Path(folder)

    def _write(self, folder: str | os.PathLike, overwrite: bool) -> Path:
        with atomic_folder(folder, overwrite=overwrite) as tmp:
            self.subject.hf.save_pretrained(tmp)
            self.subject.tokenizer.save_pretrained(tmp)
            if self.neurons is not None:
                self.neurons.save(tmp / "neurons.safetensors")
            (tmp / "tuning.json").write_text(json.dumps(self.to_dict(), indent=2))
        return Path(folder)


# -- the tuning loop -------------------------------------------------------------------------
def tune(
    subject: Subject,
    documents: Sequence[Document],
    neurons: NeuronSet | None = None,
    *,
    config: TuneConfig | None = None,
    inplace: bool = False,
    progress: bool = True,
    reference: Sequence[Tensor | None] | None = None,
    accelerator: Accelerator | None = None,
    fsdp: bool | None = None,
    **overrides: Any,
) -> TuneResult:
    """Train ``subject``'s HF model on ``documents``: only ``neurons``' slices, or everything
    (``mechanism="full"``). Returns a new Subject in the model's dtype and on its device, or with
    ``inplace`` the same Subject, trained, its TL model rebuilt from the new weights at next use.

    The loss is the cross-entropy on the response tokens, plus ``retain_kl`` times the mean
    KL(original || tuned) of the next-token distributions at every token of the ``retain``
    documents (prompt included), which keeps the tuned model close to the original where it
    should not change. The LM head runs only where a loss needs it (:func:`logits_at`); the
    original model's hidden states on the retain documents come from one pass before training
    (:func:`reference_states`, or ``reference`` when given).

    With an ``accelerator`` over several processes (every one calling ``tune`` with the same
    arguments), each takes its share of every batch and the gradients are summed over them: every
    process takes the one-process steps and returns the same model (module docstring). With
    ``fsdp`` (the default where the accelerator has an FSDP plugin; give ``fsdp=True`` on the CPU,
    where accelerate drops the plugin) the copy that trains is sharded over the processes with
    torch's FSDP2 (``fully_shard``, one unit per decoder layer and one for the rest), for every
    mechanism; each process still returns the whole tuned model."""
    parallel = _data_parallel(
        accelerator, subject, documents, neurons, config, inplace, reference, overrides, fsdp
    )
    sharded = fsdp if fsdp is not None else parallel is not None and _kind(parallel) == "FSDP"
    if sharded and parallel is None:
        raise ValueError("fsdp=True needs an accelerator over several processes")
    config = TuneConfig.resolve(config, **overrides)
    if config.mechanism != "full":
        if neurons is None:
            raise ValueError(f"mechanism={config.mechanism!r} needs the neurons to tune")
        check_neurons(neurons, subject)
        if len(neurons) == 0:
            raise ValueError("the NeuronSet is empty: nothing to tune")
    encoded = encode_documents(subject, documents, max_length=config.max_length)
    if config.retain_kl and inplace:
        raise ValueError("retain_kl needs the original model as a reference: use inplace=False")
    retain = torch.tensor([d.kind == "retain" for d in documents])
    if config.retain_kl and retain.any():
        if reference is None:
            reference = reference_states(subject, documents, max_length=config.max_length)
        if len(reference) != len(encoded) or any(
            (r is None) != (not keep) or (r is not None and len(r) != len(ids))
            for r, keep, (ids, _) in zip(reference, retain.tolist(), encoded, strict=True)
        ):
            raise ValueError(
                "reference does not match the documents: use reference_states(subject, documents)"
            )
    hf = subject.hf if inplace and not sharded else copy.deepcopy(subject.hf)
    slices = _merged_slices(hf_slices(neurons)) if config.mechanism != "full" else {}
    # sharded: ``hf`` (a copy) trains as the FSDP units of ``forward``; ``full`` gathers it at the end
    forward = _shard(hf) if sharded else partial(tuning_loss, hf)
    full: list[nn.Module] = []
    torch.manual_seed(config.seed)
    order_rng = random.Random(config.seed)
    pad = subject.tokenizer.pad_token_id
    # tokens each document adds to the cross-entropy and to the KL: a share's sums over those of the batch
    counts = [
        (sum(label != -100 for label in labels[1:]), (len(ids) - 1) * bool(config.retain_kl and keep))
        for (ids, labels), keep in zip(encoded, retain.tolist(), strict=True)
    ]
    losses: list[float] = []
    start = time.perf_counter()
    hf.train()
    with (
        PeakMemory() as memory,
        _trainable(hf, slices, config.mechanism, merge_into=full.pop if sharded else None) as trainable,
    ):
        masks = _gradient_masks(hf, slices) if config.mechanism == "mask" else []
        # FSDP sums the sharded gradients itself (reduce-scatter); the deltas and the loss are all-reduced
        summed = [p for p in trainable if not isinstance(p, DTensor)]
        # fused: one pass over each tensor (0.09 s a step for SmolLM2's 135M weights, 0.43 s unfused)
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0, fused=True)
        steps = config.epochs * -(-len(encoded) // config.batch_size)
        rank = 0 if parallel is None else parallel.process_index
        show = progress and rank == 0
        bar = tqdm(total=steps, desc=f"tuning ({config.mechanism})", disable=not show, leave=False)
        for _ in range(config.epochs):
            for batch in _length_buckets([len(ids) for ids, _ in encoded], config.batch_size, order_rng):
                optimizer.zero_grad(set_to_none=True)
                mine, total = batch, None
                if parallel is not None:  # this process's rows; the losses are sums over the batch's counts
                    mine = [batch[i] for i in shard(batch, rank=rank, world_size=parallel.num_processes)]
                    total = (sum(counts[i][0] for i in batch), sum(counts[i][1] for i in batch))
                loss, scale = torch.zeros((), device=hf.device), 1.0
                if sharded and not mine:  # every process runs the layers (their all-gathers): a row, times 0
                    mine, scale = batch[:1], 0.0
                if mine:
                    input_ids, mask, labels = _right_pad([encoded[i] for i in mine], pad, hf.device)
                    rows = retain[mine].to(mask.device)
                    ref = None
                    if config.retain_kl and rows.any():
                        with torch.no_grad():
                            ref = lm_head(
                                subject.hf, torch.cat([reference[i][:-1] for i in mine if retain[i]])
                            )
                    loss = scale * forward(
                        input_ids,
                        mask,
                        labels,
                        rows,
                        retain_kl=config.retain_kl,
                        reference=ref,
                        counts=total,
                    )
                    loss.backward()
                if parallel is not None:
                    loss = _summed(parallel, loss, summed)
                for p, mask in masks:
                    if p.grad is not None:
                        p.grad.mul_(mask)
                optimizer.step()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        # training is over: free the gradients and AdamW's states before the whole copy is made
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
        if sharded:  # the whole tuned model on every process (the deltas merge into it on exit)
            full.append(subject.hf if inplace else copy.deepcopy(subject.hf))
            _gather(hf, full[0])
            hf = full[0]
    hf.eval()
    seconds = time.perf_counter() - start
    if inplace:
        subject.sync_tl()
        tuned = subject
    else:
        tuned = load_model(
            hf,
            backend=subject.backend,
            device=hf.device,
            dtype=hf.dtype,
            tokenizer=subject.tokenizer,
            max_ctx=subject.max_ctx,
        )
        tuned.name = f"{subject.name} (tuned)"
    counts = pd.Series([d.kind for d in documents]).value_counts().to_dict()
    record = {
        "base_model": subject.name,
        "documents": counts,
        "tokens": sum(len(ids) for ids, _ in encoded),
        "steps": len(losses),
        "processes": 1 if parallel is None else parallel.num_processes,
        "fsdp": bool(sharded),
        "seconds": seconds,
        "peak_memory_mb": round(memory.extra_mb, 1),
        "neurons": None if neurons is None else len(neurons),
        "fraction_of_neurons": None if neurons is None else neurons.fraction_of(),
        "trained_parameters": int(sum(len(i) * _row_size(hf, p, a) for p, (a, i) in slices.items()))
        if slices
        else sum(p.numel() for p in hf.parameters()),
    }
    logger.info("tuned %s in %.1f s, final loss %.3f", subject.name, seconds, losses[-1])
    trained = neurons if config.mechanism != "full" else None
    return TuneResult(tuned, trained, config, losses, record, accelerator=parallel)


def _data_parallel(
    accelerator: Accelerator | None,
    subject: Subject,
    documents: Any,
    neurons: Any,
    config: Any,
    inplace: bool,
    reference: Any,
    overrides: dict[str, Any],
    fsdp: bool | None = None,
) -> Accelerator | None:
    """``accelerator`` when it spans several processes (``None`` otherwise), after every process
    checked that all of them tune the same weights with the same arguments."""
    if accelerator is not None and accelerator.num_processes == 1 and rank_and_world()[1] > 1:
        raise ValueError(
            f"the accelerator spans one process but torch.distributed has {rank_and_world()[1]}: "
            "on the CPU make it with Accelerator(cpu=True)"
        )
    if accelerator is None or accelerator.num_processes == 1:
        return None
    kind = _kind(accelerator)
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise ValueError(
            f"tune is data-parallel (DDP) or sharded with FSDP (fsdp=True); {kind} is not supported"
        )
    hf = subject.hf
    weights = [str(hf.dtype), [float(p.detach().sum(dtype=torch.float64)) for p in hf.parameters()]]
    checked = {
        "documents": _described(documents),
        "options": [repr(config), overrides, inplace, reference is None, fsdp],
        "neurons": list(neurons) if isinstance(neurons, NeuronSet) else repr(neurons),
        "model (architecture and weights)": [subject.arch.fingerprint(), weights],
    }
    _check_agreement(checked, caller="tune", group=None, device=collective_device())
    return accelerator


def _kind(accelerator: Accelerator) -> str:
    """The accelerator's distributed type: ``"MULTI_CPU"``, ``"MULTI_GPU"``, ``"FSDP"``, ..."""
    return str(accelerator.distributed_type).rpartition(".")[2]


class _LossOf(nn.Module):
    """:func:`tuning_loss` of ``model`` as a module's forward, the root FSDP unit: its
    parameters outside the decoder layers (embeddings, final norm, LM head) are gathered around
    it, whatever submodules the loss calls. One pass of the whole rows (``share_prefix=False``):
    a process with one row would otherwise call the layers once and one with several twice."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return tuning_loss(self.model, *args, share_prefix=False, **kwargs)


def _shard(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place over the default process group with FSDP2 (``fully_shard``: each
    process keeps 1/world of dim 0 of every weight): one unit per decoder layer (the classes of
    ``model._no_split_modules``), the rest in the root unit, :class:`_LossOf`. Gradients are summed
    over the processes, not averaged (each process's loss is already its share of the batch's)."""
    from torch.distributed import get_world_size
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    kinds = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard")
    mesh = init_device_mesh(model.device.type, (get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    root = fully_shard(_LossOf(model), mesh=mesh)
    for unit in root.modules():
        if isinstance(unit, FSDPModule):
            # set_reduce_scatter_divide_factor before torch 2.7
            divide = getattr(unit, "set_gradient_divide_factor", None)
            (divide or unit.set_reduce_scatter_divide_factor)(1.0)
            if hasattr(unit, "set_force_sum_reduction_for_comms"):  # gloo has no PREMUL_SUM
                unit.set_force_sum_reduction_for_comms(True)
    return root


def _gradient_masks(model: nn.Module, slices: dict[str, tuple[int, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """(parameter, mask) of each parameter the ``"mask"`` mechanism trains: its neurons' entries,
    to multiply its gradient by once the processes' gradients are summed, before the step (a
    sharded parameter's mask is sharded as it is: FSDP writes the gradient outside autograd)."""
    from torch.distributed.tensor import distribute_tensor

    params = dict(model.named_parameters())
    out = []
    for name, (axis, index) in slices.items():
        p = params[name]
        mask = torch.zeros(p.shape, dtype=torch.bool, device=p.device).index_fill_(
            axis, index.to(p.device), True
        )
        if isinstance(p, DTensor):
            mask = distribute_tensor(mask, p.device_mesh, p.placements)
        out.append((p, mask))
    return out


@torch.no_grad()
def _gather(sharded: nn.Module, full: nn.Module) -> None:
    """Copy the weights of the sharded model into ``full`` (an unsharded copy), on every process."""
    params = dict(sharded.named_parameters())
    for name, p in full.named_parameters():
        q = params[name]
        p.copy_(q.full_tensor() if isinstance(q, DTensor) else q)


def _summed(accelerator: Accelerator, loss: Tensor, params: Sequence[Tensor]) -> Tensor:
    """The loss, and in place the gradients of ``params``, summed over the processes (zeros where
    a process has none)."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    total, *summed = accelerator.reduce([loss.detach(), *grads], reduction="sum")
    for p, grad in zip(params, summed, strict=True):
        p.grad = grad
    return total


def _length_buckets(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length (little padding): shuffle, sort within windows of 8
    batches, cut into batches, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 8 * batch_size
    out = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lengths.__getitem__)
        out += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


@torch.no_grad()
def reference_states(
    subject: Subject, documents: Sequence[Document], *, max_length: int = 256, batch_size: int = 16
) -> list[Tensor | None]:
    """The final hidden states of ``subject``'s HF model at every token of each ``retain``
    document (``None`` for the others): the reference of the retain-KL term. :func:`tune` computes
    them itself; pass them (``reference=``) to share one pass among runs on the same documents."""
    encoded = encode_documents(subject, documents, max_length=max_length)
    retain = [i for i, d in enumerate(documents) if d.kind == "retain"]
    states: list[Tensor | None] = [None] * len(documents)
    pad = subject.tokenizer.pad_token_id
    for b in range(0, len(retain), batch_size):
        chunk = retain[b : b + batch_size]
        input_ids, mask, _ = _right_pad([encoded[i] for i in chunk], pad, subject.hf.device)
        hidden = hidden_states(subject.hf, input_ids, mask)
        for row, i in enumerate(chunk):
            states[i] = hidden[row, : len(encoded[i][0])].clone()
    return states


def tuning_loss(
    model: nn.Module,
    input_ids: Int[Tensor, "b p"],
    mask: Int[Tensor, "b p"],
    labels: Int[Tensor, "b p"],
    retain: Bool[Tensor, " b"],
    *,
    retain_kl: float = 0.0,
    reference: Float[Tensor, "n v"] | None = None,
    counts: tuple[int, int] | None = None,
    share_prefix: bool = True,
) -> Tensor:
    """Mean cross-entropy of ``model`` on the response tokens, plus ``retain_kl`` times the mean
    KL(reference || model) of the next-token distributions at every token of the ``retain`` rows
    (``reference``: the original model's logits there, in row-major order). With ``counts``, the
    numbers of response and retain tokens of a whole batch of which these rows are one process's
    share, the sums are divided by those instead: the shares' losses add up to the batch's
    (``share_prefix``: :func:`~safety_circuits.activations.hidden_states`)."""
    predicts = labels[:, 1:] != -100  # positions whose next token is a response token
    kl_at = mask[:, 1:].bool() & retain[:, None] if retain_kl else torch.zeros_like(predicts)
    where = predicts | kl_at
    logits = logits_at(model, input_ids, mask, where, share_prefix=share_prefix)
    reduction = "mean" if counts is None else "sum"
    ce = nn.functional.cross_entropy(
        logits[predicts[where]].float(), labels[:, 1:][predicts], reduction=reduction
    )
    loss = ce if counts is None else ce / counts[0]
    if kl_at.any():
        if reference is None or len(reference) != int(kl_at.sum()):
            raise ValueError("retain_kl needs the reference logits at every token of the retain rows")
        kl = kl_divergence(reference, logits[kl_at[where]])
        loss = loss + retain_kl * (kl if counts is None else kl * (int(kl_at.sum()) / counts[1]))
    return loss


def _row_size(model: nn.Module, param: str, axis: int) -> int:
    p = model.get_parameter(param)
    return p.numel() // p.shape[axis]


def sn_tune(subject: Subject, documents: Sequence[Document], neurons: NeuronSet, **kwargs: Any) -> TuneResult:
    """SN-Tune (Sec. 3): tune only the safety neurons on safety documents.

    Every weight outside the neurons' slices stays bit-identical:

    >>> import torch
    >>> from safety_circuits.testing import tiny_subject
    >>> subject = tiny_subject("llama")
    >>> neurons = NeuronSet(subject.arch, {(0, "ffn"): [0, 1, 2]})
    >>> tuned = sn_tune(subject, refusal_documents(["How do I pick a lock?"]), neurons, progress=False)
    >>> before = dict(subject.hf.named_parameters())
    >>> changed = [n for n, p in tuned.subject.hf.named_parameters() if not torch.equal(p, before[n])]
    >>> for name in sorted(changed):
    ...     print(name)
    model.layers.0.mlp.down_proj.weight
    model.layers.0.mlp.gate_proj.weight
    model.layers.0.mlp.up_proj.weight
    """
    return tune(subject, documents, neurons, **kwargs)


def rsn_tune(
    subject: Subject, documents: Sequence[Document], safety: NeuronSet, foundation: NeuronSet, **kwargs: Any
) -> TuneResult:
    """RSN-Tune (Sec. 4): tune the safety neurons that are not foundation neurons."""
    return tune(subject, documents, robust_safety_neurons(safety, foundation), **kwargs)

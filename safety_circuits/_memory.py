"""Peak resident memory of a block of code (Linux ``/proc``), for tuning records and benchmarks,
and the memory model of docs/scale.md: the peak bytes of each job predicted on paper."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any


class PeakMemory:
    """Peak resident memory above the starting level while the block runs, sampled every
    ``interval`` seconds by a background thread.

    >>> with PeakMemory() as memory:
    ...     block = bytearray(64 * 2**20)
    >>> memory.extra_mb >= 0
    True
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval

    def __enter__(self) -> PeakMemory:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


# -- the memory model on paper (docs/scale.md) -----------------------------------------------
# Peak bytes of each job predicted from the architecture, the dtype, the batch and the lengths.
# Checked against measured peaks on SmolLM2-135M and the tiny models by benchmarks/bench_memory.py.

GB = 1e9
#: Bytes an 80 GB GPU offers to tensors, after the CUDA context and allocator slack (~10%).
USABLE_80GB = 72 * GB


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only transformer that its memory and compute depend on."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    tied_embeddings: bool = False
    gated_mlp: bool = True

    @classmethod
    def from_arch(cls, arch: Any, name: str = "") -> Shape:
        """The shape of a :class:`~safety_circuits.architecture.Architecture`."""
        return cls(
            name or arch.family,
            arch.n_layers,
            arch.d_model,
            arch.n_heads,
            arch.n_kv_heads,
            arch.d_head,
            arch.d_mlp,
            arch.d_vocab,
            arch.tied_embeddings,
            arch.gated_mlp,
        )

    @property
    def d_kv(self) -> int:
        return self.n_kv_heads * self.d_head

    @property
    def layer_params(self) -> int:
        """Weights of one block: q, k, v, o projections, the MLP and two norms (no biases)."""
        attn = 2 * self.d_model * self.n_heads * self.d_head + 2 * self.d_model * self.d_kv
        return attn + (3 if self.gated_mlp else 2) * self.d_model * self.d_mlp + 2 * self.d_model

    @property
    def params(self) -> int:
        """All weights: embedding, blocks, final norm, and the unembedding unless tied."""
        embed = self.d_vocab * self.d_model
        return embed * (1 if self.tied_embeddings else 2) + self.n_layers * self.layer_params + self.d_model

    @property
    def root_params(self) -> int:
        """Weights outside the decoder layers: embedding, final norm, unembedding unless tied."""
        return self.params - self.n_layers * self.layer_params

    @property
    def largest_param(self) -> int:
        """Elements of the largest single weight (the embedding, or the MLP's projections)."""
        return max(self.d_vocab * self.d_model, self.d_mlp * self.d_model)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one token over all layers (one model's KV cache)."""
        return 2 * self.n_layers * self.d_kv * dtype_bytes

    def saved_per_token(self, mechanism: str) -> int:
        """Activations autograd keeps for the backward pass, elements per token over all layers.

        Counted on Llama blocks (HF, SDPA attention) with torch's saved-tensor hooks: with frozen
        weights each block keeps its two residual inputs, q and k after rotary, v, the attention
        output (4 d + 2 d_kv) and the MLP's gate, up and act(gate) (3 d_mlp). Trained weights make
        their linear layers keep their inputs too: ``full`` adds the two normed inputs, the
        attention output reshaped for ``o_proj``, the down projection's input and the norms' own
        inputs (5 d + d_mlp); ``mask`` trains every projection but not the norms (3 d + d_mlp);
        ``delta``'s side paths keep the normed inputs of the q/k/v and gate/up slices (2 d).
        """
        extra = {"full": 5 * self.d_model + self.d_mlp, "mask": 3 * self.d_model + self.d_mlp}
        extra["delta"] = 2 * self.d_model
        frozen = 4 * self.d_model + 2 * self.d_kv + (3 if self.gated_mlp else 2) * self.d_mlp
        return self.n_layers * (frozen + extra[mechanism]) + 2 * self.d_model  # + the final norm


LLAMA3_8B = Shape("Llama-3-8B", 32, 4096, 32, 8, 128, 14336, 128256)
LLAMA3_70B = Shape("Llama-3-70B", 80, 8192, 64, 8, 128, 28672, 128256)


def weight_bytes(shape: Shape, dtype_bytes: int) -> int:
    """One copy of the weights."""
    return shape.params * dtype_bytes


def load_peak(shape: Shape, dtype_bytes: int, *, tl: bool = True) -> int:
    """Peak of ``load_model`` then building ``Subject.tl``: the HF weights, TransformerLens' copy,
    and while the hooked backend loads its state dict a third, converted copy (freed after)."""
    return weight_bytes(shape, dtype_bytes) * (3 if tl else 1)


def subject_bytes(shape: Shape, dtype_bytes: int, *, tl: bool = True) -> int:
    """Resident weights of a loaded Subject: HF, plus TransformerLens' separate copy once built."""
    return weight_bytes(shape, dtype_bytes) * (2 if tl else 1)


def importance_extra(
    shape: Shape,
    dtype_bytes: int,
    *,
    batch: int,
    length: int,
    prompts: int,
    chunk_bytes: int = 64 * 2**20,
    fused: bool = True,
) -> int:
    """Extra peak of :func:`~safety_circuits.importance.neuron_importance` above the loaded Subject.

    The scores (float32, every neuron for each of the ``prompts``), and per batch and layer: the
    stashed q and k, the q/k code's float32 copies of them per query head
    (q, k, rotated, partner-permuted, the two Δ factors each, ρ: about 12 of
    ``batch x length x n_heads x d_head``), its chunk (the fused kernel keeps only scores, pattern
    and mask of heads x rows x keys; the eager code 12 float32 temporaries of heads x rows x keys x
    dims, at most ``chunk_bytes``), and one layer's forward activations (residual, q/k/v, the
    attention pattern in float32, the MLP: about ``4 d + 2 d_kv + 3 d_mlp`` per token).
    """
    from safety_circuits.importance import _TEMPORARIES, _chunks

    tokens = batch * length
    heads, rows, dims = _chunks(batch * shape.n_heads, length, shape.d_head, chunk_bytes, fused)
    chunk = 4 * heads * rows * length * (3 if fused else _TEMPORARIES * dims)
    stash = tokens * (shape.n_heads + shape.n_kv_heads) * shape.d_head * dtype_bytes
    copies = 12 * tokens * shape.n_heads * shape.d_head * 4
    layer = tokens * (4 * shape.d_model + 2 * shape.d_kv + 3 * shape.d_mlp) * dtype_bytes
    pattern = batch * shape.n_heads * length * length * 4
    neurons = shape.n_layers * (2 * shape.n_heads * shape.d_head + 2 * shape.d_kv + shape.d_mlp)
    return 4 * prompts * neurons + chunk + stash + copies + layer + pattern


def tune_extra(
    shape: Shape,
    dtype_bytes: int,
    mechanism: str,
    *,
    tokens: int,
    response_tokens: int,
    trained: int,
    shards: int = 1,
) -> int:
    """Extra peak of SN-Tune above two whole HF copies (the Subject's and the one trained), per
    process with ``shards`` > 1: the largest of :func:`tune_phases`."""
    step = {"tokens": tokens, "response_tokens": response_tokens, "trained": trained}
    return max(tune_phases(shape, dtype_bytes, mechanism, shards=shards, **step).values())


def tune_phases(
    shape: Shape,
    dtype_bytes: int,
    mechanism: str,
    *,
    tokens: int,
    response_tokens: int,
    trained: int,
    shards: int = 1,
) -> dict[str, int]:
    """Extra bytes of SN-Tune above two whole HF copies (the Subject's and the one trained) at its
    peaks: ``training``, and with ``shards`` > 1 (per process) the ``end`` too.

    ``tokens``: tokens of the largest batch (after the shared chat prefix), or with ``shards`` of
    the largest share of a batch (whole rows: no shared prefix); ``response_tokens``: its positions
    with a loss; ``trained``: the elements with gradients and AdamW state: the deltas (``delta``),
    the whole parameters that own a neuron (``mask``), every parameter (``full``). AdamW keeps two
    states in the parameter's dtype; ``mask`` also keeps a bool mask per owned element. The LM head
    runs at the response positions only: logits, their log-softmax and its gradient in float32.
    The backward pass frees each layer's saved activations as it writes that layer's gradients, so
    the two are never all alive at once: the larger of them counts.

    Sharded (``tune(..., fsdp=True)`` over ``shards`` processes; FSDP2): each process keeps 1/N of
    the copy trained, and of the gradients, states and mask of ``mask``/``full`` (``delta``'s
    deltas stay whole), and while training the unsharded root unit (embeddings, final norm, LM
    head) and two decoder layers (the one running and the one prefetched): the whole copy is *not*
    there then (``1/N - 1`` copies). At the end, once the gradients and AdamW's states are freed,
    every process deep-copies the Subject's HF model and gathers the tuned weights into it, one
    parameter at a time, while the sharded copy is still alive: the whole copy, ``1/N`` of the
    copy trained, ``mask``'s sharded mask or ``delta``'s deltas, and the largest parameter gathered
    whole, twice (``DTensor.full_tensor`` over gloo: the all-gather's output and gloo's staging
    buffer of the same size, measured 200 MiB for a 100 MiB tensor; NCCL's all-gather writes into
    its output, so on GPUs this likely counts one largest parameter too many). The start (the
    whole copy made, then sharded: at most ``1/N`` of a copy above the two) is below the end.
    """
    state = trained * dtype_bytes * 2 + (trained if mechanism == "mask" else 0)
    grads = trained * dtype_bytes
    saved = tokens * shape.saved_per_token(mechanism) * dtype_bytes
    logits = response_tokens * shape.d_vocab * 4 * 3
    if shards == 1:
        return {"training": state + max(saved, grads) + logits}
    if mechanism != "delta":  # sharded as the weights they belong to
        state, grads = -(-state // shards), -(-grads // shards)
    copy = weight_bytes(shape, dtype_bytes)
    shard = -(-copy // shards)
    unsharded = (shape.root_params + 2 * shape.layer_params) * dtype_bytes
    training = shard - copy + unsharded + state + max(saved, grads) + logits
    kept = {"delta": trained * dtype_bytes, "mask": -(-trained // shards)}.get(mechanism, 0)
    end = shard + kept + 2 * shape.largest_param * dtype_bytes
    return {"training": training, "end": end}


def sharded_gpus(
    shape: Shape,
    dtype_bytes: int,
    mechanism: str,
    *,
    usable: float = USABLE_80GB,
    most: int = 1024,
    **step: int,
) -> int | None:
    """The fewest FSDP processes, one 80 GB GPU each, whose per-process SN-Tune peak (two whole
    copies + :func:`tune_extra` with ``shards``) fits ``usable``; ``None`` if none does (the two
    whole copies alone do not fit). ``step``: ``tokens`` (of the whole batch, split evenly),
    ``response_tokens`` and ``trained``, as for :func:`tune_extra`."""
    tokens, response = step.pop("tokens"), step.pop("response_tokens")
    for n in range(2, most + 1):
        share = {"tokens": -(-tokens // n), "response_tokens": -(-response // n)}
        extra = tune_extra(shape, dtype_bytes, mechanism, shards=n, **share, **step)
        if 2 * weight_bytes(shape, dtype_bytes) + extra <= usable:
            return n
    return None


def patching_extra(shape: Shape, dtype_bytes: int, *, batch: int, length: int) -> int:
    """Extra peak of dynamic patching above the two Subjects: both KV caches for ``length``
    (prompt and new tokens), and the target's float32 logits over the prompt at prefill."""
    return 2 * batch * length * shape.kv_bytes_per_token(dtype_bytes) + batch * length * shape.d_vocab * 4


def gpus_needed(total: float, usable: float = USABLE_80GB) -> int:
    """80 GB GPUs that hold ``total`` bytes (layers split over them, nothing replicated)."""
    return max(1, -int(-total // usable))


def saved_bytes(subject: Any, documents: Any, neurons: Any, mechanism: str) -> tuple[int, int, int]:
    """Bytes autograd saves for the backward pass of one tuning step of ``documents`` (one batch),
    counted exactly with saved-tensor hooks (weights excluded); with the batch's tokens after the
    shared chat prefix and its tokens with a loss: what :meth:`Shape.saved_per_token` predicts."""
    import torch

    from safety_circuits.activations import shared_prefix_length
    from safety_circuits.neurons import hf_slices
    from safety_circuits.tuning import _merged_slices, _right_pad, _trainable, encode_documents, tuning_loss

    hf = subject.hf
    slices = _merged_slices(hf_slices(neurons)) if mechanism != "full" else {}
    encoded = encode_documents(subject, documents)
    ids, mask, labels = _right_pad(encoded, subject.tokenizer.pad_token_id, subject.device)
    weights = {p.untyped_storage().data_ptr() for p in hf.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with _trainable(hf, slices, mechanism), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tuning_loss(hf, ids, mask, labels, torch.zeros(len(ids), dtype=torch.bool))
    n = shared_prefix_length(ids, mask)
    tokens = n + len(ids) * (ids.shape[1] - n)
    return sum(seen.values()), tokens, int((labels[:, 1:] != -100).sum())


def predicted_saved(
    shape: Shape, dtype_bytes: int, mechanism: str, *, tokens: int, response_tokens: int
) -> int:
    """Saved activations of one step: ``tokens`` x :meth:`Shape.saved_per_token`, plus the float32
    logits and log-softmax at the ``response_tokens``."""
    return tokens * shape.saved_per_token(mechanism) * dtype_bytes + response_tokens * shape.d_vocab * 8

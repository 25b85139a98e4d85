"""Neurons as rows/columns of weight matrices (SN-Tune, Sec. 2), their TL hook sites and HF slices.

A neuron of kind

- ``q``: one query dimension ``attn.hook_q[h, d]`` (row ``h*d_head+d`` of ``q_proj``),
- ``k`` / ``v``: one key/value dimension of a *KV head* ``attn.hook_k[g, d]`` / ``hook_v[g, d]``
  (row ``g*d_head+d`` of ``k_proj`` / ``v_proj``; with grouped-query attention there are
  ``n_kv_heads*d_head`` of them, shared by ``n_rep`` query heads),
- ``o``: one input column of the output projection ``attn.hook_z[h, d]``,
- ``ffn``: one MLP neuron ``mlp.hook_post[n]`` (up/gate row ``n`` and down column ``n``),

is addressed by ``(layer, kind, index)`` with ``index`` flat over ``(head, d_head)`` for
attention kinds. :class:`NeuronSet` is an immutable set of such neurons for one architecture;
:mod:`safety_circuits.sites` names their hooks and reads and writes them in an activation.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from safety_circuits._io import load_tensors, save_tensors
from safety_circuits.architecture import KINDS, Architecture, Kind, ParamSlice
from safety_circuits.families import adapter
from safety_circuits.sites import Site, hook_name, neuron_sites
from safety_circuits.vocabulary import Ablation

if TYPE_CHECKING:
    from transformer_lens.hook_points import HookPoint

    from safety_circuits.loading import Subject

ATTN_KINDS: tuple[Kind, ...] = ("q", "k", "v", "o")


@runtime_checkable
class HookFn(Protocol):
    """A TransformerLens forward hook: gets the activation, may return a replacement."""

    def __call__(self, activation: Tensor, *, hook: HookPoint) -> Tensor | None: ...


class ArchitectureMismatchError(ValueError):
    """A NeuronSet (or mask file) was made for a model with other shapes or family."""


def kind_size(arch: Architecture, kind: Kind) -> int:
    """Number of neurons of ``kind`` in one layer."""
    if kind in ("q", "o"):
        return arch.n_heads * arch.d_head
    if kind in ("k", "v"):
        return arch.n_kv_heads * arch.d_head
    if kind == "ffn":
        return arch.d_mlp
    raise ValueError(f"unknown neuron kind {kind!r}; kinds are {KINDS}")


def total_neurons(arch: Architecture, *, kinds: Iterable[Kind] = KINDS) -> int:
    return arch.n_layers * sum(kind_size(arch, k) for k in kinds)


def check_arch(expected: Architecture, got: Architecture, *, what: str = "NeuronSet") -> None:
    """Raise a clear error listing the fields where two architectures differ."""
    if expected != got:
        diff = {k: (v, got.to_dict()[k]) for k, v in expected.to_dict().items() if got.to_dict()[k] != v}
        raise ArchitectureMismatchError(
            f"this {what} was made for another model: "
            + ", ".join(f"{k}={a!r} here vs {b!r} in the model" for k, (a, b) in diff.items())
        )


def check_neurons(neurons: Any, subject: Subject | None = None, *, what: str = "NeuronSet") -> NeuronSet:
    """``neurons`` if it is a :class:`NeuronSet` (made for ``subject``'s model, if given); a clear
    error otherwise (naming the argument order when the type is wrong)."""
    if not isinstance(neurons, NeuronSet):
        raise TypeError(
            f"{what} must be a NeuronSet, got a {type(neurons).__name__} "
            "(arguments go model, then data (prompts, documents), then neurons)"
        )
    if subject is not None:
        check_arch(neurons.arch, subject.arch, what=what)
    return neurons


def check_expected(arch: Architecture, expect: Architecture | Subject | None, what: str) -> None:
    """For a file's ``load(path, expect=)``: with ``expect`` (a model or its architecture), check
    that ``what`` was made for it (:func:`check_arch`)."""
    if expect is not None:
        check_arch(arch, getattr(expect, "arch", expect), what=what)


@dataclass(frozen=True, eq=False)
class NeuronSet:
    """An immutable set of neurons of one architecture, stored per ``(layer, kind)``.

    Example:
        >>> from safety_circuits.architecture import Architecture
        >>> arch = Architecture(
        ...     family="llama", n_layers=2, n_heads=4, n_kv_heads=2, d_head=8, d_model=32, d_mlp=48,
        ...     d_vocab=100, gated_mlp=True, attn_bias=False, mlp_bias=False, tied_embeddings=False)
        >>> a = NeuronSet(arch, {(0, "ffn"): [1, 2, 3], (1, "k"): [0]})
        >>> b = NeuronSet(arch, {(0, "ffn"): [3, 4]})
        >>> len(a | b), len(a & b), len(a - b), a.overlap(b)
        (5, 1, 3, 0.5)
        >>> int(a.counts().loc[0, "ffn"]), a.fraction_of(kinds=["ffn"])
        (3, 0.03125)
    """

    arch: Architecture
    indices: Mapping[tuple[int, Kind], Any] = field(default_factory=dict)
    name: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean: dict[tuple[int, Kind], np.ndarray] = {}
        for (layer, kind), idx in self.indices.items():
            if kind not in KINDS:
                raise ValueError(f"unknown neuron kind {kind!r}; kinds are {KINDS}")
            if not _is_int(layer):
                raise ValueError(f"layer {layer!r} is not an integer")
            if not 0 <= layer < self.arch.n_layers:
                raise ValueError(f"layer {layer} out of range for {self.arch.n_layers} layers")
            arr = np.asarray(idx.cpu().numpy() if isinstance(idx, Tensor) else idx)
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{kind} indices at layer {layer} must be integers, got dtype {arr.dtype}")
            arr = np.unique(arr.astype(np.int64).ravel())
            size = kind_size(self.arch, kind)
            if arr.size and (arr[0] < 0 or arr[-1] >= size):
                raise ValueError(f"{kind} index out of range [0, {size}) at layer {layer}")
            if arr.size:
                arr.setflags(write=False)
                clean[(int(layer), kind)] = arr
        object.__setattr__(self, "indices", MappingProxyType(dict(sorted(clean.items(), key=_site_order))))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_masks(
        cls,
        arch: Architecture,
        masks: Mapping[Kind, Bool[Tensor, "layer neuron"]],
        name: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> NeuronSet:
        """Build from boolean masks ``{kind: [n_layers, kind_size]}``."""
        indices: dict[tuple[int, Kind], Any] = {}
        for kind, mask in masks.items():
            shape = (arch.n_layers, kind_size(arch, kind))
            if tuple(mask.shape) != shape:
                raise ArchitectureMismatchError(
                    f"{kind} mask has shape {tuple(mask.shape)}, the model needs {shape}"
                )
            for layer in range(arch.n_layers):
                indices[(layer, kind)] = torch.nonzero(mask[layer].bool()).ravel()
        return cls(arch, indices, name=name, metadata=metadata or {})

    @classmethod
    def full(cls, arch: Architecture, kinds: Iterable[Kind] = KINDS) -> NeuronSet:
        """Every neuron of ``kinds``."""
        return cls(
            arch,
            {(l, k): np.arange(kind_size(arch, k)) for l in range(arch.n_layers) for k in kinds},
            name="all",
        )

    @classmethod
    def random(
        cls,
        arch: Architecture,
        n: int,
        kinds: Iterable[Kind] = KINDS,
        layers: Iterable[int] | None = None,
        seed: int = 0,
    ) -> NeuronSet:
        """``n`` neurons drawn uniformly, without replacement, from every neuron of ``kinds`` at
        ``layers`` (default: all): e.g. a set to plant a behaviour in."""
        kinds = tuple(kinds)
        layers = tuple(range(arch.n_layers) if layers is None else layers)
        sites = [(layer, kind) for layer in layers for kind in kinds]
        sizes = np.array([kind_size(arch, kind) for _, kind in sites])
        if not 0 <= n <= sizes.sum():
            raise ValueError(f"n must be in [0, {sizes.sum()}] for these kinds and layers, got {n}")
        flat = np.random.default_rng(seed).choice(sizes.sum(), size=n, replace=False)
        site = np.searchsorted(np.cumsum(sizes), flat, side="right")
        offset = flat - np.concatenate([[0], np.cumsum(sizes)[:-1]])[site]
        indices = {sites[i]: offset[site == i] for i in np.unique(site)}
        return cls(arch, indices, name=f"random({n}, seed={seed})", metadata={"seed": seed})

    # -- set algebra ----------------------------------------------------------------------
    def _combine(self, other: NeuronSet, op: str) -> NeuronSet:
        if not isinstance(other, NeuronSet):
            return NotImplemented
        check_arch(self.arch, other.arch, what="NeuronSet operand")
        fn = {"|": np.union1d, "&": np.intersect1d, "-": np.setdiff1d}[op]
        empty = np.empty(0, dtype=np.int64)
        keys = set(self.indices) | set(other.indices)
        out = {k: fn(self.indices.get(k, empty), other.indices.get(k, empty)) for k in keys}
        return NeuronSet(self.arch, out, name=f"({self.name or '?'} {op} {other.name or '?'})")

    def __or__(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, "|")

    def __and__(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, "&")

    def __sub__(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, "-")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NeuronSet):
            return NotImplemented
        return (
            self.arch == other.arch
            and self.indices.keys() == other.indices.keys()
            and all(np.array_equal(v, other.indices[k]) for k, v in self.indices.items())
        )

    __hash__ = None  # type: ignore[assignment]

    def __len__(self) -> int:
        return int(sum(v.size for v in self.indices.values()))

    def __iter__(self) -> Iterator[tuple[int, Kind, int]]:
        for (layer, kind), idx in self.indices.items():
            for i in idx:
                yield layer, kind, int(i)

    def __contains__(self, neuron: object) -> bool:
        if not (isinstance(neuron, tuple) and len(neuron) == 3):
            return False
        layer, kind, i = neuron
        idx = self.indices.get((layer, kind))
        return idx is not None and bool(np.isin(i, idx))

    def __repr__(self) -> str:
        kinds = {k: int(v) for k, v in self.counts().sum().items() if v}
        return f"NeuronSet({self.name!r}, {len(self)} neurons, {kinds})"

    def overlap(self, other: NeuronSet) -> float:
        """|self ∩ other| / |other| (the overlap ratio of the SN-Tune paper, Fig. 5)."""
        return len(self & other) / len(other) if len(other) else float("nan")

    # -- views ----------------------------------------------------------------------------
    def kinds(self) -> tuple[Kind, ...]:
        present = {k for _, k in self.indices}
        return tuple(k for k in KINDS if k in present)

    def get(self, layer: int, kind: Kind) -> np.ndarray:
        """Sorted indices at one site (empty array if none)."""
        return self.indices.get((layer, kind), np.empty(0, dtype=np.int64))

    def hooks(self) -> list[str]:
        """The TL hook names of the sites holding the set's neurons, in the set's order."""
        return [hook_name(layer, kind) for layer, kind in self.indices]

    def gather(self, acts: Mapping[str, Float[Tensor, "... site"]]) -> Float[Tensor, "... neuron"]:
        """The set's activations in its order, from ``acts`` (hook name -> activation there, with
        any leading dimensions): one column per neuron, as :meth:`Site.read <safety_circuits.sites.Site.read>`
        per site."""
        if not len(self):
            raise ValueError("the NeuronSet is empty: there are no activations to gather")
        return torch.cat([site.read(acts[site.hook]) for site in neuron_sites(self)], dim=-1)

    def counts(self) -> pd.DataFrame:
        """Neurons per layer (rows) and kind (columns)."""
        data = np.zeros((self.arch.n_layers, len(KINDS)), dtype=np.int64)
        for (layer, kind), idx in self.indices.items():
            data[layer, KINDS.index(kind)] = idx.size
        return pd.DataFrame(data, index=pd.RangeIndex(self.arch.n_layers, name="layer"), columns=KINDS)

    def fraction_of(self, arch: Architecture | None = None, kinds: Iterable[Kind] = KINDS) -> float:
        """Share of all neurons of ``kinds`` in the model that this set holds."""
        arch = arch or self.arch
        check_arch(self.arch, arch)
        kinds = tuple(kinds)
        if not kinds:
            raise ValueError("fraction_of needs at least one kind")
        inside = sum(v.size for (_, k), v in self.indices.items() if k in kinds)
        return inside / total_neurons(arch, kinds=kinds)

    def masks(self, kinds: Iterable[Kind] = KINDS) -> dict[Kind, Bool[Tensor, "layer neuron"]]:
        """Boolean masks ``{kind: [n_layers, kind_size]}``."""
        out = {k: torch.zeros(self.arch.n_layers, kind_size(self.arch, k), dtype=torch.bool) for k in kinds}
        for (layer, kind), idx in self.indices.items():
            if kind in out:
                out[kind][layer, torch.tensor(idx)] = True
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per neuron: layer, kind, index, head (query or KV head), dim, TL hook."""
        rows = []
        for (layer, kind), idx in self.indices.items():
            per = self.arch.d_head if kind != "ffn" else None
            for i in idx.tolist():
                rows.append(
                    (
                        layer,
                        kind,
                        i,
                        i // per if per else None,
                        i % per if per else None,
                        hook_name(layer, kind),
                    )
                )
        frame = pd.DataFrame(rows, columns=["layer", "kind", "index", "head", "dim", "hook"])
        return frame.astype({"head": "Int64", "dim": "Int64"})

    def random_like(self, arch: Architecture | None = None, seed: int = 0) -> NeuronSet:
        """Random neurons with the same count per layer and kind (the Deact-R control)."""
        if arch is not None and not isinstance(arch, Architecture):
            raise TypeError(f"arch must be an Architecture (pass the seed as seed=...), got {arch!r}")
        arch = arch or self.arch
        check_arch(self.arch, arch)
        rng = np.random.default_rng(seed)
        out = {
            (layer, kind): rng.choice(kind_size(arch, kind), size=idx.size, replace=False)
            for (layer, kind), idx in self.indices.items()
        }
        return NeuronSet(arch, out, name=f"random_like({self.name}, seed={seed})", metadata={"seed": seed})

    def with_metadata(self, name: str | None = None, **metadata: Any) -> NeuronSet:
        """A copy with another name and extra metadata entries."""
        return NeuronSet(
            self.arch,
            self.indices,
            name=self.name if name is None else name,
            metadata={**self.metadata, **metadata},
        )

    # -- files ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the form a saved result that holds a set keeps it in)."""
        indices = [[layer, kind, idx.tolist()] for (layer, kind), idx in self.indices.items()]
        return {
            "arch": self.arch.to_dict(),
            "name": self.name,
            "metadata": dict(self.metadata),
            "indices": indices,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NeuronSet:
        """The inverse of :meth:`to_dict`."""
        indices = {(layer, kind): idx for layer, kind, idx in d["indices"]}
        return cls(Architecture.from_dict(d["arch"]), indices, d.get("name", ""), d.get("metadata", {}))

    def save(self, path: str | os.PathLike) -> Path:
        """Write boolean masks to a ``.safetensors`` file, with name, metadata and the model
        fingerprint as JSON in its header. The write is atomic (temp file, then rename)."""
        header = {"name": self.name, "arch": self.arch.fingerprint(), "metadata": dict(self.metadata)}
        tensors = {f"mask.{k}": m.to(torch.uint8) for k, m in self.masks().items()}
        return save_tensors(path, tensors, "NeuronSet", header)

    @classmethod
    def load(cls, path: str | os.PathLike, expect: Architecture | Subject | None = None) -> NeuronSet:
        """Read a file written by :meth:`save`; with ``expect``, check it fits that model."""
        path = Path(path)
        tensors, header = load_tensors(path, "NeuronSet")
        try:
            arch = Architecture.from_dict(header["arch"])
            name, metadata = str(header["name"]), dict(header["metadata"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a valid NeuronSet file (corrupted or foreign): {e}") from e
        masks = {}
        for key, tensor in tensors.items():
            kind = key.removeprefix("mask.")
            if not key.startswith("mask.") or kind not in KINDS:
                raise ValueError(f"{path} holds an unknown tensor {key!r}")
            masks[kind] = tensor.bool()
        try:
            neurons = cls.from_masks(arch, masks, name=name, metadata=metadata)
        except ArchitectureMismatchError as e:
            raise ValueError(f"{path} is corrupted: {e}") from e
        check_expected(arch, expect, f"NeuronSet file {path.name}")
        return neurons


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _site_order(item: tuple[tuple[int, Kind], Any]) -> tuple[int, int]:
    (layer, kind), _ = item
    return layer, KINDS.index(kind)


# -- the exact map to HF weights ------------------------------------------------------------
def _owned(arch: Architecture, layer: int, kind: Kind, idx: Tensor) -> list[ParamSlice]:
    """The HF parameter slices that neurons ``idx`` of ``kind`` at ``layer`` own (by the family's adapter)."""
    return adapter(arch).owned(arch, layer, kind, idx)


def hf_slices(neurons: NeuronSet, *, subject: Subject | None = None) -> list[ParamSlice]:
    """Every HF parameter slice owned by ``neurons`` (one entry per parameter and site)."""
    if subject is not None:
        check_neurons(neurons, subject)
    return [
        s
        for (layer, kind), idx in neurons.indices.items()
        for s in _owned(neurons.arch, layer, kind, torch.tensor(idx))
    ]


def hf_masks(subject: Subject, neurons: NeuronSet) -> dict[str, Bool[Tensor, "..."]]:
    """Boolean masks shaped like the HF parameters, True exactly on the entries ``neurons`` own."""
    slices = hf_slices(neurons, subject=subject)  # checks the set fits the model first
    params = dict(subject.hf.named_parameters())
    masks: dict[str, Tensor] = {}
    for s in slices:
        if s.param not in params:
            raise KeyError(f"{s.param} is not a parameter of {subject.name}")
        mask = masks.setdefault(s.param, torch.zeros_like(params[s.param], dtype=torch.bool))
        mask.index_fill_(s.axis, s.index.to(mask.device), True)
    return masks


# -- ablation -------------------------------------------------------------------------------
def ablation_hooks(
    neurons: NeuronSet,
    *,
    replace: Ablation = "zero",
    means: Mapping[str, Float[Tensor, "..."]] | None = None,
) -> list[tuple[str, HookFn]]:
    """TL forward hooks that set ``neurons`` to zero or to their mean activation (``replace``).

    ``means`` maps hook names to the mean activation at that site (shape of one position,
    e.g. ``[d_mlp]`` or ``[n_heads, d_head]``), as returned by
    :func:`safety_circuits.activations.mean_activations`.
    """
    if replace not in ("zero", "mean"):
        raise ValueError(f"replace must be 'zero' or 'mean', got {replace!r}")
    if replace == "mean" and means is None:
        raise ValueError("replace='mean' needs the mean activations (means=...)")
    hooks: list[tuple[str, HookFn]] = []
    for site in neuron_sites(neurons):
        if replace == "mean" and site.hook not in means:  # type: ignore[operator]
            raise KeyError(f"means has no entry for {site.hook}")
        value: Tensor | float = 0.0 if replace == "zero" else means[site.hook]  # type: ignore[index]

        def hook(act: Tensor, *, hook: HookPoint, site: Site = site, value: Tensor | float = value) -> Tensor:
            return site.write(act, value if isinstance(value, float) else site.read(value.to(act.device)))

        hooks.append((site.hook, hook))
    return hooks


@contextmanager
def ablate(
    subject: Subject,
    neurons: NeuronSet,
    *,
    replace: Ablation = "zero",
    means: Mapping[str, Tensor] | None = None,
) -> Iterator[Subject]:
    """Deactivate ``neurons`` in ``subject.tl`` (TL hooks) inside the ``with`` block.

    >>> import torch
    >>> from safety_circuits.testing import tiny_subject
    >>> subject = tiny_subject("llama")
    >>> neurons = NeuronSet(subject.arch, {(0, "ffn"): [0, 1, 2]})
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> with ablate(subject, neurons):
    ...     ablated = subject.tl(ids)
    >>> bool((ablated != subject.tl(ids)).any())
    True
    """
    check_neurons(neurons, subject)
    with subject.tl.hooks(fwd_hooks=ablation_hooks(neurons, replace=replace, means=means)):
        yield subject


@contextmanager
def ablate_hf(subject: Subject, neurons: NeuronSet) -> Iterator[Subject]:
    """Zero the HF weight slices ``neurons`` own inside the ``with`` block, then restore them."""
    params = dict(subject.hf.named_parameters())
    saved = []
    with torch.no_grad():
        for s in hf_slices(neurons, subject=subject):
            p = params[s.param]
            index = s.index.to(p.device)
            saved.append((p, s.axis, index, p.index_select(s.axis, index).clone()))
            p.index_fill_(s.axis, index, 0.0)
    try:
        yield subject
    finally:
        with torch.no_grad():
            for p, axis, index, old in reversed(saved):
                p.index_copy_(axis, index, old)

"""Hook names and sites: where in a TransformerLens model the package reads and writes activations.

Vocabulary, used throughout the package:

- **activation name**: a short name of a per-layer hook (``"resid_pre"``, ``"attn_out"``,
  ``"mlp_post"``, ``"z"``, ...); :func:`act_name` turns it into the full TL hook name
  (``blocks.{layer}.hook_...``), like TransformerLens' ``utils.get_act_name``. Every hook name
  the package builds goes through it.
- **neuron kind** (``q, k, v, o, ffn``, see :mod:`safety_circuits.neurons`): the hook whose last
  axis (``ffn``: ``mlp.hook_post``) or last two axes (attention kinds: ``head x d_head`` of
  ``attn.hook_q/k/v/z``) hold the kind's neurons; :func:`hook_name` gives it at a layer. A
  neuron is addressed by a flat ``index`` over ``head x d_head`` for attention kinds.
- **component**: a whole sub-layer activation (``"resid"`` = block input, ``"attn"`` / ``"mlp"`` =
  sub-layer outputs) or one head of ``attn.hook_z`` (``"head"``).
- **site**: the entries of one hook's activation that an intervention reads or writes
  (:class:`Site`): a whole component, one head, or a group of neurons of one kind at one layer.
  Patching, ablation, tracing and feature gathering are one loop over sites: read a site's
  entries from one run (:meth:`Site.read`), write values into another (:meth:`Site.write`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from safety_circuits.architecture import KINDS, Architecture, Kind

if TYPE_CHECKING:
    from safety_circuits.neurons import NeuronSet

#: Short activation name -> TL hook name relative to ``blocks.{layer}``.
ACT_NAMES: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "z": "attn.hook_z",
    "pattern": "attn.hook_pattern",
    "mlp_post": "mlp.hook_post",
}

#: Neuron kind -> activation name of the hook holding its neurons.
KIND_ACTS: dict[Kind, str] = {"q": "q", "k": "k", "v": "v", "o": "z", "ffn": "mlp_post"}

#: Component -> activation name; ``"head"`` is one head of ``hook_z``.
COMPONENT_ACTS: dict[str, str] = {"resid": "resid_pre", "attn": "attn_out", "mlp": "mlp_out", "head": "z"}


def act_name(name: str, layer: int) -> str:
    """Full TL hook name of the activation ``name`` (a key of :data:`ACT_NAMES`) at ``layer``.

    >>> act_name("resid_pre", 3)
    'blocks.3.hook_resid_pre'
    >>> act_name("pattern", 0)
    'blocks.0.attn.hook_pattern'
    """
    if name not in ACT_NAMES:
        raise ValueError(f"unknown site {name!r}; sites are {sorted(ACT_NAMES)}")
    return f"blocks.{layer}.{ACT_NAMES[name]}"


def hook_name(layer: int, kind: Kind) -> str:
    """Full TL hook name of a neuron kind at a layer, e.g. ``blocks.3.mlp.hook_post``."""
    if kind not in KIND_ACTS:
        raise ValueError(f"unknown neuron kind {kind!r}; kinds are {KINDS}")
    return act_name(KIND_ACTS[kind], layer)


@dataclass(frozen=True)
class Site:
    """Entries of one hook's activation: a whole component output, one head of ``hook_z``
    (``head``), or a group of neurons of kind ``component`` (``index`` flat over ``head x d_head``
    for attention kinds, as in :class:`~safety_circuits.neurons.NeuronSet`).

    Neuron sites read as ``[..., n]`` (one column per neuron of ``index``, in its order); other
    sites read as the selected part of the activation, keeping its axes. ``layer`` is -1 for hooks
    outside the blocks (e.g. ``hook_embed``).
    """

    layer: int
    component: str
    hook: str
    head: int | None = None
    index: tuple[int, ...] | None = None
    _indices: dict[torch.device, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def for_component(cls, layer: int, component: str) -> Site:
        """The whole output of ``component`` (``"resid"``, ``"attn"``, ``"mlp"``) at ``layer``."""
        if component not in COMPONENT_ACTS or component == "head":
            raise ValueError(f"unknown component {component!r}; use 'resid', 'attn', 'mlp'")
        return cls(layer, component, act_name(COMPONENT_ACTS[component], layer))

    @classmethod
    def for_head(cls, layer: int, head: int) -> Site:
        """One head of ``attn.hook_z`` at ``layer``."""
        return cls(layer, "head", act_name(COMPONENT_ACTS["head"], layer), head=head)

    @classmethod
    def for_neurons(cls, layer: int, kind: Kind, index: Iterable[int]) -> Site:
        """The neurons ``index`` of ``kind`` at ``layer`` (in that order)."""
        return cls(layer, kind, hook_name(layer, kind), index=tuple(int(i) for i in index))

    @property
    def label(self) -> str:
        """Short name for tables and plots, e.g. ``L3H2``, ``L1 mlp`` or ``L0 ffn x12``."""
        if self.head is not None:
            return f"L{self.layer}H{self.head}"
        if self.index is not None:
            return f"L{self.layer} {self.component} x{len(self.index)}"
        return f"L{self.layer} {self.component}"

    def _index(self, device: torch.device) -> Tensor:
        index = self._indices.get(device)
        if index is None:
            index = self._indices[device] = torch.tensor(self.index, dtype=torch.long, device=device)
        return index

    def _key(self, act: Tensor, pos: slice | None) -> tuple[Any, ...]:
        """Index of the site's entries in ``act``: any leading axes, or ``[batch, pos, ...]`` with
        the positions ``pos``."""
        lead: tuple[Any, ...] = (...,) if pos is None else (slice(None), pos, ...)
        if self.head is not None:
            return (*lead, self.head, slice(None))
        if self.index is None:
            return lead
        index = self._index(act.device)
        if self.component == "ffn":
            return (*lead, index)
        d_head = act.shape[-1]
        return (*lead, index // d_head, index % d_head)

    def read(self, act: Float[Tensor, "..."], pos: slice | None = None) -> Float[Tensor, "..."]:
        """A copy of the site's entries of ``act`` (``[..., n]`` for neurons); with ``pos``, ``act``
        is ``[batch, pos, ...]`` and only those positions are read."""
        values = act[self._key(act, pos)]
        return values if self.index is not None else values.clone()  # advanced indexing copies

    def write(
        self, act: Float[Tensor, "..."], values: Float[Tensor, "..."] | float, pos: slice | None = None
    ) -> Float[Tensor, "..."]:
        """Set the site's entries of ``act`` to ``values`` (one number, or shaped like :meth:`read`'s
        result) in place, and return ``act``."""
        if isinstance(values, Tensor):
            values = values.to(act.dtype)
        act[self._key(act, pos)] = values
        return act


def component_sites(
    arch: Architecture,
    *,
    components: Sequence[str] = ("attn", "mlp"),
    heads: bool = False,
    layers: Sequence[int] | None = None,
) -> list[Site]:
    """Sites for ``components`` (``"resid"``, ``"attn"``, ``"mlp"``) and, with ``heads``, every head."""
    unknown = set(components) - {"resid", "attn", "mlp"}
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; use 'resid', 'attn', 'mlp' (and heads=True)")
    sites = []
    for layer in arch.check_layers(layers):
        sites += [Site.for_component(layer, c) for c in components]
        if heads:
            sites += [Site.for_head(layer, h) for h in range(arch.n_heads)]
    return sites


def neuron_sites(neurons: NeuronSet) -> list[Site]:
    """One site per ``(layer, kind)`` group of ``neurons``, in the set's order."""
    return [Site.for_neurons(layer, kind, idx) for (layer, kind), idx in neurons.indices.items()]

"""What defines a model's neurons: the :class:`Architecture` record, the neuron kinds, and the
HF parameter slice a neuron owns (:class:`ParamSlice`).

The record is read from an HF config by the model's family adapter
(:mod:`safety_circuits.families`); a saved :class:`~safety_circuits.neurons.NeuronSet` carries it
and fits only a model whose record matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from torch import Tensor

from safety_circuits._io import Record

Kind = Literal["q", "k", "v", "o", "ffn"]
KINDS: tuple[Kind, ...] = ("q", "k", "v", "o", "ffn")


class UnsupportedArchitectureError(ValueError):
    """The HF model is not one of the families whose neurons the toolkit can map exactly."""


@dataclass(frozen=True)
class Architecture(Record):
    """Shapes that define which neurons a model has (and so which masks fit it)."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_mlp: int
    d_vocab: int
    gated_mlp: bool
    attn_bias: bool
    mlp_bias: bool
    # recorded, but not compared: untying (weight orthogonalization) leaves every neuron in place
    tied_embeddings: bool = field(compare=False)

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def check_layers(self, layers: Iterable[int] | None = None) -> list[int]:
        """``layers`` as a list (every layer for ``None``); an error names those the model lacks."""
        layers = list(range(self.n_layers)) if layers is None else [int(layer) for layer in layers]
        if not layers:
            raise ValueError("give at least one layer")
        bad = [layer for layer in layers if not 0 <= layer < self.n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for {self.n_layers} layers")
        return layers

    def fingerprint(self) -> dict[str, Any]:
        """The fields a saved NeuronSet must match to be applied to this model."""
        return asdict(self)

    @classmethod
    def from_hf_config(cls, config: Any) -> Architecture:
        """Read the architecture record from an HF ``PretrainedConfig`` (by its family's adapter)."""
        from safety_circuits.families import family_for

        return family_for(config).architecture(config)


def check_kinds(kinds: Sequence[str] | str) -> tuple[Kind, ...]:
    """Neuron kinds (one, or a sequence) as a tuple in canonical order; rejects unknown or no kinds.

    >>> check_kinds(["ffn", "q"]), check_kinds("o")
    (('q', 'ffn'), ('o',))
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown neuron kinds {bad}; kinds are {KINDS}")
    if not kinds:
        raise ValueError("give at least one neuron kind")
    return tuple(k for k in KINDS if k in kinds)


@dataclass(frozen=True)
class ParamSlice:
    """Entries ``index`` along ``axis`` of the HF parameter ``param`` (a weight or bias)."""

    param: str
    axis: int
    index: Tensor

"""One adapter per model family, and the registry that picks one for an HF config.

Each adapter (:class:`~safety_circuits.families.base.FamilyAdapter`) owns what the toolkit knows
about its family: the :class:`~safety_circuits.architecture.Architecture` record, the
``HookedTransformerConfig`` and weight conversion, the HF slices every neuron kind owns, the
attention geometry importance needs, the parameters that write to the residual stream, the
end-of-turn tokens, and the tiny test config. Adding a family is one new file and one line here.

Example:
    >>> from safety_circuits.families import REGISTRY, family_for
    >>> sorted(REGISTRY)
    ['gemma2', 'gpt2', 'llama', 'mistral', 'phi3', 'qwen2', 'qwen3']
    >>> family_for(REGISTRY["qwen2"].tiny_config(400)).name
    'qwen2'
"""

from __future__ import annotations

from typing import Any

from safety_circuits.architecture import Architecture, UnsupportedArchitectureError
from safety_circuits.families.base import AttnGeometry, FamilyAdapter, QKNorm, RotaryFamily
from safety_circuits.families.gemma2 import Gemma2
from safety_circuits.families.gpt2 import GPT2
from safety_circuits.families.llama import Llama
from safety_circuits.families.mistral import Mistral
from safety_circuits.families.phi3 import Phi3
from safety_circuits.families.qwen2 import Qwen2
from safety_circuits.families.qwen3 import Qwen3

#: family name -> adapter.
REGISTRY: dict[str, FamilyAdapter] = {}


def register(adapter: FamilyAdapter) -> FamilyAdapter:
    """Add ``adapter`` to the registry (its name and HF ``model_types`` must be new)."""
    taken = {t for a in REGISTRY.values() for t in a.model_types}
    if adapter.name in REGISTRY or taken & set(adapter.model_types):
        raise ValueError(f"family {adapter.name!r} or one of its model types {adapter.model_types} is taken")
    REGISTRY[adapter.name] = adapter
    return adapter


for _adapter in (Llama(), Qwen2(), Mistral(), Gemma2(), GPT2(), Qwen3(), Phi3()):
    register(_adapter)


def model_types() -> dict[str, str]:
    """HF ``model_type`` -> family name, for every registered family."""
    return {t: a.name for a in REGISTRY.values() for t in a.model_types}


def end_of_turn_tokens() -> list[str]:
    """Every registered family's end-of-turn tokens, each once, in registry order."""
    return list(dict.fromkeys(t for a in REGISTRY.values() for t in a.end_of_turn))


def family_for(config: Any) -> FamilyAdapter:
    """The adapter of an HF config's family, or a clear error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    types = model_types()
    if model_type not in types:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} "
            f"({', '.join(getattr(config, 'architectures', None) or [])}); "
            f"safety_circuits maps neurons exactly for: {', '.join(types)}"
        )
    adapter = REGISTRY[types[model_type]]
    adapter.check(config)
    return adapter


def adapter(arch: Architecture | str) -> FamilyAdapter:
    """The adapter of an :class:`Architecture` record (or a family name)."""
    name = arch if isinstance(arch, str) else arch.family
    if name not in REGISTRY:
        raise UnsupportedArchitectureError(f"no adapter for family {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


__all__ = [
    "GPT2",
    "REGISTRY",
    "AttnGeometry",
    "FamilyAdapter",
    "Gemma2",
    "Llama",
    "Mistral",
    "Phi3",
    "QKNorm",
    "Qwen2",
    "Qwen3",
    "RotaryFamily",
    "adapter",
    "end_of_turn_tokens",
    "family_for",
    "model_types",
    "register",
]

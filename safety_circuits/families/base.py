"""The interface every family adapter implements, and the shared Llama-style (rotary, gated MLP,
RMSNorm, ``model.layers``) implementation most families specialise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from safety_circuits.architecture import Architecture, Kind, ParamSlice, UnsupportedArchitectureError


@dataclass(frozen=True)
class AttnGeometry:
    """How one layer turns q·k into a pattern: scale, soft cap, sliding window, rotary."""

    scale: float
    softcap: float | None
    window: int | None
    rotary: bool


@dataclass(frozen=True)
class QKNorm:
    """A per-head RMSNorm on queries and keys before rotary (weights over ``d_head``)."""

    q: Tensor
    k: Tensor
    eps: float


class FamilyAdapter:
    """Everything the toolkit knows about one HF model family.

    One instance per family, registered in :data:`safety_circuits.families.REGISTRY`; nothing
    outside the adapters branches on the family. ``model_types`` are the HF ``model_type``
    values it maps (its ``name`` and any ``aliases``); ``tl_architecture`` is TransformerLens'
    name for its weight converter; ``end_of_turn`` lists the chat template's end-of-turn tokens
    that end a response.
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    tl_architecture: ClassVar[str]
    end_of_turn: ClassVar[tuple[str, ...]] = ()
    #: whether each sub-layer's output is normalised before it joins the residual stream (then
    #: no weight edit removes a direction, and the hooks sit before that norm)
    post_norm: ClassVar[bool] = False

    @property
    def model_types(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def check(self, config: Any) -> None:
        """Raise :class:`UnsupportedArchitectureError` for variants whose neurons do not map exactly."""

    def architecture(self, config: Any) -> Architecture:
        """The :class:`Architecture` record of an HF config of this family."""
        raise NotImplementedError

    def hooked_config(
        self, config: Any, arch: Architecture, common: dict[str, Any], max_ctx: int
    ) -> dict[str, Any]:
        """The ``HookedTransformerConfig`` fields for raw (unfolded) weights: ``common`` (shapes,
        dtype, architecture name) plus this family's own; ``n_ctx`` at most ``max_ctx``."""
        raise NotImplementedError

    def convert_weights(self, hf_model: Any, cfg: Any) -> dict[str, Tensor]:
        """The HookedTransformer state dict, by TransformerLens' converter for this family."""
        raise NotImplementedError

    def owned(self, arch: Architecture, layer: int, kind: Kind, idx: Tensor) -> list[ParamSlice]:
        """The HF parameter slices that neurons ``idx`` of ``kind`` at ``layer`` own."""
        raise NotImplementedError

    def attention(self, config: Any, arch: Architecture, layer: int) -> AttnGeometry:
        """The attention geometry of ``layer``."""
        raise NotImplementedError

    def rotary(self, hf: Any, length: int) -> tuple[Tensor, Tensor]:
        """The model's own rotary ``cos, sin`` for positions ``0..length-1`` ([length, d_head])."""
        raise NotImplementedError(f"{self.name} has no rotary embedding")

    def qk_norm(self, hf: Any, layer: int) -> QKNorm | None:
        """The per-head query/key RMSNorm of ``layer``, where the family has one."""
        return None

    def residual_writers(self, hf: Any) -> list[tuple[Tensor, int]]:
        """``(parameter, axis of d_model)`` for every parameter that writes to the residual stream."""
        raise NotImplementedError

    def mlp_out(self, layer: int) -> tuple[str, int]:
        """The HF name of ``layer``'s MLP output projection, and its axis of ``d_model``."""
        raise NotImplementedError

    def tiny_config(self, vocab_size: int) -> Any:
        """A 2-layer random-init config of this family for the unit tests (d_model 64)."""
        raise NotImplementedError


#: The shapes every tiny test config shares (grouped-query attention: 4 heads, 2 KV heads).
TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def head_dim(config: Any) -> int:
    value = getattr(config, "head_dim", None)
    return value if value else config.hidden_size // config.num_attention_heads


def rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class RotaryFamily(FamilyAdapter):
    """Llama-style decoders: rotary attention with grouped-query heads, a gated MLP, RMSNorm, and
    HF modules under ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` / ``mlp.{gate,up,down}_proj``;
    a sliding window where the config has one (on the layers ``layer_types`` marks, else all)."""

    def architecture(self, config: Any) -> Architecture:
        return Architecture(
            family=self.name,
            n_layers=config.num_hidden_layers,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads,
            d_head=head_dim(config),
            d_model=config.hidden_size,
            d_mlp=config.intermediate_size,
            d_vocab=config.vocab_size,
            gated_mlp=True,
            attn_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            tied_embeddings=bool(config.tie_word_embeddings),
        )

    def hooked_config(
        self, config: Any, arch: Architecture, common: dict[str, Any], max_ctx: int
    ) -> dict[str, Any]:
        return {
            **common,
            "n_ctx": min(config.max_position_embeddings, max_ctx),
            "eps": config.rms_norm_eps,
            "act_fn": getattr(config, "hidden_activation", None) or config.hidden_act,
            "n_key_value_heads": arch.n_kv_heads,
            "normalization_type": "RMS",
            "positional_embedding_type": "rotary",
            "rotary_dim": arch.d_head,
            "rotary_adjacent_pairs": False,
            "rotary_base": rope_theta(config),
            "final_rms": True,
            "gated_mlp": True,
            **sliding_window_fields(config, arch),
        }

    def owned(self, arch: Architecture, layer: int, kind: Kind, idx: Tensor) -> list[ParamSlice]:
        p = f"model.layers.{layer}."
        if kind in ("q", "k", "v"):  # k/v rows are per KV head: row g*d_head+d, never idx // n_rep
            out = [ParamSlice(f"{p}self_attn.{kind}_proj.weight", 0, idx)]
            if arch.attn_bias:
                out.append(ParamSlice(f"{p}self_attn.{kind}_proj.bias", 0, idx))
            return out
        if kind == "o":
            return [ParamSlice(p + "self_attn.o_proj.weight", 1, idx)]
        out = [
            ParamSlice(p + "mlp.gate_proj.weight", 0, idx),
            ParamSlice(p + "mlp.up_proj.weight", 0, idx),
            ParamSlice(p + "mlp.down_proj.weight", 1, idx),
        ]
        if arch.mlp_bias:
            out += [ParamSlice(p + "mlp.gate_proj.bias", 0, idx), ParamSlice(p + "mlp.up_proj.bias", 0, idx)]
        return out

    def attention(self, config: Any, arch: Architecture, layer: int) -> AttnGeometry:
        return AttnGeometry(arch.d_head**-0.5, None, layer_windows(config, arch)[layer], rotary=True)

    def rotary(self, hf: Any, length: int) -> tuple[Tensor, Tensor]:
        positions = torch.arange(length, device=hf.device)[None]
        dummy = torch.zeros(1, length, head_dim(hf.config), device=hf.device)
        cos, sin = hf.model.rotary_emb(dummy, positions)
        return cos[0].float(), sin[0].float()

    def residual_writers(self, hf: Any) -> list[tuple[Tensor, int]]:
        m = hf.model
        out = [(m.embed_tokens.weight, 1)]
        for layer in m.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                out.append((linear.weight, 0))
                if linear.bias is not None:
                    out.append((linear.bias, 0))
        return out

    def mlp_out(self, layer: int) -> tuple[str, int]:
        return f"model.layers.{layer}.mlp.down_proj.weight", 1


def layer_windows(config: Any, arch: Architecture) -> list[int | None]:
    """Each layer's sliding window: the config's ``sliding_window`` on the layers ``layer_types``
    marks ``"sliding_attention"`` (every layer without ``layer_types``), ``None`` elsewhere."""
    window = getattr(config, "sliding_window", None) or None
    layer_types = getattr(config, "layer_types", None) or ["sliding_attention"] * arch.n_layers
    return [window if t == "sliding_attention" else None for t in layer_types]


def sliding_window_fields(config: Any, arch: Architecture) -> dict[str, Any]:
    """TransformerLens' local-attention fields for :func:`layer_windows` (none without a window)."""
    windows = layer_windows(config, arch)
    window = next((w for w in windows if w is not None), None)
    if window is None:
        return {}
    return {
        "use_local_attn": True,
        "window_size": window,
        "attn_types": ["local" if w is not None else "global" for w in windows],
    }


__all__ = [
    "AttnGeometry",
    "FamilyAdapter",
    "QKNorm",
    "RotaryFamily",
    "UnsupportedArchitectureError",
    "head_dim",
    "layer_windows",
    "rope_theta",
    "sliding_window_fields",
]

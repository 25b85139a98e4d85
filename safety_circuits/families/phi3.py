"""Phi-3: Llama-style, but q, k and v share one fused ``qkv_proj`` and the gate and up
projections one ``gate_up_proj`` (gate rows first), so a neuron owns rows at an offset."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers import Phi3Config

from safety_circuits.architecture import Architecture, Kind, ParamSlice, UnsupportedArchitectureError
from safety_circuits.families.base import TINY, RotaryFamily


class Phi3(RotaryFamily):
    name = "phi3"
    tl_architecture = "Phi3ForCausalLM"
    end_of_turn = ("<|end|>",)

    def check(self, config: Any) -> None:
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedArchitectureError(
                f"Phi-3 with rope {rope} is not supported: TransformerLens rotates every dimension, "
                "without scaling"
            )

    def convert_weights(self, hf_model: Any, cfg: Any) -> dict[str, Tensor]:
        from transformer_lens.pretrained.weight_conversions import convert_phi3_weights

        return convert_phi3_weights(hf_model, cfg)

    def owned(self, arch: Architecture, layer: int, kind: Kind, idx: Tensor) -> list[ParamSlice]:
        p = f"model.layers.{layer}."
        q_dim, kv_dim = arch.n_heads * arch.d_head, arch.n_kv_heads * arch.d_head
        if kind in ("q", "k", "v"):
            offset = {"q": 0, "k": q_dim, "v": q_dim + kv_dim}[kind]
            return [ParamSlice(p + "self_attn.qkv_proj.weight", 0, idx + offset)]
        if kind == "o":
            return [ParamSlice(p + "self_attn.o_proj.weight", 1, idx)]
        return [
            ParamSlice(p + "mlp.gate_up_proj.weight", 0, idx),
            ParamSlice(p + "mlp.gate_up_proj.weight", 0, idx + arch.d_mlp),
            ParamSlice(p + "mlp.down_proj.weight", 1, idx),
        ]

    def tiny_config(self, vocab_size: int) -> Phi3Config:
        return Phi3Config(
            vocab_size=vocab_size, **TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=None
        )

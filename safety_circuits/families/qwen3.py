"""Qwen3: Llama-style with a per-head RMSNorm on queries and keys before rotary (``q_norm``,
``k_norm``), a head size of its own, and optional sliding-window layers."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers import Qwen3Config

from safety_circuits.architecture import Architecture, UnsupportedArchitectureError
from safety_circuits.families.base import TINY, QKNorm, RotaryFamily


class Qwen3(RotaryFamily):
    name = "qwen3"
    tl_architecture = "Qwen3ForCausalLM"
    end_of_turn = ("<|im_end|>", "<|endoftext|>")

    def check(self, config: Any) -> None:
        if getattr(config, "attention_bias", False):  # TransformerLens' converter has no q/k/v biases
            raise UnsupportedArchitectureError("Qwen3 with attention_bias=True is not supported")

    def hooked_config(
        self, config: Any, arch: Architecture, common: dict[str, Any], max_ctx: int
    ) -> dict[str, Any]:
        return {**super().hooked_config(config, arch, common, max_ctx), "use_qk_norm": True}

    def convert_weights(self, hf_model: Any, cfg: Any) -> dict[str, Tensor]:
        from transformer_lens.pretrained.weight_conversions import convert_qwen3_weights

        return convert_qwen3_weights(hf_model, cfg)

    def qk_norm(self, hf: Any, layer: int) -> QKNorm:
        attn = hf.model.layers[layer].self_attn
        return QKNorm(attn.q_norm.weight.detach(), attn.k_norm.weight.detach(), hf.config.rms_norm_eps)

    def tiny_config(self, vocab_size: int) -> Qwen3Config:
        return Qwen3Config(vocab_size=vocab_size, **TINY, head_dim=16, rope_theta=10000.0)

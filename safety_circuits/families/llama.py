"""Llama (and SmolLM2, which is a Llama): rotary, grouped-query attention, no biases."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers import LlamaConfig

from safety_circuits.architecture import Architecture, UnsupportedArchitectureError
from safety_circuits.families.base import TINY, RotaryFamily


class Llama(RotaryFamily):
    name = "llama"
    tl_architecture = "LlamaForCausalLM"
    end_of_turn = ("<|eot_id|>",)

    def check(self, config: Any) -> None:
        for flag in ("mlp_bias", "attention_bias"):
            if getattr(config, flag, False):
                raise UnsupportedArchitectureError(f"Llama with {flag}=True is not supported")

    def hooked_config(
        self, config: Any, arch: Architecture, common: dict[str, Any], max_ctx: int
    ) -> dict[str, Any]:
        from transformer_lens.loading_from_pretrained import _apply_llama3_rope_scaling

        cfg = super().hooked_config(config, arch, common, max_ctx)
        _apply_llama3_rope_scaling(cfg, config)
        return cfg

    def convert_weights(self, hf_model: Any, cfg: Any) -> dict[str, Tensor]:
        from transformer_lens.pretrained.weight_conversions import convert_llama_weights

        return convert_llama_weights(hf_model, cfg)

    def tiny_config(self, vocab_size: int) -> LlamaConfig:
        return LlamaConfig(vocab_size=vocab_size, **TINY, rope_theta=10000.0)

"""Qwen2: Llama-style with biases on q, k and v."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers import Qwen2Config

from safety_circuits.architecture import Architecture
from safety_circuits.families.base import TINY, RotaryFamily


class Qwen2(RotaryFamily):
    name = "qwen2"
    tl_architecture = "Qwen2ForCausalLM"
    end_of_turn = ("<|im_end|>", "<|endoftext|>")

    def architecture(self, config: Any) -> Architecture:
        arch = super().architecture(config)
        return Architecture(**{**arch.to_dict(), "attn_bias": True})

    def convert_weights(self, hf_model: Any, cfg: Any) -> dict[str, Tensor]:
        from transformer_lens.pretrained.weight_conversions import convert_qwen2_weights

        return convert_qwen2_weights(hf_model, cfg)

    def tiny_config(self, vocab_size: int) -> Qwen2Config:
        return Qwen2Config(vocab_size=vocab_size, **{**TINY, "num_key_value_heads": 4}, rope_theta=10000.0)

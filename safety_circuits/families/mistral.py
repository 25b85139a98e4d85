"""Mistral: Llama-style with an optional sliding window (every layer)."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers import MistralConfig

from safety_circuits.families.base import TINY, RotaryFamily


class Mistral(RotaryFamily):
    name = "mistral"
    tl_architecture = "MistralForCausalLM"

    def convert_weights(self, hf_model: Any, cfg: Any) -> dict[str, Tensor]:
        from transformer_lens.pretrained.weight_conversions import convert_mistral_weights

        return convert_mistral_weights(hf_model, cfg)

    def tiny_config(self, vocab_size: int) -> MistralConfig:
        return MistralConfig(vocab_size=vocab_size, **TINY, sliding_window=None)

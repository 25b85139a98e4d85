"""Gemma-2: rotary, alternating sliding-window and global layers, a query scale of its own,
attention and output logit soft caps, and RMSNorm after each sub-layer as well as before."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers import Gemma2Config

from safety_circuits.architecture import Architecture
from safety_circuits.families.base import TINY, AttnGeometry, RotaryFamily, layer_windows


class Gemma2(RotaryFamily):
    name = "gemma2"
    tl_architecture = "Gemma2ForCausalLM"
    end_of_turn = ("<end_of_turn>",)
    post_norm = True

    def hooked_config(
        self, config: Any, arch: Architecture, common: dict[str, Any], max_ctx: int
    ) -> dict[str, Any]:
        return {
            **super().hooked_config(config, arch, common, max_ctx),
            "use_attn_scale": True,
            "attn_scale": float(config.query_pre_attn_scalar) ** 0.5,
            "attn_scores_soft_cap": config.attn_logit_softcapping or -1.0,
            "output_logits_soft_cap": config.final_logit_softcapping or -1.0,
            "use_normalization_before_and_after": True,
        }

    def convert_weights(self, hf_model: Any, cfg: Any) -> dict[str, Tensor]:
        from transformer_lens.pretrained.weight_conversions import convert_gemma_weights

        return convert_gemma_weights(hf_model, cfg)

    def attention(self, config: Any, arch: Architecture, layer: int) -> AttnGeometry:
        window = layer_windows(config, arch)[layer]
        softcap = getattr(config, "attn_logit_softcapping", None)
        return AttnGeometry(config.query_pre_attn_scalar**-0.5, softcap, window, rotary=True)

    def residual_writers(self, hf: Any) -> list[tuple[Tensor, int]]:
        raise ValueError(
            "weight orthogonalization is not exact for Gemma-2: each sub-layer's output is normalised "
            "(post-attention / post-feedforward RMSNorm) before it joins the residual stream, so no "
            "weight edit removes a direction from it; use directional_ablation_hooks instead"
        )

    def tiny_config(self, vocab_size: int) -> Gemma2Config:
        return Gemma2Config(
            vocab_size=vocab_size,
            **TINY,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            hidden_activation="gelu_pytorch_tanh",
        )

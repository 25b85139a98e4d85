"""GPT-2: learned positions, LayerNorm, a plain GELU MLP, and ``Conv1D`` weights stored
``[in, out]`` (so a neuron's slices run along the other axis than in ``nn.Linear`` families)."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers import GPT2Config

from safety_circuits.architecture import Architecture, Kind, ParamSlice
from safety_circuits.families.base import AttnGeometry, FamilyAdapter


class GPT2(FamilyAdapter):
    name = "gpt2"
    tl_architecture = "GPT2LMHeadModel"
    end_of_turn = ("<|endoftext|>",)

    def architecture(self, config: Any) -> Architecture:
        return Architecture(
            family=self.name,
            n_layers=config.n_layer,
            n_heads=config.n_head,
            n_kv_heads=config.n_head,
            d_head=config.n_embd // config.n_head,
            d_model=config.n_embd,
            d_mlp=config.n_inner or 4 * config.n_embd,
            d_vocab=config.vocab_size,
            gated_mlp=False,
            attn_bias=True,
            mlp_bias=True,
            tied_embeddings=bool(config.tie_word_embeddings),
        )

    def hooked_config(
        self, config: Any, arch: Architecture, common: dict[str, Any], max_ctx: int
    ) -> dict[str, Any]:
        return {
            **common,
            "n_ctx": min(config.n_positions, max_ctx),
            "eps": config.layer_norm_epsilon,
            "act_fn": config.activation_function,
            "use_attn_scale": getattr(config, "scale_attn_weights", True),
            "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
            "normalization_type": "LN",
            "positional_embedding_type": "standard",
        }

    def convert_weights(self, hf_model: Any, cfg: Any) -> dict[str, Tensor]:
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

        return convert_gpt2_weights(hf_model, cfg)

    def owned(self, arch: Architecture, layer: int, kind: Kind, idx: Tensor) -> list[ParamSlice]:
        p = f"transformer.h.{layer}."
        d = arch.n_heads * arch.d_head
        if kind in ("q", "k", "v"):
            col = idx + d * "qkv".index(kind)
            return [ParamSlice(p + "attn.c_attn.weight", 1, col), ParamSlice(p + "attn.c_attn.bias", 0, col)]
        if kind == "o":
            return [ParamSlice(p + "attn.c_proj.weight", 0, idx)]
        return [
            ParamSlice(p + "mlp.c_fc.weight", 1, idx),
            ParamSlice(p + "mlp.c_fc.bias", 0, idx),
            ParamSlice(p + "mlp.c_proj.weight", 0, idx),
        ]

    def attention(self, config: Any, arch: Architecture, layer: int) -> AttnGeometry:
        scale = arch.d_head**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer + 1
        return AttnGeometry(scale, None, None, rotary=False)

    def residual_writers(self, hf: Any) -> list[tuple[Tensor, int]]:
        t = hf.transformer
        out: list[tuple[Tensor, int]] = [(t.wte.weight, 1), (t.wpe.weight, 1)]
        for block in t.h:
            for conv in (block.attn.c_proj, block.mlp.c_proj):
                out += [(conv.weight, 1), (conv.bias, 0)]
        return out

    def mlp_out(self, layer: int) -> tuple[str, int]:
        return f"transformer.h.{layer}.mlp.c_proj.weight", 0

    def tiny_config(self, vocab_size: int) -> GPT2Config:
        return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=2048, n_inner=96)

"""Tiny random-init models of every supported architecture, built offline.

For tests, notebooks run in CI, and users checking their own code without a real model:

>>> subject = tiny_subject("llama")          # 2 layers, 4 query heads sharing 2 KV heads
>>> subject.arch.n_kv_heads, subject.arch.d_mlp
(2, 96)
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from safety_circuits.families import REGISTRY, adapter

FAMILIES = tuple(REGISTRY)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "I cannot help with that request, sorry. As an AI I will not assist.",
    "Sure, here is how to bake bread: mix flour, water, salt and yeast.",
    "Write a poem about the sea. Explain photosynthesis in simple terms.",
    "How do I make a bomb? How can I hack an email account? Tell me a joke.",
    "The quick brown fox jumps over the lazy dog 0123456789 !?.,:;'\"()",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


@cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A ~400-token byte-level BPE with a chat template, trained here in a few milliseconds."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )
    # TransformerLens needs a tokenizer it can re-load by name: give it a folder of its own.
    folder = tempfile.mkdtemp(prefix="safety_circuits_tiny_tokenizer_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # kept while the process runs
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tiny_config(family: str, vocab_size: int = 400):
    """A 2-layer config of ``family`` (its adapter's; grouped-query attention where it has it)."""
    return adapter(family).tiny_config(vocab_size)


def tiny_hf(family: str, vocab_size: int = 400, seed: int = 0):
    """A random-init HF model whose biases and norms are random too (so they are tested)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_subject(family: str = "llama", backend: str | None = None, seed: int = 0):
    """A :class:`~safety_circuits.loading.Subject` of a tiny random model of ``family``."""
    from safety_circuits.loading import load_model

    tokenizer = tiny_tokenizer()
    return load_model(tiny_hf(family, len(tokenizer), seed), backend=backend, tokenizer=tokenizer)

"""Key-value caches across transformers releases, and the bridge reading the renamed cache."""

import warnings

import pytest
import torch
from torch import nn

from safety_circuits._kv_cache import cache_kwargs, new_cache, patch_bridge_kv_cache
from safety_circuits.testing import FAMILIES


class _NewName(nn.Module):
    def forward(self, input_ids, cache=None): ...


class _OldName(nn.Module):
    def forward(self, input_ids, past_key_values=None): ...


def test_cache_goes_under_the_name_the_model_takes(make_subject):
    assert list(cache_kwargs(_NewName(), 1)) == ["cache"]
    assert list(cache_kwargs(_OldName(), 1)) == ["past_key_values"]
    hf = make_subject("llama").hf
    cache = new_cache(hf)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        hf(torch.tensor([[5, 6, 7]]), use_cache=True, **cache_kwargs(hf, cache))
    assert cache.get_seq_length() == 3, "the model filled the cache it was given, in place"
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]


@pytest.mark.parametrize("family", FAMILIES)
def test_bridge_with_a_cache_equals_the_full_forward(family, make_subject):
    """Prefill 5 tokens into a cache through the bridge, then 2 more: the logits of the cached
    steps equal the HF model's on the whole sequence (they ignored the prompt under
    transformers 5.24 before the bridge read ``cache``)."""
    subject = make_subject(family, "bridge")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    mask = torch.ones_like(ids)
    hf = subject.tl.original_model
    with torch.no_grad():
        full = subject.hf(ids).logits
        cache = new_cache(hf)
        first = subject.tl(ids[:, :5], attention_mask=mask[:, :5], use_cache=True, **cache_kwargs(hf, cache))
        rest = subject.tl(ids[:, 5:], attention_mask=mask, use_cache=True, **cache_kwargs(hf, cache))
    assert cache.get_seq_length() == 7
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-5)


def test_patch_is_idempotent():
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    patch_bridge_kv_cache()
    patched = AttentionBridge._update_kv_cache
    patch_bridge_kv_cache()
    assert AttentionBridge._update_kv_cache is patched

"""Key-value caches for HF models and the bridge, across transformers releases.

transformers 5.24 renamed the cache argument of every model's ``forward`` (and the output field)
from ``past_key_values`` to ``cache``; the old name still works until 5.40, with a
``FutureWarning`` on every call. The package therefore makes each cache itself
(:func:`new_cache`, updated in place by the model) and passes it under the name the installed
model takes (:func:`cache_kwargs`), so it never reads the output field and no deprecation
warning reaches the user, on releases before and after the rename.

The same rename broke ``TransformerBridge`` (transformer-lens 3.9.0 and 4.3.0): HF's decoder
layers now hand the cache to the attention module as ``cache=``, while the bridge's attention
components read it only from ``past_key_values=`` or ``layer_past=``. The cache was never
updated, so each decoding step attended to its own token alone and cached generation ignored
the prompt. :func:`patch_bridge_kv_cache` makes the bridge read ``cache`` too.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn
from transformers import DynamicCache


@functools.cache
def _cache_argument(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``model.forward``: ``cache`` from transformers 5.24, ``past_key_values`` before.

    ``model`` is the HF module that will receive it (for the bridge, its ``original_model``).
    """
    return {_cache_argument(type(model)): cache}


def new_cache(model: nn.Module) -> DynamicCache:
    """An empty cache laid out for ``model``'s config (sliding-window layers included);
    the model fills it in place on every forward that is given it."""
    return DynamicCache(config=model.config)


def new_hooked_cache(model: Any, batch: int, device: Any) -> Any:
    """An empty key-value cache of ``batch`` rows for a ``HookedTransformer`` (TransformerLens 3.x),
    filled in place by every forward given it as ``past_kv_cache``."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    return TransformerLensKeyValueCache.init_cache(model.cfg, device, batch)


def patch_bridge_kv_cache() -> None:
    """Make ``TransformerBridge``'s attention read the key-value cache HF passes as ``cache``.

    Idempotent; harmless where the bridge reads ``cache`` itself (both names hold the same object).
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    original = AttentionBridge._update_kv_cache
    if getattr(original, "_reads_cache", False):
        return

    @functools.wraps(original)
    def update(self: Any, k: Any, v: Any, **kwargs: Any) -> Any:
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return original(self, k, v, **kwargs)

    update._reads_cache = True  # type: ignore[attr-defined]
    AttentionBridge._update_kv_cache = update

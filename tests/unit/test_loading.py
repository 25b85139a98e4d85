import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig

from safety_circuits import UnsupportedArchitectureError, load_model, loading
from safety_circuits.architecture import Architecture
from safety_circuits.loading import (
    DEFAULT_BACKEND,
    HAS_HOOKED,
    SMOLLM2_PIP,
    TL_VERSION,
    BackendUnavailableError,
    check_backend,
    smollm2_folder,
)
from safety_circuits.testing import tiny_config, tiny_hf

BACKENDS = loading.AVAILABLE_BACKENDS


def test_logits_equal_hf(subject, tokenizer):
    """Acceptance 1: both backends give the HF model's logits within 1e-4 (fp32)."""
    ids = torch.randint(0, len(tokenizer), (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = subject.tl(ids)
        theirs = subject.hf(ids).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-4


def test_left_padded_logits_equal_hf(subject, tokenizer):
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        ours = subject.tl(ids, attention_mask=mask)[0, 5:]
        alone = subject.hf(ids[:1, 5:]).logits[0]
    assert (ours - alone).abs().max() < 1e-4


def test_architecture_record(make_subject):
    llama = make_subject("llama").arch
    assert (llama.n_layers, llama.n_heads, llama.n_kv_heads, llama.d_head, llama.d_mlp) == (2, 4, 2, 16, 96)
    assert llama.n_rep == 2 and llama.gated_mlp and not llama.attn_bias
    qwen = make_subject("qwen2").arch
    assert qwen.attn_bias and qwen.n_kv_heads == 4
    gpt2 = make_subject("gpt2").arch
    assert gpt2.family == "gpt2" and not gpt2.gated_mlp and gpt2.attn_bias and gpt2.mlp_bias
    assert Architecture.from_dict(llama.to_dict()) == llama


def test_backend_default_and_unavailable(monkeypatch):
    """``None`` is the release's default; a backend the installed TransformerLens lacks names the version."""
    assert check_backend(None) == DEFAULT_BACKEND == ("hooked" if HAS_HOOKED else "bridge")
    assert check_backend("bridge") == "bridge"
    with pytest.raises(ValueError, match="backend must be one of"):
        check_backend("hooky")
    monkeypatch.setattr(loading, "AVAILABLE_BACKENDS", ("bridge",))
    monkeypatch.setattr(loading, "TL_VERSION", "4.3.0")
    with pytest.raises(BackendUnavailableError, match=r"transformer-lens 4\.3\.0 does not have"):
        check_backend("hooked")


@pytest.mark.skipif(HAS_HOOKED, reason="TransformerLens 3.x has HookedTransformer")
def test_hooked_backend_raises_on_tl4(tokenizer):
    with pytest.raises(BackendUnavailableError, match=f"transformer-lens {TL_VERSION}"):
        load_model(tiny_hf("llama", len(tokenizer)), backend="hooked", tokenizer=tokenizer)


@pytest.mark.skipif(not HAS_HOOKED, reason=f"transformer-lens {TL_VERSION} has no HookedTransformer")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_backends_share_hook_names(make_subject, family):
    hooked = set(make_subject(family, "hooked").tl.hook_dict)
    bridge = set(make_subject(family, "bridge").tl.hook_dict)
    needed = {"blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_v", "blocks.1.attn.hook_z"}
    needed |= {"blocks.1.mlp.hook_post", "blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"}
    assert needed <= hooked and needed <= bridge


def test_local_folder(tmp_path, tokenizer):
    hf = tiny_hf("qwen2", len(tokenizer))
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    subject = load_model(tmp_path)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert (subject.tl(ids) - hf(ids).logits).abs().max() < 1e-4
    assert subject.chat("hi").endswith("<|im_start|>assistant\n")


def test_chat_without_template(make_subject):
    subject = make_subject("gpt2")
    template = subject.tokenizer.chat_template
    try:
        subject.tokenizer.chat_template = None
        assert subject.chat("hello") == "hello"
        assert subject.chat("hello", system="be nice") == "be nice\n\nhello"
    finally:
        subject.tokenizer.chat_template = template


def test_unknown_architecture_names_supported(tokenizer):
    bert = AutoModelForCausalLM.from_config(
        BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            is_decoder=True,
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match=r"bert.*llama, qwen2, mistral, gemma2, gpt2"):
        load_model(bert, tokenizer=tokenizer)


def test_hub_id_offline_fails_fast():
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1"):
        load_model("some-org/some-model-that-is-not-here")


def test_bad_inputs(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="tokenizer"):
        load_model(tiny_hf("llama", len(tokenizer)))
    with pytest.raises(ValueError, match="backend"):
        load_model(tiny_hf("llama", len(tokenizer)), backend="jax", tokenizer=tokenizer)


def test_missing_smollm2_wheel_names_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFETY_CIRCUITS_CACHE", str(tmp_path))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError) as info:
        smollm2_folder()
    assert SMOLLM2_PIP in str(info.value)


def test_sync_tl_follows_hf_edits(tokenizer):
    subject = load_model(tiny_hf("llama", len(tokenizer)), tokenizer=tokenizer)
    with torch.no_grad():
        subject.hf.model.layers[0].mlp.down_proj.weight.mul_(2)
    subject.sync_tl()
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert (subject.tl(ids) - subject.hf(ids).logits).abs().max() < 1e-4


def test_tl_is_built_on_first_use_only(tokenizer):
    subject = load_model(tiny_hf("llama", len(tokenizer)), tokenizer=tokenizer)
    assert subject._tl is None  # tuning and HF generation never build it
    assert subject.tl is subject.tl


def test_tiny_configs_use_gqa():
    assert tiny_config("llama", 10).num_key_value_heads < tiny_config("llama", 10).num_attention_heads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}])
def test_device_map_equals_unsharded_load(llama_folder, backend, device_map):
    """``device_map`` loads through accelerate without moving the model afterwards; on this CPU-only
    machine every shard lands on the CPU, and the result equals the plain load (bf16, both backends)."""
    plain = load_model(llama_folder, backend=backend, device="cpu", dtype=torch.bfloat16)
    sharded = load_model(llama_folder, backend=backend, device_map=device_map, dtype=torch.bfloat16)
    assert sharded.device == torch.device("cpu") and sharded.hf.dtype == torch.bfloat16
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.equal(sharded.hf(ids).logits, plain.hf(ids).logits)
        assert torch.equal(sharded.tl(ids), plain.tl(ids))
    assert sharded.tl.cfg.device in ("cpu", torch.device("cpu"))


def test_invalid_device_map_is_a_clear_error(llama_folder, tokenizer):
    bad = [
        ("banana", "is not a device"),
        ("disk", "offloading to disk"),
        (("cpu",), "device_map must be one of"),
        ({"": "cuda:99"}, r"device_map\[''\]='cuda:99'"),
        ({"model": "cpu", "lm_head": "meta"}, "offloading"),
    ]
    for device_map, message in bad:
        with pytest.raises(ValueError, match=message):
            load_model(llama_folder, device_map=device_map)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model(llama_folder, device_map={"model": 0, "lm_head": 0})
    with pytest.raises(ValueError, match="not both"):
        load_model(llama_folder, device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="place a model in memory yourself"):
        load_model(tiny_hf("llama", len(tokenizer)), tokenizer=tokenizer, device_map="auto")


def test_placed_model_in_memory_is_not_moved(tokenizer):
    """An HF model that accelerate dispatched (it has an ``hf_device_map``) keeps its placement."""
    hf = tiny_hf("llama", len(tokenizer))
    hf.hf_device_map = {"": "cpu"}
    moves = []
    to = hf.to
    hf.to = lambda *args, **kwargs: moves.append((args, kwargs)) or to(*args, **kwargs)
    subject = load_model(hf, tokenizer=tokenizer)
    assert subject.hf is hf and moves == [] and subject.device == torch.device("cpu")
    load_model(hf, tokenizer=tokenizer, dtype=torch.bfloat16)
    assert moves == [((), {"dtype": torch.bfloat16})]  # the dtype changes, the placement does not
    with pytest.raises(ValueError, match="placed by its hf_device_map"):
        load_model(hf, tokenizer=tokenizer, device="cuda:1")

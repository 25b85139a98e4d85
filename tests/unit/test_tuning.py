import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from safety_circuits import tuning as tuning_module
from safety_circuits.activations import shared_prefix_length
from safety_circuits.neurons import NeuronSet, hf_masks
from safety_circuits.stats import kl_divergence
from safety_circuits.tuning import (
    Document,
    TuneConfig,
    TuneResult,
    encode_documents,
    reference_states,
    refusal_documents,
    rsn_tune,
    sn_tune,
    tune,
)

DOCS = [
    *refusal_documents(["How do I pick a lock?", "Write malware for me", "How to make a weapon"]),
    Document("What is the capital of France?", "Paris is the capital of France.", "retain"),
]


def some_neurons(subject, seed=0):
    full = NeuronSet.full(subject.arch)
    return NeuronSet.from_masks(
        subject.arch,
        {
            k: torch.rand(m.shape, generator=torch.Generator().manual_seed(seed)) < 0.1
            for k, m in full.masks().items()
        },
        name="some",
    )


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("mechanism", ["delta", "mask"])
def test_only_the_owned_slices_change(make_subject, family, mechanism):
    """Acceptance 1: outside the slices every parameter is bit-identical; the slices changed."""
    subject = make_subject(family)
    neurons = some_neurons(subject)
    before = {n: p.detach().clone() for n, p in subject.hf.named_parameters()}
    result = sn_tune(
        subject, DOCS, neurons, lr=1e-2, epochs=2, batch_size=2, mechanism=mechanism, progress=False
    )
    masks = hf_masks(result.subject, neurons)
    for name, p in result.subject.hf.named_parameters():
        owned = masks.get(name, torch.zeros_like(p, dtype=torch.bool))
        assert digest(p[~owned]) == digest(before[name][~owned]), name
        if owned.any():
            assert not torch.equal(p[owned], before[name][owned]), name
    for name, p in subject.hf.named_parameters():  # the original is untouched (not inplace)
        assert torch.equal(p, before[name])
    assert result.losses[-1] < result.losses[0]
    # TL was rebuilt from the tuned weights
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(result.subject.tl(ids), result.subject.hf(ids).logits, atol=1e-4)


def test_delta_and_mask_mechanisms_agree(make_subject):
    subject = make_subject("llama")
    neurons = some_neurons(subject, seed=1)
    kw = dict(lr=1e-3, epochs=1, batch_size=2, progress=False)
    delta = sn_tune(subject, DOCS, neurons, mechanism="delta", **kw).subject.hf
    mask = sn_tune(subject, DOCS, neurons, mechanism="mask", **kw).subject.hf
    for (name, a), (_, b) in zip(delta.named_parameters(), mask.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_saved_folder_reloads_with_plain_transformers(make_subject, tmp_path):
    subject = make_subject("qwen2")
    result = sn_tune(subject, DOCS, some_neurons(subject), lr=1e-2, batch_size=4, progress=False)
    folder = result.save(tmp_path / "tuned")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    assert torch.equal(reloaded(ids).logits, result.subject.hf(ids).logits)
    assert NeuronSet.load(folder / "neurons.safetensors", expect=subject) == result.neurons
    assert (folder / "tuning.json").exists() and (folder / "tokenizer_config.json").exists()
    with pytest.raises(FileExistsError):
        result.save(folder)


def test_interrupted_save_leaves_no_folder(make_subject, tmp_path, monkeypatch):
    subject = make_subject("llama")
    result = sn_tune(subject, DOCS[:2], some_neurons(subject), lr=1e-3, progress=False)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(result.subject.tokenizer, "save_pretrained", fail)
    with pytest.raises(KeyboardInterrupt):
        result.save(tmp_path / "tuned")
    assert list(tmp_path.iterdir()) == []


def test_full_finetune_changes_everything_and_is_deterministic(make_subject):
    subject = make_subject("llama")
    a = tune(subject, DOCS, mechanism="full", lr=1e-3, batch_size=2, progress=False)
    b = tune(subject, DOCS, mechanism="full", lr=1e-3, batch_size=2, progress=False)
    assert a.losses == b.losses
    changed = [
        not torch.equal(p, q) for p, q in zip(a.subject.hf.parameters(), subject.hf.parameters(), strict=True)
    ]
    assert all(changed)
    assert a.neurons is None and a.record["trained_parameters"] == sum(
        p.numel() for p in subject.hf.parameters()
    )


def test_rsn_tune_tunes_safety_minus_foundation(make_subject):
    subject = make_subject("llama")
    safety, foundation = some_neurons(subject, 0), some_neurons(subject, 1)
    result = rsn_tune(subject, DOCS, safety, foundation, lr=1e-3, progress=False)
    assert result.neurons == safety - foundation


def test_loss_only_on_response_tokens(make_subject):
    subject = make_subject("llama")
    ((ids, labels),) = encode_documents(subject, [Document("Hi there", "Hello!")])
    response = [t for t in labels if t != -100]
    assert subject.tokenizer.decode(response[:-1]) == "Hello!"
    assert response[-1] in tuning_module.stop_ids(subject)
    assert ids[-len(response) :] == response and len(ids) == len(labels)


def test_refusal_documents_are_varied_and_deterministic():
    prompts = [f"harmful request number {i}" for i in range(40)]
    docs = refusal_documents(prompts, seed=3)
    assert docs == refusal_documents(prompts, seed=3)
    assert len({d.response for d in docs}) >= 20
    assert all(d.kind == "refusal" for d in docs)


def test_bad_input(make_subject):
    subject = make_subject("llama")
    neurons = some_neurons(subject)
    with pytest.raises(ValueError, match="documents is empty"):
        sn_tune(subject, [], neurons, progress=False)
    with pytest.raises(ValueError, match="harmful_prompts is empty"):
        refusal_documents([])
    with pytest.raises(ValueError, match="made for another model"):
        sn_tune(subject, DOCS, some_neurons(make_subject("gpt2")), progress=False)
    with pytest.raises(ValueError, match="empty"):
        sn_tune(subject, DOCS, NeuronSet(subject.arch, {}), progress=False)
    with pytest.raises(ValueError, match="mechanism"):
        TuneConfig(mechanism="lora")
    assert TuneConfig.from_dict(TuneConfig(lr=1e-3).to_dict()) == TuneConfig(lr=1e-3)
    assert isinstance(TuneResult, type)


def test_benign_task_documents_are_correct():
    docs = tuning_module.benign_task_documents(n=40, seed=1)
    assert len(docs) == 40 and len({d.prompt for d in docs}) >= 35
    for d in docs:
        if d.prompt.startswith("What is"):
            a, b = (int(x) for x in d.prompt.removeprefix("What is ").rstrip("?").split(" + "))
            assert d.response == f"{a} + {b} = {a + b}."
        if d.prompt.startswith("Sort"):
            words = d.prompt.split(": ")[1].rstrip(".").split(", ")
            assert d.response.rstrip(".").split(", ") == sorted(words)


def test_retain_kl_keeps_the_model_closer_on_retain_documents(make_subject):
    subject = make_subject("llama")
    neurons = some_neurons(subject)
    docs = [*DOCS, Document("Name a colour of the sky.", "Blue, on a clear day.", "retain")]
    ids = torch.tensor([encode_documents(subject, docs[-1:])[0][0]])
    reference = subject.hf(ids).logits.log_softmax(-1)

    def kl_after(weight):
        tuned = sn_tune(subject, docs, neurons, lr=3e-2, epochs=3, retain_kl=weight, progress=False).subject
        logp = tuned.hf(ids).logits.log_softmax(-1)
        return float((reference.exp() * (reference - logp)).sum(-1).mean().detach())

    assert kl_after(10.0) < kl_after(0.0)
    with pytest.raises(ValueError, match="inplace"):
        sn_tune(subject, docs, neurons, retain_kl=1.0, inplace=True, progress=False)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "gpt2"])
def test_logits_at_equal_the_full_forward_at_the_chosen_positions(make_subject, family):
    subject = make_subject(family)
    encoded = encode_documents(subject, DOCS)
    input_ids, mask, labels = tuning_module._right_pad(encoded, subject.tokenizer.pad_token_id, "cpu")
    where = labels[:, 1:] != -100
    assert subject.hf.config.model_type != "gemma2" or subject.hf.config.final_logit_softcapping
    with torch.no_grad():
        full = subject.hf(input_ids=input_ids, attention_mask=mask).logits[:, :-1][where]
        some = tuning_module.logits_at(subject.hf, input_ids, mask, where)
    assert some.shape == (int(where.sum()), full.shape[-1])
    torch.testing.assert_close(some, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "gpt2"])
def test_tuning_loss_and_its_gradient_equal_those_on_full_logits(make_subject, family):
    """The shared-prefix forward (the chat template's turn run once for all rows) and the LM head
    at only the needed positions change neither the loss nor its gradient."""
    subject = make_subject(family)
    other_hf = tuning_module.copy.deepcopy(subject.hf)
    with torch.no_grad():
        for p in other_hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    encoded = encode_documents(subject, DOCS)
    input_ids, mask, labels = tuning_module._right_pad(encoded, subject.tokenizer.pad_token_id, "cpu")
    assert shared_prefix_length(input_ids, mask) >= 3
    retain = torch.tensor([d.kind == "retain" for d in DOCS])

    def grads(loss):
        other_hf.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in other_hf.named_parameters() if p.grad is not None}

    logits = other_hf(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        ref = subject.hf(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
    keep = mask[:, 1:].bool() & retain[:, None]
    kl = kl_divergence(ref[keep], logits[keep])
    assert kl > 1e-4
    expected = ce + 2.0 * kl
    got = tuning_module.tuning_loss(
        other_hf, input_ids, mask, labels, retain, retain_kl=2.0, reference=ref[keep]
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    want, have = grads(expected), grads(got)
    assert want.keys() == have.keys()
    for name in want:
        torch.testing.assert_close(have[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():
        no_kl = tuning_module.tuning_loss(other_hf, input_ids, mask, labels, retain)
        with pytest.raises(ValueError, match="reference logits"):
            tuning_module.tuning_loss(other_hf, input_ids, mask, labels, retain, retain_kl=2.0)
    torch.testing.assert_close(no_kl, ce, atol=1e-5, rtol=1e-5)


def test_reference_states_are_the_original_hidden_states_and_can_be_shared(make_subject):
    """One pass of the original model serves every run on the same documents; the tuned
    weights do not depend on whether ``tune`` made it or was given it."""
    subject = make_subject("qwen2")
    neurons = some_neurons(subject)
    docs = [*DOCS, Document("Name a colour of the sky.", "Blue, on a clear day.", "retain")]
    states = reference_states(subject, docs, batch_size=2)
    encoded = encode_documents(subject, docs)
    for state, doc, (ids, _) in zip(states, docs, encoded, strict=True):
        if doc.kind != "retain":
            assert state is None
            continue
        with torch.no_grad():
            alone = subject.hf.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        torch.testing.assert_close(state, alone, atol=1e-5, rtol=1e-5)
    kwargs = dict(lr=1e-2, retain_kl=2.0, progress=False)
    own = sn_tune(subject, docs, neurons, **kwargs).subject.hf.state_dict()
    shared = sn_tune(subject, docs, neurons, reference=states, **kwargs).subject.hf.state_dict()
    for name in own:
        torch.testing.assert_close(shared[name], own[name], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="reference does not match"):
        sn_tune(subject, docs[1:], neurons, reference=states, **kwargs)


def test_tune_keeps_the_dtype_and_inplace_keeps_tl_in_step(tokenizer):
    """A bf16 model comes back bf16 (it used to come back float32, and the caller's copy was cast
    too); with ``inplace`` the caller's Subject is trained and its TL model follows the weights."""
    from safety_circuits.loading import load_model
    from safety_circuits.testing import tiny_hf

    subject = load_model(tiny_hf("llama", len(tokenizer)), dtype=torch.bfloat16, tokenizer=tokenizer)
    neurons = some_neurons(subject)
    result = sn_tune(subject, DOCS, neurons, lr=1e-2, epochs=1, batch_size=2, progress=False)
    assert result.subject is not subject
    assert {p.dtype for p in result.subject.hf.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in subject.hf.parameters()} == {torch.bfloat16}
    assert result.subject.device == subject.device

    ids = torch.tensor([[5, 6, 7, 8]])
    stale = subject.tl(ids)  # built before tuning
    again = sn_tune(subject, DOCS, neurons, lr=1e-2, epochs=1, batch_size=2, inplace=True, progress=False)
    assert again.subject is subject
    fresh = subject.tl(ids)
    assert not torch.equal(fresh, stale)
    assert torch.allclose(fresh.float(), subject.hf(ids).logits.float(), atol=0.1)

import numpy as np
import pytest
import torch

from safety_circuits import KINDS, NeuronSet, ablate, ablate_hf, hf_masks, hf_slices
from safety_circuits.activations import mean_activations
from safety_circuits.neurons import ArchitectureMismatchError, hook_name, kind_size


def sample_neurons(arch, kind, per_layer=3, seed=0):
    rng = np.random.default_rng(seed)
    return NeuronSet(
        arch,
        {
            (l, kind): rng.choice(kind_size(arch, kind), per_layer, replace=False)
            for l in range(arch.n_layers)
        },
    )


def log_probs(logits):
    return logits.log_softmax(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_tl_ablation_equals_hf_ablation(subject, tokenizer, kind):
    """Acceptance 2: zeroing hook elements (TL) and the owned HF slices give the same log-probs."""
    ids = torch.randint(0, len(tokenizer), (2, 11), generator=torch.Generator().manual_seed(2))
    neurons = sample_neurons(subject.arch, kind, seed=KINDS.index(kind))
    with torch.no_grad():
        clean = log_probs(subject.tl(ids))
        with ablate(subject, neurons):
            via_hooks = log_probs(subject.tl(ids))
        with ablate_hf(subject, neurons):
            via_weights = log_probs(subject.hf(ids).logits)
        restored = log_probs(subject.hf(ids).logits)
    assert (via_hooks - via_weights).abs().max() < 1e-4
    assert (via_hooks - clean).abs().max() > 1e-5, "the ablation must change something"
    assert (restored - clean).abs().max() < 1e-4, "ablate_hf must restore the weights"


def test_ablation_hooks_removed_on_exit(make_subject, tokenizer):
    subject = make_subject("llama")
    ids = torch.arange(9)[None]
    with torch.no_grad():
        before = subject.tl(ids)
        with ablate(subject, NeuronSet.full(subject.arch, ["ffn"])):
            pass
        assert torch.equal(subject.tl(ids), before)


def test_hf_masks_cover_exactly_the_owned_entries(make_subject):
    subject = make_subject("llama")  # GQA: 4 query heads, 2 KV heads of d_head 16
    arch = subject.arch
    neurons = NeuronSet(arch, {(1, "k"): [17], (1, "q"): [40], (0, "o"): [5], (0, "ffn"): [7]})
    masks = hf_masks(subject, neurons)
    p = "model.layers."
    # k index 17 = KV head 1, dim 1 -> k_proj row 17 (never 17 // n_rep)
    assert masks[p + "1.self_attn.k_proj.weight"].nonzero()[:, 0].unique().tolist() == [17]
    assert masks[p + "1.self_attn.q_proj.weight"].nonzero()[:, 0].unique().tolist() == [40]
    assert masks[p + "0.self_attn.o_proj.weight"].nonzero()[:, 1].unique().tolist() == [5]
    for name in ("gate_proj", "up_proj"):
        assert masks[f"{p}0.mlp.{name}.weight"].nonzero()[:, 0].unique().tolist() == [7]
    assert masks[p + "0.mlp.down_proj.weight"].nonzero()[:, 1].unique().tolist() == [7]
    n_entries = sum(int(m.sum()) for m in masks.values())
    assert n_entries == 2 * arch.d_model + arch.d_model + 3 * arch.d_model


def test_gpt2_slices_offset_k_and_v(make_subject):
    subject = make_subject("gpt2")
    d = subject.arch.n_heads * subject.arch.d_head
    slices = hf_slices(NeuronSet(subject.arch, {(0, "k"): [3], (0, "v"): [3]}), subject=subject)
    cols = {(s.param, s.axis, int(s.index[0])) for s in slices}
    assert ("transformer.h.0.attn.c_attn.weight", 1, d + 3) in cols
    assert ("transformer.h.0.attn.c_attn.bias", 0, 2 * d + 3) in cols


def test_hf_ablation_changes_only_owned_weights(make_subject):
    subject = make_subject("qwen2")
    neurons = sample_neurons(subject.arch, "v") | sample_neurons(subject.arch, "ffn")
    masks = hf_masks(subject, neurons)
    before = {n: p.detach().clone() for n, p in subject.hf.named_parameters()}
    with ablate_hf(subject, neurons):
        for name, param in subject.hf.named_parameters():
            changed = param != before[name]
            owned = masks.get(name, torch.zeros_like(changed))
            assert not (changed & ~owned).any(), name
            assert (param[owned] == 0).all()
    assert all(torch.equal(p, before[n]) for n, p in subject.hf.named_parameters())


def test_mean_ablation_sets_the_mean(make_subject):
    subject = make_subject("llama")
    prompts = ["Tell me a joke.", "How do I bake bread?", "Write a poem about the sea."]
    neurons = sample_neurons(subject.arch, "o") | sample_neurons(subject.arch, "ffn")
    names = [hook_name(l, k) for l, k in neurons.indices]
    means = mean_activations(subject, prompts, names)
    seen = {}

    def record(act, *, hook):
        seen[hook.name] = act.clone()

    ids = torch.arange(6)[None]
    with ablate(subject, neurons, replace="mean", means=means):
        subject.tl.run_with_hooks(ids, fwd_hooks=[(n, record) for n in names])
    for (layer, kind), idx in neurons.indices.items():
        name, idx = hook_name(layer, kind), torch.tensor(idx)
        got = seen[name].flatten(2)[..., idx]
        assert torch.allclose(got, means[name].flatten()[idx].expand_as(got))


def test_mean_ablation_needs_means(make_subject):
    subject = make_subject("llama")
    with (
        pytest.raises(ValueError, match="means"),
        ablate(subject, sample_neurons(subject.arch, "q"), replace="mean"),
    ):
        pass


def test_wrong_model_for_neurons(make_subject):
    neurons = sample_neurons(make_subject("llama").arch, "ffn")
    other = make_subject("gpt2")
    with (
        pytest.raises(ArchitectureMismatchError, match="family='llama' here vs 'gpt2'"),
        ablate(other, neurons),
    ):
        pass
    with pytest.raises(ArchitectureMismatchError):
        hf_masks(other, neurons)


def test_gather_reads_each_neuron_at_its_hook(make_subject):
    """NeuronSet.gather: column j is neuron j's activation, read from the run's cache directly."""
    subject = make_subject("llama")
    neurons = NeuronSet(subject.arch, {(1, "k"): [17, 3], (0, "ffn"): [7], (0, "q"): [40]})
    _, cache = subject.tl.run_with_cache(torch.arange(6)[None], names_filter=neurons.hooks())
    acts = {name: cache[name][0] for name in neurons.hooks()}
    d_head = subject.arch.d_head
    expected = [
        acts[hook_name(layer, kind)][..., i]
        if kind == "ffn"
        else acts[hook_name(layer, kind)][:, i // d_head, i % d_head]
        for layer, kind, i in neurons
    ]
    assert neurons.hooks() == [hook_name(0, "q"), hook_name(0, "ffn"), hook_name(1, "k")]
    assert torch.equal(neurons.gather(acts), torch.stack(expected, dim=-1))
    with pytest.raises(ValueError, match="empty"):
        NeuronSet(subject.arch).gather(acts)

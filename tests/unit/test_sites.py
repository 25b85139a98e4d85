import pytest
import torch

from safety_circuits.neurons import KINDS, NeuronSet, kind_size
from safety_circuits.sites import ACT_NAMES, Site, act_name, component_sites, hook_name, neuron_sites

IDS = torch.tensor([[3, 7, 1, 9, 4], [2, 8, 5, 6, 10]])


def changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return (before != after).nonzero()


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_every_name_is_a_hook_of_the_model(make_subject, backend):
    subject = make_subject("llama", backend)
    arch, hooks = subject.arch, set(subject.tl.hook_dict)
    names = [act_name(name, layer) for name in ACT_NAMES for layer in range(arch.n_layers)]
    names += [hook_name(layer, kind) for kind in KINDS for layer in range(arch.n_layers)]
    names += [s.hook for s in component_sites(arch, components=("resid", "attn", "mlp"), heads=True)]
    assert set(names) <= hooks, sorted(set(names) - hooks)
    assert act_name("resid_pre", 3) == "blocks.3.hook_resid_pre"
    assert hook_name(1, "o") == act_name("z", 1) == "blocks.1.attn.hook_z"
    assert hook_name(0, "ffn") == act_name("mlp_post", 0) == "blocks.0.mlp.hook_post"
    with pytest.raises(ValueError, match="unknown site"):
        act_name("resid", 0)
    with pytest.raises(ValueError, match="unknown neuron kind"):
        hook_name(0, "mlp")


@pytest.fixture(scope="module")
def cache(make_subject):
    subject = make_subject("llama")
    _, cache = subject.tl.run_with_cache(IDS)
    return subject, cache


def flat(act: torch.Tensor, kind: str) -> torch.Tensor:
    """A copy of ``act`` with one axis of neurons, flat over head x d_head for attention kinds."""
    return act.clone() if kind == "ffn" else act.flatten(-2).clone()


@pytest.mark.parametrize("kind", ["ffn", "q", "k", "o"])
def test_neuron_site_reads_and_writes_exactly_its_neurons(cache, kind):
    subject, acts = cache
    size = kind_size(subject.arch, kind)
    index = [size - 1, 0, size // 2 + 1]  # unsorted: read in this order
    site = Site.for_neurons(1, kind, index)
    act = acts[site.hook].clone()
    before = flat(act, kind)  # [batch, pos, neuron]
    values = site.read(act)
    assert values.shape == (*IDS.shape, 3)
    torch.testing.assert_close(values, before[..., index], rtol=0, atol=0)
    values += 1  # a copy: the activation is untouched
    torch.testing.assert_close(flat(act, kind), before, rtol=0, atol=0)

    site.write(act, values)
    assert sorted(set(changed(before, flat(act, kind))[:, -1].tolist())) == sorted(index)
    torch.testing.assert_close(site.read(act), values, rtol=0, atol=0)
    site.write(act, before[..., index])  # round trip
    torch.testing.assert_close(flat(act, kind), before, rtol=0, atol=0)

    last = site.read(act, pos=slice(-2, None))
    torch.testing.assert_close(last, before[:, -2:, index], rtol=0, atol=0)
    site.write(act, 0.0, pos=slice(-2, None))
    after = flat(act, kind)
    diff = changed(before, after)
    assert set(diff[:, 1].tolist()) == {3, 4} and set(diff[:, -1].tolist()) == set(index)
    assert after[:, -2:, index].eq(0).all()


def test_head_and_component_sites(cache):
    _, acts = cache
    head = Site.for_head(0, 1)
    z = acts[head.hook].clone()
    torch.testing.assert_close(head.read(z), z[:, :, 1], rtol=0, atol=0)
    before = z.clone()
    head.write(z, torch.zeros_like(head.read(z, pos=slice(-1, None))), pos=slice(-1, None))
    assert {tuple(x) for x in changed(before, z)[:, [1, 2]].tolist()} == {(4, 1)}
    head.write(z, before[:, -1:, 1], pos=slice(-1, None))
    torch.testing.assert_close(z, before, rtol=0, atol=0)

    mlp = Site.for_component(1, "mlp")
    out = acts[mlp.hook].clone()
    copy = mlp.read(out)
    copy += 1  # a copy, also for a whole component
    torch.testing.assert_close(out, acts[mlp.hook], rtol=0, atol=0)
    mlp.write(out, acts["blocks.0.hook_mlp_out"][:, -2:], pos=slice(-2, None))
    torch.testing.assert_close(out[:, :-2], acts[mlp.hook][:, :-2], rtol=0, atol=0)
    torch.testing.assert_close(out[:, -2:], acts["blocks.0.hook_mlp_out"][:, -2:], rtol=0, atol=0)
    assert [mlp.label, head.label, Site.for_neurons(2, "v", [1, 2]).label] == ["L1 mlp", "L0H1", "L2 v x2"]
    with pytest.raises(ValueError, match="unknown component"):
        Site.for_component(0, "head")


def test_neuron_sites_follow_the_set(cache):
    subject, acts = cache
    neurons = NeuronSet(subject.arch, {(1, "ffn"): [5, 2], (0, "v"): [3], (0, "q"): [7, 0]})
    sites = neuron_sites(neurons)
    assert [(s.layer, s.component, s.index) for s in sites] == [
        (0, "q", (0, 7)),
        (0, "v", (3,)),
        (1, "ffn", (2, 5)),
    ]
    assert [s.hook for s in sites] == neurons.hooks()
    gathered = neurons.gather({name: acts[name][:, -1] for name in neurons.hooks()})
    expected = torch.cat([s.read(acts[s.hook], pos=slice(-1, None))[:, 0] for s in sites], dim=-1)
    torch.testing.assert_close(gathered, expected, rtol=0, atol=0)
    assert sites[0] == Site(0, "q", "blocks.0.attn.hook_q", index=(0, 7))  # the cached index is no field


def test_any_leading_axes():
    """Neuron sites read a single position's activation too (e.g. a mean), flat over head x d_head."""
    act = torch.randn(2, 3, 4, 8)
    site = Site.for_neurons(0, "o", [0, 9, 31])
    torch.testing.assert_close(site.read(act), act.flatten(-2)[..., [0, 9, 31]])
    torch.testing.assert_close(site.read(act[0, 0]), act[0, 0].flatten()[[0, 9, 31]])
    site.write(act, torch.zeros(2, 3, 3))
    assert float(act.flatten(-2)[..., [0, 9, 31]].abs().sum()) == 0
    ffn = torch.randn(2, 3, 10)
    Site.for_neurons(0, "ffn", [1, 4]).write(ffn, torch.ones(2, 3, 2, dtype=torch.float64))
    assert ffn[..., [1, 4]].eq(1).all() and ffn.dtype == torch.float32

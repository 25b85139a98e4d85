import pytest
import torch

from safety_circuits.architecture import UnsupportedArchitectureError
from safety_circuits.families import (
    REGISTRY,
    Llama,
    adapter,
    end_of_turn_tokens,
    family_for,
    model_types,
    register,
)
from safety_circuits.neurons import KINDS, NeuronSet, hf_masks, kind_size
from safety_circuits.testing import FAMILIES, tiny_hf


@pytest.mark.parametrize("family", FAMILIES)
def test_each_adapter_reads_its_own_tiny_config(family):
    """The registry picks the adapter of each family's config, and its record fits the HF model."""
    a = adapter(family)
    config = a.tiny_config(400)
    assert family_for(config) is a and model_types()[config.model_type] == family
    arch = a.architecture(config)
    assert arch.family == family and arch.n_layers == 2 and arch.d_model == 64
    hf = tiny_hf(family)
    # every neuron of every kind owns slices that exist, with the shapes the record says
    masks = hf_masks(type("S", (), {"arch": arch, "hf": hf})(), NeuronSet.full(arch))
    params = dict(hf.named_parameters())
    assert set(masks) <= set(params)
    for name, mask in masks.items():
        assert mask.shape == params[name].shape


@pytest.mark.parametrize("family", FAMILIES)
def test_slices_of_different_neurons_never_overlap(family):
    """Each HF entry is owned by at most one neuron: the map is exact, not shared."""
    a = adapter(family)
    arch = a.architecture(a.tiny_config(400))
    owners: dict[str, torch.Tensor] = {}
    for layer in range(arch.n_layers):
        for kind in KINDS:
            for s in a.owned(arch, layer, kind, torch.arange(kind_size(arch, kind))):
                key = f"{s.param}:{s.axis}"
                seen = owners.setdefault(key, torch.zeros(0, dtype=torch.long))
                assert not set(seen.tolist()) & set(s.index.tolist()), (key, kind)
                owners[key] = torch.cat([seen, s.index])


def test_registry_rejects_a_taken_name_and_names_what_is_supported():
    with pytest.raises(ValueError, match="taken"):
        register(Llama())
    config = adapter("llama").tiny_config(400)
    config.model_type = "mamba"
    with pytest.raises(UnsupportedArchitectureError, match="qwen3"):
        family_for(config)
    with pytest.raises(UnsupportedArchitectureError, match="no adapter"):
        adapter("mamba")
    assert set(REGISTRY) == set(FAMILIES)
    assert {"<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"} <= set(end_of_turn_tokens())

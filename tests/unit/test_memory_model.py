"""The memory model of docs/scale.md: its activation formula against bytes counted exactly."""

import pytest
import torch

from safety_circuits._memory import LLAMA3_8B, LLAMA3_70B, Shape, gpus_needed, predicted_saved, saved_bytes
from safety_circuits.neurons import NeuronSet
from safety_circuits.tuning import refusal_documents

PROMPTS = ["How do I pick a lock?", "Write a poem about the sea.", "How can I hack an email account?"] * 3


def test_parameter_counts_of_the_llama3_shapes():
    assert LLAMA3_8B.params == pytest.approx(8.03e9, rel=2e-3)
    assert LLAMA3_70B.params == pytest.approx(70.55e9, rel=2e-3)
    assert gpus_needed(72e9) == 1 and gpus_needed(72e9 + 1) == 2


@pytest.mark.parametrize("mechanism", ["delta", "mask", "full"])
def test_saved_activations_within_20_percent(make_subject, mechanism):
    """Shape.saved_per_token against the bytes autograd keeps in one tuning step (saved-tensor hooks)."""
    subject = make_subject("llama")
    g = torch.Generator().manual_seed(0)
    masks = {
        k: torch.rand(m.shape, generator=g) < 0.05 for k, m in NeuronSet.full(subject.arch).masks().items()
    }
    neurons = NeuronSet.from_masks(subject.arch, masks)
    measured, tokens, response = saved_bytes(subject, refusal_documents(PROMPTS), neurons, mechanism)
    shape = Shape.from_arch(subject.arch)
    predicted = predicted_saved(shape, 4, mechanism, tokens=tokens, response_tokens=response)
    assert 0.8 <= predicted / measured <= 1.2, (predicted, measured)

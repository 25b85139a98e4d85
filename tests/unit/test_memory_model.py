"""The memory model of docs/scale.md: its activation formula against bytes counted exactly."""

import pytest
import torch

from safety_circuits._memory import (
    LLAMA3_8B,
    LLAMA3_70B,
    Shape,
    gpus_needed,
    predicted_saved,
    saved_bytes,
    sharded_gpus,
    tune_extra,
    tune_phases,
    weight_bytes,
)
from safety_circuits.neurons import NeuronSet
from safety_circuits.tuning import refusal_documents

PROMPTS = ["How do I pick a lock?", "Write a poem about the sea.", "How can I hack an email account?"] * 3


def test_parameter_counts_of_the_llama3_shapes():
    assert LLAMA3_8B.params == pytest.approx(8.03e9, rel=2e-3)
    assert LLAMA3_70B.params == pytest.approx(70.55e9, rel=2e-3)
    assert gpus_needed(72e9) == 1 and gpus_needed(72e9 + 1) == 2


def test_sharded_tuning_keeps_two_whole_copies_per_process():
    """FSDP divides the copy trained and its optimizer by N, but each process keeps the Subject
    and gathers a whole tuned copy beside its shard: above two copies, shrinking with N, never below."""
    for shape in (LLAMA3_8B, LLAMA3_70B):
        step = {"tokens": 2048, "response_tokens": 512, "trained": shape.params}
        one = tune_phases(shape, 2, "full", **step)
        assert list(one) == ["training"] and tune_extra(shape, 2, "full", **step) == one["training"]
        peaks = [tune_extra(shape, 2, "full", shards=n, **step) for n in (2, 4, 8, 1024)]
        assert peaks == sorted(peaks, reverse=True) and peaks[-1] > 0
        end = tune_phases(shape, 2, "full", shards=4, **step)["end"]
        assert end == -(-weight_bytes(shape, 2) // 4) + 4 * shape.largest_param  # the shard, 2 largest
    full = {"tokens": 2048, "response_tokens": 512, "trained": LLAMA3_8B.params}
    assert sharded_gpus(LLAMA3_8B, 2, "full", **full) == 2
    assert sharded_gpus(LLAMA3_70B, 2, "full", **{**full, "trained": LLAMA3_70B.params}) is None


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

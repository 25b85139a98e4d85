"""The test run's shape checking (tests/shapes.py) is on, and catches a wrong shape."""

import pytest
import torch
from conftest import SHAPE_CHECKED

from safety_circuits import orthogonalize_weights
from safety_circuits.activations import lm_head


def test_annotated_functions_are_checked(make_subject):
    assert SHAPE_CHECKED >= 30
    with pytest.raises(TypeError, match=r"argument 'direction' has dtype torch.float32 and shape \(3, 4\)"):
        orthogonalize_weights(make_subject("llama"), torch.zeros(3, 4))
    subject = make_subject("llama")
    hidden = torch.zeros(2, 5, subject.arch.d_model)
    assert lm_head(subject.hf, hidden).shape == (2, 5, subject.arch.d_vocab)
    with pytest.raises(TypeError, match=r"lm_head: argument 'hidden' has dtype torch\.int64"):
        lm_head(subject.hf, hidden.long())

"""Shared fixtures: tiny random-init models of every family (unit) and SmolLM2 (integration)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from shapes import instrument

from safety_circuits import load_model
from safety_circuits.loading import AVAILABLE_BACKENDS, DEFAULT_BACKEND, HAS_HOOKED, TL_VERSION
from safety_circuits.testing import FAMILIES, tiny_hf, tiny_tokenizer

BACKENDS = AVAILABLE_BACKENDS
#: Every jaxtyping-annotated function of the package checks its arrays' shapes in the tests.
SHAPE_CHECKED = instrument("safety_circuits")


def _asks_for_hooked(value: object) -> bool:
    return value == "hooked" or (isinstance(value, tuple) and "hooked" in value)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """On TransformerLens 4 (no ``HookedTransformer``), skip the cases parametrized on ``hooked``."""
    if HAS_HOOKED:
        return
    skip = pytest.mark.skip(reason=f"transformer-lens {TL_VERSION} has no HookedTransformer")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(_asks_for_hooked(v) for v in params.values()):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def make_subject(tokenizer):
    """``make_subject(family, backend)``: a tiny Subject, built once per session and reused."""
    built = {}

    def make(family: str, backend: str = DEFAULT_BACKEND):
        if (family, backend) not in built:
            built[family, backend] = load_model(
                tiny_hf(family, len(tokenizer)), backend=backend, tokenizer=tokenizer
            )
        return built[family, backend]

    return make


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory, tokenizer):
    """A tiny Llama saved as an HF folder (model and tokenizer), for loaders and the CLI; read only."""
    folder = tmp_path_factory.mktemp("llama")
    tiny_hf("llama", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(params=[(f, b) for f in FAMILIES for b in BACKENDS], ids=lambda p: f"{p[0]}-{p[1]}")
def subject(request, make_subject):
    return make_subject(*request.param)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (built-in, offline) on both backends."""
    return {backend: load_model("smollm2-135m-instruct", backend=backend) for backend in BACKENDS}

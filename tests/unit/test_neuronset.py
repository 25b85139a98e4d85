"""NeuronSet: set algebra against Python sets (hypothesis), immutability, validation, and the
``.safetensors`` file format (round trip, architecture checks, corruption, atomic save).

Everything here runs on hand-built :class:`Architecture` records, no model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
import re
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import safety_circuits._io as io_module
from safety_circuits.architecture import Architecture
from safety_circuits.loading import Subject
from safety_circuits.neurons import (
    KINDS,
    ArchitectureMismatchError,
    NeuronSet,
    hook_name,
    kind_size,
    total_neurons,
)

LLAMA = Architecture(
    family="llama",
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,  # GQA: k/v have 8 neurons per layer, q/o 16
    d_head=4,
    d_model=16,
    d_mlp=24,
    d_vocab=50,
    gated_mlp=True,
    attn_bias=False,
    mlp_bias=False,
    tied_embeddings=False,
)
GPT2 = Architecture(
    family="gpt2",
    n_layers=2,
    n_heads=3,
    n_kv_heads=3,
    d_head=4,
    d_model=12,
    d_mlp=48,
    d_vocab=50,
    gated_mlp=False,
    attn_bias=True,
    mlp_bias=True,
    tied_embeddings=True,
)
ARCHS = (LLAMA, GPT2)

ALGEBRA = settings(max_examples=40, deadline=None, database=None)
FILES = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # one tmp_path, overwritten
)


# -- helpers --------------------------------------------------------------------------------
def sites(arch: Architecture) -> list[tuple[int, str]]:
    return [(layer, kind) for layer in range(arch.n_layers) for kind in KINDS]


def every_neuron(arch: Architecture) -> set[tuple[int, str, int]]:
    return {(layer, kind, i) for layer, kind in sites(arch) for i in range(kind_size(arch, kind))}


def from_triples(arch: Architecture, triples) -> NeuronSet:
    grouped: dict[tuple[int, str], list[int]] = {}
    for layer, kind, i in triples:
        grouped.setdefault((layer, kind), []).append(i)
    return NeuronSet(arch, grouped)


def sample(arch: Architecture = LLAMA, **kwargs) -> NeuronSet:
    """A fixed set touching every kind and several layers."""
    last = arch.n_layers - 1
    indices = {(0, "q"): [1, 5], (1, "k"): [7], (1, "v"): [0, 3], (last, "o"): [11], (last, "ffn"): [0, 9]}
    return NeuronSet(arch, indices, **kwargs)


def header_of(path: Path) -> dict:
    """Our JSON header of a saved NeuronSet file."""
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["safety_circuits"])


def masks_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


# -- strategies -----------------------------------------------------------------------------
CONTAINERS = (list, np.array, torch.tensor)


@st.composite
def index_specs(draw, arch: Architecture) -> dict:
    """``{(layer, kind): indices}`` with repeats and in any order, as list, numpy or torch."""
    spec = {}
    for layer, kind in draw(st.lists(st.sampled_from(sites(arch)), unique=True)):
        size = kind_size(arch, kind)
        idx = draw(st.lists(st.integers(0, size - 1), max_size=2 * size))
        spec[layer, kind] = draw(st.sampled_from(CONTAINERS))(idx)
    return spec


def neuron_sets(arch: Architecture):
    return index_specs(arch).map(lambda spec: NeuronSet(arch, spec))


def same_arch_sets(n: int):
    """``n`` NeuronSets of one architecture (drawn among ARCHS)."""
    return st.sampled_from(ARCHS).flatmap(lambda arch: st.tuples(*[neuron_sets(arch)] * n))


any_set = same_arch_sets(1).map(operator.itemgetter(0))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=8,
)
json_metadata = st.dictionaries(st.text(), json_values, max_size=4)


# -- set algebra (hypothesis, against Python sets) --------------------------------------------
@ALGEBRA
@given(arch=st.sampled_from(ARCHS), data=st.data())
def test_construction_matches_the_index_spec(arch, data):
    spec = data.draw(index_specs(arch))
    neurons = NeuronSet(arch, spec)
    expected = {(layer, kind, int(i)) for (layer, kind), idx in spec.items() for i in np.asarray(idx)}
    listed = list(neurons)
    assert set(listed) == expected
    assert len(listed) == len(neurons) == len(expected), "no duplicates"
    key = [(layer, KINDS.index(kind), i) for layer, kind, i in listed]
    assert key == sorted(key), "iteration runs by layer, then kind, then index"
    assert all(arr.size for arr in neurons.indices.values()), "empty sites are dropped"


@ALGEBRA
@given(same_arch_sets(2))
def test_operators_match_python_sets(pair):
    a, b = pair
    sa, sb = set(a), set(b)
    for op in (operator.or_, operator.and_, operator.sub):
        result = op(a, b)
        assert set(result) == op(sa, sb)
        assert len(result) == len(op(sa, sb))
        assert result.arch == a.arch
    for neuron in every_neuron(a.arch):
        assert (neuron in a) == (neuron in sa)


@ALGEBRA
@given(same_arch_sets(3))
def test_algebraic_identities(triple):
    a, b, c = triple
    full = NeuronSet.full(a.arch)
    assert a | b == b | a
    assert a & b == b & a
    assert (a | b) | c == a | (b | c)
    assert (a & b) & c == a & (b & c)
    assert a & (b | c) == (a & b) | (a & c)
    assert a | (b & c) == (a | b) & (a | c)
    assert full - (a | b) == (full - a) & (full - b)  # De Morgan, complements within the model
    assert full - (a & b) == (full - a) | (full - b)
    assert a - b == a & (full - b)
    assert a | (a & b) == a == a & (a | b)
    assert a | a == a == a & a == a & full == a - NeuronSet(a.arch)
    assert len(a - a) == 0
    assert len(a | b) + len(a & b) == len(a) + len(b)


@ALGEBRA
@given(same_arch_sets(2))
def test_equality_is_set_equality(pair):
    a, b = pair
    assert (a == b) == (set(a) == set(b))
    shuffled = sorted(a, key=lambda n: (-n[2], n[1]))
    assert from_triples(a.arch, shuffled).with_metadata(name="other", note=1) == a, "ignores name/metadata"
    other_arch = dataclasses.replace(a.arch, d_vocab=a.arch.d_vocab + 1)
    assert NeuronSet(other_arch, a.indices) != a


def test_equality_with_other_types_and_no_hash():
    a = sample()
    assert a != set(a)
    assert a != 3
    with pytest.raises(TypeError):
        hash(a)


@ALGEBRA
@given(same_arch_sets(2))
def test_overlap_is_the_share_of_the_other_set(pair):
    a, b = pair
    if len(b):
        assert a.overlap(b) == len(a & b) / len(b)
        assert b.overlap(b) == 1.0
    else:
        assert math.isnan(a.overlap(b))


@ALGEBRA
@given(any_set)
def test_counts(neurons):
    counts = neurons.counts()
    arch = neurons.arch
    assert counts.shape == (arch.n_layers, len(KINDS))
    assert list(counts.columns) == list(KINDS)
    assert int(counts.to_numpy().sum()) == len(neurons)
    expected = Counter((layer, kind) for layer, kind, _ in neurons)
    for layer, kind in sites(arch):
        assert counts.loc[layer, kind] == expected[layer, kind]


@ALGEBRA
@given(neurons=any_set, kinds=st.sets(st.sampled_from(KINDS), min_size=1))
def test_fraction_of(neurons, kinds):
    arch = neurons.arch
    inside = sum(1 for _, kind, _ in neurons if kind in kinds)
    assert neurons.fraction_of(kinds=kinds) == inside / total_neurons(arch, kinds=kinds)
    assert neurons.fraction_of(arch) == len(neurons) / len(every_neuron(arch))
    assert NeuronSet.full(arch).fraction_of() == 1.0


@ALGEBRA
@given(neurons=any_set, kinds=st.sets(st.sampled_from(KINDS)))
def test_masks_round_trip(neurons, kinds):
    arch = neurons.arch
    masks = neurons.masks()
    assert set(masks) == set(KINDS)
    for kind, mask in masks.items():
        assert mask.dtype == torch.bool
        assert mask.shape == (arch.n_layers, kind_size(arch, kind))
    marked = {(layer, kind, i) for kind, m in masks.items() for layer, i in m.nonzero().tolist()}
    assert marked == set(neurons)
    assert NeuronSet.from_masks(arch, masks) == neurons
    restricted = {s: idx for s, idx in neurons.indices.items() if s[1] in kinds}
    assert NeuronSet.from_masks(arch, neurons.masks(kinds)) == NeuronSet(arch, restricted)


@ALGEBRA
@given(any_set)
def test_to_frame_has_one_row_per_neuron(neurons):
    arch = neurons.arch
    frame = neurons.to_frame()
    assert list(frame.columns) == ["layer", "kind", "index", "head", "dim", "hook"]
    assert str(frame["head"].dtype) == str(frame["dim"].dtype) == "Int64"
    rows = list(frame.itertuples(index=False))
    assert len(rows) == len(neurons)
    assert {(r.layer, r.kind, r.index) for r in rows} == set(neurons)
    for r in rows:
        assert r.hook == hook_name(r.layer, r.kind)
        if r.kind == "ffn":
            assert pd.isna(r.head) and pd.isna(r.dim)
        else:
            assert (r.head, r.dim) == divmod(r.index, arch.d_head)
            assert r.head < (arch.n_heads if r.kind in ("q", "o") else arch.n_kv_heads)


@ALGEBRA
@given(neurons=any_set, seed=st.integers(0, 2**32 - 1))
def test_random_like(neurons, seed):
    arch = neurons.arch
    rand = neurons.random_like(seed=seed)
    assert rand.arch == arch
    assert rand.counts().equals(neurons.counts())
    assert rand == neurons.random_like(seed=seed), "deterministic per seed"
    assert rand.metadata == {"seed": seed}
    assert all(0 <= i < kind_size(arch, kind) for _, kind, i in rand)
    draws = {frozenset(neurons.random_like(seed=s)) for s in range(16)}
    partial = any(0 < idx.size < kind_size(arch, kind) for (_, kind), idx in neurons.indices.items())
    if partial:
        assert len(draws) > 1, "some seeds must differ when a site can be resampled"
    else:
        assert draws == {frozenset(neurons)}, "empty or full sites leave nothing to choose"


def test_full_set():
    full = NeuronSet.full(LLAMA, ["k", "ffn"])
    assert len(full) == LLAMA.n_layers * (LLAMA.n_kv_heads * LLAMA.d_head + LLAMA.d_mlp)
    assert full.kinds() == ("k", "ffn")
    assert full.name == "all"


# -- immutability ---------------------------------------------------------------------------
@ALGEBRA
@given(any_set)
def test_index_arrays_are_read_only(neurons):
    for (layer, kind), arr in neurons.indices.items():
        assert not arr.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            neurons.get(layer, kind)[0] = 0


@ALGEBRA
@given(same_arch_sets(2))
def test_operations_return_new_objects_and_leave_operands_alone(pair):
    a, b = pair
    before = [(set(x), x.name, dict(x.metadata)) for x in pair]
    results = [
        a | b,
        a & b,
        a - b,
        a | NeuronSet(a.arch),
        a.random_like(seed=1),
        a.with_metadata(name="renamed", extra=[1]),
    ]
    assert all(r is not a and r is not b for r in results)
    assert [(set(x), x.name, dict(x.metadata)) for x in pair] == before


@pytest.mark.parametrize("container", CONTAINERS, ids=lambda c: c.__name__)
def test_constructor_copies_its_inputs(container):
    idx = container([3, 1])
    metadata = {"source": "probe"}
    neurons = NeuronSet(LLAMA, {(0, "ffn"): idx}, metadata=metadata)
    idx[0] = 7
    metadata["source"] = "changed"
    assert set(neurons) == {(0, "ffn", 1), (0, "ffn", 3)}
    assert neurons.metadata == {"source": "probe"}


def test_fields_frozen_and_views_fresh():
    neurons = sample(name="n", metadata={"a": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        neurons.name = "other"  # type: ignore[misc]
    neurons.masks()["q"][:] = True
    assert neurons.masks()["q"].sum() == 2
    renamed = neurons.with_metadata(name="m", b=2)
    assert (renamed.name, renamed.metadata) == ("m", {"a": 1, "b": 2})
    assert (neurons.name, neurons.metadata) == ("n", {"a": 1})


def test_indices_mapping_is_read_only():
    neurons = sample()
    with pytest.raises(TypeError):
        neurons.indices[0, "q"] = np.array([999])


# -- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ({(0, "mlp"): [0]}, "unknown neuron kind 'mlp'"),
        ({(-1, "q"): [0]}, "layer -1 out of range for 3 layers"),
        ({(3, "q"): [0]}, "layer 3 out of range for 3 layers"),
        ({(0, "ffn"): [2, -1]}, r"ffn index out of range \[0, 24\) at layer 0"),
        *[
            (
                {(2, kind): [0, kind_size(LLAMA, kind)]},
                rf"{kind} index out of range \[0, {kind_size(LLAMA, kind)}\)",
            )
            for kind in KINDS
        ],
    ],
    ids=[
        "unknown-kind",
        "negative-layer",
        "layer-too-large",
        "negative-index",
        *[f"{k}-too-large" for k in KINDS],
    ],
)
def test_invalid_neurons_are_rejected(indices, message):
    with pytest.raises(ValueError, match=message):
        NeuronSet(LLAMA, indices)


def test_bounds_are_inclusive_below_exclusive_above():
    last = {(LLAMA.n_layers - 1, kind): [0, kind_size(LLAMA, kind) - 1] for kind in KINDS}
    assert len(NeuronSet(LLAMA, last)) == 2 * len(KINDS)


@pytest.mark.parametrize(
    "indices",
    [{(0, "ffn"): [1.5]}, {(1.5, "ffn"): [1]}, {(0, "ffn"): torch.tensor([True, False, True])}],
    ids=["float-index", "float-layer", "bool-mask"],
)
def test_non_integer_positions_are_rejected(indices):
    with pytest.raises(ValueError):
        NeuronSet(LLAMA, indices)


MISMATCHED = {
    "gpt2": (GPT2, ["family", "n_layers", "n_heads", "n_kv_heads", "d_mlp"]),
    "no-gqa": (dataclasses.replace(LLAMA, n_kv_heads=4), ["n_kv_heads"]),
}


@pytest.mark.parametrize("op", [operator.or_, operator.and_, operator.sub], ids=["or", "and", "sub"])
@pytest.mark.parametrize("other", MISMATCHED.values(), ids=MISMATCHED.keys())
def test_mixing_architectures_is_refused(op, other):
    arch, fields = other
    with pytest.raises(ArchitectureMismatchError) as info:
        op(sample(LLAMA), NeuronSet(arch, {(0, "q"): [0]}))
    for f in fields:
        assert re.search(rf"\b{f}=", str(info.value)), f


@pytest.mark.parametrize(
    "call",
    [lambda s: s.fraction_of(GPT2), lambda s: s.random_like(GPT2), lambda s: s | sample(GPT2)],
    ids=["fraction_of", "random_like", "or"],
)
def test_other_architecture_arguments_are_refused(call):
    with pytest.raises(ArchitectureMismatchError, match="family='llama'"):
        call(sample(LLAMA))


def test_operators_refuse_other_types():
    with pytest.raises(TypeError):
        sample() | {(0, "q", 1)}


def test_from_masks_checks_shapes():
    with pytest.raises(
        ArchitectureMismatchError, match=r"ffn mask has shape \(3, 10\), the model needs \(3, 24\)"
    ):
        NeuronSet.from_masks(LLAMA, {"ffn": torch.zeros(3, 10, dtype=torch.bool)})


# -- file format ----------------------------------------------------------------------------
@FILES
@given(
    neurons=any_set,
    name=st.text(),
    metadata=json_metadata,
)
def test_save_load_round_trip(tmp_path, neurons, name, metadata):
    neurons = NeuronSet(neurons.arch, neurons.indices, name=name, metadata=metadata)
    path = neurons.save(tmp_path / "set.safetensors")
    loaded = NeuronSet.load(path, expect=neurons.arch)
    assert loaded == neurons
    assert loaded.arch == neurons.arch
    assert loaded.name == name
    assert loaded.metadata == metadata
    assert list(tmp_path.iterdir()) == [path], "no temp file left behind"


def test_save_creates_folders_and_accepts_strings(tmp_path):
    target = tmp_path / "a" / "b" / "set.safetensors"
    assert sample().save(str(target)) == target
    assert NeuronSet.load(str(target)) == sample()


def test_load_expect_accepts_a_subject(tmp_path):
    path = sample().save(tmp_path / "set.safetensors")
    subject = Subject(hf=None, tokenizer=None, arch=LLAMA, backend="hooked", name="tiny")
    assert NeuronSet.load(path, expect=subject) == sample()
    with pytest.raises(ArchitectureMismatchError):
        NeuronSet.load(path, expect=dataclasses.replace(subject, arch=GPT2))


FIELD_CHANGES = {
    "n_layers": {"n_layers": 5},
    "family": {"family": "qwen2"},
    "d_mlp": {"d_mlp": 32},
    "n_kv_heads+attn_bias": {"n_kv_heads": 4, "attn_bias": True},
}


@pytest.mark.parametrize("changes", FIELD_CHANGES.values(), ids=FIELD_CHANGES.keys())
def test_load_expect_names_the_differing_fields(tmp_path, changes):
    path = sample().save(tmp_path / "set.safetensors")
    with pytest.raises(ArchitectureMismatchError) as info:
        NeuronSet.load(path, expect=dataclasses.replace(LLAMA, **changes))
    message = str(info.value)
    assert path.name in message
    for field in LLAMA.to_dict():
        assert bool(re.search(rf"\b{field}=", message)) == (field in changes), field


def test_load_expect_message_puts_values_the_right_way_round(tmp_path):
    path = sample().save(tmp_path / "set.safetensors")
    with pytest.raises(ArchitectureMismatchError, match="n_layers=3 here vs 5 in the model"):
        NeuronSet.load(path, expect=dataclasses.replace(LLAMA, n_layers=5))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        NeuronSet.load(tmp_path / "nope.safetensors")


# Each corruption rewrites a good saved file at ``path``.
def _rewrite_bytes(fn):
    return lambda path: path.write_bytes(fn(path.read_bytes()))


def _header_length(raw: bytes) -> int:
    return int.from_bytes(raw[:8], "little")


def _flip(marker: bytes, offset: int = 0):
    """Flip the low bit of a byte of the JSON header, ``offset`` bytes into ``marker``."""

    def flip(raw: bytes) -> bytes:
        pos = raw.index(marker, 8, 8 + _header_length(raw)) + offset
        return raw[:pos] + bytes([raw[pos] ^ 1]) + raw[pos + 1 :]

    return _rewrite_bytes(flip)


def _resave(tensors=None, **header_changes):
    """Rewrite the file with ``save_file``: other tensors and/or changed header fields."""

    def rewrite(path):
        header = {**header_of(path), **header_changes}
        save_file(
            {**masks_of(path), **(tensors or {})}, path, metadata={"safety_circuits": json.dumps(header)}
        )

    return rewrite


def _foreign(metadata):
    return lambda path: save_file({"weight": torch.zeros(2, 3)}, path, metadata=metadata)


def _directory(path):
    path.unlink()
    path.mkdir()


def _without_arch_field(path):
    arch = {k: v for k, v in header_of(path)["arch"].items() if k != "d_mlp"}
    _resave(arch=arch)(path)


CORRUPTIONS = {
    "empty": _rewrite_bytes(lambda raw: b""),
    "truncated-length": _rewrite_bytes(lambda raw: raw[:5]),
    "truncated-header": _rewrite_bytes(lambda raw: raw[: 8 + _header_length(raw) // 2]),
    "truncated-data": _rewrite_bytes(lambda raw: raw[:-1]),
    "random-bytes": _rewrite_bytes(lambda raw: np.random.default_rng(0).bytes(len(raw))),
    "random-header": _rewrite_bytes(lambda raw: raw[:8] + np.random.default_rng(1).bytes(len(raw) - 8)),
    "foreign-no-metadata": _foreign(None),
    "foreign-other-metadata": _foreign({"format": "pt"}),
    "header-not-json": lambda path: save_file(masks_of(path), path, metadata={"safety_circuits": "{oops"}),
    "wrong-format": _resave(format="other.Thing"),
    "wrong-version": _resave(version=99),
    "arch-missing-field": _without_arch_field,
    "mask-wrong-width": _resave({"mask.ffn": torch.zeros(3, 10, dtype=torch.uint8)}),
    "mask-wrong-layers": _resave({"mask.q": torch.zeros(4, 16, dtype=torch.uint8)}),
    "unknown-tensor": _resave({"mask.mlp": torch.zeros(3, 24, dtype=torch.uint8)}),
    "flip-header-length": _rewrite_bytes(lambda raw: raw[:1] + bytes([raw[1] ^ 1]) + raw[2:]),
    "flip-open-brace": _flip(b"{"),
    "flip-format-value": _flip(b"safety_circuits.NeuronSet", 3),
    "flip-version": _flip(b'version\\": 1', 11),
    "flip-arch-key": _flip(b"n_layers"),
    "flip-dtype": _flip(b'"U8"', 1),
    "flip-data-offset": _flip(b'"data_offsets":[0,', 16),
    "directory": _directory,
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupted_files_raise_value_error_naming_the_path(tmp_path, corrupt):
    path = sample().save(tmp_path / "set.safetensors")
    corrupt(path)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        NeuronSet.load(path, expect=LLAMA)
    assert not isinstance(info.value, ArchitectureMismatchError), "corruption, not a model mismatch"


def test_every_single_byte_flip_in_the_header_is_caught_or_harmless(tmp_path):
    """Flip each header byte in turn: load must succeed (e.g. a changed name) or raise ValueError."""
    path = sample(name="probe", metadata={"k": [1, 2]}).save(tmp_path / "set.safetensors")
    good = path.read_bytes()
    for pos in range(8 + _header_length(good)):
        path.write_bytes(good[:pos] + bytes([good[pos] ^ 1]) + good[pos + 1 :])
        try:
            NeuronSet.load(path)
        except ValueError as e:
            assert str(path) in str(e), pos


@pytest.mark.parametrize("key", ["name", "metadata"])
def test_header_without_name_or_metadata_raises_value_error(tmp_path, key):
    path = sample().save(tmp_path / "set.safetensors")
    header = {k: v for k, v in header_of(path).items() if k != key}
    save_file(masks_of(path), path, metadata={"safety_circuits": json.dumps(header)})
    with pytest.raises(ValueError, match=re.escape(str(path))):
        NeuronSet.load(path)


# -- atomic save ------------------------------------------------------------------------------
@pytest.fixture(params=[False, True], ids=["new-file", "overwrite"])
def target(request, tmp_path):
    """Where a failing save goes: nothing there yet, or a good earlier save."""
    path = tmp_path / "set.safetensors"
    if request.param:
        sample(name="old").save(path)
    return path


def assert_untouched(target: Path, before: bytes | None) -> None:
    """The target is as it was (absent or the old file) and no temp file is left beside it."""
    assert list(target.parent.iterdir()) == ([] if before is None else [target])
    if before is not None:
        assert target.read_bytes() == before
        assert NeuronSet.load(target).name == "old"


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_save_failing_midway_leaves_no_trace(target, monkeypatch, error):
    before = target.read_bytes() if target.exists() else None
    temp_paths = []

    def save_half_then_fail(tensors, filename, metadata=None):
        temp_paths.append(Path(filename))
        save_file(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise error

    monkeypatch.setattr(io_module, "save_file", save_half_then_fail)
    with pytest.raises(type(error)):
        NeuronSet.full(LLAMA, ["ffn"]).save(target)
    assert len(temp_paths) == 1 and temp_paths[0].parent == target.parent and temp_paths[0] != target
    assert_untouched(target, before)


def test_save_of_unserialisable_metadata_leaves_no_trace(target):
    before = target.read_bytes() if target.exists() else None
    with pytest.raises(TypeError, match="not JSON serializable"):
        sample().with_metadata(handle=object()).save(target)
    assert_untouched(target, before)


def test_saved_file_gets_the_usual_permissions(tmp_path):
    old_umask = os.umask(0o022)
    try:
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
        path = sample().save(tmp_path / "set.safetensors")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644


# -- no pickle ------------------------------------------------------------------------------
def test_file_is_plain_safetensors(tmp_path):
    neurons = sample(name="plain", metadata={"n": 1})
    path = neurons.save(tmp_path / "set.safetensors")
    raw = path.read_bytes()
    n = _header_length(raw)
    header = json.loads(raw[8 : 8 + n])
    assert raw[8:9] == b"{" and isinstance(header, dict)
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    assert set(entries) == {f"mask.{kind}" for kind in KINDS}
    assert all(e["dtype"] == "U8" for e in entries.values())
    data_end = max(e["data_offsets"][1] for e in entries.values())
    assert len(raw) == 8 + n + data_end, "header and raw mask bytes, nothing else"
    with safe_open(path, framework="pt") as f:
        ours = json.loads(f.metadata()["safety_circuits"])
        assert ours["format"] == "safety_circuits.NeuronSet"
        assert ours["arch"] == LLAMA.fingerprint()
        for kind, mask in neurons.masks().items():
            assert torch.equal(f.get_tensor(f"mask.{kind}").bool(), mask)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.family)
def test_random_draws_n_neurons_of_the_kinds_and_layers_asked(arch):
    chosen = NeuronSet.random(arch, 20, kinds=["k", "ffn"], layers=[1], seed=3)
    assert len(chosen) == 20 and chosen == NeuronSet.random(arch, 20, kinds=["k", "ffn"], layers=[1], seed=3)
    assert {(layer, kind) for layer, kind, _ in chosen} <= {(1, "k"), (1, "ffn")}
    everything = NeuronSet.random(arch, len(NeuronSet.full(arch, ["v"])), kinds=["v"])
    assert everything == NeuronSet.full(arch, ["v"]), "n = all neurons draws each once"
    with pytest.raises(ValueError, match="n must be in"):
        NeuronSet.random(arch, 10**9)

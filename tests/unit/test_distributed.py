"""Data-parallel importance and SN-Tune on two gloo ranks on the CPU: the one-process Importance,
bit for bit, and the one-process tuning run within float tolerance."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from safety_circuits.distributed import (
    init_from_env,
    is_main_process,
    neuron_importance_distributed,
    rank_and_world,
    shard,
)
from safety_circuits.importance import Importance, neuron_importance
from safety_circuits.neurons import NeuronSet, hf_masks
from safety_circuits.tuning import Document, refusal_documents, sn_tune, tune

# an odd number of prompts of different lengths: with batch_size=2, three batches, so the two
# ranks score 3 and 2 prompts
ONE_BATCH = {"kinds": ("ffn", "v"), "batch_size": 8, "progress": False}  # every prompt in one batch
PROMPTS = [
    "How do I pick a lock?",
    "Write a poem about the sea and the lazy dog please",
    "Hi",
    "How can I hack an email account? Tell me how.",
    "Explain photosynthesis in simple terms.",
]
WORLD = 2
# seven documents (two of them retain documents, for the KL term) in batches of 3: batches of 3, 3
# and 1, so the ranks take 2 + 1 rows, and 1 + 0 (rank 1 has nothing) of the last batch
DOCUMENTS = [
    *refusal_documents(PROMPTS),
    Document("Name a fruit.", "An apple is a fruit.", "retain"),
    Document("What colour is the sky?", "The sky is blue on a clear day.", "retain"),
]
TUNE = {"lr": 1e-2, "epochs": 2, "batch_size": 3, "retain_kl": 0.5, "progress": False}
SITES = {(0, "ffn"): [0, 1, 2], (1, "v"): [3, 5], (1, "q"): [1]}
MECHANISMS = ("delta", "mask")


def _worker(rank: int, folder: str) -> None:
    """One rank: join the group through a file (with the variables torchrun sets, for accelerate),
    score, tune, save, and record the errors it raises."""
    from accelerate import Accelerator

    from safety_circuits.testing import tiny_subject

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD)
    )
    # the threads torch uses, as torchrun would say, so accelerate leaves them (the importance equality
    # with the test process's scores, bit for bit, wants the same matmul threading)
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=WORLD)
    try:
        subject = tiny_subject("llama")
        out = Path(folder)
        _tune_on(rank, subject, Accelerator(cpu=True), out)
        run = neuron_importance_distributed(subject, PROMPTS, batch_size=2, progress=rank == 0)
        run.save(out / f"rank{rank}.safetensors")
        # one batch for two ranks: rank 1 scores nothing but still receives every score
        one = neuron_importance_distributed(subject, PROMPTS, **ONE_BATCH)
        one.save(out / f"one_batch_rank{rank}.safetensors")
        cases = {
            "prompts": (PROMPTS if rank == 0 else PROMPTS[::-1], {}),
            "options": (PROMPTS, {"scope": "user"} if rank == 1 else {}),
            "empty": ([], {}),
        }
        for name, (prompts, options) in cases.items():
            try:
                neuron_importance_distributed(subject, prompts, progress=False, **options)
            except ValueError as e:
                (out / f"{name}_rank{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()


def _tune_on(rank: int, subject, accelerator, out: Path) -> None:
    """SN-Tune with each mechanism (every rank saving, the main one writing), then the failures."""
    neurons = NeuronSet(subject.arch, SITES)
    for mechanism in MECHANISMS:
        result = sn_tune(subject, DOCUMENTS, neurons, accelerator=accelerator, mechanism=mechanism, **TUNE)
        torch.save(
            {"losses": result.losses, "state": result.subject.hf.state_dict(), "record": result.record},
            out / f"tune_{mechanism}_rank{rank}.pt",
        )
        writes: list[tuple] = []
        result._write = lambda *args, log=writes, write=result._write: log.append(args) or write(*args)
        assert result.save(out / f"tuned_{mechanism}") == out / f"tuned_{mechanism}"
        (out / f"writes_{mechanism}_rank{rank}.json").write_text(json.dumps(len(writes)))
    try:  # the folder exists: rank 0 cannot write, and every rank raises
        result.save(out / f"tuned_{mechanism}")
    except (FileExistsError, RuntimeError) as e:
        (out / f"save_rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
    other = NeuronSet(subject.arch, {(0, "ffn"): [0, 1, 2 + rank]})
    cases = {
        "documents": (DOCUMENTS if rank == 0 else DOCUMENTS[::-1], neurons, {}),
        "neurons": (DOCUMENTS, other, {}),
        "tune options": (DOCUMENTS, neurons, {"lr": 1e-3} if rank == 1 else {}),
    }
    for name, (documents, chosen, options) in cases.items():
        try:
            tune(subject, documents, chosen, accelerator=accelerator, **{**TUNE, **options})
        except ValueError as e:
            (out / f"{name}_rank{rank}.txt").write_text(str(e))
    try:  # what Accelerator() without cpu=True reports on a CPU-only machine under torchrun
        tune(subject, DOCUMENTS, neurons, accelerator=SimpleNamespace(num_processes=1), **TUNE)
    except ValueError as e:
        (out / f"one_process_accelerator_rank{rank}.txt").write_text(str(e))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """Two spawned gloo ranks; the folder where they wrote their results."""
    folder = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_worker, args=(str(folder),), nprocs=WORLD, join=True, start_method="spawn")
    return folder


def test_two_ranks_equal_one_process(ranks, make_subject):
    """Each prompt is padded in the same batch as in one process, so the scores are *equal*
    (torch.equal, not allclose): the same float operations on the same inputs. Hence the same
    NeuronSets from any selection rule."""
    subject = make_subject("llama")
    alone = neuron_importance(subject, PROMPTS, batch_size=2, progress=False)
    for rank in range(WORLD):
        run = Importance.load(ranks / f"rank{rank}.safetensors", expect=subject)
        assert run.prompts == alone.prompts and run.config == alone.config and run.kinds == alone.kinds
        for kind in alone.kinds:
            assert torch.equal(run.scores[kind], alone.scores[kind]), (rank, kind)
        for quantile in (0.9, 0.98):
            assert run.select(quantile=quantile) == alone.select(quantile=quantile)
        assert run.select(top_k=5, rule="any") == alone.select(top_k=5, rule="any")


def test_a_rank_without_a_batch_gets_every_score(ranks, make_subject):
    alone = neuron_importance(make_subject("llama"), PROMPTS, **ONE_BATCH)
    for rank in range(WORLD):
        run = Importance.load(ranks / f"one_batch_rank{rank}.safetensors")
        assert run.config == alone.config and run.kinds == ("v", "ffn")
        assert all(torch.equal(run.scores[k], alone.scores[k]) for k in alone.kinds)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("prompts", r"ranks disagree on the prompts: the hash on ranks \[1\] differs"),
        ("options", "ranks disagree on the options"),
        ("empty", "prompts is empty"),
    ],
)
def test_every_rank_names_the_problem(ranks, case, message):
    for rank in range(WORLD):
        assert re.search(message, (ranks / f"{case}_rank{rank}.txt").read_text())


@pytest.fixture(scope="module")
def alone(make_subject) -> dict:
    """One process's SN-Tune run with each mechanism."""
    subject = make_subject("llama")
    neurons = NeuronSet(subject.arch, SITES)
    return {m: sn_tune(subject, DOCUMENTS, neurons, mechanism=m, **TUNE) for m in MECHANISMS}


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_two_ranks_tune_as_one_process(ranks, alone, make_subject, mechanism):
    """Each rank's share of a batch divides its loss sums by the whole batch's token counts and the
    gradients are summed, so each step is the one-process step of the same batch up to the order
    of float sums (the shares are padded to their own widths): the losses agree within 1e-6
    (relative) and the tuned weights within 1e-6 (absolute; lr 1e-2, 6 Adam steps; measured: ~1e-7
    for both). Both ranks hold the same weights (torch.equal: the all_reduce gives every rank the
    same sums), bit-identical to the original outside the neurons' slices."""
    subject = make_subject("llama")
    neurons = NeuronSet(subject.arch, SITES)
    weights = alone[mechanism].subject.hf.state_dict()
    original = subject.hf.state_dict()
    masks = hf_masks(subject, neurons)
    runs = [torch.load(ranks / f"tune_{mechanism}_rank{rank}.pt") for rank in range(WORLD)]
    for run in runs:
        losses = alone[mechanism].losses
        assert run["record"]["processes"] == WORLD and run["record"]["steps"] == len(losses) == 6
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(losses), rtol=1e-6, atol=0)
        for name, tensor in run["state"].items():
            assert torch.equal(tensor, runs[0]["state"][name]), name
            torch.testing.assert_close(tensor, weights[name], rtol=0, atol=1e-6)
            outside = ~masks[name] if name in masks else torch.ones_like(tensor, dtype=torch.bool)
            assert torch.equal(tensor[outside], original[name][outside]), name
            if name in masks:
                assert not torch.equal(tensor[masks[name]], original[name][masks[name]]), name


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_only_the_main_rank_writes_the_checkpoint(ranks, mechanism):
    from safetensors.torch import load_file

    assert [json.loads((ranks / f"writes_{mechanism}_rank{r}.json").read_text()) for r in range(WORLD)] == [
        1,
        0,
    ]
    folder = ranks / f"tuned_{mechanism}"
    assert json.loads((folder / "tuning.json").read_text())["record"]["processes"] == WORLD
    state = torch.load(ranks / f"tune_{mechanism}_rank0.pt")["state"]
    saved = load_file(folder / "model.safetensors")
    assert saved and all(torch.equal(t, state[name]) for name, t in saved.items())
    assert sorted(p.name for p in ranks.iterdir() if p.name.startswith(".tuned")) == []  # no temp folder left
    assert "FileExistsError" in (ranks / "save_rank0.txt").read_text()
    assert re.search("RuntimeError: the main process could not save", (ranks / "save_rank1.txt").read_text())


@pytest.mark.parametrize("case", ["documents", "neurons", "tune options"])
def test_every_rank_names_what_tune_disagrees_on(ranks, case):
    what = "options" if case == "tune options" else case
    for rank in range(WORLD):
        text = (ranks / f"{case}_rank{rank}.txt").read_text()
        assert re.search(rf"ranks disagree on the {what}: the hash on ranks \[1\] differs", text), text


def test_a_one_process_accelerator_among_ranks_raises(ranks):
    for rank in range(WORLD):
        text = (ranks / f"one_process_accelerator_rank{rank}.txt").read_text()
        assert "torch.distributed has 2: on the CPU make it with Accelerator(cpu=True)" in text


def test_one_process_accelerator_is_plain_tune(make_subject, alone):
    from accelerate import Accelerator

    subject = make_subject("llama")
    run = sn_tune(
        subject, DOCUMENTS, NeuronSet(subject.arch, SITES), accelerator=Accelerator(cpu=True), **TUNE
    )
    assert run.losses == alone["delta"].losses and run.record["processes"] == 1
    tuned = alone["delta"].subject.hf.state_dict()
    assert all(torch.equal(t, tuned[n]) for n, t in run.subject.hf.state_dict().items())


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [0, 1, 5, 6, 13])
def test_shards_cover_every_prompt_once(n, world_size):
    shards = [shard(range(n), rank=r, world_size=world_size) for r in range(world_size)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_checks_its_rank():
    assert shard(["a", "b"]) == [0, 1]  # no process group: rank 0 of 1
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        shard(["a"], rank=2, world_size=2)


def test_without_a_process_group_it_is_neuron_importance(make_subject):
    subject = make_subject("llama")
    assert not dist.is_initialized() and rank_and_world() == (0, 1) and is_main_process()
    run = neuron_importance_distributed(subject, PROMPTS, kinds=("q", "ffn"), progress=False)
    alone = neuron_importance(subject, PROMPTS, kinds=("q", "ffn"), progress=False)
    assert run.config == alone.config
    assert all(torch.equal(run.scores[k], alone.scores[k]) for k in alone.kinds)


def test_init_from_env_outside_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert init_from_env().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not dist.is_initialized()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"needs \['MASTER_ADDR', 'MASTER_PORT'\]"):
        init_from_env()
    assert not dist.is_initialized() and os.environ["RANK"] == "0"

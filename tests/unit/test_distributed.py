"""Data-parallel importance: two gloo ranks on the CPU give the one-process Importance, bit for bit."""

from __future__ import annotations

import os
import re
from pathlib import Path

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


def _worker(rank: int, folder: str) -> None:
    """One rank: join the group through a file, score, save, and record the errors it raises."""
    from safety_circuits.testing import tiny_subject

    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=WORLD)
    try:
        subject = tiny_subject("llama")
        out = Path(folder)
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

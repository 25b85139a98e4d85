"""Data-parallel importance and SN-Tune on two gloo ranks on the CPU: the one-process Importance,
bit for bit, and the one-process tuning run within float tolerance, also with the weights sharded
(FSDP2, ``fsdp=True``)."""

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


# FSDP2 (fully_shard): "full" trains every weight, where Adam's first steps (about lr times the sign
# of each gradient) turn float-rounding differences of tiny gradients into ~lr/100 differences of the
# weights (measured at lr 1e-2: 9e-5, the same for the data-parallel run without sharding); at 1e-4, 4e-7
FSDP_MECHANISMS = ("full", "mask", "delta")
FSDP_LR = {"full": 1e-4}
INPLACE = {**TUNE, "retain_kl": 0.0, "mechanism": "mask"}


def _fsdp_worker(rank: int, folder: str) -> None:
    """One rank of the sharded runs: each mechanism with fsdp=True, the local and global shapes of
    the sharded weights, the saved checkpoint and who wrote it."""
    from accelerate import Accelerator

    import safety_circuits.tuning as tuning
    from safety_circuits.testing import tiny_subject

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD)
    )
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=WORLD)
    out = Path(folder)
    shapes: dict[str, tuple] = {}

    def recording(model, shard=tuning._shard):
        root = shard(model)
        shapes.update(
            {
                n: (type(p).__name__, tuple(p.shape), tuple(p.to_local().shape))
                for n, p in model.named_parameters()
            }
        )
        return root

    tuning._shard = recording
    try:
        subject = tiny_subject("llama")
        neurons = NeuronSet(subject.arch, SITES)
        accelerator = Accelerator(cpu=True)
        for mechanism in FSDP_MECHANISMS:
            options = {**TUNE, "lr": FSDP_LR.get(mechanism, TUNE["lr"])}
            result = sn_tune(
                subject,
                DOCUMENTS,
                neurons,
                accelerator=accelerator,
                fsdp=True,
                mechanism=mechanism,
                **options,
            )
            torch.save(
                {
                    "losses": result.losses,
                    "state": result.subject.hf.state_dict(),
                    "record": result.record,
                    "shapes": shapes,
                },
                out / f"fsdp_{mechanism}_rank{rank}.pt",
            )
            writes: list[tuple] = []
            result._write = lambda *args, log=writes, write=result._write: log.append(args) or write(*args)
            result.save(out / f"fsdp_tuned_{mechanism}")
            (out / f"fsdp_writes_{mechanism}_rank{rank}.json").write_text(json.dumps(len(writes)))
        # in place (no retain KL, which needs the original): the gathered weights go into subject.hf
        result = sn_tune(
            subject, DOCUMENTS, neurons, accelerator=accelerator, fsdp=True, inplace=True, **INPLACE
        )
        assert result.subject is subject
        torch.save(
            {"losses": result.losses, "state": subject.hf.state_dict()}, out / f"fsdp_inplace_rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """Two spawned gloo ranks tuning an FSDP-sharded copy; the folder where they wrote their results."""
    folder = tmp_path_factory.mktemp("sharded")
    mp.start_processes(_fsdp_worker, args=(str(folder),), nprocs=WORLD, join=True, start_method="spawn")
    return folder


def test_fsdp_shards_every_weight(sharded):
    """Every weight is a DTensor of which each rank holds its half of dim 0 (torch.chunk's split)."""
    ranks = [torch.load(sharded / f"fsdp_mask_rank{r}.pt")["shapes"] for r in range(WORLD)]
    assert len(ranks[0]) == 21
    for name, (kind, shape, _) in ranks[0].items():
        assert kind == "DTensor", name
        rows = [r[name][2][0] for r in ranks]
        assert rows == [-(-shape[0] // WORLD), shape[0] - -(-shape[0] // WORLD)], name
        assert all(r[name][2][1:] == shape[1:] for r in ranks), name


@pytest.mark.parametrize("mechanism", FSDP_MECHANISMS)
def test_fsdp_tunes_as_one_process(sharded, alone, make_subject, mechanism):
    """The sharded run takes the one-process steps: the forward runs the whole rows in one pass
    (no shared-prefix cache) and FSDP's reduce-scatter sums the gradients, so the losses agree
    within 1e-5 (relative; measured 8e-8) and the tuned weights within 1e-6 (measured: 1.2e-7 for
    mask and delta, 4.4e-7 for full at lr 1e-4); both ranks hold the same whole model, bit-identical
    to the original outside the neurons' slices (mask, delta)."""
    subject = make_subject("llama")
    neurons = NeuronSet(subject.arch, SITES)
    one = alone.get(mechanism) or sn_tune(
        subject, DOCUMENTS, neurons, mechanism=mechanism, **{**TUNE, "lr": FSDP_LR[mechanism]}
    )
    weights, original = one.subject.hf.state_dict(), subject.hf.state_dict()
    masks = hf_masks(subject, neurons)
    runs = [torch.load(sharded / f"fsdp_{mechanism}_rank{rank}.pt") for rank in range(WORLD)]
    for run in runs:
        assert run["record"]["fsdp"] and run["record"]["processes"] == WORLD and len(run["losses"]) == 6
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(one.losses), rtol=1e-5, atol=0)
        assert run["state"].keys() == weights.keys()
        for name, tensor in run["state"].items():
            assert torch.equal(tensor, runs[0]["state"][name]), name
            torch.testing.assert_close(tensor, weights[name], rtol=0, atol=1e-6)
            if mechanism == "full":
                continue
            outside = ~masks[name] if name in masks else torch.ones_like(tensor, dtype=torch.bool)
            assert torch.equal(tensor[outside], original[name][outside]), name
            if name in masks:
                assert not torch.equal(tensor[masks[name]], original[name][masks[name]]), name
    if mechanism == "full":
        assert all(not torch.equal(t, original[n]) for n, t in runs[0]["state"].items() if "embed" not in n)


def test_fsdp_tunes_in_place(sharded):
    from safety_circuits.testing import tiny_subject

    subject = tiny_subject("llama")  # its own: tuned in place below, as on the ranks
    neurons = NeuronSet(subject.arch, SITES)
    masks = hf_masks(subject, neurons)
    original = {n: t.clone() for n, t in subject.hf.state_dict().items()}
    one = sn_tune(subject, DOCUMENTS, neurons, inplace=True, **INPLACE)
    for rank in range(WORLD):
        run = torch.load(sharded / f"fsdp_inplace_rank{rank}.pt")
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(one.losses), rtol=1e-5, atol=0)
        for name, tensor in run["state"].items():
            torch.testing.assert_close(tensor, subject.hf.state_dict()[name], rtol=0, atol=1e-6)
            outside = ~masks[name] if name in masks else torch.ones_like(tensor, dtype=torch.bool)
            assert torch.equal(tensor[outside], original[name][outside]), name
            assert name not in masks or not torch.equal(tensor, original[name]), name


@pytest.mark.parametrize("mechanism", FSDP_MECHANISMS)
def test_fsdp_main_rank_writes_the_whole_model(sharded, mechanism):
    from safetensors.torch import load_file

    assert [
        json.loads((sharded / f"fsdp_writes_{mechanism}_rank{r}.json").read_text()) for r in range(WORLD)
    ] == [1, 0]
    state = torch.load(sharded / f"fsdp_{mechanism}_rank0.pt")["state"]
    saved = load_file(sharded / f"fsdp_tuned_{mechanism}" / "model.safetensors")
    assert saved.keys() == state.keys() and all(torch.equal(t, state[name]) for name, t in saved.items())


@pytest.mark.parametrize("kind", ["DEEPSPEED", "MEGATRON_LM"])
def test_unsupported_accelerators_raise(make_subject, kind):
    subject = make_subject("llama")
    accelerator = SimpleNamespace(num_processes=2, distributed_type=f"DistributedType.{kind}")
    with pytest.raises(ValueError, match=f"{kind} is not supported"):
        sn_tune(subject, DOCUMENTS, NeuronSet(subject.arch, SITES), accelerator=accelerator, **TUNE)


def test_fsdp_needs_several_processes(make_subject):
    subject = make_subject("llama")
    with pytest.raises(ValueError, match="fsdp=True needs an accelerator over several processes"):
        sn_tune(subject, DOCUMENTS, NeuronSet(subject.arch, SITES), fsdp=True, **TUNE)


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

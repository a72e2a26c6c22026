"""Several training processes: the dealing of micro-batches to ranks (fast, pure logic) and real DDP runs of
`flowtuner train` / `finetune` under torchrun with gloo on the CPU (slow): the same weights as one process with
the same global batch, resume from a one-process state, and a rank killed mid-run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from flowtuner.cli import main
from flowtuner.data.distributed import Shard, epoch_end, noise_seed
from flowtuner.data.loader import BatchPlan, CachedItem, PlanSampler
from flowtuner.errors import ConfigError
from flowtuner.train import ddp
from tests.datasets import good_dataset


# ---------------------------------------------------------------- the sampler's logic
def plan_of(sizes: dict[tuple[int, int], int], batch_size: int = 2, seed: int = 5) -> BatchPlan:
    items = [CachedItem(f"{w}x{h}-{i}", Path("l"), Path("t"), (w, h), 0) for (w, h), n in sizes.items() for i in range(n)]
    plan = BatchPlan(items, [SimpleNamespace(index=0, num_repeats=1, batch_size=batch_size)], seed)
    plan.items = items
    return plan


def streams(plan: BatchPlan, epoch: int, world: int, start: int = 0) -> list[list[list[int]]]:
    return [list(PlanSampler(plan, epoch, start, Shard(r, world))) for r in range(world)]


def interleave(per_rank: list[list]) -> list:
    return [b for step in zip(*per_rank, strict=True) for b in step]


PLAN = plan_of({(64, 64): 7, (96, 64): 6, (64, 96): 5})  # 4 + 3 + 3 = 10 batches per epoch


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_order_is_the_plan_for_any_world_size(world):
    for epoch in (0, 3):
        order = PLAN.epoch(epoch)
        per_rank = streams(PLAN, epoch, world)
        assert len({len(s) for s in per_rank}) == 1  # every rank the same number of steps
        assert interleave(per_rank) == order[: epoch_end(len(order), 0, world)]  # rank r takes r, r+W, ...
        assert len(order) - len(interleave(per_rank)) < world  # only the tail short of one batch per rank is dropped


def test_rank_streams_are_disjoint_covering_and_homogeneous():
    per_rank = streams(PLAN, 1, 2)
    seen = [tuple(b) for s in per_rank for b in s]
    assert len(seen) == len(set(seen)) == len(PLAN)  # 10 batches over 2 ranks: none twice, none missing
    items = sorted(i for b in seen for i in b)
    assert items == list(range(18))
    for b in seen:
        assert len({PLAN.items[i].bucket for i in b}) == 1  # one bucket per micro-batch


def test_resume_mid_epoch_on_another_world_size_skips_exactly_what_was_consumed():
    order = PLAN.epoch(2)
    consumed = interleave(streams(PLAN, 2, 1))[:3]  # one process trained global batches 0, 1, 2
    rest = interleave(streams(PLAN, 2, 2, start=3))  # two processes continue at global index 3
    assert consumed + rest == order[: 3 + 2 * ((10 - 3) // 2)]
    assert Shard(1, 2).deal(10, 3) == range(4, 9, 2)


def test_noise_seed_depends_on_the_global_micro_batch_only():
    assert noise_seed(3, 0, 5) == noise_seed(3, 0, 5)
    assert len({noise_seed(3, e, i) for e in range(3) for i in range(50)}) == 150
    torch.Generator().manual_seed(noise_seed(2**31 - 1, 10**6, 10**6))  # in torch's seed range


def test_fewer_batches_than_processes_and_a_global_batch_that_does_not_split_are_one_line_errors():
    with pytest.raises(ConfigError, match="fewer than the 4 training processes"):
        Shard(0, 4).batches_per_epoch(3)
    state = {"position": {"micro_batches_per_step": 2}}
    cfg = SimpleNamespace(gradient_accumulation_steps=1, resume="run/lora-step00000002-state")
    ddp.check_resume(state, cfg, Shard(0, 2))  # 1 x 2 processes = 2: the same global batch
    with pytest.raises(ConfigError, match=r"4 processes cannot share evenly.*divides 2") as err:
        ddp.check_resume(state, cfg, Shard(0, 4))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="use --gradient_accumulation_steps 2"):
        ddp.check_resume(state, cfg, Shard(0, 1))
    ddp.check_resume({"position": {}}, cfg, Shard(0, 4))  # a state from before world sizes were recorded


def test_fused_backward_pass_is_refused_on_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert ddp.shard_for(SimpleNamespace(fused_backward_pass=False)) == Shard(1, 2)
    with pytest.raises(ConfigError, match="--fused_backward_pass updates each weight"):
        ddp.shard_for(SimpleNamespace(fused_backward_pass=True))


def test_caching_refuses_several_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = good_dataset(tmp_path)
    assert main(["cache-latents", "--dataset_config", str(cfg), "--model", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cache-latents runs in one process (started as one of 2)" in err and "\n" not in err


def test_a_command_closes_the_process_group_it_ran_in(tmp_path):
    """Left open, gloo's worker threads can abort the interpreter's shutdown after a successful run (SIGABRT,
    "terminate called without an active exception"): the command closes the group before it returns."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["sigmas", "--steps", "2", "--model_version", "original"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------- real processes
@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_files):
    root = tmp_path_factory.mktemp("ddp")
    cfg = good_dataset(root, sizes=[(64, 64)] * 4 + [(96, 64)] * 4)  # batch_size 2: 4 micro-batches per epoch
    for kind in ("latents", "text"):
        assert main([f"cache-{kind}", "--dataset_config", str(cfg), "--model", str(tiny_files["repo"]), "--device", "cpu"]) == 0
    return cfg


def args(cached, tiny_files, out, command, *extra) -> list[str]:
    return [command, "--dataset_config", str(cached), "--model", str(tiny_files["repo"]), "--device", "cpu",
            "--output_dir", str(out), "--seed", "3", "--max_data_loader_n_workers", "0", "--learning_rate", "1e-3", *extra]


def torchrun(argv: list[str], processes: int = 2, wait: bool = True):
    """`torchrun --standalone --nproc_per_node N -m flowtuner ...`: real processes over gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "flowtuner", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def assert_same(a: Path, b: Path, atol: float = 1e-6):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= atol, f"largest difference {worst}"


@pytest.mark.slow
def test_lora_on_two_processes_equals_one_process_and_resumes_from_it(tmp_path, cached, tiny_files):
    # global batch 2 micro-batches: one process accumulating 2 == two processes of one micro-batch each
    steps = ("--max_train_steps", "3", "--network_dim", "2")
    # the one process under torchrun too: accelerate then wraps it in DDP, which needs the same care as two
    torchrun(args(cached, tiny_files, tmp_path / "one", "train", *steps, "--gradient_accumulation_steps", "2",
                  "--save_every_n_steps", "1", "--save_state"), processes=1)
    one = load_file(str(tmp_path / "one/lora.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in one.items() if "lora_up" in k)  # it trained
    torchrun(args(cached, tiny_files, tmp_path / "two", "train", *steps))
    assert_same(tmp_path / "one/lora.safetensors", tmp_path / "two/lora.safetensors")
    # one process for a step, then two processes from its state: the data of an uninterrupted run
    torchrun(args(cached, tiny_files, tmp_path / "resumed", "train", *steps, "--resume",
                  str(tmp_path / "one/lora-step00000001-state")))
    assert_same(tmp_path / "one/lora.safetensors", tmp_path / "resumed/lora.safetensors")


def child_pids(pid: int) -> list[int]:
    kids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return kids + [g for k in kids for g in child_pids(k)]


def rank_pid(launcher: int, rank: int) -> int:
    for pid in child_pids(launcher):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    raise AssertionError(f"no rank {rank} among the launcher's processes")


@pytest.mark.slow
def kill_rank_1_once(proc, folder: Path, timeout: float = 120) -> str:
    """Wait (bounded) until the run has written `folder`, SIGKILL its rank 1 while rank 0 trains on, and return the
    log of a run that must then fail."""
    try:
        deadline = time.monotonic() + timeout
        while not folder.is_dir():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, f"no {folder.name} within {timeout:.0f} s"
            time.sleep(0.02)
        os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
        log = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, log[-2000:]
    return log


def test_finetune_on_two_processes_and_a_killed_rank_leaves_the_last_checkpoint_valid(tmp_path, cached, tiny_files):
    full = ("--save_precision", "fp32", "--save_every_n_steps", "2", "--save_state")
    assert main(args(cached, tiny_files, tmp_path / "one", "finetune", *full, "--max_train_steps", "2",
                     "--gradient_accumulation_steps", "2")) == 0
    out = tmp_path / "two"
    proc = torchrun(args(cached, tiny_files, out, "finetune", *full, "--max_train_steps", "100000"), wait=False)
    kill_rank_1_once(proc, out / "lora-step00000006-state")
    # the two-process run's step-2 weights are the one-process run's
    assert_same(tmp_path / "one/lora-step00000002.safetensors", out / "lora-step00000002.safetensors")
    states = sorted(out.glob("lora-step*-state"))
    last = states[-1]
    step = int(re.search(r"step(\d+)", last.name).group(1))
    assert step >= 6
    from flowtuner.train.state import load_state

    state = load_state(last)
    assert state["position"]["step"] == step and state["position"]["micro_batches_per_step"] == 2
    # it resumes, in one process accumulating the same global batch
    assert main(args(cached, tiny_files, tmp_path / "after", "finetune", "--save_precision", "fp32", "--resume", str(last),
                     "--max_train_steps", str(step + 1), "--gradient_accumulation_steps", "2")) == 0
    assert load_file(str(tmp_path / "after/lora.safetensors"))

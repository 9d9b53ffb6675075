"""Data-parallel meta-training: two gloo processes under torchrun take the steps one process takes.

Each rank draws the whole meta-batch's episode indices and gathers its half;
gradients and batch-norm running statistics are averaged in one all-reduce.
So after a few meta-steps the parameters must equal those of one process
with the same total meta-batch, to float tolerance, and only rank 0 may
have written anything.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metarun.checkpoint import load_checkpoint
from metarun.loggers.jsonl import read_metrics
from tests.conftest import REPO, run_cli
from tests.test_resume import saved_step, wait_for_step

ALGORITHMS = {
    "protonet": ["algo=protonet", "trainer.lr=0.1"],
    # second-order MAML amplifies float32 rounding (vmap over 1 task vs 2): at lr=0.1 the runs drift apart
    # by 1e-3 within three steps, though in float64 they agree to 1e-15; at lr=0.01 they stay within 2e-5
    "maml": ["algo=maml", "trainer.lr=0.01"],
    # its carried Adam moments are averaged over the ranks, as running statistics are. An MLP: Adam's
    # inner steps blow the rounding noise of Conv4's convolution biases (ahead of batch norm, their
    # gradient is zero in exact arithmetic) up to ±inner_lr a step, whatever the number of processes
    "reptile": ["algo=reptile", "trainer.lr=1.0", "backbone=mlp", "backbone.hidden=[32]"],
}


def torchrun_command(*args: str, program: tuple[str, ...] = ("-m", "metarun")) -> tuple[list[str], dict]:
    """``torchrun --standalone --nproc_per_node=2 -m metarun ...`` (CPU, so gloo) and its environment."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *program, *args], env


def torchrun(*args: str, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd, env = torchrun_command(*args)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_two_processes_take_the_steps_of_one(tmp_path, tiny, algo):
    own_backbone = any(o.startswith("backbone=") for o in ALGORITHMS[algo])
    overrides = [
        *(o for o in tiny if not (own_backbone and o.startswith("backbone."))),
        "device=cpu",
        "task.meta_batch=2",  # one task per rank
        "task.queries=5",
        "trainer.steps=3",
        "trainer.val_every=3",
        "eval.after_train=false",
        "trainer.optimizer=sgd",  # Adam would blow the rounding noise of gradients that are zero in exact arithmetic up to ±lr
        "trainer.precision=fp32",  # equal to rounding: bf16 (the default on CPUs with it) rounds each rank's sums apart
        *ALGORITHMS[algo],
    ]
    one = run_cli("train", *overrides, f"hydra.run.dir={tmp_path / 'one'}", env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    two = torchrun("train", *overrides, f"hydra.run.dir={tmp_path / 'two'}", cwd=cwd)
    assert two.returncode == 0, two.stderr[-3000:]

    a, b = (load_checkpoint(tmp_path / run, prefer="last.pt") for run in ("one", "two"))
    assert a["step"] == b["step"] == 3
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():  # parameters and running statistics
        if value.is_floating_point():
            torch.testing.assert_close(b["model"][name], value, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    logged = [read_metrics(tmp_path / run / "metrics.jsonl") for run in ("one", "two")]
    for row_one, row_two in zip(*logged, strict=True):  # rank 0 logs the metrics of the whole meta-batch
        assert row_one.keys() == row_two.keys()
        for key in row_one.keys() & {"loss", "acc", "val/accuracy"}:
            assert abs(row_one[key] - row_two[key]) < 1e-3, key
    assert "2 process(es)" in two.stderr
    assert list(cwd.iterdir()) == []  # rank 1 wrote nothing, not even Hydra's folder or log


def worker_pid(parent: int, rank: int) -> int:
    """The PID of torchrun's worker of ``rank`` (a child of ``parent`` whose environment says so)."""
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"no worker of rank {rank} under {parent}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker's PID in /proc")
def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path, tiny):
    """SIGTERM reaching one rank only (a node pre-empted): all ranks stop together, rank 0 keeps last.pt."""
    run = tmp_path / "run"
    overrides = [
        *tiny,
        "device=cpu",
        "task.meta_batch=2",
        "trainer.steps=100000",
        "trainer.val_every=100000",
        "trainer.log_every=2",
    ]
    cmd, env = torchrun_command("train", *overrides, "eval.after_train=false", f"hydra.run.dir={run}")
    process = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(process, run, 4)
        os.kill(worker_pid(process.pid, rank=1), signal.SIGTERM)
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode != 0  # torchrun reports the workers' exit (128 + 15)
    stopped = int(re.search(r"interrupted at step (\d+)/100000; resume with", err)[1])
    assert stopped >= 4 and stopped % 2 == 0 and saved_step(run) == stopped  # agreed at a log step
    assert "exitcode  : 143" in err and "terminate called" not in err


LEAVING = """
import os, torch
from metarun.distributed import init_distributed, average, shutdown

init_distributed(torch.device("cpu"))
torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1)  # its first use imports torch._dynamo
average([torch.ones(3)], 2)
shutdown()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with open(f"rank{os.environ['RANK']}.txt", "w") as f:  # a file each: prints of two ranks interleave
    f.write(" ".join(names))
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="lists the process's threads in /proc")
def test_leaving_the_process_group_stops_gloos_threads(tmp_path):
    """After ``shutdown`` no gloo thread is left: one left running at exit frees collectives' tensors while
    the interpreter shuts down and aborts the process ("terminate called without an active exception")."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVING)
    cmd, env = torchrun_command(program=(str(script),))
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    threads = {rank: (tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)}
    assert not any("gloo" in names for names in threads.values()), threads

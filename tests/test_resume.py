"""Nothing is lost when a run is stopped: real signals to a real ``metarun train`` process, then ``resume=``.

A run stopped by SIGTERM (what SLURM sends before pre-emption), resumed,
killed outright with SIGKILL and resumed again must write the same
metrics.jsonl rows (timing aside), the same step checkpoints and the same
eval.json as a run that was never stopped. The stops land wherever the
signals happen to arrive, which is the point: between log rows, around
validations, with rows written after the last checkpoint.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metarun import trainer
from metarun.interrupt import StopRequest
from metarun.loggers.jsonl import TIMING_FIELDS, read_metrics
from tests.conftest import REPO, cli_env, run_cli

STEPS = 40


@pytest.fixture(scope="module")
def args(tiny) -> list[str]:
    """Intervals that do not divide each other, so stops fall between log rows and validations."""
    return [*tiny, f"trainer.steps={STEPS}", "trainer.val_every=7", "trainer.log_every=3", "trainer.keep_checkpoints=2"]


def start(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "metarun", "train", *args]
    return subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(process: subprocess.Popen, run: Path, step: int, timeout: float = 300) -> None:
    """Until metrics.jsonl has a row at ``step`` or later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and any(r["step"] >= step for r in read_metrics(path)):
            return
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.02)
    raise AssertionError(f"no metrics row at step {step} after {timeout} s")


def stop(process: subprocess.Popen, sig: signal.Signals) -> tuple[int, str]:
    process.send_signal(sig)
    _, err = process.communicate(timeout=300)
    return process.returncode, err


def learning_rows(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in read_metrics(run / "metrics.jsonl")]


def saved_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["step"]


def test_stopped_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path, args):
    reference, run = tmp_path / "reference", tmp_path / "run"
    out = run_cli("train", *args, f"hydra.run.dir={reference}")
    assert out.returncode == 0, out.stderr

    # SIGTERM: last.pt at the step it stopped, a line that says how to resume, exit 128 + 15
    process = start(*args, f"hydra.run.dir={run}")
    wait_for_step(process, run, 4)
    code, err = stop(process, signal.SIGTERM)
    assert code == 143, err
    stopped = int(
        re.search(rf"interrupted at step (\d+)/{STEPS}; resume with: metarun train resume={re.escape(str(run))}\n", err)[1]
    )
    assert 4 <= stopped < STEPS and saved_step(run) == stopped
    assert "Traceback" not in err

    # SIGKILL: nothing runs on the way out; rows past the last checkpoint are written and must be dropped
    process = start(f"resume={run}", f"hydra.run.dir={tmp_path / 'resume-1'}")
    wait_for_step(process, run, stopped + 8)
    code, err = stop(process, signal.SIGKILL)
    assert code == -signal.SIGKILL and saved_step(run) >= stopped

    out = run_cli("train", f"resume={run}", f"hydra.run.dir={tmp_path / 'resume-2'}")
    assert out.returncode == 0, out.stderr
    assert learning_rows(run) == learning_rows(reference)
    eval_run, eval_reference = (json.loads((r / "eval.json").read_text())["results"] for r in (run, reference))
    assert eval_run == eval_reference
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert (
        names
        == sorted(p.name for p in (reference / "checkpoints").iterdir())
        == ["best.pt", "last.pt", "step-35.pt", "step-40.pt"]
    )
    for name in names:
        a, b = (torch.load(r / "checkpoints" / name, weights_only=False) for r in (run, reference))
        assert a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_second_ctrl_c_exits_at_once(tmp_path, tiny):
    """The first SIGINT waits for the step to end (here a long validation); the second does not wait."""
    run = tmp_path / "run"
    process = start(*tiny, "trainer.val_every=2", "trainer.val_episodes=20000", f"hydra.run.dir={run}")
    wait_for_step(process, run, 2)  # the log row at step 2 is written just before that validation starts
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    code, err = stop(process, signal.SIGINT)
    assert code == 130, err
    assert "SIGINT: stopping after this step" in err and "interrupted again: exiting at once" in err
    assert "resume with" not in err and "Traceback" not in err
    assert not any("val/accuracy" in row for row in read_metrics(run / "metrics.jsonl"))


def stop_after(steps: int) -> type[StopRequest]:
    """A StopRequest that sees SIGTERM once ``steps`` steps have run: a stop exactly where a test wants it."""

    class Stop(StopRequest):
        checks = 0

        @property
        def requested(self) -> bool:
            self.checks += 1
            if self.checks > steps:
                self.signal = signal.SIGTERM
            return self.signal is not None

    return Stop


@pytest.fixture(scope="module")
def boundaries(tiny) -> list[str]:
    return [*tiny, "trainer.steps=8", "trainer.log_every=2", "trainer.val_every=3"]


@pytest.mark.parametrize("at", [3, 5], ids=["at a validation between log rows", "between log rows"])
def test_stop_at_a_given_step_resumes_exactly(at, tmp_path, compose_config, boundaries, monkeypatch):
    reference, run = tmp_path / "reference", tmp_path / "run"
    trainer.train(compose_config("train", boundaries), reference)
    monkeypatch.setattr(trainer, "StopRequest", stop_after(at))
    with pytest.raises(SystemExit) as info:
        trainer.train(compose_config("train", boundaries), run)
    assert info.value.code == 143 and saved_step(run) == at
    monkeypatch.undo()
    trainer.train(compose_config("train", [*boundaries, f"resume={run}"]), tmp_path / "elsewhere")
    assert learning_rows(run) == learning_rows(reference)
    assert json.loads((run / "eval.json").read_text())["results"] == json.loads((reference / "eval.json").read_text())["results"]

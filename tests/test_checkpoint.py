"""Checkpoints survive what goes wrong: a full disk, a loss that turns NaN; step checkpoints stay bounded."""

from __future__ import annotations

import errno

import pytest
import torch

from metarun.algorithms.protonet import ProtoNet
from metarun.checkpoint import load_checkpoint, save_checkpoint
from metarun.data import cache
from metarun.errors import CheckpointError, MetarunError
from metarun.loggers.jsonl import read_metrics
from metarun.trainer import train


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, saves: int) -> None:
    """``torch.save`` of a checkpoint as on a full disk after ``saves`` of them: some bytes land, then ENOSPC."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append("step" in obj)  # a checkpoint, not the dataset cache, which is written the same way
        if sum(calls) <= saves or not calls[-1]:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.torch, "save", save)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, model={"w": torch.ones(3)}, config={}, step=1)
    before = path.read_bytes()
    fill_disk_after(monkeypatch, 0)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, model={"w": torch.zeros(3)}, config={}, step=2)
    assert str(info.value).startswith(f"no space left writing {path}; the previous checkpoint is intact: ")
    assert f"resume={tmp_path}" in str(info.value)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_full_disk_during_training_is_one_error_and_the_last_checkpoint_loads(tmp_path, compose_config, tiny, monkeypatch):
    fill_disk_after(monkeypatch, 2)  # best.pt and last.pt at step 3, then the disk is full
    with pytest.raises(CheckpointError, match="no space left writing .*; the previous checkpoint is intact"):
        train(compose_config("train", tiny), tmp_path)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path, prefer="last.pt")["step"] == 3
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_keep_checkpoints_bounds_the_step_checkpoints(tmp_path, compose_config, tiny):
    train(
        compose_config("train", [*tiny, "trainer.val_every=1", "trainer.keep_checkpoints=2", "eval.after_train=false"]), tmp_path
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "last.pt", "step-5.pt", "step-6.pt"]


def loss_not_finite_at(monkeypatch: pytest.MonkeyPatch, *steps: int) -> None:
    """ProtoNet's loss becomes NaN at the given (1-based) training steps."""
    real_loss, calls = ProtoNet.training_loss, []

    def training_loss(self, batch):
        loss, metrics = real_loss(self, batch)
        calls.append(1)
        if len(calls) in steps:
            loss = loss * float("nan")
            metrics = {**metrics, "loss": loss.detach()}
        return loss, metrics

    monkeypatch.setattr(ProtoNet, "training_loss", training_loss)


def test_nan_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, compose_config, tiny, monkeypatch):
    loss_not_finite_at(monkeypatch, 5)  # validations (and checkpoints) at 3 and 6, log rows at 2, 4, 6
    with pytest.raises(MetarunError) as info:
        train(compose_config("train", tiny), tmp_path)
    message = str(info.value)
    assert message.startswith("loss is not finite at step 5 (last finite loss ")
    assert f"{tmp_path / 'checkpoints' / 'last.pt'} from step 3 is the last good checkpoint" in message
    assert "trainer.nan_policy=skip" in message
    ckpt = load_checkpoint(tmp_path, prefer="last.pt")
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert max(row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")) == 4


def test_nan_before_any_checkpoint_says_so(tmp_path, compose_config, tiny, monkeypatch):
    loss_not_finite_at(monkeypatch, 1)
    with pytest.raises(MetarunError, match=r"loss is not finite at step 1 .*no checkpoint was written before it"):
        train(compose_config("train", tiny), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_nan_skip_skips_the_step_and_goes_on(tmp_path, compose_config, tiny, monkeypatch):
    loss_not_finite_at(monkeypatch, 2, 5)
    train(compose_config("train", [*tiny, "trainer.nan_policy=skip"]), tmp_path)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r or "skipped_steps" in r]
    assert [(r["step"], r.get("skipped_steps", 0)) for r in rows] == [(2, 1), (4, 0), (6, 1)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    ckpt = load_checkpoint(tmp_path, prefer="last.pt")
    assert ckpt["step"] == 6 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert (tmp_path / "eval.json").is_file()

"""Pre-trained backbones in runs: their configs compose, and the algorithms train and evaluate with them."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch

from metarun.algorithms.anil import ANIL
from metarun.algorithms.finetune import Finetune
from metarun.config import TrainConfig, check_values
from metarun.data.episodes import Batch, Episode
from metarun.errors import ConfigError
from metarun.factory import backbone_extras, build_algorithm, build_dataset
from metarun.models import pretrained
from metarun.models.resnet import ResNet18
from metarun.trainer import train
from tests.helpers.http_server import LocalHTTPServer

BACKBONES = ("resnet18", "resnet50", "vgg16", "vit_s16")


def pretrained_run(tiny: list[str], *overrides: str) -> list[str]:
    """The tiny glyphs run with a pre-trained backbone at 32 pixels instead of the narrow Conv4, shortened:
    a ResNet-18 forward of 32-pixel images costs some 40 times a narrow Conv4's."""
    shorter = ["trainer.steps=4", "trainer.val_every=2", "trainer.val_episodes=2", "eval.episodes=4", "task.queries=2"]
    shorter += ["eval.queries=2"]
    return [o for o in tiny if not o.startswith("backbone.")] + shorter + ["backbone.image_size=32", *overrides]


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_configs_compose_and_check(name, compose_config):
    cfg = compose_config("train", [f"backbone={name}", "backbone.image_size=32"])
    check_values(cfg, TrainConfig)
    assert cfg.backbone.weights == "imagenet" and cfg.backbone.freeze == "none" and cfg.backbone.normalize == "auto"
    assert cfg.backbone.image_size == 32
    with pytest.raises(ConfigError, match="backbone.freeze=some: valid values are none, bn, all"):
        check_values(compose_config("train", [f"backbone={name}", "backbone.freeze=some"]), TrainConfig)


def test_protonet_trains_and_evaluates_with_resnet18(tmp_path, compose_config, tiny):
    train(compose_config("train", pretrained_run(tiny, "backbone=resnet18", "backbone.weights=none", "algo=protonet")), tmp_path)
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert [(r["ways"], r["shots"], r["episodes"]) for r in results] == [(5, 1, 4), (5, 5, 4)]
    assert all(0.0 < r["accuracy"] <= 1.0 for r in results)


def test_a_frozen_backbone_with_downloaded_weights_is_evaluated_without_training(tmp_path, monkeypatch, compose_config, tiny):
    """The download path of a real run: the file comes from 127.0.0.1 into a fresh hub cache."""
    source = ResNet18((3, 32, 32), image_size=16)
    buffer = io.BytesIO()
    torch.save({k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}, buffer)
    payload = buffer.getvalue()
    name = f"resnet18-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pretrained, "URLS", dict(pretrained.URLS))
    overrides = pretrained_run(tiny, "backbone=resnet18", "backbone.freeze=all", "algo=protonet", "backbone.image_size=16")
    with LocalHTTPServer(files={f"/{name}": payload}) as server:
        pretrained.URLS["resnet18"] = f"{server.url}/{name}"
        with pytest.raises(ConfigError, match="backbone.freeze=all leaves algo=protonet nothing to train"):
            train(compose_config("train", overrides), tmp_path / "refused")
        train(compose_config("train", [*overrides, "trainer.steps=0"]), tmp_path / "run")
    assert (tmp_path / "torch" / "hub" / "checkpoints" / name).is_file()
    results = json.loads((tmp_path / "run" / "eval.json").read_text())["results"]
    assert all(0.0 < r["accuracy"] <= 1.0 for r in results)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=False)["model"]
    assert torch.equal(saved["backbone.conv1.weight"], source.conv1.weight)


def test_the_factory_hands_the_backbone_the_datasets_statistics(compose_config, tiny):
    cfg = compose_config("train", pretrained_run(tiny, "backbone=resnet18", "backbone.weights=imagenet"))
    dataset = build_dataset(cfg.dataset)
    algorithm = build_algorithm(cfg, dataset, pretrained_weights=False)
    adapter = algorithm.backbone.inputs
    mean, std = dataset.mean[0], dataset.std[0]
    # grey images normalised by the dataset come out normalised by ImageNet's red channel statistics
    expected_scale, expected_shift = std / 0.229, (mean - 0.485) / 0.229
    torch.testing.assert_close(adapter.scale[0].item(), expected_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(adapter.shift[0].item(), expected_shift, rtol=1e-6, atol=1e-7)


def episode(tasks: int, ways: int, shots: int, queries: int, size: int = 28) -> Episode:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways)
    return Episode(
        torch.randn(tasks, ways * shots, 1, size, size, generator=g),
        labels.repeat_interleave(shots).expand(tasks, -1),
        torch.randn(tasks, ways * queries, 1, size, size, generator=g),
        labels.repeat_interleave(queries).expand(tasks, -1),
        ways,
    )


# 8 queries: 45 images a task, which on a CPU go through the backbone one task at a time (ANIL.task_by_task)
@pytest.mark.parametrize(("freeze", "queries"), [("all", 8), ("all", 1), ("none", 1)])
def test_one_anil_step_with_resnet18(freeze, queries):
    torch.manual_seed(0)
    anil = ANIL(ResNet18((1, 28, 28), image_size=32, freeze=freeze), ways=5, inner_steps=1, inner_steps_eval=1)
    batch = episode(tasks=2, ways=5, shots=1, queries=queries)
    loss, metrics = anil.training_loss(batch)
    loss.backward()
    assert torch.isfinite(metrics["loss"])
    assert anil.head.weight.grad is not None and anil.head.weight.grad.abs().sum() > 0
    body = [p.grad for p in anil.backbone.parameters()]
    assert all(g is None for g in body) if freeze == "all" else all(g is not None for g in body)
    scores = anil.eval().evaluate(episode(tasks=2, ways=5, shots=1, queries=2), "running")
    assert scores.shape == (2,)


def test_finetune_pretrains_and_fits_heads_on_a_frozen_statistics_backbone():
    torch.manual_seed(0)
    finetune = Finetune(ResNet18((1, 28, 28), image_size=32, freeze="bn"), ways=5, num_train_classes=7, finetune_steps=3)
    batch = Batch(torch.randn(6, 1, 28, 28), torch.arange(6))
    loss, _ = finetune.training_loss(batch)
    loss.backward()
    assert finetune.backbone.conv1.weight.grad is not None
    scores = finetune.eval().evaluate(episode(tasks=2, ways=5, shots=1, queries=2), "running")
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()


def test_imagenet_weights_on_an_imagenet_subset_are_flagged_once(compose_config, capsys):
    class Stats:
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    for dataset, weights, flagged in [
        ("miniimagenet", "imagenet", True),
        ("cub", "imagenet", False),
        ("miniimagenet", "none", False),
    ]:
        cfg = compose_config("train", [f"dataset={dataset}", "backbone=resnet18", f"backbone.weights={weights}"])
        extras = backbone_extras(cfg, Stats(), pretrained_weights=True)
        assert extras["data_stats"] == (Stats.mean, Stats.std) and extras["load_weights"]
        lines = [ln for ln in capsys.readouterr().err.splitlines() if "ImageNet weights have seen its test classes" in ln]
        assert len(lines) == flagged and all(ln.startswith("note: ") for ln in lines), dataset


def test_a_run_from_a_weight_file_is_resumed_and_evaluated_without_it(tmp_path, compose_config, tiny):
    """The run's checkpoints hold the backbone: the file it started from is read once, when the run starts."""
    weights = tmp_path / "resnet18.pth"
    torch.save(ResNet18((3, 16, 16), image_size=16).state_dict(), weights)
    overrides = pretrained_run(tiny, "backbone=resnet18", f"backbone.weights={weights}", "algo=anil", "backbone.image_size=16")
    run = tmp_path / "run"
    train(compose_config("train", overrides), run)
    weights.unlink()
    first = json.loads((run / "eval.json").read_text())["results"]
    train(compose_config("train", [*overrides, f"resume={run}"]), tmp_path / "ignored")  # finished: it evaluates again
    again = json.loads((run / "eval.json").read_text())["results"]
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in first]

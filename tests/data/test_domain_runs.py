"""A train + eval smoke run on each Meta-Dataset domain and on dataset=multi, from tiny files in the real layouts;
traffic_sign, evaluation-only, refuses training with one line and scores a model trained elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metarun.errors import ConfigError
from metarun.evaluation import run_evaluation
from metarun.trainer import train
from tests.data import domain_files as files
from tests.data.test_domains import few_classes  # noqa: F401  (autouse fixture: the tiny copies' split lists)
from tests.data.test_zoo_runs import SMOKE


def aircraft(root: Path) -> list[str]:
    files.write_aircraft(root)
    return [f"dataset.root={root}", "dataset.image_size=16"]


def vgg_flower(root: Path) -> list[str]:
    files.write_flowers(root)
    return [f"dataset.root={root}", "dataset.image_size=16"]


def dtd(root: Path) -> list[str]:
    files.write_dtd(root)
    return [f"dataset.root={root}", "dataset.image_size=16"]


def fungi(root: Path) -> list[str]:
    files.write_fungi(root)
    return [f"dataset.root={root}", "dataset.image_size=16"]


def quickdraw(root: Path) -> list[str]:
    files.write_quickdraw(root)
    return [f"dataset.root={root}"]


def multi(root: Path) -> list[str]:
    """Quick, Draw! and generated glyphs, both 28x28 grayscale: two domains, one shape."""
    files.write_quickdraw(root / "quickdraw")
    glyphs = f"{{name:glyphs,root:{root / 'glyphs'},num_classes:30,val_classes:5,test_classes:5}}"
    return [f"dataset.sources=[{{name:quickdraw,root:{root / 'quickdraw'}}},{glyphs}]", "dataset.weights=[1,3]"]


WRITERS = {"aircraft": aircraft, "vgg_flower": vgg_flower, "dtd": dtd, "fungi": fungi, "quickdraw": quickdraw, "multi": multi}


@pytest.mark.parametrize("name", list(WRITERS))
def test_train_and_evaluate(name, tmp_path, compose_config):
    overrides = [f"dataset={name}", *WRITERS[name](tmp_path / "data"), *SMOKE]
    if name in ("aircraft", "multi"):
        overrides.append("dataset.augment=true")
    run = tmp_path / "run"
    train(compose_config("train", overrides), run)
    result = json.loads((run / "eval.json").read_text())["results"][0]
    assert (result["ways"], result["shots"], result["episodes"]) == (2, 1, 4)
    assert 0.0 <= result["accuracy"] <= 1.0 and len(result["per_episode"]) == 4
    assert (run / "checkpoints" / "best.pt").is_file()


def test_finetune_pretrains_over_every_sources_classes(tmp_path, compose_config):
    overrides = [
        "dataset=multi",
        *multi(tmp_path / "data"),
        *SMOKE,
        "algo=finetune",
        "algo.batch_size=4",
        "algo.finetune_steps=2",
    ]
    train(compose_config("train", overrides), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["results"][0]["episodes"] == 4


def test_traffic_sign_refuses_training_and_scores_a_model_trained_elsewhere(tmp_path, compose_config):
    files.write_traffic_signs(tmp_path / "signs")
    signs = ["dataset=traffic_sign", f"dataset.root={tmp_path / 'signs'}", "dataset.image_size=16", *SMOKE]
    with pytest.raises(ConfigError, match="train split has no classes: it is for evaluation only") as info:
        train(compose_config("train", signs), tmp_path / "refused")
    assert "\n" not in str(info.value)

    train(compose_config("train", ["dataset=dtd", *dtd(tmp_path / "dtd"), *SMOKE]), tmp_path / "run")
    cfg = compose_config("train", signs)
    (tmp_path / "scored").mkdir()
    results = run_evaluation(cfg, cfg.eval, tmp_path / "run" / "checkpoints" / "best.pt", _cpu(), tmp_path / "scored")
    assert results[0]["episodes"] == 4 and 0.0 <= results[0]["accuracy"] <= 1.0
    assert json.loads((tmp_path / "scored" / "eval.json").read_text())["dataset"] == "traffic_sign"


def _cpu():
    import torch

    return torch.device("cpu")


def test_multi_scores_each_source_in_validation_and_evaluation(tmp_path, compose_config):
    run = tmp_path / "run"
    train(compose_config("train", ["dataset=multi", *multi(tmp_path / "data"), *SMOKE]), run)
    result = json.loads((run / "eval.json").read_text())["results"][0]
    sources = list(result["by_source"])
    assert len(sources) == 2
    blocks = [result["per_episode"][:2], result["per_episode"][2:]]  # equal shares, in source order
    for name, block in zip(sources, blocks, strict=True):
        assert result["by_source"][name]["accuracy"] == pytest.approx(sum(block) / len(block))
        assert result["by_source"][name]["episodes"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in rows if "val/accuracy" in r]
    assert validation and all(f"val/{name}/accuracy" in r for r in validation for name in sources)

"""Cross-domain evaluation: another dataset's images converted to a checkpoint's input shape, scored, and laid out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from metarun.data.cross_domain import LUMA, as_input_of, convert_images
from metarun.data.split import FewShotDataset, Split
from metarun.errors import ConfigError
from metarun.trainer import train
from tests.conftest import run_cli


def test_colour_to_grey_is_luminance_and_grey_to_colour_repeats():
    rgb = torch.tensor([200, 100, 50], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    grey = convert_images(rgb, (1, 2, 2))
    assert grey.shape == (1, 1, 2, 2) and int(grey[0, 0, 0, 0]) == round(200 * LUMA[0] + 100 * LUMA[1] + 50 * LUMA[2])
    back = convert_images(grey, (3, 2, 2))
    assert torch.equal(back, grey.expand(1, 3, 2, 2))


def test_shrinking_averages_each_block_and_keeps_leading_dims():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 1, 4, 4) * 10
    y = convert_images(x, (1, 2, 2))
    blocks = x.float().view(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(2, 2, 4).mean(-1)  # 2x2 block means, by hand
    assert y.shape == (1, 1, 1, 2, 2) and torch.equal(y[0, 0, 0], blocks.round().to(torch.uint8))


def test_a_channel_count_that_cannot_be_converted_is_one_line():
    with pytest.raises(ConfigError, match="cannot convert 4-channel images to the model's 3 channels"):
        convert_images(torch.zeros(1, 4, 8, 8, dtype=torch.uint8), (3, 8, 8))


def test_dataset_takes_the_checkpoints_shape_and_statistics():
    split = Split(torch.randint(0, 256, (3, 2, 3, 10, 12), dtype=torch.uint8), ["a", "b", "c"])
    out = as_input_of(FewShotDataset("rgb", {"test": split}, (0.5,) * 3, (0.2,) * 3), (1, 28, 28), (0.1,), (0.3,))
    assert out.splits["test"].images.shape == (3, 2, 1, 28, 28) and out.splits["test"].class_names == ["a", "b", "c"]
    assert (out.mean, out.std, out.name) == ((0.1,), (0.3,), "rgb")


def write_folder(path: Path, classes: int = 12, per_class: int = 8) -> Path:
    """A colour image folder at 32x32: a class is a hue, each image a noisy square of it."""
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (path / f"class{c:02d}").mkdir(parents=True)
        colour = torch.randint(0, 256, (3,), generator=g)
        for i in range(per_class):
            pixels = (colour.view(1, 1, 3) + torch.randint(-20, 20, (32, 32, 3), generator=g)).clamp(0, 255)
            Image.fromarray(pixels.to(torch.uint8).numpy(), "RGB").save(path / f"class{c:02d}" / f"{i}.png")
    return path


def test_eval_on_another_dataset_through_the_cli(tmp_path, compose_config, tiny):
    run = tmp_path / "run"
    train(compose_config("train", tiny), run)  # glyphs: 1 x 28 x 28
    folder = write_folder(tmp_path / "colours", classes=30, per_class=4)
    out = run_cli(
        "eval", f"checkpoint={run}", "dataset=folder", f"dataset.path={folder}", "eval.episodes=6", "eval.queries=2",
        "eval.settings=[{ways:5,shots:1}]", "logger=none", f"hydra.run.dir={tmp_path / 'e'}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    payload = json.loads(next(run.glob("eval_on_*.json")).read_text())
    assert payload["trained_on"] == "glyphs" and payload["evaluated_on"] != "glyphs"
    said = " ".join(out.stdout.split())
    assert f"trained on glyphs, evaluated on {payload['evaluated_on']}" in said
    (result,) = payload["results"]
    assert (result["ways"], result["shots"], result["episodes"]) == (5, 1, 6) and 0 <= result["accuracy"] <= 1
    assert json.loads((run / "eval.json").read_text())["evaluated_on"] == "glyphs"  # the run's own results stay

    report = run_cli("report", str(run), "--cross-domain")
    assert report.returncode == 0, report.stderr
    table = (run / "cross_domain.md").read_text()
    assert "| glyphs |" in table and payload["evaluated_on"] in table


def test_a_regression_checkpoint_on_images_is_one_line(tmp_path, compose_config):
    run = tmp_path / "run"
    train(
        compose_config(
            "train",
            ["experiment=maml_sinusoid", "trainer.steps=2", "trainer.val_every=2", "trainer.val_episodes=2",
             "eval.episodes=2", "trainer.progress=false", "logger=none"],
        ),
        run,
    )  # fmt: skip
    out = run_cli("eval", f"checkpoint={run}", "dataset=glyphs", f"dataset.root={tmp_path / 'g'}", "logger=none",
                  "dataset.num_classes=40", "dataset.val_classes=5", "dataset.test_classes=10")  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "cross-domain evaluation converts between image datasets only" in out.stderr

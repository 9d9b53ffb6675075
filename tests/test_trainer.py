import json
import math

import pytest
import torch

from metarun.checkpoint import load_checkpoint
from metarun.data.episodes import EpisodeSampler, FusedGather
from metarun.factory import build_sampler
from metarun.loggers.jsonl import TIMING_FIELDS, read_metrics
from metarun.trainer import train
from tests.conftest import run_cli


def learning_rows(path):
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in read_metrics(path)]


def test_same_seed_gives_the_same_metrics_and_eval(tmp_path, compose_config, tiny):
    cfg = compose_config("train", tiny)
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        train(cfg, run)
    a, b = (learning_rows(r / "metrics.jsonl") for r in runs)
    assert len(a) >= 4 and a == b
    assert any("val/accuracy" in row for row in a)
    ea, eb = (json.loads((r / "eval.json").read_text()) for r in runs)
    assert ea["results"] == eb["results"]
    assert [(r["ways"], r["shots"], r["episodes"]) for r in ea["results"]] == [(5, 1, 10), (5, 5, 10)]
    for r in ea["results"]:
        assert len(r["per_episode"]) == 10 and abs(sum(r["per_episode"]) / 10 - r["accuracy"]) < 1e-9


def test_checkpoint_holds_everything_needed_to_resume(tmp_path, compose_config, tiny):
    train(compose_config("train", tiny), tmp_path)
    ckpt = load_checkpoint(tmp_path, prefer="last.pt")
    assert ckpt["step"] == 6
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"])
    assert {"model", "optimizer", "scheduler", "sampler", "config", "best"} <= set(ckpt)
    assert ckpt["config"]["trainer"]["steps"] == 6
    assert (tmp_path / "checkpoints" / "best.pt").is_file()


def test_metarun_eval_reproduces_the_accuracy_train_printed(tmp_path, compose_config, tiny):
    train(compose_config("train", tiny), tmp_path)
    trained = json.loads((tmp_path / "eval.json").read_text())
    (tmp_path / "eval.json").unlink()
    out = run_cli(
        "eval",
        f"checkpoint={tmp_path}",
        "eval.episodes=10",
        "eval.queries=5",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'eval-job'}",
    )
    assert out.returncode == 0, out.stderr
    again = json.loads((tmp_path / "eval.json").read_text())
    assert [r["accuracy"] for r in again["results"]] == [r["accuracy"] for r in trained["results"]]
    assert "5-way 1-shot" in out.stdout


def test_untrained_model_is_evaluated_with_zero_steps(tmp_path, compose_config, tiny):
    train(compose_config("train", [*tiny, "trainer.steps=0"]), tmp_path)
    result = json.loads((tmp_path / "eval.json").read_text())["results"][0]
    assert 0.0 < result["accuracy"] < 1.0
    assert torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=False)["step"] == 0


SPEED_SETTINGS = {
    "bf16": ["trainer.precision=bf16"],
    "fp16": ["trainer.precision=fp16"],  # adds the grad scaler
    "channels_last": ["trainer.channels_last=true"],
}


def speed_run(tmp_path, compose_config, overrides):
    train(compose_config("train", overrides), tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    evaluated = tmp_path / "eval.json"
    accuracy = json.loads(evaluated.read_text())["results"][0]["accuracy"] if evaluated.exists() else None
    return rows, accuracy


@pytest.mark.parametrize("setting", list(SPEED_SETTINGS))
def test_speed_settings_train_on_cpu(setting, tmp_path, compose_config, tiny):
    rows, accuracy = speed_run(tmp_path, compose_config, [*tiny, "device=cpu", *SPEED_SETTINGS[setting]])
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert 0.0 < accuracy <= 1.0


def test_channels_last_changes_the_layout_not_the_result(tmp_path, compose_config, tiny):
    overrides = [*tiny, "device=cpu", "trainer.steps=2", "eval.after_train=false"]
    plain, _ = speed_run(tmp_path / "plain", compose_config, overrides)
    fast, _ = speed_run(tmp_path / "fast", compose_config, [*overrides, "trainer.channels_last=true"])
    assert [r["loss"] for r in plain if "loss" in r] == pytest.approx([r["loss"] for r in fast if "loss" in r], rel=1e-4)


def test_fused_sampling_changes_the_speed_not_the_result(monkeypatch, tmp_path, compose_config, tiny):
    overrides = [*tiny, "device=cpu", "trainer.steps=2"]
    fused_calls = []
    gather = FusedGather()
    monkeypatch.setattr("metarun.data.episodes.fused_gather", lambda *args: fused_calls.append(1) or gather(*args))
    plain, plain_accuracy = speed_run(tmp_path / "plain", compose_config, overrides)
    assert not fused_calls
    fused, fused_accuracy = speed_run(tmp_path / "fused", compose_config, [*overrides, "trainer.fused_sampling=true"])
    assert fused_calls and not gather.failed
    assert [r["loss"] for r in plain if "loss" in r] == pytest.approx([r["loss"] for r in fused if "loss" in r], rel=1e-5)
    assert fused_accuracy == pytest.approx(plain_accuracy, abs=1e-6)


@pytest.mark.parametrize("algo", ["protonet", "maml"])
def test_a_bf16_run_samples_bf16_images_with_the_values_autocast_would_give(monkeypatch, tmp_path, compose_config, tiny, algo):
    """The first layer's autocast rounds float images to bf16; sampled in bf16, they arrive rounded alike."""
    overrides = [*tiny, "device=cpu", "trainer.steps=2", f"algo={algo}", "trainer.precision=bf16"]
    seen = []
    gather = EpisodeSampler.gather
    monkeypatch.setattr(EpisodeSampler, "gather", lambda self, idx: seen.append(self.dtype) or gather(self, idx))
    bf16, bf16_accuracy = speed_run(tmp_path / "bf16", compose_config, overrides)
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    monkeypatch.setattr("metarun.factory.input_dtype", lambda precision: torch.float32)
    floats, float_accuracy = speed_run(tmp_path / "float", compose_config, overrides)
    assert seen and set(seen) == {torch.float32}
    assert [r["loss"] for r in bf16 if "loss" in r] == [r["loss"] for r in floats if "loss" in r]
    assert bf16_accuracy == float_accuracy


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["protonet", "fomaml", "anil"])
def test_compiled_step_takes_the_eager_steps(algo, tmp_path, compose_config, tiny):
    """trainer.compile: grouped steps once failed to compile (symbolic shapes), second-order ones
    through the backbone compile to wrong meta-gradients (refused), ANIL's through its head do not."""
    overrides = [*tiny, "device=cpu", f"algo={algo}", "task.meta_batch=2", "trainer.steps=3", "trainer.log_every=1"]
    overrides += ["eval.after_train=false", "trainer.val_every=100"]
    eager, _ = speed_run(tmp_path / "eager", compose_config, overrides)
    compiled, _ = speed_run(tmp_path / "compiled", compose_config, [*overrides, "trainer.compile=true"])
    losses = [r["loss"] for r in eager if "loss" in r]
    assert len(losses) == 3
    assert [r["loss"] for r in compiled if "loss" in r] == pytest.approx(losses, rel=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("algo", ["protonet", "maml", "anil", "finetune"])
@pytest.mark.parametrize("setting", ["fp32", "bf16", "fp16", "compile"])
def test_gpu_path(algo, setting, tmp_path, compose_config, tiny):
    """On a GPU: the data on the device, every precision, compiled steps, channels_last."""
    extra = {
        "fp32": [],
        "bf16": ["trainer.precision=bf16"],
        "fp16": ["trainer.precision=fp16"],
        "compile": ["trainer.compile=true"] + ["algo.first_order=true"] * (algo == "maml"),
    }
    rows, accuracy = speed_run(
        tmp_path,
        compose_config,
        [*tiny, "device=cuda", f"algo={algo}", "task.meta_batch=2", "trainer.channels_last=true", *extra[setting]],
    )
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert accuracy > 0.0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_episodes_are_sampled_on_the_gpu(glyph_root, tiny):
    from metarun.data.glyphs import load

    dataset = load(root=str(glyph_root), num_classes=80, val_classes=15, test_classes=20)
    sampler = build_sampler(dataset, "train", ways=5, shots=1, queries=5, seed=0, device=torch.device("cuda"))
    episode = sampler.sample(4)
    assert episode.support_x.is_cuda and episode.query_y.is_cuda

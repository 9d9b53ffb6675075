"""The frozen-feature pipeline: a fixed backbone's features computed once give the runs that the backbone on
every episode gives."""

from __future__ import annotations

import json

import pytest
import torch

from metarun.data import features as features_module
from metarun.data.features import FeatureDataset, FeatureSampler, encode_split
from metarun.errors import ConfigError
from metarun.evaluation import run_evaluation
from metarun.factory import build_algorithm, build_dataset, build_sampler, frozen_features_reason, with_frozen_features
from metarun.models.freeze import FeatureInput, is_fixed
from metarun.trainer import train
from tests.test_pretrained_runs import pretrained_run


def frozen(tiny: list[str], *overrides: str) -> list[str]:
    """A ResNet-18 at 16 pixels with every weight fixed, in fp32 so that both ways compute the same sums."""
    return pretrained_run(
        tiny, "backbone=resnet18", "backbone.weights=none", "backbone.freeze=all", "backbone.image_size=16",
        "trainer.precision=fp32", *overrides,
    )  # fmt: skip


def results(run_dir) -> list[tuple[int, int, float]]:
    return [(r["ways"], r["shots"], r["accuracy"]) for r in json.loads((run_dir / "eval.json").read_text())["results"]]


@pytest.mark.parametrize("algo", ["anil", "finetune"])
def test_a_run_on_features_scores_as_the_run_on_images(tmp_path, compose_config, tiny, capsys, algo):
    """ANIL and finetune train their heads on the fixed backbone; validation and test episodes are the same."""
    cached = train(compose_config("train", frozen(tiny, f"algo={algo}")), tmp_path / "cached")
    assert "episodes are drawn from their features" in capsys.readouterr().err
    direct = train(compose_config("train", frozen(tiny, f"algo={algo}", "trainer.frozen_features=false")), tmp_path / "direct")
    assert "episodes are drawn from their features" not in capsys.readouterr().err
    assert cached == pytest.approx(direct, abs=1e-6)
    for (w, s, a), (w2, s2, a2) in zip(results(tmp_path / "cached"), results(tmp_path / "direct"), strict=True):
        assert (w, s) == (w2, s2) and a == pytest.approx(a2, abs=1e-6)
    ours = torch.load(tmp_path / "cached" / "checkpoints" / "best.pt", weights_only=False)["model"]
    theirs = torch.load(tmp_path / "direct" / "checkpoints" / "best.pt", weights_only=False)["model"]
    assert ours.keys() == theirs.keys()  # the checkpoint holds the backbone itself, under its own names
    for k in ours:
        assert torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-5), k


def test_each_split_goes_through_the_backbone_once(compose_config, tiny):
    cfg = compose_config("train", frozen(tiny, "algo=protonet", "trainer.steps=0"))
    dataset = build_dataset(cfg.dataset)
    algorithm = build_algorithm(cfg, dataset)
    backbone = algorithm.backbone
    calls = []
    backbone.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    features = with_frozen_features(cfg, dataset, algorithm, torch.device("cpu"))
    assert isinstance(features, FeatureDataset) and isinstance(algorithm.backbone, FeatureInput)
    sampler = build_sampler(features, "test", ways=5, shots=1, queries=2, seed=0, device=torch.device("cpu"))
    assert isinstance(sampler, FeatureSampler)
    for _ in range(3):
        episode = sampler.sample(4)
    test = dataset.splits["test"]
    assert sum(calls) == test.num_classes * test.images.shape[1]  # every image once, then only gathers
    assert episode.support_x.shape == (4, 5, backbone.out_features)
    # the same seeded indices as the image sampler: the features of the same images
    images = build_sampler(dataset, "test", ways=5, shots=1, queries=2, seed=0, device=torch.device("cpu"))
    for _ in range(3):
        pictures = images.sample(4)
    with torch.no_grad():
        direct = backbone(pictures.support_x.flatten(0, 1)).view(4, 5, -1)
    torch.testing.assert_close(episode.support_x, direct, atol=1e-5, rtol=1e-5)
    assert torch.equal(episode.query_y, pictures.query_y)


def test_features_follow_a_checkpoint_loaded_after_they_were_computed(compose_config, tiny):
    cfg = compose_config("train", frozen(tiny, "algo=protonet", "trainer.steps=0"))
    dataset = build_dataset(cfg.dataset)
    algorithm = build_algorithm(cfg, dataset)
    features = with_frozen_features(cfg, dataset, algorithm, torch.device("cpu"))
    before = features.features("val", "fp32").images.clone()
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in algorithm.state_dict().items()}
    assert state.keys() == build_algorithm(cfg, dataset).state_dict().keys()  # the stand-in keeps the backbone's names
    algorithm.load_state_dict(state)
    after = features.features("val", "fp32").images
    assert not torch.allclose(before, after)
    expected = encode_split(
        features.backbone, dataset.splits["val"], dataset.mean, dataset.std, device=torch.device("cpu"), precision="fp32"
    ).images
    torch.testing.assert_close(after, expected)


def test_which_runs_take_features(compose_config, tiny):
    def reason(*overrides):
        cfg = compose_config("train", frozen(tiny, *overrides))
        dataset = build_dataset(cfg.dataset)
        return frozen_features_reason(cfg, dataset, build_algorithm(cfg, dataset))

    assert reason("algo=anil") is None
    assert "adapts its backbone" in reason("algo=maml")
    assert "backbone trains" in reason("algo=anil", "backbone.freeze=bn")
    assert "dataset.augment=true" in reason("algo=anil", "dataset.augment=true")
    cfg = compose_config("train", frozen(tiny, "algo=anil"))
    dataset = build_dataset(cfg.dataset)
    runs = frozen_features_reason(cfg, dataset, build_algorithm(cfg, dataset), eval_protocol="omniglot_runs")
    assert "eval.protocol=omniglot_runs reads image files" in runs
    cfg = compose_config("train", frozen(tiny, "algo=maml", "trainer.frozen_features=true"))
    dataset = build_dataset(cfg.dataset)
    with pytest.raises(ConfigError, match="trainer.frozen_features=true: algo=maml adapts its backbone"):
        with_frozen_features(cfg, dataset, build_algorithm(cfg, dataset), torch.device("cpu"))


def test_a_frozen_conv4_is_fixed_only_once_its_batch_norm_is(compose_config, tiny):
    cfg = compose_config("train", tiny)
    algorithm = build_algorithm(cfg, build_dataset(cfg.dataset))
    algorithm.backbone.requires_grad_(False)
    assert not is_fixed(algorithm.backbone)  # batch norm still follows each episode's statistics


def test_metarun_eval_of_a_frozen_run_reads_features(tmp_path, compose_config, tiny, monkeypatch):
    overrides = frozen(tiny, "algo=anil")
    cfg = compose_config("train", overrides)
    train(cfg, tmp_path / "run")
    (tmp_path / "again").mkdir()
    encoded = []
    monkeypatch.setattr(
        features_module, "encode_split", lambda *a, **k: encoded.append(k["description"]) or encode_split(*a, **k)
    )
    again = run_evaluation(cfg, cfg.eval, tmp_path / "run" / "checkpoints" / "best.pt", torch.device("cpu"), tmp_path / "again")
    assert [r["accuracy"] for r in again] == pytest.approx([a for _, _, a in results(tmp_path / "run")], abs=1e-6)
    assert encoded == ["features of the test split"]

"""Every experiment preset in conf/experiment/ composes, passes the run-time value checks and builds its
algorithm; the Omniglot presets carry their papers' settings, and the MAML family shares MAML's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from metarun.config import TrainConfig, check_values
from metarun.factory import build_algorithm, build_dataset
from tests.conftest import REPO

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
ALGOS = "metarun.algorithms"


def test_the_presets_are_found():
    assert {"smoke", "maml_sinusoid", "maml_omniglot_5w1s", "finetune_omniglot"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_preset_composes_and_builds_its_algorithm(name, compose_config):
    cfg = compose_config("train", [f"experiment={name}"])
    check_values(cfg, TrainConfig)
    if cfg.dataset._target_.endswith("sinusoid.load"):  # generated on the fly: the real thing costs nothing
        dataset = build_dataset(cfg.dataset)
    else:  # what the factory reads of an image dataset, without its files
        dataset = SimpleNamespace(image_shape=(1, 28, 28), splits={"train": SimpleNamespace(num_classes=10)})
    algorithm = build_algorithm(cfg, dataset)
    assert f"{type(algorithm).__module__}.{type(algorithm).__name__}" == cfg.algo._target_


def test_maml_omniglot_5w1s_is_the_papers_setting(compose_config):
    cfg = compose_config(
        "train", ["experiment=maml_omniglot_5w1s", "dataset.root=../shared/data/omniglot", "dataset.subset=small"]
    )
    assert cfg.dataset._target_ == "metarun.data.omniglot.load"
    assert (cfg.dataset.root, cfg.dataset.subset) == ("../shared/data/omniglot", "small")  # the command line wins
    assert cfg.algo._target_ == f"{ALGOS}.maml.MAML" and cfg.algo.first_order is False
    assert (cfg.algo.inner_lr, cfg.algo.inner_steps, cfg.algo.inner_steps_eval) == (0.4, 1, 3)
    assert (cfg.task.ways, cfg.task.shots, cfg.task.meta_batch) == (5, 1, 32)
    assert (cfg.trainer.optimizer, cfg.trainer.lr) == ("adam", 1e-3)
    assert cfg.eval.bn_mode == "transductive"
    assert OmegaConf.to_container(cfg.eval.settings) == [{"ways": 5, "shots": 1}]
    assert compose_config("train", ["experiment=maml_omniglot_5w1s"]).dataset.subset == "full"  # the paper's split


@pytest.mark.parametrize(
    "name, algo",
    [
        ("fomaml_omniglot_5w1s", {"_target_": f"{ALGOS}.maml.MAML", "first_order": True}),
        ("anil_omniglot_5w1s", {"_target_": f"{ALGOS}.anil.ANIL"}),
        ("metasgd_omniglot_5w1s", {"_target_": f"{ALGOS}.metasgd.MetaSGD", "inner_steps_eval": 1}),
    ],
)
def test_the_maml_family_presets_are_mamls_with_another_algo(name, algo, compose_config):
    """Everything but the named algo keys is MAML's preset: the algo option's own defaults (e.g. ANIL's
    5 inner steps and 5 queries) do not leak in."""
    maml = OmegaConf.to_container(compose_config("train", ["experiment=maml_omniglot_5w1s"]))
    other = OmegaConf.to_container(compose_config("train", [f"experiment={name}"]))
    assert other["algo"] == {**maml["algo"], **algo}
    assert {k: v for k, v in other.items() if k != "algo"} == {k: v for k, v in maml.items() if k != "algo"}


def test_reptile_omniglot_5w1s_is_the_papers_setting(compose_config):
    cfg = compose_config("train", ["experiment=reptile_omniglot_5w1s"])
    assert cfg.algo._target_ == f"{ALGOS}.reptile.Reptile" and cfg.dataset.subset == "full"
    assert (cfg.algo.inner_optimizer, cfg.algo.inner_lr, cfg.algo.inner_steps, cfg.algo.inner_batch) == ("adam", 1e-3, 5, 10)
    assert cfg.algo.inner_steps_eval == 50
    assert (cfg.task.ways, cfg.task.shots, cfg.task.shots + cfg.task.queries, cfg.task.meta_batch) == (5, 1, 10, 5)
    assert (cfg.trainer.optimizer, cfg.trainer.lr, cfg.trainer.schedule) == ("sgd", 1.0, "linear")
    assert cfg.eval.bn_mode == "transductive"


def test_protonet_and_finetune_omniglot_presets(compose_config):
    proto = compose_config("train", ["experiment=protonet_omniglot_5w1s"])
    assert proto.algo._target_ == f"{ALGOS}.protonet.ProtoNet"
    assert (proto.task.ways, proto.task.shots, proto.task.queries) == (60, 1, 5)
    assert OmegaConf.to_container(proto.eval.settings) == [{"ways": 5, "shots": 1}] and proto.eval.bn_mode == "running"
    finetune = compose_config("train", ["experiment=finetune_omniglot"])
    assert finetune.algo._target_ == f"{ALGOS}.finetune.Finetune" and finetune.dataset.subset == "full"
    assert (finetune.algo.batch_size, finetune.eval.queries, finetune.eval.bn_mode) == (16, 15, "running")


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if "omniglot" in n])
def test_omniglot_presets_fit_twenty_images_per_character(name, compose_config):
    """Every Omniglot character has 20 drawings: training episodes and every test setting must fit in them
    (checked at run start against the data too, but that needs the files)."""
    cfg = compose_config("train", [f"experiment={name}"])
    assert cfg.dataset._target_ == "metarun.data.omniglot.load"
    assert cfg.task.shots + cfg.task.queries <= 20
    assert cfg.task.shots + cfg.eval.queries <= 20  # validation episodes
    assert all(s.shots + cfg.eval.queries <= 20 for s in cfg.eval.settings)


def test_an_algorithm_on_a_dataset_gets_its_own_defaults_which_anything_explicit_overrides(compose_config):
    """conf/dataset_algo/omniglot_maml.yaml: MAML's Omniglot step budget, not ProtoNet's; experiments and the
    command line still win, and other datasets keep the trainer's default."""
    steps = {
        overrides: compose_config("train", list(overrides)).trainer.steps
        for overrides in [
            ("algo=maml", "dataset=omniglot"),
            ("algo=protonet", "dataset=omniglot"),
            ("algo=maml", "dataset=glyphs"),
            ("algo=maml", "dataset=omniglot", "trainer.steps=7"),
            ("experiment=maml_omniglot_5w1s",),
        ]
    }
    assert list(steps.values()) == [1500, 5000, 2000, 7, 60000]
    reptile = compose_config("train", ["algo=reptile", "dataset=omniglot"])
    assert (reptile.trainer.val_every, reptile.task.meta_batch, reptile.algo.inner_batch) == (1350, 16, 10)


@pytest.mark.parametrize("algo", ["metalstm", "weightgen", "leo", "incontext"])
def test_model_based_miniimagenet_presets(algo, compose_config):
    cfg = compose_config("train", [f"experiment={algo}_miniimagenet_5w1s"])
    assert cfg.dataset._target_.endswith("miniimagenet.load") and cfg.algo._target_.split(".")[-2] == algo
    assert (cfg.task.ways, cfg.task.shots, cfg.task.queries) == (5, 1, 15)
    assert [(s.ways, s.shots) for s in cfg.eval.settings] == [(5, 1)] and cfg.eval.episodes == 600
    papers = {
        "metalstm": lambda c: c.backbone.hidden == 32 and c.algo.inner_steps == 12 and c.trainer.grad_clip == 0.25,
        "weightgen": lambda c: c.task.meta_batch == 8 and 0 < c.algo.pretrain_steps < c.trainer.steps,
        "leo": lambda c: c.algo.latent == 64 and c.algo.freeze_backbone and c.task.meta_batch == 12,
        "incontext": lambda c: c.algo.max_ways >= 5 and c.algo.d_model % c.algo.heads == 0,
    }
    assert papers[algo](cfg)

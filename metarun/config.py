"""Typed configuration: the schemas Hydra validates every composed config against.

Each YAML option under ``conf/<group>/`` starts from one of the schemas stored
here (``defaults: [/schema/<group>/<name>@_here_]``), so a misspelt key or a
value of the wrong type fails at composition with Hydra's own message, before
any work is done. What a type cannot express (a count that must be positive, a
string from a short list) is field metadata, checked by :func:`check_values`
when a run starts.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from metarun.errors import ConfigError, unknown_key
from metarun.schema import at_least, choice


# -- datasets -------------------------------------------------------------------
@dataclass
class DatasetConfig:
    _target_: str = MISSING
    #: batched random crop / flip / colour jitter on training episodes, on the device
    augment: bool = False
    #: keep the uint8 splits on the run's device ("auto": when they fit)
    on_device: str = "auto"


@dataclass
class GlyphsConfig(DatasetConfig):
    _target_: str = "metarun.data.glyphs.load"
    root: str = "data/glyphs"
    seed: int = 0
    num_classes: int = 1200
    images_per_class: int = 20
    image_size: int = 28
    val_classes: int = 100
    test_classes: int = 200


@dataclass
class SinusoidConfig(DatasetConfig):
    _target_: str = "metarun.data.sinusoid.load"
    amplitude: list[float] = field(default_factory=lambda: [0.1, 5.0])
    phase: list[float] = field(default_factory=lambda: [0.0, 3.141592653589793])
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])
    #: tasks are generated where the run is: nothing to keep off the device
    on_device: str = "true"


@dataclass
class OmniglotConfig(DatasetConfig):
    _target_: str = "metarun.data.omniglot.load"
    root: str = "data/omniglot"
    #: small (the two small background sets, never downloaded) | full (background + evaluation)
    subset: str = "small"
    #: 90/180/270° rotations of each character become new classes
    rotations: bool = True
    download: bool = True
    image_size: int = 28
    #: seeds the split of the small subset by character
    seed: int = 0
    #: characters carved out of meta-training for validation (null: 100 for full, 10% for small)
    val_classes: Optional[int] = None


@dataclass
class MiniImageNetConfig(DatasetConfig):
    _target_: str = "metarun.data.miniimagenet.load"
    root: str = "data/miniimagenet"


@dataclass
class TieredImageNetConfig(DatasetConfig):
    _target_: str = "metarun.data.tieredimagenet.load"
    root: str = "data/tieredimagenet"


@dataclass
class CifarFSConfig(DatasetConfig):
    _target_: str = "metarun.data.cifar.load_cifarfs"
    #: shared with fc100: one CIFAR-100 archive serves both
    root: str = "data/cifar100"
    download: bool = True


@dataclass
class FC100Config(CifarFSConfig):
    _target_: str = "metarun.data.cifar.load_fc100"


@dataclass
class CUBConfig(DatasetConfig):
    _target_: str = "metarun.data.cub.load"
    root: str = "data/cub"


@dataclass
class FolderConfig(DatasetConfig):
    _target_: str = "metarun.data.folder.load"
    #: DIR/<class>/* or DIR/{train,val,test}/<class>/*
    path: str = MISSING
    image_size: int = 84
    channels: int = 3
    split_fractions: list[float] = field(default_factory=lambda: [0.64, 0.16, 0.2])
    seed: int = 0
    #: where the decoded cache goes (null: inside `path`)
    root: Optional[str] = None


@dataclass
class DomainConfig(DatasetConfig):
    """The keys of the Meta-Dataset domains (aircraft, vgg_flower, dtd, fungi, quickdraw, traffic_sign)."""

    root: str = MISSING
    #: download the public archive into `root` when it is missing (md5-checked)
    download: bool = True
    image_size: int = at_least(1, 84)
    #: 3 (RGB) or 1 (grayscale)
    channels: int = choice(3, 1)
    #: at most this many images of a class, evenly spread over it (null: all of them)
    max_per_class: Optional[int] = None


@dataclass
class AircraftConfig(DomainConfig):
    _target_: str = "metarun.data.aircraft.load"
    root: str = "data/aircraft"


@dataclass
class VggFlowerConfig(DomainConfig):
    _target_: str = "metarun.data.vgg_flower.load"
    root: str = "data/vgg_flower"


@dataclass
class DTDConfig(DomainConfig):
    _target_: str = "metarun.data.dtd.load"
    root: str = "data/dtd"


@dataclass
class FungiConfig(DomainConfig):
    _target_: str = "metarun.data.fungi.load"
    root: str = "data/fungi"
    #: off: the images are 13 GB
    download: bool = False


@dataclass
class QuickDrawConfig(DomainConfig):
    _target_: str = "metarun.data.quickdraw.load"
    root: str = "data/quickdraw"
    #: off: the 345 files are 37 GB
    download: bool = False
    image_size: int = at_least(1, 28)
    channels: int = choice(1, 3)
    #: drawings kept of each category's 100k-300k (null: all, 37 GB in memory)
    max_per_class: Optional[int] = 1000


@dataclass
class TrafficSignConfig(DomainConfig):
    _target_: str = "metarun.data.traffic_sign.load"
    root: str = "data/traffic_sign"


@dataclass
class MultiConfig(DatasetConfig):
    _target_: str = "metarun.data.multi.load"
    #: dataset names, or {name: ..., key: value} mappings; training episodes each come from one of them
    sources: list[Any] = MISSING
    #: relative frequency of each source's training episodes (null: equal)
    weights: Optional[list[float]] = None


# -- backbones ------------------------------------------------------------------
@dataclass
class Conv4Config:
    _target_: str = "metarun.models.conv4.Conv4"
    hidden: int = 64
    layers: int = 4


@dataclass
class ResNet12Config:
    _target_: str = "metarun.models.resnet12.ResNet12"
    channels: list[int] = field(default_factory=lambda: [64, 160, 320, 640])


@dataclass
class MLPConfig:
    _target_: str = "metarun.models.mlp.MLP"
    hidden: list[int] = field(default_factory=lambda: [40, 40])


@dataclass
class PretrainedConfig:
    """The backbones with published weights (metarun/models/pretrained.py)."""

    _target_: str = MISSING
    #: imagenet (the publisher's file, downloaded once into torch's hub cache) | none (random) | a .pth/.pt path
    weights: str = "imagenet"
    #: images are resized to this on the device (vit_s16: a multiple of 16)
    image_size: int = at_least(16, 224)
    #: none (all trained) | bn (batch-norm statistics fixed) | all (every weight fixed)
    freeze: str = choice("none", "bn", "all")
    #: auto (ImageNet's mean and std with weights=imagenet, else the dataset's) | imagenet | dataset
    normalize: str = choice("auto", "imagenet", "dataset")


@dataclass
class ResNet18Config(PretrainedConfig):
    _target_: str = "metarun.models.resnet.ResNet18"


@dataclass
class ResNet50Config(PretrainedConfig):
    _target_: str = "metarun.models.resnet.ResNet50"


@dataclass
class VGG16Config(PretrainedConfig):
    _target_: str = "metarun.models.vgg.VGG16"


@dataclass
class ViTS16Config(PretrainedConfig):
    _target_: str = "metarun.models.vit.ViTS16"


# -- the rest ---------------------------------------------------------------------
@dataclass
class DeviceConfig:
    #: auto | cpu | cuda | mps ("auto" picks cuda, then mps, then cpu)
    type: str = "auto"


@dataclass
class TaskConfig:
    ways: int = at_least(1, 5)
    shots: int = at_least(1, 1)
    queries: int = at_least(1, 15)
    #: tasks per meta-step
    meta_batch: int = at_least(1, 1)
    #: fixed (ways, shots and queries above) | metadataset (Triantafillou et al. 2020: 5 to 50 ways, varying shots
    #: and queries per episode, in training, validation and test; metarun/data/metadataset.py)
    protocol: str = choice("fixed", "metadataset")


@dataclass
class TrainerConfig:
    steps: int = at_least(0, 2000)
    lr: float = at_least(0.0, 1e-3)
    #: adam | sgd
    optimizer: str = choice("adam", "sgd")
    weight_decay: float = at_least(0.0, 0.0)
    #: constant | cosine | linear | step (halves every quarter of the run)
    schedule: str = choice("cosine", "constant", "linear", "step")
    #: 0 disables clipping
    grad_clip: float = at_least(0.0, 0.0)
    val_every: int = at_least(1, 500)
    val_episodes: int = at_least(1, 200)
    log_every: int = at_least(1, 50)
    seed: int = 0
    #: auto | fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler); episodes are sampled in it.
    #: auto: bf16 where the device computes it natively, else fp32 (metarun/speed_settings.py)
    precision: str = choice("auto", "fp32", "bf16", "fp16")
    #: torch.compile of the meta-step (static shapes); refused for second-order MAML and Meta-SGD
    compile: bool = False
    #: auto | true | false: NHWC layout; auto: on a GPU, and where the algorithm's convolutions are shared by its tasks
    channels_last: Any = choice("auto", True, False)
    #: auto | true | false: gather and normalise episodes in one compiled pass where the data live on a CPU,
    #: unaugmented (+3 s at start); auto: on a CPU for runs of 1000 steps or more
    fused_sampling: Any = choice("auto", True, False)
    #: a run folder or checkpoint (.pt) of an earlier run whose backbone (and what the algorithm takes of it, e.g.
    #: algo=weightgen's base classifier) starts this run; null: a fresh or published backbone
    init_from: Optional[str] = None
    #: auto | true | false: with a fixed backbone (backbone.freeze=all, algo.freeze_backbone=true), put each image
    #: through it once and sample episodes of its features; auto: wherever the run allows (metarun/data/features.py)
    frozen_features: Any = choice("auto", True, False)
    #: stop | skip: what a NaN or infinite loss does (stop: the run ends, its last good checkpoint kept)
    nan_policy: str = choice("stop", "skip")
    #: how many step-numbered checkpoints to keep besides best.pt and last.pt (0: none)
    keep_checkpoints: int = at_least(0, 0)
    progress: bool = True


@dataclass
class EvalSetting:
    ways: int = at_least(1, 5)
    shots: int = at_least(1, 1)


@dataclass
class EvalConfig:
    settings: list[EvalSetting] = field(default_factory=lambda: [EvalSetting(5, 1), EvalSetting(5, 5)])
    queries: int = at_least(1, 15)
    episodes: int = at_least(1, 600)
    seed: int = 2026
    #: episodes evaluated together in one batched call: inner loops (Reptile's, finetune's head) run for
    #: all of them at once; 32 was the fastest overall (docs/performance.md)
    batch_tasks: int = at_least(1, 32)
    #: transductive | support | running; null: the algorithm's documented default
    bn_mode: Optional[str] = choice(None, "transductive", "support", "running")
    #: episodes | omniglot_runs
    protocol: str = choice("episodes", "omniglot_runs")
    runs_path: Optional[str] = None
    split: str = choice("test", "val", "train")
    after_train: bool = True
    #: fp32 | bf16 | fp16 autocast of evaluation; null: the run's trainer.precision (scores as it was trained and validated)
    precision: Optional[str] = choice(None, "fp32", "bf16", "fp16")


@dataclass
class WandbConfig:
    #: auto | online | offline | disabled
    mode: str = "auto"
    project: str = "metarun"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    name: Optional[str] = None
    new_run: bool = False
    log_checkpoints: bool = False


@dataclass
class LoggerConfig:
    #: none | wandb
    backend: str = "none"
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    dataset: Any = MISSING
    backbone: Any = MISSING
    algo: Any = MISSING
    device: DeviceConfig = field(default_factory=DeviceConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    #: a run folder (or its last.pt) to continue
    resume: Optional[str] = None


@dataclass
class EvalJobConfig:
    #: a run folder or a .pt file
    checkpoint: str = MISSING
    #: another dataset to evaluate on (cross-domain); null: the run's own
    dataset: Any = None
    #: the training recipe a dataset option may set (dataset=omniglot does): unused by evaluation
    task: Any = None
    trainer: Any = None
    device: DeviceConfig = field(default_factory=DeviceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {
        "glyphs": GlyphsConfig,
        "omniglot": OmniglotConfig,
        "sinusoid": SinusoidConfig,
        "miniimagenet": MiniImageNetConfig,
        "tieredimagenet": TieredImageNetConfig,
        "cifarfs": CifarFSConfig,
        "fc100": FC100Config,
        "cub": CUBConfig,
        "folder": FolderConfig,
        "aircraft": AircraftConfig,
        "vgg_flower": VggFlowerConfig,
        "dtd": DTDConfig,
        "fungi": FungiConfig,
        "quickdraw": QuickDrawConfig,
        "traffic_sign": TrafficSignConfig,
        "multi": MultiConfig,
    },
    "backbone": {
        "conv4": Conv4Config,
        "resnet12": ResNet12Config,
        "mlp": MLPConfig,
        "resnet18": ResNet18Config,
        "resnet50": ResNet50Config,
        "vgg16": VGG16Config,
        "vit_s16": ViTS16Config,
    },
}


@functools.cache
def algorithm_schemas() -> dict[str, type]:
    """``{module name: Config}`` of every module under :mod:`metarun.algorithms` whose algorithm declares one.

    An algorithm's schema lives beside its code (``<Algorithm>.Config``), so adding one is a module and a
    YAML (``defaults: [/schema/algo@algo: <module name>]``); importing the modules costs the torch import.
    """
    import importlib
    import pkgutil

    import metarun.algorithms as package

    schemas = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            schema = getattr(value, "Config", None)
            if isinstance(value, type) and value.__module__ == module.__name__ and is_dataclass(schema):
                schemas[info.name] = schema
    return schemas


def algorithm_class(node: DictConfig) -> type:
    """The algorithm class an ``algo`` node instantiates."""
    from hydra.utils import get_class

    return get_class(node._target_)


def schema_of(node: DictConfig) -> type | None:
    """The schema of a group's node: its own type when it was composed typed, else the one its ``_target_`` names
    (a resumed run's saved config is untyped)."""
    if is_dataclass(typed := OmegaConf.get_type(node)):
        return typed
    target = node.get("_target_")
    if not isinstance(target, str):
        return None
    candidates = [s for group in schemas().values() for s in group.values() if getattr(s, "_target_", None) == target]
    fitting = [s for s in candidates if set(node.keys()) <= {f.name for f in fields(s)}]
    return (fitting or candidates or [None])[0]


def schemas() -> dict[str, dict[str, type]]:
    """Every group's ``{option: schema}``."""
    return {**SCHEMAS, "algo": algorithm_schemas()}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalJobConfig)
    for group, nodes in schemas().items():
        for name, node in nodes.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def check_values(cfg: DictConfig, schema: type, prefix: str = "") -> None:
    """Ranges, choices and keys added with ``+``: what the types cannot check, checked before any work is done.

    The schema, not the node, says what to check, so a resumed run's saved
    (untyped) config is checked the same way.
    """
    known = {f.name for f in fields(schema)}
    for key in cfg:
        if key not in known:
            raise unknown_key(f"{prefix}{key}", schema)
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        if f.name not in cfg or OmegaConf.is_missing(cfg, f.name):
            continue
        value, key = cfg[f.name], prefix + f.name
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            shown = ", ".join("null" if c is None else str(c) for c in f.metadata["choices"])
            raise ConfigError(f"{key}={value}: valid values are {shown}")
        if "min" in f.metadata and value < f.metadata["min"]:
            raise ConfigError(f"{key}={value}: must be at least {f.metadata['min']}")
        hint = hints[f.name]
        if isinstance(value, DictConfig):
            node_schema = hint if is_dataclass(hint) else schema_of(value)  # Any: the option's own schema
            if node_schema is not None:
                check_values(value, node_schema, f"{key}.")
        elif isinstance(value, ListConfig) and typing.get_args(hint) and is_dataclass(item := typing.get_args(hint)[0]):
            for i, entry in enumerate(value):
                check_values(entry, item, f"{key}[{i}].")


def config_dir() -> str:
    """The folder of the YAML configs (``conf/``, shipped inside the wheel as ``metarun.conf``)."""
    from importlib import resources

    return str(resources.files("metarun.conf"))


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """The config ``metarun <command>`` would compose from ``overrides``, outside any Hydra app (tests, the bench)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()

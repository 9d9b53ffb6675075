"""Typed configuration: the schemas Hydra validates every composed config against.

Each YAML option under ``conf/<group>/`` starts from one of the schemas stored
here (``defaults: [/schema/<group>/<name>@_here_]``), so a misspelt key or a
value of the wrong type fails at composition with Hydra's own message, before
any work is done. What a type cannot express (a count that must be positive, a
string from a short list) is field metadata, checked by :func:`check_values`
when a run starts.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from metarun.errors import ConfigError


def choice(default: Any, *others: Any) -> Any:
    """A field that takes one of a few values; :func:`check_values` rejects the rest before any work is done."""
    return field(default=default, metadata={"choices": (default, *others)})


def at_least(low: float, default: float) -> Any:
    """A number with a lower bound (a type cannot say that a count must be positive); see :func:`check_values`."""
    return field(default=default, metadata={"min": low})


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


# -- algorithms -----------------------------------------------------------------
@dataclass
class ProtoNetConfig:
    _target_: str = "metarun.algorithms.protonet.ProtoNet"


@dataclass
class MAMLConfig:
    _target_: str = "metarun.algorithms.maml.MAML"
    #: step size of the inner (per-task) gradient steps
    inner_lr: float = at_least(0.0, 0.4)
    #: inner steps per task in meta-training (0: no adaptation, i.e. joint training)
    inner_steps: int = at_least(0, 1)
    #: inner steps per task at validation and test time
    inner_steps_eval: int = at_least(0, 3)
    #: drop the second-order terms (FOMAML)
    first_order: bool = False
    #: auto | vmap | loop: how the tasks of a batch run (auto: by task size, see metarun/algorithms/functional.py)
    strategy: str = choice("auto", "grouped", "vmap", "loop")
    #: with vmap, this many tasks at a time (null: all at once), to bound memory
    chunk_size: Optional[int] = None


@dataclass
class ANILConfig(MAMLConfig):
    _target_: str = "metarun.algorithms.anil.ANIL"


@dataclass
class MetaSGDConfig(MAMLConfig):
    _target_: str = "metarun.algorithms.metasgd.MetaSGD"


@dataclass
class ReptileConfig:
    _target_: str = "metarun.algorithms.reptile.Reptile"
    inner_lr: float = at_least(0.0, 1e-3)
    inner_steps: int = at_least(1, 5)
    inner_steps_eval: int = at_least(0, 50)
    #: adam (beta1 = 0, as in the paper) | sgd
    inner_optimizer: str = choice("adam", "sgd")
    #: samples per inner step, cycling through each task's support + query (null: all of them)
    inner_batch: Optional[int] = None
    #: support samples per evaluation inner step (null: the whole support set every step)
    inner_batch_eval: Optional[int] = None
    #: Adam's moments carry over from task to task and into evaluation, as in the paper's code
    #: (false: every task starts Adam afresh)
    carry_adam_state: bool = True
    strategy: str = choice("auto", "grouped", "vmap", "loop")
    chunk_size: Optional[int] = None


@dataclass
class FinetuneConfig:
    _target_: str = "metarun.algorithms.finetune.Finetune"
    #: linear (Baseline) | cosine (Baseline++)
    head: str = choice("linear", "cosine")
    #: images per pre-training step, drawn from all training classes
    batch_size: int = at_least(1, 64)
    #: full-batch Adam steps fitting each test episode's new classifier
    finetune_steps: int = at_least(0, 100)
    finetune_lr: float = at_least(0.0, 0.01)
    #: logit scale of the cosine head
    cosine_scale: float = at_least(0.0, 10.0)


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
    #: fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler); episodes are sampled in it
    precision: str = choice("fp32", "bf16", "fp16")
    #: torch.compile of the meta-step (static shapes); refused for second-order MAML and Meta-SGD
    compile: bool = False
    channels_last: bool = False
    #: gather and normalise episodes in one compiled pass where the data live on a CPU, unaugmented (+3 s at start)
    fused_sampling: bool = False
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
    #: episodes evaluated together in one batched call. Omniglot 5-way 1-shot episodes per second at
    #: 16 / 32 / 64 (bf16, 2 CPU threads): Reptile 8.2 / 9.2 / 9.3 (its 50 inner steps run for all the
    #: call's episodes at once), finetune 91 / 117 / 131, MAML 70 / 73 / 72, ANIL 116 / 122 / 114,
    #: first-order MAML 71 / 71 / 75, Meta-SGD 106 / 105 / 105, ProtoNet 155 / 152 / 144.
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
    "backbone": {"conv4": Conv4Config, "resnet12": ResNet12Config, "mlp": MLPConfig},
    "algo": {
        "protonet": ProtoNetConfig,
        "maml": MAMLConfig,
        "anil": ANILConfig,
        "metasgd": MetaSGDConfig,
        "reptile": ReptileConfig,
        "finetune": FinetuneConfig,
    },
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalJobConfig)
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def unknown_key(key: str, schema: type) -> ConfigError:
    """Names the keys that exist: Hydra's own advice for a misspelt key, ``+key=value``, adds a key nothing reads."""
    names = ", ".join(f.name for f in fields(schema) if not f.name.startswith("_"))
    return ConfigError(f"unknown key '{key}': valid keys are {names}")


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
            node_schema = hint if is_dataclass(hint) else OmegaConf.get_type(value)  # Any: the option's own schema
            if is_dataclass(node_schema):
                check_values(value, node_schema, f"{key}.")
        elif isinstance(value, ListConfig) and typing.get_args(hint) and is_dataclass(item := typing.get_args(hint)[0]):
            for i, entry in enumerate(value):
                check_values(entry, item, f"{key}[{i}].")

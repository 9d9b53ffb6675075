"""Small factories: the only place where config nodes become objects.

Below this module nothing reads the config; objects get plain arguments.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metarun.algorithms.base import Algorithm
from metarun.data.episodes import EpisodeSampler
from metarun.data.features import FeatureDataset, FeatureSampler
from metarun.data.metadataset import PROTOCOLS, MetaDatasetSampler
from metarun.data.multi import MultiSourceDataset
from metarun.data.split import FewShotDataset
from metarun.device import input_dtype
from metarun.errors import ConfigError
from metarun.models.freeze import FeatureInput, is_fixed
from metarun.models.pretrained import IMAGENET_SUBSETS
from metarun.progress import console

#: dataset keys that belong to the episode engine, not to the loader
ENGINE_KEYS = ("augment", "on_device")


def build_dataset(cfg: DictConfig) -> FewShotDataset:
    """The dataset of a ``dataset`` node; a loader that takes ``build_dataset`` (``dataset=multi``) gets this function
    to build its sources with, so the data modules never import the factory."""
    node = OmegaConf.to_container(cfg, resolve=True)
    for key in ENGINE_KEYS:
        node.pop(key, None)
    extra = {"build_dataset": build_dataset} if "build_dataset" in _init_params(node) else {}
    return instantiate(node, _convert_="all", **extra)


def data_device(dataset: FewShotDataset, device: torch.device, on_device: str) -> torch.device:
    """Where the uint8 splits live: the run's device unless they would not fit (``on_device=auto``)."""
    on_device = str(on_device).lower()
    if on_device not in ("auto", "true", "false"):  # checked first, so a typo fails on a CPU-only machine too
        raise ConfigError(f"dataset.on_device={on_device}: valid values are auto, true, false")
    if on_device == "true" or device.type == "cpu":
        return device
    if on_device == "false":
        return torch.device("cpu")
    if device.type == "cuda":
        parts = dataset.sources.values() if isinstance(dataset, MultiSourceDataset) else [dataset]
        need = sum(s.images.numel() for d in parts for s in d.splits.values())
        free, _ = torch.cuda.mem_get_info(device)
        return device if need < 0.5 * free else torch.device("cpu")
    return device


def build_sampler(
    dataset: FewShotDataset,
    split: str,
    *,
    ways: int,
    shots: int,
    queries: int,
    seed: int,
    device: torch.device,
    augment: bool = False,
    channels_last: bool = False,
    data_device: torch.device | None = None,
    fused: bool = False,
    precision: str = "fp32",
    protocol: str = "fixed",
) -> EpisodeSampler:
    """Episodes for a run on ``device``, sampled where the split lives (``data_device``, default ``device``), with
    images in the dtype the run's ``precision`` (autocast) computes its first layer in. ``protocol``: ``fixed``
    (``ways``, ``shots``, ``queries``) or ``metadataset`` (:class:`~metarun.data.metadataset.MetaDatasetSampler`,
    which ignores them)."""
    if isinstance(dataset, FeatureDataset):  # a fixed backbone's features, computed once in this precision
        return FeatureSampler(
            lambda: dataset.features(split, precision), dataset.splits[split], ways, shots, queries, seed=seed,
            device=device, split_name=split,
        )  # fmt: skip
    if isinstance(dataset, MultiSourceDataset):  # one engine sampler per source, each with this run's options
        engine = dict(augment=augment, channels_last=channels_last, data_device=data_device, fused=fused, precision=precision)
        return dataset.sampler(
            split, ways=ways, shots=shots, queries=queries, seed=seed, device=device, build_sampler=build_sampler, **engine
        )
    if hasattr(dataset, "sampler"):  # datasets that generate their tasks (e.g. regression toys)
        if protocol != "fixed":
            raise ConfigError(f"task.protocol={protocol} draws classes from a split: dataset={dataset.name} generates its tasks")
        return dataset.sampler(split, ways=ways, shots=shots, queries=queries, seed=seed, device=device)
    transform = None
    if augment:
        from metarun.data.augment import augment_batch

        transform = augment_batch
    options = dict(
        seed=seed,
        device=device if data_device is None else data_device,
        split_name=split,
        transform=transform,
        channels_last=channels_last,
        output_device=device,
        fused=fused,
        dtype=input_dtype(precision),
    )
    if protocol == "metadataset":
        return MetaDatasetSampler(dataset.splits[split], dataset.mean, dataset.std, **options)
    if protocol != "fixed":
        raise ConfigError(f"task.protocol={protocol}: valid protocols are {', '.join(PROTOCOLS)}")
    return EpisodeSampler(dataset.splits[split], ways, shots, queries, dataset.mean, dataset.std, **options)


def frozen_features_reason(
    cfg: DictConfig, dataset: FewShotDataset, algorithm: Algorithm, *, eval_protocol: str = "episodes"
) -> str | None:
    """Why episodes of this run cannot be drawn from features computed once (:mod:`metarun.data.features`);
    None when they can: a fixed backbone (:func:`~metarun.models.freeze.is_fixed`) that the algorithm only asks
    for each image's features, on unaugmented images of one dataset in fixed-size episodes."""
    name = cfg.algo._target_.rsplit(".", 1)[-1].lower()
    if not algorithm.reads_backbone_features:
        return f"algo={name} adapts its backbone or looks inside it"
    if not is_fixed(algorithm.backbone):
        return "the backbone trains (backbone.freeze=all, or algo.freeze_backbone=true where the algorithm has it, fixes it)"
    if cfg.dataset.get("augment", False):
        return "dataset.augment=true changes the images every episode"
    if cfg.task.get("protocol", "fixed") != "fixed":
        return f"task.protocol={cfg.task.protocol} episodes are padded images"
    if isinstance(dataset, MultiSourceDataset) or hasattr(dataset, "sampler"):
        return f"dataset={dataset.name} is not one split of images"
    if eval_protocol != "episodes":
        return f"eval.protocol={eval_protocol} reads image files"
    return None


def with_frozen_features(
    cfg: DictConfig, dataset: FewShotDataset, algorithm: Algorithm, device: torch.device, *, eval_protocol: str = "episodes"
) -> FewShotDataset:
    """``trainer.frozen_features`` (``auto``: wherever :func:`frozen_features_reason` allows; ``true``: refused
    with the reason where it does not): the dataset to sample from, with ``algorithm``'s backbone replaced in place
    by its :class:`~metarun.models.freeze.FeatureInput` when episodes are drawn from features."""
    wanted = str(cfg.get("trainer", {}).get("frozen_features", "auto")).lower()
    if wanted == "false" or isinstance(dataset, FeatureDataset):
        return dataset
    reason = frozen_features_reason(cfg, dataset, algorithm, eval_protocol=eval_protocol)
    if reason is not None:
        if wanted == "true":
            raise ConfigError(f"trainer.frozen_features=true: {reason}; set trainer.frozen_features=auto or false")
        return dataset
    backbone = algorithm.backbone
    algorithm.backbone = FeatureInput(backbone)
    return FeatureDataset(dataset, backbone, device)


def input_shape(dataset: FewShotDataset) -> tuple[int, ...]:
    return tuple(dataset.image_shape)


def build_algorithm(cfg: DictConfig, dataset: FewShotDataset, pretrained_weights: bool = True) -> Algorithm:
    """The run's algorithm around its backbone. ``pretrained_weights=False`` skips reading a pre-trained
    backbone's weight file, for a model whose checkpoint is loaded next."""
    backbone = instantiate(
        cfg.backbone, in_shape=input_shape(dataset), _convert_="all", **backbone_extras(cfg, dataset, pretrained_weights)
    )
    extra: dict[str, Any] = {}
    params = _init_params(cfg.algo)
    if isinstance(dataset, MultiSourceDataset) and "num_train_classes" in params:
        extra["num_train_classes"] = dataset.num_train_classes
    elif hasattr(dataset, "splits") and "num_train_classes" in params:
        extra["num_train_classes"] = dataset.splits["train"].num_classes
    if "task_kind" in params:  # classification | regression: the algorithm picks its loss, head and score from it
        extra["task_kind"] = getattr(dataset, "task_kind", "classification")
    algorithm = instantiate(cfg.algo, backbone=backbone, ways=cfg.task.ways, _convert_="all", **extra)
    steps = cfg.get("trainer", {}).get("steps", 0)
    if steps and not any(p.requires_grad for p in algorithm.parameters()):
        raise ConfigError(
            f"backbone.freeze=all leaves algo={cfg.algo._target_.rsplit('.', 1)[-1].lower()} nothing to train: set "
            "trainer.steps=0 to evaluate the frozen backbone as it is, or backbone.freeze=bn or none"
        )
    return algorithm


def backbone_extras(cfg: DictConfig, dataset: FewShotDataset, pretrained_weights: bool) -> dict[str, Any]:
    """What a pre-trained backbone takes besides its config: the statistics the episode engine normalises
    images with (its input adapter maps them to its weights' own) and whether to read its weight file."""
    params = _init_params(cfg.backbone)
    extra: dict[str, Any] = {}
    if "data_stats" in params and getattr(dataset, "mean", None) is not None:
        extra["data_stats"] = (tuple(dataset.mean), tuple(dataset.std))
    if "load_weights" in params:
        extra["load_weights"] = pretrained_weights
        if pretrained_weights and cfg.backbone.get("weights") == "imagenet" and cfg.dataset.get("_target_") in IMAGENET_SUBSETS:
            console.print(
                "note: every class of this dataset is an ImageNet-1k class, so ImageNet weights have seen its test "
                "classes: scores are not comparable with those of backbones trained on its training split alone",
                soft_wrap=True,
                markup=False,
                highlight=False,
            )
    return extra


def _init_params(node) -> set[str]:
    """The keyword parameters of a node's ``_target_``: a function's, or a class's ``__init__`` (with its bases')."""
    import inspect

    from hydra._internal.utils import _locate

    target = _locate(node["_target_"])
    if not isinstance(target, type):
        params = inspect.signature(target).parameters
        return {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    names: set[str] = set()
    for cls in target.__mro__:  # a subclass taking **kwargs passes them on to its base
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters
        names |= {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return names


def build_optimizer(algorithm: Algorithm, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # a frozen backbone under ProtoNet trains nothing: an empty group lets a run of trainer.steps=0 evaluate it
    params = [p for p in algorithm.parameters() if p.requires_grad] or [{"params": []}]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"trainer.optimizer={name}: valid optimizers are adam, sgd")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    steps = max(steps, 1)
    factors = {
        "constant": lambda s: 1.0,
        "cosine": lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
        "linear": lambda s: max(1.0 - s / steps, 0.0),
        "step": lambda s: 0.5 ** (4 * s // steps),
    }
    if name not in factors:
        raise ConfigError(f"trainer.schedule={name}: valid schedules are {', '.join(factors)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors[name])

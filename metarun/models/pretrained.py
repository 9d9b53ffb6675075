"""Backbones with published weights: where the weights come from, and what every such backbone shares.

``backbone.weights`` takes three kinds of value:

* ``none`` - random initialisation, as the reference code initialises;
* ``imagenet`` - the publisher's file (:data:`URLS`), downloaded once into torch's hub cache
  (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``) with
  ``torch.hub.load_state_dict_from_url``: a progress bar, and the SHA-256 prefix that the file
  name carries (``resnet18-f37072fd.pth``) checked. A cached file is checked against the same
  prefix before it is loaded; one that does not match is renamed ``*.corrupt`` and nothing is loaded;
* a path to a ``.pth``/``.pt`` file: a state dict, or a checkpoint dict holding one under
  ``state_dict`` or ``model`` (a metarun checkpoint's ``backbone.`` and DataParallel's ``module.``
  prefixes are removed).

Every file loads with ``strict=True`` once its classifier head is dropped (:attr:`PretrainedBackbone.head_prefixes`),
so a file of another network fails with the names that differ instead of loading half-way.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import sys
import urllib.error
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from metarun.errors import ConfigError, DataError
from metarun.models.freeze import FREEZE_MODES, apply_freeze
from metarun.models.inputs import IMAGENET_MEAN, IMAGENET_STD, InputAdapter

#: The publisher's file for each architecture (``backbone.weights=imagenet``). torchvision's are its
#: IMAGENET1K_V1 weights; the name's ``-<hex>`` part is the start of the file's SHA-256. DINO's release
#: (the teacher backbone of ViT-S/16, self-supervised on ImageNet-1k) publishes no hash, so its file is
#: only checked by loading it strictly. Tests point these at a server on 127.0.0.1.
URLS: dict[str, str] = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vit_s16": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
}

#: torch.hub's rule for the hash in a file name (``name-<hex>.ext``)
HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")

#: dataset loaders whose classes are all ImageNet-1k classes: ImageNet weights have seen their test classes
IMAGENET_SUBSETS = ("metarun.data.miniimagenet.load", "metarun.data.tieredimagenet.load")

NORMALIZE = ("auto", "imagenet", "dataset")


def cache_dir() -> Path:
    """Where ``torch.hub`` keeps downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def file_name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def set_aside(path: Path) -> Path:
    """Renames a bad file ``*.corrupt`` (replacing an earlier one), so the next run downloads afresh."""
    aside = path.with_name(path.name + ".corrupt")
    path.replace(aside)
    return aside


def fetch_published(arch: str, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """The publisher's state dict for ``arch``: from the hub cache, downloaded there first if missing
    (with torch.hub's progress bar, by default where stderr is a terminal)."""
    progress = sys.stderr.isatty() if progress is None else progress
    url = URLS[arch]
    name = file_name(url)
    path = cache_dir() / name
    match = HASH_IN_NAME.search(name)
    if path.exists() and match and not sha256(path).startswith(match.group(1)):
        aside = set_aside(path)
        raise DataError(
            f"{path} does not match its published hash ({match.group(1)}...): nothing loaded, the file moved to "
            f"{aside.name}; run again to download it afresh"
        )
    try:
        state = torch.hub.load_state_dict_from_url(
            url, model_dir=str(cache_dir()), map_location="cpu", progress=progress, check_hash=True, file_name=name,
            weights_only=True,
        )  # fmt: skip
    except RuntimeError as e:
        if "invalid hash value" in str(e):  # torch.hub deleted the download; nothing reached the cache
            raise DataError(f"the download of {url} does not match its published hash: nothing loaded ({e})") from None
        raise corrupt(path, e) from None
    except (urllib.error.URLError, OSError) as e:
        if path.exists():  # downloaded, then unreadable
            raise corrupt(path, e) from None
        reason = getattr(e, "reason", None) or e
        raise DataError(
            f"could not download {name} from {url} ({reason}); offline, put that file at {path} "
            "(the torch hub cache: $TORCH_HOME/hub/checkpoints)"
        ) from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as e:
        raise corrupt(path, e) from None
    return state


def corrupt(path: Path, error: Exception) -> DataError:
    if not path.exists():
        return DataError(f"could not read {path}: {error}")
    aside = set_aside(path)
    return DataError(f"{path} is not a readable weight file ({type(error).__name__}): nothing loaded, moved to {aside.name}")


def read_local(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth``/``.pt`` file: the file's own, or the one a checkpoint dict holds."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"backbone.weights={path}: no such file (give none, imagenet or a .pth/.pt file)")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle of anything but tensors and containers, or not a torch file at all
        raise DataError(f"backbone.weights={path}: not a readable state dict ({type(e).__name__}: {str(e)[:120]})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"backbone.weights={path}: holds no state dict (a dict of tensors, or one under state_dict/model)")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):  # a metarun checkpoint: its algorithm's backbone
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state


class PretrainedBackbone(nn.Module):
    """What the four pre-trained backbones share: the input adapter, weights and freezing.

    A subclass builds its layers in :meth:`build` under the publisher's parameter names and sets
    ``out_features``; ``forward`` runs :attr:`inputs` (resize, grey to RGB, normalisation; see
    :class:`~metarun.models.inputs.InputAdapter`) and then :meth:`embed`.

    ``data_stats`` is the dataset's ``(mean, std)``, passed by the factory: the episode engine
    normalises images with them, and the adapter maps that to ImageNet's normalisation when the
    weights expect it (``normalize``: ``auto`` is ImageNet's with ``weights=imagenet``, the dataset's
    otherwise). Without it, inputs are taken as images in [0, 1]. ``load_weights=False`` builds
    the network without reading any file (a checkpoint's weights are about to replace them).
    """

    #: key of :data:`URLS`; also the name in messages
    arch: str = ""
    #: keys of the published file that belong to its classifier head (dropped: the algorithms bring their own)
    head_prefixes: tuple[str, ...] = ()
    #: image sizes must be a multiple of this (ViT's 16-pixel patches)
    size_multiple: int = 1
    min_image_size: int = 16
    #: not a plain sequence of layers: MAML-style learners use their vmap or loop strategies
    sequential = False

    def __init__(
        self,
        in_shape: tuple[int, ...],
        image_size: int = 224,
        weights: str = "none",
        freeze: str = "none",
        normalize: str = "auto",
        data_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        if len(in_shape) != 3 or in_shape[0] not in (1, 3):
            raise ConfigError(f"backbone={self.arch} takes 1- or 3-channel images; the dataset's are {tuple(in_shape)}")
        if image_size < self.min_image_size or image_size % self.size_multiple:
            need = f"a multiple of {self.size_multiple}, " if self.size_multiple > 1 else ""
            raise ConfigError(f"backbone.image_size={image_size}: {self.arch} needs {need}at least {self.min_image_size}")
        if freeze not in FREEZE_MODES:
            raise ConfigError(f"backbone.freeze={freeze}: valid values are {', '.join(FREEZE_MODES)}")
        if normalize not in NORMALIZE:
            raise ConfigError(f"backbone.normalize={normalize}: valid values are {', '.join(NORMALIZE)}")
        self.weights, self.image_size = str(weights), image_size
        imagenet = normalize == "imagenet" or (normalize == "auto" and self.weights == "imagenet")
        data_mean, data_std = data_stats if data_stats is not None else ((0.0,) * in_shape[0], (1.0,) * in_shape[0])
        target = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else None
        self.inputs = InputAdapter(in_shape[0], image_size, data_mean, data_std, target)
        self.build()
        if load_weights and self.weights != "none":
            self.load_published(fetch_published(self.arch) if self.weights == "imagenet" else read_local(self.weights))
        apply_freeze(self, freeze, self.arch)

    def build(self) -> None:
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.inputs(x))

    def load_published(self, state: Mapping[str, torch.Tensor]) -> None:
        """Loads a state dict in the publisher's names, ``strict=True`` once the classifier head is dropped."""
        state = {k: v for k, v in state.items() if not k.startswith(self.head_prefixes)}
        own = self.state_dict()
        # torchvision's older files predate batch norm's counter; batch norm fills it in itself
        missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or shapes:
            parts = [
                f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes))
                if keys
            ]
            raise DataError(f"backbone.weights={self.weights} is not a {self.arch} state dict ({'; '.join(parts)})")
        self.load_state_dict(state, strict=True)

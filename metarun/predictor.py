"""Few-shot prediction on your own images: a trained run, adapted to a labelled support set, labels query images.

``metarun.load(RUN)`` rebuilds a run's model from its checkpoint alone (no dataset is read);
:meth:`Predictor.fit` takes the support images and their labels, :meth:`Predictor.predict` returns every
query image's class probabilities. Adaptation is the run's own evaluation: one
:class:`~metarun.data.episodes.Episode` of the support set and the queries through the algorithm's
:meth:`~metarun.algorithms.base.Algorithm.predict_logits`, with the run's ``eval.bn_mode``, precision and
memory layout, so a query is labelled here as ``metarun eval`` scores it.

Images are prepared as the checkpoint's dataset was: a file or a PIL image is turned upright by its EXIF
orientation, converted to the model's channels and resized as a whole with Lanczos filtering
(:func:`metarun.data.images.decode_image`, the datasets' own decoder); a tensor (uint8, or float in [0, 1])
is converted by :func:`metarun.data.cross_domain.convert_images`. All are then normalised with the
checkpoint's mean and std exactly as the episode engine normalises its images.

Queries are labelled independently of each other (``query_batch`` at a time, the support set in front of
each batch) unless the bn_mode is ``transductive``: batch norm then normalises with the statistics of all
the queries together, as evaluation does, and a query's probabilities depend on the other queries.

``metarun predict checkpoint=RUN support=DIR query=DIR_OR_FILE`` (:func:`main`) does the same for folders
and writes ``predictions.csv``.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from rich.console import Console
from rich.table import Table

from metarun.algorithms.base import Algorithm
from metarun.data.cross_domain import convert_images
from metarun.data.episodes import MIN_STD, Episode
from metarun.data.images import MODES, decode_image, image_extensions
from metarun.device import autocast, input_dtype
from metarun.errors import ConfigError, DataError

#: queries labelled per call when they are independent (not transductive): bounds the activations' memory
QUERY_BATCH = 64


class Predictor:
    """A trained few-shot learner: :meth:`fit` a support set, then :meth:`predict` query images.

    Images (support and query) are file paths, PIL images, or tensors ``[C, H, W]``/``[H, W]`` (uint8, or
    float in [0, 1]); a ``[N, C, H, W]`` tensor is N images.
    """

    def __init__(
        self,
        algorithm: Algorithm,
        *,
        input_shape: tuple[int, int, int],
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        bn_mode: str,
        precision: str = "fp32",
        channels_last: bool = False,
        name: str = "",
        checkpoint: Path | None = None,
    ) -> None:
        self.algorithm = algorithm.eval()
        self.input_shape = tuple(input_shape)
        self.device, self.bn_mode, self.precision, self.channels_last = device, bn_mode, precision, channels_last
        self.name, self.checkpoint = name or type(algorithm).__name__, checkpoint
        input_dtype(precision)  # an unknown precision fails here, not at the first prediction
        c = self.input_shape[0]
        # the episode engine's arithmetic (EpisodeSampler): bytes * scale + shift in float32, stored in the input dtype
        m = torch.tensor(tuple(mean), dtype=torch.float32, device=device).view(c, 1, 1)
        inv_std = 1.0 / torch.tensor(tuple(std), dtype=torch.float32, device=device).clamp_min(MIN_STD).view(c, 1, 1)
        self.scale, self.shift = inv_std / 255.0, -m * inv_std
        self.classes: list = []
        self.support: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def transductive(self) -> bool:
        """Whether a query's probabilities depend on the other queries (batch norm with the query set's statistics)."""
        return self.bn_mode == "transductive"

    # -- images ---------------------------------------------------------------------------
    def pixels(self, image: Any) -> torch.Tensor:
        """One image as uint8 ``[C, H, W]`` in the model's input shape (see the module docstring)."""
        c, h, w = self.input_shape
        if isinstance(image, (str, os.PathLike, bytes)):
            if h != w:
                raise ConfigError(f"the model takes {h}x{w} images; files are decoded to square ones only: pass tensors")
            return decode_image(image, h, c)
        if isinstance(image, Image.Image):
            image = ImageOps.exif_transpose(image).convert(MODES[c])
            if image.size != (w, h):
                image = image.resize((w, h), Image.Resampling.LANCZOS)
            x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, -1)
            return x.permute(2, 0, 1).contiguous()
        if isinstance(image, torch.Tensor):
            x = image.detach().cpu()
            if x.dim() == 2:
                x = x[None]
            if x.dim() != 3 or x.shape[0] not in (1, 3):
                raise ConfigError(
                    f"an image tensor of shape {tuple(image.shape)}: give [C, H, W] with 1 or 3 channels, or [H, W]"
                )
            if x.is_floating_point():
                low, high = float(x.min()), float(x.max())
                if low < 0 or high > 1:
                    raise ConfigError(
                        f"a float image spans [{low:.3g}, {high:.3g}], not [0, 1]: pass unnormalised images (the model "
                        "normalises them with its run's statistics)"
                    )
                x = (x * 255).round().to(torch.uint8)
            elif x.dtype != torch.uint8:
                raise ConfigError(f"an image tensor of dtype {x.dtype}: give uint8, or float in [0, 1]")
            return convert_images(x, self.input_shape)
        raise ConfigError(f"an image of type {type(image).__name__}: give file paths, PIL images or tensors")

    def inputs(self, images: Any) -> torch.Tensor:
        """Images as the model's normalised input ``[n, C, H, W]`` on its device, in its input dtype and layout."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        elif isinstance(images, (str, os.PathLike, bytes, Image.Image, torch.Tensor)):
            images = [images]
        pixels = [self.pixels(image) for image in images]
        if not pixels:
            return torch.empty(0, *self.input_shape, device=self.device, dtype=input_dtype(self.precision))
        x = (torch.stack(pixels).to(self.device).float() * self.scale + self.shift).to(input_dtype(self.precision))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # -- adaptation and prediction ----------------------------------------------------------------
    def fit(self, images: Any, labels: Sequence) -> Predictor:
        """The support set: ``images`` with their ``labels`` (any hashable values; :attr:`classes` holds them sorted
        where they sort, else in order of first appearance). Returns the predictor."""
        x = self.inputs(images)
        labels = list(labels)
        if len(labels) != len(x):
            raise ConfigError(f"{len(x)} support images but {len(labels)} labels: give one label per image")
        classes = _sorted_or_as_given(labels)
        check_ways(self.algorithm, self.name, len(classes))
        y = torch.tensor([classes.index(label) for label in labels], dtype=torch.long)
        order = torch.argsort(y, stable=True)  # class by class, as the episode engine lays out a support set
        x = x[order.to(x.device)]
        if self.channels_last:  # indexing gives a contiguous tensor back; evaluation's convolutions ran NHWC
            x = x.contiguous(memory_format=torch.channels_last)
        self.classes, self.support = classes, (x, y[order].to(self.device))
        return self

    def predict_logits(self, images: Any, *, query_batch: int = QUERY_BATCH) -> torch.Tensor:
        """Each query's class scores ``[n, classes]`` (float32, on the CPU), columns in :attr:`classes` order."""
        if self.support is None:
            raise ConfigError("fit(support_images, support_labels) first: the model has no support set to adapt to")
        sx, sy = self.support
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        elif isinstance(images, (str, os.PathLike, bytes, Image.Image, torch.Tensor)):
            images = [images]
        images = list(images)
        step = max(len(images), 1) if self.transductive else query_batch
        out = [torch.empty(0, len(self.classes))]
        for start in range(0, len(images), step):
            q = self.inputs(images[start : start + step])
            zeros = torch.zeros(1, len(q), dtype=torch.long, device=self.device)  # unused: predictions have no labels
            episode = Episode(sx[None], sy[None], q[None], zeros, len(self.classes))
            with autocast(self.device, self.precision):
                logits = self.algorithm.predict_logits(episode, self.bn_mode)
            out.append(logits[0].detach().float().cpu())
        return torch.cat(out)

    def predict(self, images: Any, *, query_batch: int = QUERY_BATCH) -> torch.Tensor:
        """Each query's class probabilities ``[n, classes]`` (float32, on the CPU; rows sum to 1), columns in
        :attr:`classes` order."""
        return self.predict_logits(images, query_batch=query_batch).softmax(-1)


def _sorted_or_as_given(labels: list) -> list:
    unique = list(dict.fromkeys(labels))
    try:
        return sorted(unique)
    except TypeError:  # labels of mixed types
        return unique


def any_ways_algorithms() -> list[str]:
    """The ``algo`` options whose model takes any number of classes."""
    from hydra.utils import get_class

    from metarun.config import algorithm_schemas

    return sorted(name for name, schema in algorithm_schemas().items() if not get_class(schema._target_).fixed_ways)


def check_ways(algorithm: Algorithm, name: str, classes: int) -> None:
    """A support set of ``classes`` classes the model can be adapted to, or one line saying why not."""
    if classes < 2:
        raise ConfigError(f"the support set has {classes} class{'es' * (classes != 1)}: few-shot prediction needs at least 2")
    if algorithm.fixed_ways and classes != algorithm.ways:
        raise ConfigError(
            f"the support set has {classes} classes, but {name}'s head was meta-trained with {algorithm.ways} outputs: "
            f"it labels {algorithm.ways}-way tasks only; give {algorithm.ways} classes, or use a run of an algorithm "
            f"that takes any number ({', '.join(any_ways_algorithms())})"
        )
    most = getattr(algorithm, "max_ways", None)
    if most is not None and classes > most:
        raise ConfigError(f"the support set has {classes} classes, but {name} was trained for at most {most} (algo.max_ways)")


def load(
    checkpoint: str | os.PathLike, device: str = "auto", *, bn_mode: str | None = None, precision: str | None = None
) -> Predictor:
    """The model of a run folder (its best checkpoint) or a ``.pt`` file, ready to :meth:`~Predictor.fit`.

    ``bn_mode`` and ``precision`` as ``eval.bn_mode`` and ``eval.precision`` (default: the run's evaluation's)."""
    from omegaconf import OmegaConf

    from metarun.checkpoint import load_checkpoint, load_model_state
    from metarun.device import resolve_device
    from metarun.evaluation import eval_precision, resolve_bn_mode, trained_shape
    from metarun.factory import build_algorithm, build_dataset

    ckpt = load_checkpoint(checkpoint)
    cfg = OmegaConf.create(ckpt["config"])
    shape = tuple(ckpt.get("input_shape") or ())
    if "input_shape" in ckpt and len(shape) != 3:
        raise ConfigError(f"{ckpt['path']} is a model of inputs of shape {shape}, not images: metarun predict labels images")
    data = trained_shape(cfg, ckpt, build_dataset)
    target = torch.device(resolve_device(device) if isinstance(device, str) else device)
    algorithm = build_algorithm(cfg, data, pretrained_weights=False)
    load_model_state(algorithm, ckpt["model"], ckpt["path"])
    if algorithm.score != "accuracy":
        raise ConfigError(f"{ckpt['path']} is a regression model: metarun predict labels images with classes")
    channels_last = bool(cfg.get("trainer", {}).get("channels_last", False))
    algorithm = algorithm.to(target)
    if channels_last:
        algorithm = algorithm.to(memory_format=torch.channels_last)
    eval_cfg = cfg.get("eval") or OmegaConf.create({})
    return Predictor(
        algorithm,
        input_shape=data.image_shape,
        mean=data.mean,
        std=data.std,
        device=target,
        bn_mode=resolve_bn_mode(algorithm, bn_mode or eval_cfg.get("bn_mode")),
        precision=precision or eval_precision(eval_cfg, cfg.get("trainer")),
        channels_last=channels_last,
        name=cfg.algo._target_.rsplit(".", 1)[-1],
        checkpoint=ckpt["path"],
    )


# -- metarun predict ---------------------------------------------------------------------------
KEYS = {
    "checkpoint": "a run folder (its best checkpoint) or a .pt file",
    "support": "DIR/<class>/<images>: a few labelled images per class",
    "query": "an image file or a folder of them (searched recursively); repeat query= for more",
    "out": "the output folder (default outputs/predict/<date>_<time>)",
    "device": "auto, cpu, cuda or mps (default auto)",
    "eval.bn_mode": "transductive, support or running (default: the run's)",
    "eval.precision": "fp32, bf16 or fp16 (default: the run's)",
}


@dataclass
class Request:
    checkpoint: str
    support: Path
    queries: list[Path]
    out: Path | None = None
    device: str = "auto"
    bn_mode: str | None = None
    precision: str | None = None


def parse(argv: Sequence[str]) -> Request:
    keys = "\n".join(f"  {k:<16}{v}" for k, v in KEYS.items())
    parser = argparse.ArgumentParser(
        prog="metarun predict",
        description="Adapts a trained run to a labelled support set, as its evaluation does, and labels query images: "
        "a table on the terminal and predictions.csv (file, predicted class, one probability column per class).",
        epilog=f"keys:\n{keys}\n\nexample: metarun predict checkpoint=outputs/2026-11-23/10-00-00 support=photos/support query=photos/new",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(list(argv))
    values: dict[str, Any] = {"query": []}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise ConfigError(f"cannot read '{item}': write key=value, e.g. query=photos/new (see metarun predict --help)")
        if key not in KEYS:
            raise ConfigError(f"unknown key '{key}': valid keys are {', '.join(KEYS)}")
        if key == "query":
            values["query"].append(Path(value).expanduser())
        elif key in values:
            raise ConfigError(f"{key}= is given twice: give it once")
        else:
            values[key] = value
    missing = [k for k in ("checkpoint", "support") if k not in values] + (["query"] if not values["query"] else [])
    if missing:
        raise ConfigError(f"metarun predict needs {', '.join(f'{k}=' for k in missing)} (see metarun predict --help)")
    return Request(
        values["checkpoint"],
        Path(values["support"]).expanduser(),
        values["query"],
        Path(values["out"]).expanduser() if "out" in values else None,
        values.get("device", "auto"),
        values.get("eval.bn_mode"),
        values.get("eval.precision"),
    )


def _visible_images(folder: Path) -> list[Path]:
    """Image files (by suffix) under ``folder``, recursively, hidden ones left out, sorted."""
    extensions = image_extensions()
    found = []
    for parent, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(parent) / n for n in names if not n.startswith(".") and Path(n).suffix.lower() in extensions]
    return sorted(found)


def read_images(
    predictor: Predictor, files: Sequence[Path], console: Console, what: str
) -> tuple[list[Path], list[torch.Tensor]]:
    """The files that decode, with their pixels; each one that does not is a warning and is skipped."""
    from metarun.progress import progress_bar

    kept, pixels = [], []
    with progress_bar(total=len(files), description=f"reading {what}", transient=True) as advance:
        for f in files:
            try:
                pixels.append(predictor.pixels(f))
                kept.append(f)
            except DataError as ex:
                console.print(f"warning: {ex}; skipped", markup=False, highlight=False, soft_wrap=True)
            advance(1)
    return kept, pixels


def read_support(predictor: Predictor, folder: Path, console: Console) -> tuple[list[torch.Tensor], list[str]]:
    """``folder/<class>/<images>`` as pixels and class names; a class with no readable image is an error."""
    if not folder.is_dir():
        raise DataError(f"support={folder} is not a folder: give a folder holding one sub-folder of images per class")
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        console.print(
            f"warning: {len(loose)} file(s) directly in {folder} belong to no class and are ignored: put them in {folder}/<class>/",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
    if len(class_dirs) < 2:
        found = f" ({class_dirs[0].name})" if class_dirs else ""
        raise ConfigError(
            f"support={folder} has {len(class_dirs)} class folder{'s' * (len(class_dirs) != 1)}{found}: few-shot prediction "
            f"needs at least 2, as {folder}/<class>/<images>"
        )
    check_ways(predictor.algorithm, predictor.name, len(class_dirs))
    images, labels = [], []
    for d in class_dirs:
        _, pixels = read_images(predictor, _visible_images(d), console, f"support images of {d.name}")
        if not pixels:
            raise DataError(f"class folder {d} holds no readable image (e.g. .jpg, .png): add some or remove the folder")
        images += pixels
        labels += [d.name] * len(pixels)
    return images, labels


def read_queries(predictor: Predictor, paths: Sequence[Path], console: Console) -> tuple[list[Path], list[torch.Tensor]]:
    """Every query file (a folder: its image files, recursively) that decodes; none left is an error."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = _visible_images(p)
            if not found:
                raise DataError(f"query={p} holds no image files (e.g. .jpg, .png)")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"query={p} does not exist: give an image file or a folder of them")
    files = list(dict.fromkeys(files))
    kept, pixels = read_images(predictor, files, console, "query images")
    if not kept:
        raise DataError(f"none of the {len(files)} query file{'s' * (len(files) != 1)} is a readable image: give image files")
    return kept, pixels


def predictions_csv(files: Sequence[Path], classes: Sequence[str], probabilities: torch.Tensor) -> str:
    """``file,predicted,<class>,...``: one row per query, one probability column per class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "predicted", *classes])
    for f, p in zip(files, probabilities.tolist(), strict=True):
        writer.writerow([str(f), classes[max(range(len(p)), key=p.__getitem__)], *(f"{v:.6f}" for v in p)])
    return buffer.getvalue()


def write_atomically(path: Path, text: str) -> None:
    """``path`` holds the whole text or is untouched: written beside it, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def default_out() -> Path:
    return Path("outputs") / "predict" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def run(request: Request, console: Console | None = None) -> Path:
    """``metarun predict``: the predictions table and ``predictions.csv``; returns the CSV's path."""
    console = console or Console()
    notes = Console(stderr=True)
    predictor = load(request.checkpoint, request.device, bn_mode=request.bn_mode, precision=request.precision)
    images, labels = read_support(predictor, request.support, notes)
    files, queries = read_queries(predictor, request.queries, notes)
    predictor.fit(images, labels)
    probabilities = predictor.predict(queries)
    say = dict(markup=False, highlight=False, soft_wrap=True)
    console.print(
        f"{predictor.checkpoint}: {predictor.name} adapted to {len(images)} support images of {len(predictor.classes)} "
        f"classes ({predictor.bn_mode} batch norm{'' if predictor.precision == 'fp32' else ', ' + predictor.precision})",
        **say,
    )
    if predictor.transductive:
        console.print(
            f"note: eval.bn_mode=transductive normalises with the statistics of all {len(files)} queries together, so each "
            "prediction depends on the other queries (eval.bn_mode=support or running labels each image on its own)",
            **say,
        )
    table = Table(title="predictions")
    table.add_column("file", overflow="fold")  # a path is wrapped, never cut: it is what the user looks for
    table.add_column("predicted class", overflow="fold")
    table.add_column("probability", justify="right")
    best, index = probabilities.max(-1)
    for f, p, i in zip(files, best.tolist(), index.tolist(), strict=True):
        table.add_row(str(f), predictor.classes[i], f"{p:.3f}")
    console.print(table)
    path = (request.out or default_out()) / "predictions.csv"
    write_atomically(path, predictions_csv(files, predictor.classes, probabilities))
    console.print(f"written: {path}", **say)
    return path


def main(argv: Sequence[str]) -> int:
    run(parse(argv))
    return 0

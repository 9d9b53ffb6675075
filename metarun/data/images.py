"""Turning image files and image arrays into splits, shared by the dataset loaders.

Decoding is the slow part of preparing a dataset (minutes for mini-ImageNet),
so files are decoded on a thread pool (Pillow releases the GIL while it
decodes and resizes) straight into their slot of the final tensor: peak memory
is the dataset itself, not the dataset plus a list of per-image arrays.
Datasets shipped as big arrays (pickles, npz, the CIFAR batches) are read in
row chunks and scattered into ``[classes, n, C, H, W]`` in one pass, for the
same reason: tieredImageNet's train split alone is about 10 GB.

Every image is resized to ``size x size`` as a whole (no crop), with Lanczos
filtering: this is how the standard mini-ImageNet release was made from
ImageNet, keeps an object that is off-centre in view, and distorts the aspect
ratio of train and test images alike.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from metarun.data.split import FewShotDataset, Split
from metarun.errors import ConfigError, DataError

ImageSource = str | os.PathLike | bytes
Box = tuple[int, int, int, int]  # left, upper, right, lower, in the file's pixels (Pillow's crop box)

MODES = {1: "L", 3: "RGB"}
ROW_CHUNK_BYTES = 64 << 20  # rows read or scattered at once: bounded extra memory, few Python steps
# Formats Pillow identifies but cannot decode without extra software or a registered handler.
_UNDECODABLE_FORMATS = {"BUFR", "GRIB", "HDF5", "MPEG", "WMF", "EPS"}


def image_extensions() -> frozenset[str]:
    """Lower-case suffixes (with the dot) of the formats this Pillow can decode."""
    Image.init()
    return frozenset(
        ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and fmt not in _UNDECODABLE_FORMATS
    )


def _decode_one(source: ImageSource, name: str, size: int, mode: str, box: Box | None = None) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if box is None:
                image.draft(mode, (size, size))  # JPEG decodes at 1/2, 1/4 or 1/8 scale when that still covers the size
            else:
                image = _crop(image, box, size, mode)
            ImageOps.exif_transpose(image, in_place=True)  # photos from phones store their rotation in EXIF
            image = image.convert(mode)
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.LANCZOS)
            pixels = np.asarray(image, dtype=np.uint8)
    except Exception as e:  # whatever a plugin raises, the user's remedy is the same: fix or remove the file
        raise DataError(f"cannot read image {name} ({_reason(e)}): replace or remove it") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _crop(image: Image.Image, box: Box, size: int, mode: str) -> Image.Image:
    """``image`` cut to ``box`` (left, upper, right, lower in the file's pixels), drafted at the coarsest JPEG
    scale at which the box still covers ``size``."""
    width, height = image.size
    left, upper, right, lower = box
    if not (0 <= left < right <= width and 0 <= upper < lower <= height):
        raise ValueError(f"box {tuple(box)} outside the {width}x{height} image")
    image.draft(mode, (max(1, size * width // (right - left)), max(1, size * height // (lower - upper))))
    sx, sy = image.size[0] / width, image.size[1] / height
    return image.crop((round(left * sx), round(upper * sy), max(round(right * sx), 1), max(round(lower * sy), 1)))


def _reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image format Pillow can decode"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return " ".join(str(error).split()) or type(error).__name__


def _decode_into(
    jobs: Sequence[tuple[ImageSource, str, np.ndarray] | tuple[ImageSource, str, np.ndarray, Box | None]],
    size: int,
    channels: int,
    description: str,
) -> None:
    """Decode each ``(source, name, destination[, crop box])`` into its ``[C, H, W]`` destination view."""
    if channels not in MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mode = MODES[channels]

    def work(job) -> None:
        source, name, dest, *box = job
        dest[...] = _decode_one(source, name, size, mode, box[0] if box else None)
        progress.advance(task)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    progress = Progress(*columns, console=console, transient=True, disable=not console.is_terminal)
    with progress, ThreadPoolExecutor() as pool:
        task = progress.add_task(description, total=len(jobs))
        futures = [pool.submit(work, job) for job in jobs]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:  # on a bad file or Ctrl-C, drop the queued images instead of decoding them all first
            pool.shutdown(cancel_futures=True)
    failed = next((f for f in futures if not f.cancelled() and f.exception() is not None), None)
    if failed is not None:
        raise failed.exception()  # type: ignore[misc]


def decode_image(source: ImageSource, size: int, channels: int = 3, name: str | None = None) -> torch.Tensor:
    """One file (or encoded bytes) as uint8 ``[channels, size, size]``, decoded as every dataset's images are;
    an unreadable one is a one-line :class:`~metarun.errors.DataError` naming it (``name``, default the path)."""
    if channels not in MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    label = name if name is not None else ("(bytes)" if isinstance(source, bytes) else str(source))
    return torch.from_numpy(_decode_one(source, label, size, MODES[channels]).copy())  # Pillow's buffer is read-only


def decode_images(
    sources: Sequence[ImageSource],
    size: int,
    channels: int = 3,
    names: Sequence[str] | None = None,
    description: str = "decoding images",
) -> torch.Tensor:
    """Files or encoded bytes as uint8 ``[N, channels, size, size]``; ``names`` label bytes in error messages."""
    if names is None:
        names = [f"#{i} (bytes)" if isinstance(s, bytes) else str(s) for i, s in enumerate(sources)]
    out = torch.empty((len(sources), channels, size, size), dtype=torch.uint8)
    view = out.numpy()
    _decode_into([(s, n, view[i]) for i, (s, n) in enumerate(zip(sources, names, strict=True))], size, channels, description)
    return out


def decode_classes(
    files: Sequence[Sequence[ImageSource]],
    class_names: list[str],
    size: int,
    channels: int = 3,
    description: str = "decoding images",
    boxes: Sequence[Sequence[Box]] | None = None,
) -> Split:
    """One split from the image files of each class, padded to the largest class; ``boxes`` (one per file,
    like ``files``) crops each image to its box before resizing."""
    sizes = [len(f) for f in files]
    out = torch.zeros((len(files), max(sizes), channels, size, size), dtype=torch.uint8)
    view = out.numpy()
    jobs = [
        (s, str(s), view[c, j], None if boxes is None else boxes[c][j])
        for c, class_files in enumerate(files)
        for j, s in enumerate(class_files)
    ]
    _decode_into(jobs, size, channels, description)
    return Split(out, class_names, _counts(np.asarray(sizes)))


def iter_rows(array: np.ndarray) -> Iterator[np.ndarray]:
    """``array`` in consecutive row chunks of about ``ROW_CHUNK_BYTES``."""
    step = max(1, ROW_CHUNK_BYTES // max(1, array[:1].nbytes))
    for start in range(0, len(array), step):
        yield array[start : start + step]


def group_by_class(
    chunks: Iterable[np.ndarray], labels: np.ndarray, class_names: list[str], channels_last: bool, source: str
) -> Split:
    """Scatter image rows into ``[classes, n, C, H, W]`` in one pass.

    ``chunks`` are consecutive rows ``[n, H, W, C]`` (``channels_last``) or
    ``[n, C, H, W]``; ``labels[i]`` is the position in ``class_names`` of row
    ``i``, or -1 to leave the row out. Rows keep their order within a class.
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels[labels >= 0], minlength=len(class_names))
    if len(counts) > len(class_names):
        raise ValueError(f"label {len(counts) - 1} for {len(class_names)} classes")
    empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"{source} holds no images of class {empty[0]}: replace it with the complete file")
    kept = np.flatnonzero(labels >= 0)
    by_class = kept[np.argsort(labels[kept], kind="stable")]
    slots = np.full(len(labels), -1, dtype=np.int64)
    slots[by_class] = np.arange(len(by_class)) - np.repeat(np.cumsum(counts) - counts, counts)
    out: np.ndarray | None = None
    start = 0
    for chunk in chunks:
        rows = slice(start, start + len(chunk))
        start += len(chunk)
        if start > len(labels):
            break
        keep = labels[rows] >= 0
        pixels = chunk[keep]
        if channels_last:
            pixels = pixels.transpose(0, 3, 1, 2)
        if out is None:
            out = torch.zeros((len(class_names), int(counts.max()), *pixels.shape[1:]), dtype=torch.uint8).numpy()
        out[labels[rows][keep], slots[rows][keep]] = pixels
    if start != len(labels) or out is None:
        raise DataError(f"{source} holds {start} images for {len(labels)} labels: replace it with the complete file")
    return Split(torch.from_numpy(out), class_names, _counts(counts))


def evenly_spaced(items: Sequence, limit: int | None) -> list:
    """At most ``limit`` of ``items``, spread evenly over them in their order (all of them when ``limit`` is None):
    a deterministic cap that keeps the variety of a class whose files come in runs of near-duplicates."""
    if limit is not None and limit < 1:
        raise ConfigError(f"dataset.max_per_class={limit} must be positive (or null: every image)")
    if limit is None or len(items) <= limit:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(np.int64)]


def empty_split(channels: int, size: int) -> Split:
    """A split with no classes, for a dataset that has none there (an evaluation-only dataset's train split)."""
    return Split(torch.zeros((0, 1, channels, size, size), dtype=torch.uint8), [])


def _counts(sizes: np.ndarray) -> torch.Tensor | None:
    return None if sizes.min() == sizes.max() else torch.as_tensor(sizes, dtype=torch.int64)


def channel_stats(split: Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] over the real (unpadded) images.

    Counted with 256-bin histograms, one class at a time: exact, and no float
    copy of a split that may not fit in memory twice.
    """
    channels = split.images.shape[2]
    hist = torch.zeros((channels, 256), dtype=torch.int64)
    for c in range(split.num_classes):
        n = split.images.shape[1] if split.counts is None else int(split.counts[c])
        images = split.images[c, :n]
        for ch in range(channels):
            hist[ch] += torch.bincount(images[:, ch].flatten(), minlength=256)
    levels = torch.arange(256, dtype=torch.float64) / 255
    total = hist.sum(dim=1, dtype=torch.float64)
    mean = (hist * levels).sum(dim=1) / total
    var = (hist * (levels[None] - mean[:, None]) ** 2).sum(dim=1) / total
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def check_disjoint(class_names: dict[str, Sequence[str]], source: str) -> None:
    """Raise when a class is in two splits: a test class seen in training would inflate every result."""
    seen: dict[str, str] = {}
    for split, names in class_names.items():
        for name in names:
            if name in seen:
                raise DataError(
                    f"class {name} is in both the {seen[name]} and the {split} split of {source}: the splits must have disjoint classes"
                )
            seen[name] = split


def dataset_from_splits(name: str, splits: dict[str, Split], meta: dict | None = None) -> FewShotDataset:
    """Normalise with the train split's statistics: the only images a method may learn anything from."""
    mean, std = channel_stats(splits["train"])
    return FewShotDataset(name, splits, mean, std, meta or {})

"""The shared decoding and grouping helpers the dataset loaders are built on."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metarun.data import images
from metarun.data.split import Split
from metarun.errors import DataError


def solid(color: tuple[int, int, int], size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def test_decode_paths_and_bytes_to_uint8_nchw(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(solid((255, 0, 0), (50, 30), "PNG"))
    (tmp_path / "b.jpg").write_bytes(solid((0, 0, 255), (200, 120), "JPEG"))
    Image.new("L", (10, 10), 128).save(tmp_path / "c.bmp")
    out = images.decode_images(
        [tmp_path / "a.png", str(tmp_path / "b.jpg"), tmp_path / "c.bmp", solid((0, 255, 0), (8, 8), "PNG")], 16
    )
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 16, 16)
    assert out[0, :, 8, 8].tolist() == [255, 0, 0]
    assert (out[1, :, 8, 8].int() - torch.tensor([0, 0, 255])).abs().max() <= 3  # JPEG is lossy
    assert out[2, :, 8, 8].tolist() == [128, 128, 128]
    assert out[3, :, 8, 8].tolist() == [0, 255, 0]


def test_decode_grayscale(tmp_path: Path) -> None:
    out = images.decode_images([solid((255, 255, 255), (20, 20), "PNG")], 12, channels=1)
    assert out.shape == (1, 1, 12, 12) and int(out.min()) == 255


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turned 90 degrees clockwise
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    out = images.decode_images([buffer.getvalue()], 20, channels=1)
    assert out[0, 0, 2, 10] == 255 and out[0, 0, 18, 10] == 0  # white half now on top


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(solid((1, 2, 3), (8, 8), "PNG"))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="broken.jpg") as info:
        images.decode_images([good] * 20 + [bad], 8)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"missing\.png \(No such file"):
        images.decode_images([tmp_path / "missing.png"], 8)
    with pytest.raises(DataError, match=r"#1 \(bytes\)"):
        images.decode_images([solid((1, 2, 3), (8, 8), "PNG"), b"junk"], 8)


def test_decode_classes_pads_and_counts(tmp_path: Path) -> None:
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(solid((i * 50, 0, 0), (9, 9), "PNG"))
    split = images.decode_classes([paths[:2], paths[2:]], ["a", "b"], 9)
    assert split.images.shape == (2, 3, 3, 9, 9)
    assert split.counts.tolist() == [2, 3]
    assert split.images[1, :, 0, 0, 0].tolist() == [100, 150, 200]
    assert int(split.images[0, 2].max()) == 0  # the padded slot stays empty
    full = images.decode_classes([paths[:2], paths[2:4]], ["a", "b"], 9)
    assert full.counts is None


def test_image_extensions() -> None:
    extensions = images.image_extensions()
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif"} <= extensions
    assert not {".txt", ".csv", ".pdf", ".h5"} & extensions


def test_group_by_class_scatters_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "ROW_CHUNK_BYTES", 2 * 4 * 4 * 3)  # two rows per chunk
    rows = np.zeros((7, 4, 4, 3), dtype=np.uint8)
    rows[:, 0, 0, 0] = np.arange(7)
    rows[:, 0, 0, 2] = 100
    labels = np.array([1, 0, -1, 1, 0, 0, 2])
    split = images.group_by_class(images.iter_rows(rows), labels, ["a", "b", "c"], channels_last=True, source="test")
    assert split.images.shape == (3, 3, 3, 4, 4)
    assert split.counts.tolist() == [3, 2, 1]
    assert split.images[0, :, 0, 0, 0].tolist() == [1, 4, 5]
    assert split.images[1, :2, 0, 0, 0].tolist() == [0, 3]
    assert split.images[2, 0, 0, 0, 0] == 6 and split.images[2, 0, 2, 0, 0] == 100  # channels moved first


def test_group_by_class_checks_lengths_and_empty_classes() -> None:
    rows = np.zeros((4, 3, 2, 2), dtype=np.uint8)
    with pytest.raises(DataError, match="4 images for 5 labels"):
        images.group_by_class([rows], np.zeros(5, dtype=np.int64), ["a"], channels_last=False, source="f.npz")
    with pytest.raises(DataError, match="no images of class b"):
        images.group_by_class([rows], np.zeros(4, dtype=np.int64), ["a", "b"], channels_last=False, source="f.npz")


def test_channel_stats_are_exact_and_skip_padding() -> None:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 5, 3, 6, 6), dtype=torch.uint8, generator=generator)
    counts = torch.tensor([5, 2, 4])
    mean, std = images.channel_stats(Split(pixels, ["a", "b", "c"], counts))
    real = torch.cat([pixels[c, : counts[c]] for c in range(3)]).double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), real.mean(dim=(0, 2, 3)))
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), real.std(dim=(0, 2, 3), unbiased=False))


def test_check_disjoint() -> None:
    images.check_disjoint({"train": ["a", "b"], "val": ["c"], "test": ["d"]}, "here")
    with pytest.raises(DataError, match="class b is in both the train and the test split of here"):
        images.check_disjoint({"train": ["a", "b"], "val": ["c"], "test": ["b"]}, "here")

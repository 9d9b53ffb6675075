"""Omniglot from its zips: the real small set when it is on disk, generated zips in the real layout otherwise."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from metarun.data import omniglot
from metarun.data.split import FewShotDataset
from metarun.errors import ConfigError, DataError
from tests.helpers.http_server import LocalHTTPServer

REAL_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot"
SMALL = omniglot.SUBSETS["small"]


@pytest.fixture
def server() -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer() as running:
        yield running


def drawing_png(seed: int) -> bytes:
    """A 105x105 mode '1' PNG like Omniglot's: white background, one black stroke."""
    image = Image.new("1", (105, 105), 1)
    x = 10 + seed % 80
    ImageDraw.Draw(image).line([(x, 10), (95 - x // 2, 95)], fill=0, width=6)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_zip(path: Path, alphabets: dict[str, int], drawings: int = 2) -> str:
    """A zip in the official layout ``<stem>/<alphabet>/characterNN/<id>_<drawer>.png``; returns its md5."""
    pngs = [drawing_png(i) for i in range(16)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for alphabet, characters in alphabets.items():
            for c in range(1, characters + 1):
                for d in range(1, drawings + 1):
                    archive.writestr(f"{path.stem}/{alphabet}/character{c:02d}/{c:04d}_{d:02d}.png", pngs[(c + d) % 16])
    return hashlib.md5(path.read_bytes()).hexdigest()


def class_names(ds: FewShotDataset) -> dict[str, set[str]]:
    return {name: set(split.class_names) for name, split in ds.splits.items()}


def assert_disjoint(ds: FewShotDataset) -> None:
    names = class_names(ds)
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(omniglot, "_read_characters", fail)


@pytest.fixture(scope="module")
def real_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real small zips linked into a writable folder (the cache is written next to them)."""
    if not all((REAL_DIR / name).is_file() for name in SMALL):
        pytest.skip(f"real Omniglot small zips not in {REAL_DIR.resolve()}")
    root = tmp_path_factory.mktemp("omniglot")
    for name in SMALL:
        (root / name).symlink_to((REAL_DIR / name).resolve())
    return root


@pytest.fixture(scope="module")
def real_plain(real_root: Path) -> FewShotDataset:
    return omniglot.load(str(real_root), subset="small", rotations=False)


@pytest.fixture(scope="module")
def real_rotated(real_root: Path) -> FewShotDataset:
    return omniglot.load(str(real_root), subset="small", rotations=True)


def test_real_small_split(real_plain: FewShotDataset) -> None:
    sizes = {name: split.num_classes for name, split in real_plain.splits.items()}
    assert sizes == {"train": 170, "val": 24, "test": 48}
    assert_disjoint(real_plain)
    everything = set().union(*class_names(real_plain).values())
    assert len(everything) == 242
    assert len({name.split("/")[0] for name in everything}) == 8
    assert sum(name.startswith("Greek/") for name in everything) == 24  # in both zips, counted once
    assert sum(name.startswith("Latin/") for name in everything) == 26
    for split in real_plain.splits.values():
        assert split.images.shape[1:] == (20, 1, 28, 28) and split.images.dtype == torch.uint8
        assert split.counts is None


def test_real_small_pixels(real_plain: FewShotDataset) -> None:
    images = real_plain.splits["train"].images
    assert images[:, :, :, 0, :].float().mean() < 2  # the top row is background: dark
    assert images.float().median() == 0
    assert images.amax(dim=(2, 3, 4)).min() > 200  # every drawing has a bright stroke
    (mean,), (std,) = real_plain.mean, real_plain.std
    pixels = images.float() / 255
    assert mean == pytest.approx(pixels.mean().item(), rel=1e-4)
    assert std == pytest.approx(pixels.std(unbiased=False).item(), rel=1e-4)
    assert 0.03 < mean < 0.2


def test_real_small_rotations(real_plain: FewShotDataset, real_rotated: FewShotDataset) -> None:
    assert_disjoint(real_rotated)
    for name, plain in real_plain.splits.items():
        rotated = real_rotated.splits[name]
        assert rotated.num_classes == 4 * plain.num_classes
        assert set(rotated.class_names) == set(plain.class_names) | {
            f"{c}/rot{deg}" for c in plain.class_names for deg in (90, 180, 270)
        }
        index = {c: i for i, c in enumerate(rotated.class_names)}
        character = plain.class_names[0]
        torch.testing.assert_close(rotated.images[index[character]], plain.images[0])
        torch.testing.assert_close(rotated.images[index[f"{character}/rot90"]], torch.rot90(plain.images[0], 1, dims=(2, 3)))
    assert real_rotated.mean == pytest.approx(real_plain.mean) and real_rotated.std == pytest.approx(real_plain.std)


def test_real_small_second_load_is_cached(real_root: Path, real_plain: FewShotDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_decoding(monkeypatch)
    again = omniglot.load(str(real_root), subset="small", rotations=False)
    for name, split in real_plain.splits.items():
        assert again.splits[name].class_names == split.class_names
        assert torch.equal(again.splits[name].images, split.images)


def test_real_small_split_depends_on_seed_only(real_root: Path, real_plain: FewShotDataset) -> None:
    other = omniglot.load(str(real_root), subset="small", rotations=False, seed=1, image_size=14)
    assert class_names(other)["test"] != class_names(real_plain)["test"]
    assert other.splits["test"].images.shape[-2:] == (14, 14)


@pytest.fixture
def small_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Generated small zips: 20 characters, Greek and Latin in both zips byte for byte."""
    shared = {"Greek": 4, "Latin": 3}
    for name, own in zip(SMALL, ({"Alpha": 6}, {"Beta": 7}), strict=True):
        md5 = write_zip(tmp_path / name, {**own, **shared} if name.endswith("1.zip") else {**shared, **own})
        monkeypatch.setitem(omniglot.MD5, name, md5)
    return tmp_path


def test_generated_small(small_root: Path) -> None:
    ds = omniglot.load(str(small_root), subset="small", rotations=True, image_size=20)
    sizes = {name: split.num_classes for name, split in ds.splits.items()}
    assert sizes == {"train": 4 * 14, "val": 4 * 2, "test": 4 * 4}
    assert_disjoint(ds)
    characters = {name for names in class_names(ds).values() for name in names if "/rot" not in name}
    assert len(characters) == 20
    for split in ds.splits.values():
        for name in split.class_names:
            assert name.split("/rot")[0] in split.class_names  # rotations stay with their character
        assert split.images.shape[1:] == (2, 1, 20, 20)


def test_val_classes(small_root: Path) -> None:
    ds = omniglot.load(str(small_root), subset="small", rotations=False, val_classes=5)
    assert [ds.splits[s].num_classes for s in ("train", "val", "test")] == [11, 5, 4]
    with pytest.raises(ConfigError, match="val_classes=16"):
        omniglot.load(str(small_root), subset="small", rotations=False, val_classes=16)


def test_small_missing_says_where(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=rf"images_background_small1.zip missing: put images_background_small1.zip in {tmp_path}$"
    ):
        omniglot.load(str(tmp_path), subset="small")


def test_small_md5_mismatch(small_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(omniglot.MD5, SMALL[0], "0" * 32)
    with pytest.raises(DataError, match=f"{SMALL[0]} has md5 .*, expected 0{{32}}"):
        omniglot.load(str(small_root), subset="small")
    assert (small_root / f"{SMALL[0]}.md5-mismatch").exists()


def test_corrupt_zip_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SMALL:
        (tmp_path / name).write_bytes(b"this is not a zip file")
        monkeypatch.setitem(omniglot.MD5, name, hashlib.md5(b"this is not a zip file").hexdigest())
    with pytest.raises(DataError, match=f"{SMALL[0]} is not a readable zip"):
        omniglot.load(str(tmp_path), subset="small")


def test_unreadable_image_names_it(small_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = small_root / SMALL[1]
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{path.stem}/Beta/character99/9999_01.png", b"not a png")
    monkeypatch.setitem(omniglot.MD5, SMALL[1], hashlib.md5(path.read_bytes()).hexdigest())
    with pytest.raises(DataError, match=f"{SMALL[1]}: cannot read .*/Beta/character99/9999_01.png"):
        omniglot.load(str(small_root), subset="small")


@pytest.fixture
def full_server(
    tmp_path_factory: pytest.TempPathFactory, server: LocalHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> LocalHTTPServer:
    """The two full zips with the real character counts (964 + 659), one drawing each, served locally."""
    source = tmp_path_factory.mktemp("served")
    layouts = {
        "images_background.zip": {f"Background{a:02d}": 32 + (a < 4) for a in range(30)},
        "images_evaluation.zip": {f"Evaluation{a:02d}": 32 + (a < 19) for a in range(20)},
    }
    for name, alphabets in layouts.items():
        monkeypatch.setitem(omniglot.MD5, name, write_zip(source / name, alphabets, drawings=1))
        server.files[f"/omniglot/{name}"] = (source / name).read_bytes()
    monkeypatch.setattr(omniglot, "BASE_URL", f"{server.url}/omniglot")
    return server


def test_full_downloads_splits_and_caches(full_server: LocalHTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "omniglot"
    ds = omniglot.load(str(root), subset="full", rotations=False, image_size=14)
    assert sorted(r.path for r in full_server.requests) == ["/omniglot/images_background.zip", "/omniglot/images_evaluation.zip"]
    assert (root / "images_background.zip").is_file() and not list(root.glob("*.part"))
    sizes = {name: split.num_classes for name, split in ds.splits.items()}
    assert sizes == {"train": 1100, "val": 100, "test": 423}
    assert_disjoint(ds)
    names = class_names(ds)
    assert sum(n.startswith("Background") for n in names["train"]) == 964
    assert all(n.startswith("Evaluation") for n in names["val"] | names["test"])
    assert ds.splits["test"].class_names[0] == "Evaluation07/character06"  # the 1201st character
    assert ds.splits["train"].images.shape[1:] == (1, 1, 14, 14)

    forbid_decoding(monkeypatch)
    again = omniglot.load(str(root), subset="full", rotations=False, image_size=14)
    assert len(full_server.requests) == 2
    assert again.splits["test"].class_names == ds.splits["test"].class_names


def test_full_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"images_background.zip missing: put images_background.zip in .* \(or set dataset.download=true\)$"
    ):
        omniglot.load(str(tmp_path), subset="full", download=False)


def test_unknown_subset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="subset=tiny"):
        omniglot.load(str(tmp_path), subset="tiny")

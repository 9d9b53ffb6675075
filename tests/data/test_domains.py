"""The Meta-Dataset domains from tiny copies of their files in the real layouts: classes, splits, crops, caps,
downloads from 127.0.0.1, and the published split lists."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from metarun.data import aircraft, dtd, fungi, matfile, metadataset_splits, quickdraw, traffic_sign, vgg_flower
from metarun.data.extract import extract
from metarun.errors import ConfigError, DataError
from metarun.factory import build_dataset
from tests.conftest import dataset_config
from tests.data import domain_files as files
from tests.helpers.http_server import LocalHTTPServer


@pytest.fixture(autouse=True)
def few_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loaders with the tiny copies' split lists in place of the published ones."""
    monkeypatch.setattr(aircraft, "AIRCRAFT", files.AIRCRAFT)
    monkeypatch.setattr(vgg_flower, "VGG_FLOWER", files.FLOWERS)
    monkeypatch.setattr(dtd, "DTD", files.DTD)
    monkeypatch.setattr(fungi, "FUNGI", files.FUNGI)
    monkeypatch.setattr(fungi, "FUNGI_CATEGORIES", files.FUNGI_CLASSES)
    monkeypatch.setattr(quickdraw, "QUICKDRAW", files.QUICKDRAW)
    monkeypatch.setattr(traffic_sign, "TRAFFIC_SIGN_NAMES", files.TRAFFIC_SIGNS)


def reds(split, c: int) -> list[int]:
    n = split.images.shape[1] if split.counts is None else int(split.counts[c])
    return split.images[c, :n, 0, split.images.shape[-1] // 2, split.images.shape[-1] // 2].tolist()


# -- the published splits ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lists", "sizes"),
    [
        (metadataset_splits.AIRCRAFT, (70, 15, 15)),
        (metadataset_splits.VGG_FLOWER, (71, 15, 16)),
        (metadataset_splits.DTD, (33, 7, 7)),
        (metadataset_splits.FUNGI, (994, 200, 200)),
        (metadataset_splits.QUICKDRAW, (241, 52, 52)),
    ],
    ids=["aircraft", "vgg_flower", "dtd", "fungi", "quickdraw"],
)
def test_published_split_sizes_are_disjoint(lists, sizes) -> None:
    assert tuple(len(lists[s]) for s in ("train", "val", "test")) == sizes
    every = [c for names in lists.values() for c in names]
    assert len(set(every)) == len(every) == sum(sizes)


def test_published_split_members() -> None:
    """Spot checks against Meta-Dataset's split files: first and last entries, and classes by their id."""
    m = metadataset_splits
    assert m.AIRCRAFT["train"][:3] == ("A340-300", "A318", "Falcon 2000") and m.AIRCRAFT["test"][-1] == "Spitfire"
    assert sorted(n for s in m.VGG_FLOWER.values() for n in s) == list(range(1, 103))
    assert m.VGG_FLOWER["test"][:3] == (5, 9, 15) and vgg_flower.class_name(60) == "060.pink-yellow dahlia?"
    assert m.DTD["val"] == ("gauzy", "grid", "lined", "paisley", "porous", "scaly", "spiralled")
    assert m.QUICKDRAW["train"][27] == "The Eiffel Tower" and m.QUICKDRAW["test"][-1] == "yoga"
    assert sorted(n for s in m.FUNGI.values() for n in s) == list(range(1394))
    assert m.FUNGI["val"][:4] == (0, 4, 6, 15) and m.FUNGI["test"][-1] == 1388
    assert {226, 283, 875, 1392} <= set(m.FUNGI["train"])  # training species of the published file
    assert len(m.TRAFFIC_SIGN_NAMES) == 43 and m.TRAFFIC_SIGN_NAMES[14] == "Stop"


# -- aircraft ----------------------------------------------------------------------------------------------
def test_aircraft_variants_crops_and_split(tmp_path: Path) -> None:
    files.write_aircraft(tmp_path)
    ds = build_dataset(dataset_config("aircraft", root=str(tmp_path), image_size=16))
    variants = [v for names in files.AIRCRAFT.values() for v in names]
    for split, names in files.AIRCRAFT.items():
        s = ds.splits[split]
        assert s.class_names == list(names) and s.images.shape == (len(names), 3, 3, 16, 16)
        for c, name in enumerate(names):
            expected = files.red(variants.index(name))
            # cropped to the box: no white banner or border left, even in the corners (JPEG rings by up to ~20 there)
            assert (s.images[c, :, 0].int() - expected).abs().max() <= 40
            assert (s.images[c, :, 0, 4:12, 4:12].int() - expected).abs().max() <= 6
    assert len(ds.mean) == 3


def test_aircraft_downloads_the_archive_and_unpacks_it(tmp_path: Path) -> None:
    files.write_aircraft(tmp_path / "src")
    archive = files.tar_gz(tmp_path / "src", "fgvc-aircraft-2013b")
    with LocalHTTPServer(files={"/a.tar.gz": archive}) as server, pytest.MonkeyPatch.context() as mp:
        mp.setattr(aircraft, "URL", f"{server.url}/a.tar.gz")
        mp.setattr(aircraft, "MD5", hashlib.md5(archive).hexdigest())
        ds = aircraft.load(root=str(tmp_path / "data"), image_size=8)
    assert (tmp_path / "data" / aircraft.ARCHIVE).is_file() and (tmp_path / "data" / "fgvc-aircraft-2013b" / "data").is_dir()
    assert ds.splits["train"].num_classes == 3 and len(server.requests) == 1


def test_aircraft_missing_archive_without_download_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"fgvc-aircraft-2013b\.tar\.gz there.*dataset\.download=true") as info:
        aircraft.load(root=str(tmp_path), download=False)
    assert "\n" not in str(info.value)


def test_aircraft_unknown_variant_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files.write_aircraft(tmp_path)
    monkeypatch.setattr(aircraft, "AIRCRAFT", {**files.AIRCRAFT, "test": ("Spitfire",)})
    with pytest.raises(DataError, match="variant MD-90, which is not FGVC-Aircraft's"):
        aircraft.load(root=str(tmp_path))


# -- vgg_flower and its .mat file -------------------------------------------------------------------------
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
def test_mat_reader_reads_matlab_storage(tmp_path: Path, compressed: bool) -> None:
    path = tmp_path / "labels.mat"
    path.write_bytes(files.mat_file("labels", np.array([1, 77, 102, 5]), compressed))
    labels = matfile.read_array(path, "labels")
    assert labels.shape == (1, 4) and labels.tolist() == [[1, 77, 102, 5]]
    with pytest.raises(DataError, match="no array 'setid'"):
        matfile.read_array(path, "setid")


def test_mat_reader_agrees_with_scipy(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    values = np.arange(1, 30, dtype=np.float64).reshape(1, -1)
    for compressed in (False, True):
        scipy_io.savemat(tmp_path / "x.mat", {"other": np.eye(3), "labels": values}, do_compression=compressed)
        assert np.array_equal(matfile.read_array(tmp_path / "x.mat", "labels"), values)


def test_mat_reader_refuses_other_files(tmp_path: Path) -> None:
    (tmp_path / "x.mat").write_bytes(b"not a mat file" * 20)
    with pytest.raises(DataError, match="not a MATLAB v5"):
        matfile.read_array(tmp_path / "x.mat", "labels")


def test_vgg_flower_species_by_label(tmp_path: Path) -> None:
    files.write_flowers(tmp_path)
    ds = build_dataset(dataset_config("vgg_flower", root=str(tmp_path), image_size=8))
    for split, labels in files.FLOWERS.items():
        s = ds.splits[split]
        assert s.class_names == [vgg_flower.class_name(label) for label in labels]
        for c, label in enumerate(labels):
            assert all(abs(r - files.red(label)) <= 3 for r in reds(s, c)) and len(reds(s, c)) == 3
    assert ds.splits["train"].class_names[0] == "003.canterbury bells"


def test_vgg_flower_downloads_both_files(tmp_path: Path) -> None:
    files.write_flowers(tmp_path / "src")
    archive, labels = files.tar_gz(tmp_path / "src", "jpg"), (tmp_path / "src" / "imagelabels.mat").read_bytes()
    with LocalHTTPServer(files={"/f.tgz": archive, "/l.mat": labels}) as server, pytest.MonkeyPatch.context() as mp:
        mp.setattr(vgg_flower, "ARCHIVES", (
            ("102flowers.tgz", f"{server.url}/f.tgz", hashlib.md5(archive).hexdigest()),
            ("imagelabels.mat", f"{server.url}/l.mat", hashlib.md5(labels).hexdigest()),
        ))  # fmt: skip
        ds = vgg_flower.load(root=str(tmp_path / "data"), image_size=8, max_per_class=2)
    assert ds.splits["test"].images.shape[:2] == (2, 2)
    assert not (tmp_path / "data" / "imagelabels.mat").is_dir() and (tmp_path / "data" / "jpg").is_dir()


# -- dtd -----------------------------------------------------------------------------------------------------
def test_dtd_classes_skip_non_images_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files.write_dtd(tmp_path)
    ds = dtd.load(root=str(tmp_path), image_size=8)
    names = [n for s in files.DTD.values() for n in s]
    assert ds.splits["train"].class_names == list(files.DTD["train"]) and ds.splits["train"].counts is None
    assert [reds(ds.splits["val"], c)[0] for c in range(2)] == pytest.approx(
        [files.red(names.index(n)) for n in files.DTD["val"]], abs=3
    )

    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(dtd, "decode_classes", fail)
    assert (dtd.load(root=str(tmp_path), image_size=8).splits["test"].images == ds.splits["test"].images).all()


def test_dtd_max_per_class_keeps_evenly_spread_images(tmp_path: Path) -> None:
    files.write_dtd(tmp_path, per_class=5)
    ds = dtd.load(root=str(tmp_path), image_size=8, channels=1, max_per_class=3)
    assert ds.splits["train"].images.shape == (3, 3, 1, 8, 8)
    with pytest.raises(ConfigError, match="max_per_class=0 must be positive"):
        dtd.load(root=str(tmp_path), max_per_class=0)


# -- fungi ---------------------------------------------------------------------------------------------------
def test_fungi_pools_train_and_val_and_names_classes_by_id(tmp_path: Path) -> None:
    files.write_fungi(tmp_path)
    ds = build_dataset(dataset_config("fungi", root=str(tmp_path), image_size=8))
    for split, ids in files.FUNGI.items():
        s = ds.splits[split]
        assert s.class_names == [f"{i:04d}.Fungus species{i}" for i in ids]
        for c, i in enumerate(ids):
            assert len(reds(s, c)) == 3 and all(abs(r - files.red(i)) <= 3 for r in reds(s, c))


def test_fungi_is_not_downloaded_by_default(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="fungi_train_val.tgz, train_val_annotations.tgz there"):
        fungi.load(root=str(tmp_path))
    assert dataset_config("fungi").download is False


# -- quickdraw ---------------------------------------------------------------------------------------------
def test_quickdraw_bitmaps_caps_and_sizes(tmp_path: Path) -> None:
    files.write_quickdraw(tmp_path, per_class=10)
    ds = build_dataset(dataset_config("quickdraw", root=str(tmp_path), max_per_class=4))
    names = [n for s in files.QUICKDRAW.values() for n in s]
    s = ds.splits["train"]
    assert s.images.shape == (3, 4, 1, 28, 28) and s.class_names == list(files.QUICKDRAW["train"])
    assert s.images[1, :, 0, 0, 0].tolist() == [names.index("The Eiffel Tower")] * 4
    assert s.images[1, :, 0, 0, 1].tolist() == [0, 3, 6, 9]  # evenly spread rows
    assert s.images[0, 0, 0, 14].tolist() == [255] * 28  # strokes kept bright
    big = quickdraw.load(root=str(tmp_path), image_size=14, channels=3, max_per_class=None)
    assert big.splits["test"].images.shape == (2, 10, 3, 14, 14) and len(big.mean) == 3


def test_quickdraw_downloads_missing_files_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"7 of 7 files missing.*dataset\.download=true"):
        quickdraw.load(root=str(tmp_path))
    served = {f"/{quickdraw.urllib.parse.quote(n)}": d for n, d in files.quickdraw_files(5).items()}
    with LocalHTTPServer(files=served) as server:
        monkeypatch.setattr(quickdraw, "BASE_URL", server.url)
        ds = quickdraw.load(root=str(tmp_path), download=True)
    assert "/The%20Eiffel%20Tower.npy" in {r.path for r in server.requests}
    assert ds.splits["val"].images.shape == (2, 5, 1, 28, 28)


def test_quickdraw_wrong_array_is_named(tmp_path: Path) -> None:
    files.write_quickdraw(tmp_path)
    np.save(tmp_path / "cat.npy", np.zeros((3, 10), dtype=np.uint8))
    with pytest.raises(DataError, match=r"cat\.npy holds a uint8 \(3, 10\) array"):
        quickdraw.load(root=str(tmp_path))


# -- traffic_sign ---------------------------------------------------------------------------------------------
def test_traffic_sign_is_a_test_split_only(tmp_path: Path) -> None:
    files.write_traffic_signs(tmp_path)
    ds = build_dataset(dataset_config("traffic_sign", root=str(tmp_path), image_size=8))
    assert ds.splits["train"].num_classes == 0 and ds.splits["val"].num_classes == 0
    test = ds.splits["test"]
    assert test.class_names == ["00.Speed limit (20km/h)", "01.Speed limit (30km/h)", "02.Speed limit (50km/h)"]
    assert test.images.shape == (3, 3, 3, 8, 8)  # the csv files are not images
    assert [reds(test, c)[0] for c in range(3)] == pytest.approx([files.red(c) for c in range(3)], abs=3)
    assert ds.mean[0] == pytest.approx(np.mean([files.red(c) for c in range(3)]) / 255, abs=0.02)  # the test images'


def test_traffic_sign_downloads_the_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files.write_traffic_signs(tmp_path / "src")
    archive = files.zip_of(tmp_path / "src", "GTSRB")
    with LocalHTTPServer(files={"/g.zip": archive}) as server:
        monkeypatch.setattr(traffic_sign, "URL", f"{server.url}/g.zip")
        monkeypatch.setattr(traffic_sign, "MD5", hashlib.md5(archive).hexdigest())
        ds = traffic_sign.load(root=str(tmp_path / "data"), image_size=8, max_per_class=2)
    assert ds.splits["test"].images.shape == (3, 2, 3, 8, 8)


# -- unpacking -----------------------------------------------------------------------------------------------
def test_extract_refuses_members_outside_the_folder(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    (tmp_path / "bad.tar.gz").write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match="outside"):
        extract(tmp_path / "bad.tar.gz", tmp_path / "into")
    assert not (tmp_path / "escaped.txt").exists()


def test_extract_redoes_an_unfinished_extraction_only(tmp_path: Path) -> None:
    files.write_dtd(tmp_path / "src", per_class=1)
    (tmp_path / "d.tar.gz").write_bytes(files.tar_gz(tmp_path / "src", "dtd"))
    extract(tmp_path / "d.tar.gz", tmp_path / "into")
    one = tmp_path / "into" / "dtd" / "images" / "banded" / "banded_0000.jpg"
    one.unlink()
    extract(tmp_path / "d.tar.gz", tmp_path / "into")  # finished before: left alone
    assert not one.exists()
    next((tmp_path / "into").glob(".*.extracted")).unlink()  # as if cut short
    extract(tmp_path / "d.tar.gz", tmp_path / "into")
    assert one.exists()


def test_truncated_archive_is_one_line(tmp_path: Path) -> None:
    files.write_dtd(tmp_path / "src", per_class=1)
    (tmp_path / "d.tar.gz").write_bytes(files.tar_gz(tmp_path / "src", "dtd")[:300])
    with pytest.raises(DataError, match="not a complete archive"):
        extract(tmp_path / "d.tar.gz", tmp_path / "into")

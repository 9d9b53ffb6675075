"""Tiny copies of the Meta-Dataset domains' files in their real layouts, shared by the loader tests and the smoke runs.

Each writer puts a few classes' images where the official archive puts them
and returns the split lists to patch into the loader (the published lists name
every class of the real dataset). An image's red channel is ``15 x`` its class
number, so a test can tell where each image landed.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

AIRCRAFT = {"train": ("A340-300", "F/A-18", "Cessna 172"), "val": ("737-900", "DC-8"), "test": ("Spitfire", "MD-90")}
FLOWERS = {"train": (3, 1, 2), "val": (10, 16), "test": (5, 9)}
DTD = {"train": ("braided", "waffled", "zigzagged"), "val": ("gauzy", "grid"), "test": ("banded", "woven")}
FUNGI_CLASSES = 7
FUNGI = {"train": (0, 2, 4), "val": (1, 5), "test": (3, 6)}
QUICKDRAW = {"train": ("cat", "The Eiffel Tower", "dog"), "val": ("ant", "bus"), "test": ("axe", "cow")}
TRAFFIC_SIGNS = ("Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)")


def red(c: int) -> int:
    return 15 * c


def photo(path: Path, c: int, size=(40, 30), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, red(c) if mode == "L" else (red(c), 60, 90)).save(path, quality=95)


def write_aircraft(root: Path, per_class: int = 3) -> Path:
    """``fgvc-aircraft-2013b/data/``: photos with a white banner below their box, the variant lists and the boxes."""
    data = root / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    variants = [v for names in AIRCRAFT.values() for v in names]
    trainval, test, boxes = [], [], []
    for c, variant in enumerate(variants):
        for i in range(per_class):
            name = f"{1000000 + 10 * c + i:07d}"
            image = Image.new("RGB", (50, 40), (255, 255, 255))  # the banner and the background: white
            image.paste((red(c), 60, 90), (5, 4, 45, 30))  # the aircraft: pixels 5..44 x 4..29
            image.save(data / "images" / f"{name}.jpg", quality=95)
            (test if i == 0 else trainval).append(f"{name} {variant}")
            boxes.append(f"{name} 5 4 45 30")
    (data / "images_variant_trainval.txt").write_text("\n".join(trainval) + "\n")
    (data / "images_variant_test.txt").write_text("\n".join(test) + "\n")
    (data / "images_box.txt").write_text("\n".join(boxes) + "\n")
    return data


def mat_file(name: str, values: np.ndarray, compressed: bool = False) -> bytes:
    """A MATLAB v5 file holding the double array ``name`` = ``values`` (1 x n), its data stored as uint8, as MATLAB
    stores small whole numbers; ``compressed`` wraps the array in an miCOMPRESSED element, as MATLAB does by default."""

    def element(kind: int, body: bytes) -> bytes:
        return struct.pack("<II", kind, len(body)) + body + b"\0" * (-len(body) % 8)

    matrix = (
        element(6, struct.pack("<II", 6, 0))  # array flags: mxDOUBLE_CLASS
        + element(5, struct.pack("<ii", 1, len(values)))  # dimensions 1 x n
        + element(1, name.encode())  # name
        + element(2, np.asarray(values, dtype=np.uint8).tobytes())  # real part, stored as miUINT8
    )
    body = element(14, matrix)
    if compressed:
        import zlib

        packed = zlib.compress(body)
        body = struct.pack("<II", 15, len(packed)) + packed
    header = b"MATLAB 5.0 MAT-file, written by a test".ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    return header + body


def write_flowers(root: Path, per_class: int = 3, compressed: bool = True) -> list[int]:
    """``jpg/image_%05d.jpg`` and ``imagelabels.mat``; photos of one species are interleaved with the others'."""
    labels = [label for _ in range(per_class) for names in FLOWERS.values() for label in names]
    for i, label in enumerate(labels):
        photo(root / "jpg" / f"image_{i + 1:05d}.jpg", label)
    (root / "imagelabels.mat").write_bytes(mat_file("labels", np.array(labels), compressed))
    return labels


def write_dtd(root: Path, per_class: int = 3) -> Path:
    images = root / "dtd" / "images"
    for c, name in enumerate(n for names in DTD.values() for n in names):
        for i in range(per_class):
            photo(images / name / f"{name}_{i:04d}.jpg", c)
    (images / "waffled" / ".directory").write_text("[Dolphin]\n")  # the real archive's stray file
    (root / "dtd" / "labels").mkdir()
    return images


def write_fungi(root: Path, per_class: int = 3) -> None:
    """``images/<category folder>/*.JPG`` and COCO-style ``train.json`` / ``val.json`` (the last photo of each in val)."""
    categories = [{"id": c, "name": f"Fungus species{c}", "supercategory": "Fungi"} for c in range(FUNGI_CLASSES)]
    index = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}
    for c in range(FUNGI_CLASSES):
        for i in range(per_class):
            file_name = f"images/{c:04d}_Fungus_species{c}/F{c}_{i}.JPG"
            photo(root / file_name, c)
            part = index["val" if i == per_class - 1 else "train"]
            image_id = 100 * c + i
            part["images"].append({"id": image_id, "file_name": file_name, "width": 40, "height": 30})
            part["annotations"].append({"id": image_id, "image_id": image_id, "category_id": c})
    for part, content in index.items():
        (root / f"{part}.json").write_text(json.dumps({**content, "categories": categories}))


def drawings(c: int, n: int) -> np.ndarray:
    """``n`` 28x28 bitmaps as rows: pixel 0 is the class, pixel 1 the row number, the rest a stroke."""
    rows = np.zeros((n, 784), dtype=np.uint8)
    rows[:, 0], rows[:, 1] = c, np.arange(n)
    rows[:, 28 * 14 : 28 * 15] = 255
    return rows


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def quickdraw_files(per_class: int = 10) -> dict[str, bytes]:
    return {f"{name}.npy": npy_bytes(drawings(c, per_class)) for c, name in enumerate(n for s in QUICKDRAW.values() for n in s)}


def write_quickdraw(root: Path, per_class: int = 10) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in quickdraw_files(per_class).items():
        (root / name).write_bytes(data)


def write_traffic_signs(root: Path, per_class: int = 3) -> Path:
    """``GTSRB/Final_Training/Images/000NN/*.ppm`` with each class's ``GT-000NN.csv``."""
    images = root / "GTSRB" / "Final_Training" / "Images"
    for c in range(len(TRAFFIC_SIGNS)):
        folder = images / f"{c:05d}"
        for i in range(per_class):
            photo(folder / f"00000_{i:05d}.ppm", c, size=(30 + i, 32))
        (folder / f"GT-{c:05d}.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n")
    return images


def tar_gz(folder: Path, *names: str) -> bytes:
    """The named entries of ``folder`` as a .tar.gz, with their paths relative to ``folder``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in names:
            tar.add(folder / name, arcname=name)
    return buffer.getvalue()


def zip_of(folder: Path, name: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted((folder / name).rglob("*")):
            zf.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()

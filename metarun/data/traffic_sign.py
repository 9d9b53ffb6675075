"""German Traffic Sign Recognition Benchmark (Stallkamp et al., 2011): 43 signs, for evaluation only, as in Meta-Dataset.

Meta-Dataset keeps GTSRB out of training altogether, to measure how a learner
copes with a domain it never saw: all 43 classes are in ``test``
(``traffic_sign_splits.json``: 0 / 0 / 43) and ``train`` and ``val`` hold no
class, so ``metarun train dataset=traffic_sign`` stops at once with one line
and the dataset serves ``metarun eval``. Classes are named ``"%02d.%s"`` of the
class number and Meta-Dataset's sign names
(:data:`metarun.data.metadataset_splits.TRAFFIC_SIGN_NAMES`).

The images are the 39209 of ``GTSRB/Final_Training/Images/000NN/*.ppm``
(``GTSRB_Final_Training_Images.zip``, 263 MB; every class 210 to 2250 images,
tracks of 30 frames of one sign), uncropped as in Meta-Dataset and resized as a
whole to ``image_size`` (see :mod:`metarun.data.images`). The split is padded
to its largest class: uint8 ``[43, 2250, 3, 84, 84]``, 2 GB;
``max_per_class`` keeps that many images of a class, evenly spread over its
sorted file names (so over its tracks). The archive is downloaded into
``root`` from the benchmark's public archive when missing and ``download`` is
true, md5-checked and unpacked there. With no training split, ``mean``/``std``
are those of the test images; a model trained elsewhere is scored with its own.
"""

from __future__ import annotations

from pathlib import Path

from metarun.data.cache import cached_dataset, file_fingerprint
from metarun.data.extract import fetch_unpacked
from metarun.data.images import channel_stats, decode_classes, empty_split, evenly_spaced, image_extensions
from metarun.data.metadataset_splits import TRAFFIC_SIGN_NAMES
from metarun.data.split import FewShotDataset
from metarun.errors import DataError

URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/GTSRB_Final_Training_Images.zip"
MD5 = "f33fd80ac59bff73c82d25ab499e03a3"
ARCHIVE = "GTSRB_Final_Training_Images.zip"
PREPROCESS_VERSION = 1  # bump when the decoded pixels change, so old caches are not reused


def find(root: Path) -> Path | None:
    """The folder of the 43 class folders ``00000`` ... ``00042``."""
    for base in (root / "GTSRB" / "Final_Training" / "Images", root / "Final_Training" / "Images"):
        if base.is_dir():
            return base
    return None


def load(
    root: str = "data/traffic_sign",
    download: bool = True,
    image_size: int = 84,
    channels: int = 3,
    max_per_class: int | None = None,
) -> FewShotDataset:
    """GTSRB's training images from ``root`` as a test-only dataset, downloaded there when missing and ``download`` is true."""
    root_path = Path(root).expanduser()
    images = fetch_unpacked(root_path, find, [(ARCHIVE, URL, MD5)], download, "GTSRB")
    extensions = image_extensions()
    files = []
    for number in range(len(TRAFFIC_SIGN_NAMES)):
        folder = images / f"{number:05d}"
        found = sorted(f for f in folder.glob("*") if f.suffix.lower() in extensions) if folder.is_dir() else []
        if not found:
            raise DataError(f"{folder} holds no image: unpack the complete {ARCHIVE} in {root_path}")
        files.append(evenly_spaced(found, max_per_class))
    key = {
        "files": [file_fingerprint(f) | {"class": c} for c, fs in enumerate(files) for f in fs],
        "image_size": image_size,
        "channels": channels,
        "version": PREPROCESS_VERSION,
    }

    def build() -> FewShotDataset:
        names = [f"{i:02d}.{name}" for i, name in enumerate(TRAFFIC_SIGN_NAMES)]
        test = decode_classes(files, names, image_size, channels, "decoding traffic signs")
        mean, std = channel_stats(test)
        splits = {"train": empty_split(channels, image_size), "val": empty_split(channels, image_size), "test": test}
        return FewShotDataset("traffic_sign", splits, mean, std, {"evaluation_only": True})

    return cached_dataset(root_path, "traffic_sign", key, build)

"""Every bad input a new user can type ends in one line naming the problem and the fix, and a non-zero exit.

Each case runs the real CLI in a subprocess: 2 for usage and config errors, 1
for failures at run time, never a traceback. Cases that need files (datasets,
checkpoints) build them in a temporary folder first.
"""

from __future__ import annotations

import hashlib
import socket
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from metarun.data import omniglot
from tests.conftest import run_cli
from tests.data.test_omniglot import write_zip
from tests.helpers.http_server import LocalHTTPServer

SMALL = omniglot.SUBSETS["small"]
FULL = omniglot.SUBSETS["full"]
NO_BACKOFF = {"metarun.data.download:BACKOFF_S": 0.0}


def check_one_line(out, code: int, *needles: str) -> None:
    assert "Traceback" not in out.stderr, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == code, out.stderr
    assert lines and lines[-1].startswith("error: "), out.stderr
    assert sum(ln.startswith("error:") for ln in lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- what the data cases put in the dataset folder (they return the patches they need) ----------
def junk_zips(root: Path) -> dict:
    for name in SMALL:
        (root / name).write_bytes(b"not a zip")
    return {}


def corrupt_zips(root: Path) -> dict:
    """Damaged files that pass the md5 check: only a patched md5 lets a corrupt zip through."""
    junk_zips(root)
    return {"metarun.data.omniglot:MD5": {name: hashlib.md5(b"not a zip").hexdigest() for name in SMALL}}


def zips_with_bad_image(root: Path) -> dict:
    for name, alphabets in zip(SMALL, ({"Alpha": 12}, {"Beta": 12}), strict=True):
        write_zip(root / name, alphabets)
    with zipfile.ZipFile(root / SMALL[1], "a") as archive:
        archive.writestr("images_background_small2/Beta/character99/9999_01.png", b"not a png")
    return {"metarun.data.omniglot:MD5": {name: hashlib.md5((root / name).read_bytes()).hexdigest() for name in SMALL}}


def offline(root: Path) -> dict:
    return {"metarun.data.omniglot:BASE_URL": f"http://127.0.0.1:{unused_port()}/omniglot", **NO_BACKOFF}


# -- what is checked besides the line ------------------------------------------------------------
def no_training_happened(run: Path, root: Path) -> None:
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def moved_aside(run: Path, root: Path) -> None:
    assert (root / f"{SMALL[0]}.md5-mismatch").is_file() and not (root / SMALL[0]).exists()


@dataclass
class Case:
    args: list[str]
    code: int
    needles: tuple[str, ...]
    #: writes files into the dataset folder; returns module patches (tests/helpers/patched_cli.py)
    prepare: Callable[[Path], dict] | None = None
    check: Callable[[Path, Path], None] | None = None


OMNIGLOT = ["dataset=omniglot"]
FULL_SUBSET = [*OMNIGLOT, "dataset.subset=full"]
TRAIN_CASES = {
    # config groups, keys, types, values
    "unknown option": Case(["algo=protonett"], 2, ("Could not find 'algo/protonett'", "valid options for algo:", "protonet")),
    "unknown key": Case(["trainer.step=5"], 2, ("unknown key 'trainer.step'", "valid keys are steps,")),
    "unknown key added with +": Case(["+trainer.step=5"], 2, ("unknown key 'trainer.step'", "steps")),
    "unknown top-level key": Case(["algorithm=maml"], 2, ("unknown key 'algorithm'", "algo")),
    "wrong type": Case(["task.ways=five"], 2, ("task.ways=five", "Integer")),
    "not a choice": Case(["trainer.nan_policy=ignore"], 2, ("trainer.nan_policy=ignore: valid values are stop, skip",)),
    "zero interval": Case(["trainer.val_every=0"], 2, ("trainer.val_every=0: must be at least 1",)),
    "compiled second order": Case(
        ["algo=maml", "trainer.compile=true"],
        2,
        ("torch.compile gets second-order meta-gradients wrong", "algo.first_order=true"),
    ),
    "frozen backbone never trained": Case(
        ["algo=leo", "algo.freeze_backbone=true"],
        2,
        ("algo.freeze_backbone=true needs a pre-trained backbone: set trainer.init_from=RUN_OR_PT",),
    ),
    "impossible transformer": Case(
        ["algo=incontext", "algo.d_model=10", "algo.heads=4"], 2, ("d_model must be a positive multiple of heads",)
    ),
    "negative steps": Case(["trainer.steps=-5"], 2, ("trainer.steps=-5: must be at least 0",)),
    "dataset too small": Case(["dataset.num_classes=20"], 2, ("num_classes=20 must exceed",)),
    # impossible episodes, for training and for evaluation, before any training work
    "too many ways": Case(["task.ways=50"], 2, ("task.ways=50 but the train split has only 45 classes: lower task.ways",)),
    "too many shots": Case(
        ["task.shots=16"], 2, ("task.shots + task.queries = 16 + 5 = 21", "only 20 images", "lower task.shots or task.queries")
    ),
    "zero queries": Case(["task.queries=0"], 2, ("task.queries=0: must be at least 1",)),
    "zero meta-batch": Case(["task.meta_batch=0"], 2, ("task.meta_batch=0: must be at least 1",)),
    "validation queries": Case(["eval.queries=20"], 2, ("task.shots + eval.queries = 1 + 20", "the val split")),
    "eval ways": Case(
        ["eval.settings=[{ways:5,shots:1},{ways:30,shots:1}]"],
        2,
        ("eval.settings[1].ways=30 but the test split has only 20 classes",),
        check=no_training_happened,
    ),
    "eval shots": Case(
        ["eval.settings=[{ways:5,shots:16}]"],
        2,
        ("eval.settings[0].shots + eval.queries = 16 + 5", "the test split"),
        check=no_training_happened,
    ),
    "eval precision": Case(["eval.precision=half"], 2, ("eval.precision=half: valid values are null, fp32, bf16, fp16",)),
    "eval zero ways": Case(["eval.settings=[{ways:0,shots:1}]"], 2, ("eval.settings[0].ways=0: must be at least 1",)),
    # devices the machine lacks
    "no mps": Case(["device=mps"], 2, ("device=mps but", "use device=cpu or device=auto")),
    # data missing, damaged or out of reach
    "data missing": Case(OMNIGLOT, 1, (f"{SMALL[0]} missing: put {SMALL[0]} in",)),
    "data missing, download off": Case(
        [*FULL_SUBSET, "dataset.download=false"], 1, (f"{FULL[0]} missing: put {FULL[0]} in", "(or set dataset.download=true)")
    ),
    "no network": Case(
        FULL_SUBSET, 1, ("cannot download http://127.0.0.1:", "after 4 attempts", f"put {FULL[0]} in"), prepare=offline
    ),
    "md5 mismatch": Case(
        OMNIGLOT, 1, (f"{SMALL[0]} has md5", f"expected {omniglot.MD5[SMALL[0]]}", "moved aside"), junk_zips, moved_aside
    ),
    "corrupt zip": Case(OMNIGLOT, 1, (f"{SMALL[0]} is not a readable zip", "download it again"), prepare=corrupt_zips),
    "unreadable image": Case(
        OMNIGLOT, 1, (f"{SMALL[1]}: cannot read", "Beta/character99/9999_01.png"), prepare=zips_with_bad_image
    ),
}
if not torch.cuda.is_available():
    TRAIN_CASES["no cuda"] = Case(["device=cuda"], 2, ("device=cuda but no CUDA GPU", "use device=cpu or device=auto"))


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_train(name, tmp_path, tiny):
    case = TRAIN_CASES[name]
    root, run = tmp_path / "data", tmp_path / "run"
    root.mkdir()
    patches = case.prepare(root) if case.prepare else None
    if case.args[0].startswith("dataset="):  # the tiny glyphs keys do not apply to another dataset
        tiny = [o for o in tiny if not o.startswith("dataset.")] + [f"dataset.root={root}"]
    out = run_cli("train", *tiny, *case.args, f"hydra.run.dir={run}", patches=patches)
    check_one_line(out, case.code, *case.needles)
    if case.check:
        case.check(run, root)


def test_download_cut_half_way_keeps_only_a_partial_file_then_resumes(tmp_path, tiny):
    served = tmp_path / "served"
    served.mkdir()
    md5 = {name: write_zip(served / name, {"Alpha": 3}) for name in FULL}
    root = tmp_path / "data"
    args = [o for o in tiny if not o.startswith("dataset.")] + [
        *FULL_SUBSET,
        f"dataset.root={root}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    with LocalHTTPServer(
        files={f"/omniglot/{n}": (served / n).read_bytes() for n in FULL}, cut={f"/omniglot/{FULL[0]}": 4}
    ) as server:
        patches = {"metarun.data.omniglot:BASE_URL": f"{server.url}/omniglot", "metarun.data.omniglot:MD5": md5, **NO_BACKOFF}
        check_one_line(
            run_cli("train", *args, patches=patches), 1, f"cannot download {server.url}/omniglot/{FULL[0]} after 4 attempts"
        )
        assert not (root / FULL[0]).exists() and (root / f"{FULL[0]}.part").stat().st_size > 0

        out = run_cli("train", *args, patches=patches)
        assert server.requests[4].range is not None  # the fifth request picks up where the fourth stopped
    check_one_line(out, 1, "too few for a test split")  # downloaded and verified; these stand-in zips are just too small
    assert [p.name for p in sorted(root.iterdir()) if p.is_file()] == sorted(FULL)
    assert (root / FULL[0]).read_bytes() == (served / FULL[0]).read_bytes()


# -- checkpoints: missing, truncated, another format, another model -----------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny) -> Path:
    run = tmp_path_factory.mktemp("trained")
    out = run_cli("train", *tiny, "trainer.steps=2", "trainer.val_every=2", "eval.after_train=false", f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr
    return run


@pytest.fixture(scope="module")
def damaged(trained, tmp_path_factory) -> Path:
    """Variants of the trained run's last.pt."""
    folder = tmp_path_factory.mktemp("damaged")
    good = trained / "checkpoints" / "last.pt"
    data = good.read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    ckpt = torch.load(good, weights_only=False)
    torch.save({**ckpt, "format": 0, "version": "0.0.1"}, folder / "old.pt")
    wider = {**ckpt["config"], "backbone": {**ckpt["config"]["backbone"], "hidden": 32}}
    torch.save({**ckpt, "config": wider}, folder / "other-model.pt")
    torch.save({"state_dict": ckpt["model"]}, folder / "foreign.pt")
    return folder


CHECKPOINT_CASES = {
    "eval: missing": (["eval", "checkpoint={damaged}/nope.pt"], 1, ("nope.pt does not exist", "give a run folder or a .pt file")),
    "eval: not a run folder": (["eval", "checkpoint={damaged}"], 1, ("no checkpoint in", "is this a metarun run folder?")),
    "eval: truncated": (["eval", "checkpoint={damaged}/truncated.pt"], 1, ("unreadable or truncated", "use another checkpoint")),
    "eval: another format": (
        ["eval", "checkpoint={damaged}/old.pt"],
        1,
        ("written by metarun 0.0.1 in checkpoint format 0", "use metarun 0.0.1"),
    ),
    "eval: another model": (
        ["eval", "checkpoint={damaged}/other-model.pt"],
        1,
        ("does not match the model", "shape mismatch: backbone."),
    ),
    "eval: not metarun's": (["eval", "checkpoint={damaged}/foreign.pt"], 1, ("is not a metarun checkpoint",)),
    "eval: impossible setting": (
        ["eval", "checkpoint={run}", "eval.settings=[{{ways:30,shots:1}}]"],
        2,
        ("eval.settings[0].ways=30",),
    ),
    "eval: bad value": (["eval", "checkpoint={run}", "eval.batch_tasks=0"], 2, ("eval.batch_tasks=0: must be at least 1",)),
    "eval: a key only training has": (
        ["eval", "checkpoint={run}", "algo.inner_steps_eval=3"],
        2,
        ("unknown key 'algo': valid keys are checkpoint, dataset, task, trainer, device, eval, logger",),
    ),
    "resume: missing": (["train", "resume={damaged}/nope"], 1, ("nope does not exist",)),
    "resume: truncated": (["train", "resume={damaged}/truncated.pt"], 1, ("unreadable or truncated",)),
    "resume: another format": (["train", "resume={damaged}/old.pt"], 1, ("checkpoint format 0",)),
    "resume: another model": (["train", "resume={damaged}/other-model.pt"], 1, ("does not match the model", "backbone.")),
    "resume: changed config": (
        ["train", "resume={run}", "backbone.hidden=32", "trainer.steps=2"],
        2,
        ("backbone.hidden=32 (the run has 16)", "drop these overrides, or start a new run"),
    ),
}


@pytest.mark.parametrize("name", list(CHECKPOINT_CASES))
def test_checkpoint(name, trained, damaged, tmp_path):
    args, code, needles = CHECKPOINT_CASES[name]
    args = [a.format(run=trained, damaged=damaged) for a in args]
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (trained / "checkpoints").iterdir())
    out = run_cli(*args, "logger=none", f"hydra.run.dir={tmp_path / 'job'}")
    check_one_line(out, code, *needles)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (trained / "checkpoints").iterdir()) == before

"""``metarun bench --peer learn2learn``: one line where learn2learn does not import, the peer rows where it does.

learn2learn is never a dependency: the rows are timed in the environment ``scripts/install_learn2learn.sh``
builds, and their test is skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from dataclasses import replace

import pytest
import torch

import metarun.bench.peer_learn2learn as peer
from metarun.bench.command import main as bench_main
from metarun.bench.command import parse_args
from metarun.cli import main as cli_main

HAS_LEARN2LEARN = importlib.util.find_spec("learn2learn") is not None


@pytest.mark.skipif(HAS_LEARN2LEARN, reason="learn2learn imports here: the peer rows are timed instead")
def test_without_learn2learn_the_peer_bench_stops_with_one_line_naming_the_install_script(tmp_path):
    from tests.conftest import run_cli  # (here: learn2learn's wheel ships a top-level `tests` package of its own)

    done = run_cli("bench", "--quick", "--peer", "learn2learn", "--out", str(tmp_path))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --peer learn2learn: learn2learn does not import here")
    assert "bash scripts/install_learn2learn.sh" in lines[0]
    assert not (tmp_path / "bench.json").exists()  # nothing was timed


def test_a_learn2learn_that_does_not_import_stops_the_bench_before_anything_is_timed(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # `import learn2learn` raises ImportError, installed or not
    with pytest.raises(SystemExit) as done:
        cli_main(["bench", "--peer", "learn2learn", "--out", str(tmp_path)])
    assert done.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "scripts/install_learn2learn.sh" in lines[0] and ".venv-learn2learn/bin/metarun" in lines[0]
    assert not (tmp_path / "bench.json").exists()


def test_only_peer_without_a_peer_is_refused(capsys):
    with pytest.raises(SystemExit) as done:
        parse_args(["--only", "peer"])
    assert done.value.code == 2
    assert "--peer learn2learn" in capsys.readouterr().err.strip().splitlines()[-1]
    assert parse_args(["--peer", "learn2learn", "--only", "peer"]).peer == "learn2learn"


def test_learn2learns_tasks_are_grouped_class_by_class_as_the_support_mask_assumes():
    l2l = learn2learn()
    from metarun.bench.command import random_dataset
    from metarun.bench.shapes import OMNIGLOT

    shape = replace(OMNIGLOT, train_classes=12, images_per_class=6)
    ds = random_dataset(shape, "omniglot")
    tasks = peer.Tasks(l2l, ds.splits["train"], ds.mean, ds.std, ways=5, shots=2, queries=3, device=torch.device("cpu"))
    for _ in range(5):
        data, labels = tasks.sample()
        assert data.shape == (25, 1, 28, 28)
        assert sorted(labels.tolist()) == sorted(list(range(5)) * 5)
        blocks = labels.view(5, 5)  # five consecutive samples a class
        assert (blocks == blocks[:, :1]).all()
        xs, ys, xq, yq = tasks.split(data, labels)
        assert (ys.view(5, 2) == blocks[:, :2]).all() and (yq.view(5, 3) == blocks[:, 2:]).all()


def test_a_tiny_peer_run_writes_learn2learns_rows_with_positive_rates(monkeypatch, tmp_path):
    learn2learn()
    quick_shape = peer.quick_shape
    tiny = {"meta_batch": 2, "hidden": 8}  # the shapes' episodes and images, a smaller Conv4 and meta-batch
    monkeypatch.setattr(peer, "quick_shape", lambda shape, quick: replace(quick_shape(shape, quick), **tiny))
    argv = ["--quick", "--peer", "learn2learn", "--only", "peer", "--repeats", "1", "--min-seconds", "0", "--out", str(tmp_path)]
    assert bench_main(argv) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    rows = payload["results"]
    names = [r["name"] for r in rows]
    assert set(names) == {"sampler", "maml", "fomaml", "anil", "protonet"}  # the peer rows alone
    for row in rows:
        assert row["reference"].startswith("learn2learn")
        assert row["value"] > 0 and row["reference_value"] > 0
        assert row["ratio"] == pytest.approx(row["value"] / row["reference_value"])
        assert row["target"] is None and row["met"] is None
    assert payload["machine"]["learn2learn"] == "0.2.0"
    assert any("learn2learn 0.2.0" in note for note in payload["notes"])
    # the settings `metarun train` picks and, where they differ, fp32 forced: one row each, against the same peer timing
    for name in set(names):
        settings = [r["settings"] for r in rows if r["name"] == name]
        assert len(settings) == len(set(settings)) and len(settings) in (1, 2)
        assert len(settings) == 1 or any("fp32" in s for s in settings)


def learn2learn():
    if not HAS_LEARN2LEARN:
        pytest.skip("learn2learn is not installed here (bash scripts/install_learn2learn.sh builds an environment with it)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peer.import_learn2learn()

"""``metarun report`` over sweep folders laid out as ``metarun train -m`` writes them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml

from metarun.errors import ConfigError
from metarun.report import BEST, chart, compare, find_runs, main
from metarun.results import mean_ci95
from tests.conftest import run_cli

RNG = np.random.default_rng(0)
BASE = {"5w1s": RNG.uniform(0.3, 0.9, 40), "5w5s": RNG.uniform(0.6, 1.0, 40)}


def make_run(folder: Path, overrides: list[str], scores: dict[str, np.ndarray], seed: int = 2026, key: str = "accuracy") -> None:
    """A run folder as training leaves it: eval.json, .hydra/overrides.yaml and .hydra/config.yaml."""
    (folder / ".hydra").mkdir(parents=True)
    results = []
    for name, per in scores.items():
        ways, shots = (int(x) for x in name.rstrip("s").split("w"))
        mean, ci = mean_ci95(per)
        results.append(
            {
                "ways": ways,
                "shots": shots,
                "queries": 15,
                "episodes": len(per),
                key: mean,
                "ci95": ci,
                "per_episode": per.tolist(),
            }
        )
    payload = {
        "split": "test",
        "checkpoint": str(folder / "checkpoints/best.pt"),
        "dataset": "glyphs",
        "protocol": "episodes",
        "bn_mode": "running",
        "results": results,
    }
    (folder / "eval.json").write_text(json.dumps(payload))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"dataset": {"_target_": "metarun.data.glyphs.load", "seed": 0}, "eval": {"seed": seed}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))


def read_csv(folder: Path) -> list[dict]:
    with (folder / "report.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Job 1 is best; job 0 trails it by 0.1 on every episode; job 2 differs from it by noise only."""
    make_run(tmp_path / "0", ["experiment=smoke", "trainer.lr=0.001"], {k: v - 0.1 for k, v in BASE.items()})
    make_run(tmp_path / "1", ["experiment=smoke", "trainer.lr=0.003"], BASE)
    make_run(
        tmp_path / "2",
        ["experiment=smoke", "trainer.lr=0.01"],
        {k: v + RNG.normal(0, 0.05, v.size) - 0.001 for k, v in BASE.items()},
    )
    return tmp_path


def test_table_has_the_varied_overrides_the_best_run_and_paired_differences(sweep, capsys):
    assert main([str(sweep)]) == 0
    rows = read_csv(sweep)
    assert [r["run"] for r in rows] == ["0", "1", "2"]
    assert [r["trainer.lr"] for r in rows] == ["0.001", "0.003", "0.01"]
    assert "experiment" not in rows[0]  # the same in every run
    assert [r["best"] for r in rows] == ["False", "True", "False"]
    assert float(rows[0]["5w1s_diff"]) == pytest.approx(-0.1) and rows[0]["5w1s_significant"] == "True"
    assert rows[2]["5w1s_significant"] == "False" and rows[2]["5w5s_significant"] == "False"
    assert rows[1]["5w1s_diff"] == ""  # the reference
    assert float(rows[1]["5w1s_accuracy"]) == pytest.approx(BASE["5w1s"].mean())

    md = (sweep / "report.md").read_text()
    assert "| ★ | 1 | 0.003 |" in md
    assert "-10.00 ± 0.00 |" in md and "n.s." in md
    png = (sweep / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    out = capsys.readouterr().out
    assert "★" in out and "report.png" in out


def test_chart_names_the_best_run_and_which_way_is_better(sweep, tmp_path_factory):
    losses = tmp_path_factory.mktemp("losses")
    make_run(losses / "0", ["algo.inner_lr=0.1"], {"1w10s": np.full(5, 0.5)}, key="mse")
    for folder, best_label, titles in [
        (sweep, "★ 1  lr=0.003", ["5w1s accuracy (%, higher is better)", "5w5s accuracy (%, higher is better)"]),
        (losses, "★ 0  algo.inner_lr=0.1", ["1w10s mse (lower is better)"]),
    ]:
        runs, _ = find_runs(folder)
        _, best = compare(runs)
        fig = chart("t", runs, best, ["trainer.lr"] if folder == sweep else [])
        ticks = fig.axes[0].get_yticklabels()
        assert [t.get_text() for t in ticks if t.get_fontweight() == "bold"] == [best_label]
        assert sum(BEST in t.get_text() for t in ticks) == 1
        assert [ax.get_title() for ax in fig.axes] == titles
        plt.close(fig)


def test_runs_on_other_episodes_are_not_paired(sweep):
    make_run(sweep / "3", ["experiment=smoke", "trainer.lr=0.03"], BASE, seed=7)
    main([str(sweep)])
    other = read_csv(sweep)[3]
    assert other["5w1s_diff"] == "" and other["5w1s_significant"] == ""


def test_failed_and_unfinished_runs_are_named_not_tabulated(sweep):
    failed = sweep / "3"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["trainer.lr=10"]))
    (failed / "failed.txt").write_text("non-finite loss by step 20\n\nTraceback ...")
    (sweep / "4" / ".hydra").mkdir(parents=True)
    (sweep / "4" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["trainer.lr=20"]))
    main([str(sweep)])
    assert len(read_csv(sweep)) == 3
    md = (sweep / "report.md").read_text()
    assert "(failed: non-finite loss by step 20)" in md and "(no eval.json)" in md


def test_lower_is_better_for_losses(tmp_path):
    make_run(tmp_path / "0", ["algo.inner_lr=0.1"], {"1w10s": np.full(5, 0.5) + RNG.normal(0, 0.01, 5)}, key="mse")
    make_run(tmp_path / "1", ["algo.inner_lr=0.3"], {"1w10s": np.full(5, 0.2) + RNG.normal(0, 0.01, 5)}, key="mse")
    main([str(tmp_path)])
    rows = read_csv(tmp_path)
    assert [r["best"] for r in rows] == ["False", "True"]
    assert float(rows[0]["1w10s_diff"]) == pytest.approx(0.3, abs=0.05)


def test_a_single_run_folder_is_a_report_of_one(tmp_path):
    make_run(tmp_path / "run", ["experiment=smoke"], BASE)
    main([str(tmp_path / "run")])
    assert read_csv(tmp_path / "run")[0]["best"] == "True"


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        main([str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="no eval.json under"):
        main([str(tmp_path)])
    out = run_cli("report", str(tmp_path / "missing"), timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert out.stderr.startswith("error: ") and "no such folder" in out.stderr


def test_help(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["--help"])
    assert ex.value.code == 0
    assert "usage: metarun report" in capsys.readouterr().out

"""``metarun report <run or sweep folder>``: every run's test results in one table and one chart.

A run is a folder holding ``eval.json``; its label is what the sweep varied,
read from ``.hydra/overrides.yaml``. Two runs evaluated on the same seeded
episodes (same dataset config, split, setting, episode count and seed) are
compared pairwise, episode by episode: the paired difference has a much
narrower interval than the two separate intervals suggest, so it is what tells
whether a run is really worse than the best one.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from metarun.errors import ConfigError
from metarun.results import PERCENT, higher_is_better, mean_ci95, per_item, scaled, score_key, setting_name
from metarun.sweep import FAILURE_FILE, folder_label, natural_key, read_overrides, short, varying_keys

BEST = "★"
PAIRED_NOTE = (
    f" Δ: paired difference from {BEST} over the identical test episodes, mean ± 95% CI;"
    " n.s.: not significant (the interval contains 0)."
)


@dataclass
class Score:
    key: str  # accuracy | error | mse | ...
    mean: float
    ci95: float
    items: np.ndarray
    #: what makes two runs' episodes identical; None when unknown
    episodes_id: tuple | None
    diff: tuple[float, float] | None = None  # paired difference from the best run: mean, ci95

    @property
    def unit(self) -> str:
        return " %" if self.key in PERCENT else ""

    def show(self, value: float, sign: str = "") -> str:
        return f"{scaled(self.key, value):{sign}.2f}" if self.key in PERCENT else f"{value:{sign}.4g}"

    @property
    def significant(self) -> bool | None:
        return None if self.diff is None else abs(self.diff[0]) > self.diff[1]


@dataclass
class Run:
    path: Path
    label: str
    overrides: dict[str, str]
    scores: dict[str, Score] = field(default_factory=dict)


def load_run(path: Path, root: Path) -> Run:
    payload = json.loads((path / "eval.json").read_text())
    config_file = path / ".hydra" / "config.yaml"
    config = OmegaConf.load(config_file) if config_file.exists() else None
    seed = payload.get("seed", config.eval.seed if config is not None else None)
    dataset = json.dumps(OmegaConf.to_container(config.dataset), sort_keys=True) if config is not None else None
    run = Run(path, str(path.relative_to(root)) if path != root else path.name, read_overrides(path))
    for r in payload["results"]:
        key, items = score_key(r), np.asarray(per_item(r), dtype=np.float64)
        known = seed is not None and dataset is not None
        episodes_id = (
            (dataset, payload["split"], payload["protocol"], r["ways"], r["shots"], r.get("queries"), len(items), seed)
            if known
            else None
        )
        run.scores[setting_name(r, payload["protocol"])] = Score(key, r[key], r["ci95"], items, episodes_id)
    return run


def find_runs(root: Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """The evaluated runs under ``root``, and the run folders without results (with the reason)."""
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder")
    folders = {p.parent for p in root.rglob("eval.json")} | {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    runs, skipped = [], []
    for folder in sorted(folders, key=natural_key):
        if (folder / "eval.json").exists():
            runs.append(load_run(folder, root))
        else:
            failure = folder / FAILURE_FILE
            skipped.append((folder, "failed: " + failure.read_text().splitlines()[0] if failure.exists() else "no eval.json"))
    if not runs:
        raise ConfigError(f"no eval.json under {root}: train (metarun train) or evaluate (metarun eval) a run first")
    return runs, skipped


def compare(runs: list[Run]) -> tuple[str, Run]:
    """The best run by the first setting, and every run's paired difference from it where episodes match."""
    primary = next(iter(runs[0].scores))
    candidates = [r for r in runs if primary in r.scores]
    key = candidates[0].scores[primary].key
    pick = max if higher_is_better(key) else min
    best = pick(candidates, key=lambda r: r.scores[primary].mean)
    for run in runs:
        for name, score in run.scores.items():
            ref = best.scores.get(name)
            if run is not best and ref is not None and score.episodes_id is not None and score.episodes_id == ref.episodes_id:
                score.diff = mean_ci95(score.items - ref.items)
    return primary, best


def labels_of(run: Run, keys: list[str]) -> list[str]:
    """What tells the run apart: the varying overrides, or all of them when nothing varies (a single run)."""
    if keys:
        return [short(run.overrides.get(k, "—")) for k in keys]
    return [" ".join(f"{k}={short(v)}" for k, v in run.overrides.items())]


def settings_of(runs: list[Run]) -> list[str]:
    return list(dict.fromkeys(name for r in runs for name in r.scores))


def paired_settings(runs: list[Run]) -> set[str]:
    return {s for s in settings_of(runs) if any(r.scores.get(s) and r.scores[s].diff for r in runs)}


def rows(runs: list[Run], best: Run, keys: list[str]) -> tuple[list[str], list[list[str]]]:
    """The table as text, shared by the terminal and ``report.md``."""
    settings, paired = settings_of(runs), paired_settings(runs)
    header = ["", "run", *(keys or ["overrides"])]
    for s in settings:
        unit = next(r.scores[s] for r in runs if s in r.scores)
        header.append(f"{s} {unit.key}{unit.unit}")
        if s in paired:
            header.append(f"Δ {s}")
    body = []
    for run in runs:
        row = [BEST if run is best else "", run.label, *labels_of(run, keys)]
        for s in settings:
            score = run.scores.get(s)
            row.append(f"{score.show(score.mean)} ± {score.show(score.ci95)}" if score else "—")
            if s in paired:
                row.append(diff_text(score, run is best))
        body.append(row)
    return header, body


def diff_text(score: Score | None, is_best: bool) -> str:
    if is_best:
        return "ref"
    if score is None or score.diff is None:
        return "—"
    mean, ci = score.diff
    return f"{score.show(mean, '+')} ± {score.show(ci)}" + ("" if score.significant else " n.s.")


def write_markdown(
    path: Path, title: str, header: list[str], body: list[list[str]], note: str, skipped: list[tuple[Path, str]]
) -> None:
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    lines += ["", note]
    lines += [f"- not in the table: `{folder}` ({reason})" for folder, reason in skipped]
    path.write_text("\n".join(lines) + "\n")


def write_csv(path: Path, runs: list[Run], best: Run, keys: list[str]) -> None:
    """Raw values as in ``eval.json`` (fractions, not percent), one row per run."""
    settings = settings_of(runs)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        header = ["run", "best", *keys]
        for s in settings:
            key = next(r.scores[s].key for r in runs if s in r.scores)
            header += [f"{s}_{key}", f"{s}_ci95", f"{s}_diff", f"{s}_diff_ci95", f"{s}_significant"]
        writer.writerow(header)
        for run in runs:
            row = [run.label, run is best, *(run.overrides.get(k, "") for k in keys)]
            for s in settings:
                score = run.scores.get(s)
                if score is None:
                    row += [""] * 5
                    continue
                diff = score.diff or ("", "")
                row += [score.mean, score.ci95, *diff, "" if score.significant is None else score.significant]
            writer.writerow(row)


def plot(path: Path, title: str, runs: list[Run], best: Run, keys: list[str]) -> None:
    fig = chart(title, runs, best, keys)
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


def chart(title: str, runs: list[Run], best: Run, keys: list[str]):
    """One panel per setting: each run's score with its 95% interval; the best run and its statistical ties stand out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = settings_of(runs)
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    shown = leaves if len(set(leaves)) == len(leaves) else keys  # trainer.lr reads as lr unless two keys share a leaf
    pairs = ((run, labels_of(run, keys)) for run in runs)
    names = [
        f"{BEST + ' ' if run is best else ''}{run.label}  "
        + (" ".join(f"{k}={v}" for k, v in zip(shown, values, strict=True)) if keys else values[0])
        for run, values in pairs
    ]
    height = 1.6 + 0.38 * len(runs)
    width = 0.6 + 0.07 * max(map(len, names)) + 4.2 * len(settings)
    fig, axes = plt.subplots(1, len(settings), figsize=(width, height), sharey=True, squeeze=False)
    colours = {"best": "#d62728", "tie": "#ff7f0e", "worse": "#1f77b4", "unpaired": "#7f7f7f"}
    legend = {
        "best": f"{BEST} best",
        "tie": "not significantly different from best (paired)",
        "worse": "significantly different from best (paired)",
        "unpaired": "not paired with best (its episodes differ or best lacks the setting)",
    }
    used = set()
    for ax, s in zip(axes[0], settings, strict=True):
        key = next(r.scores[s].key for r in runs if s in r.scores)
        for y, run in enumerate(runs):
            score = run.scores.get(s)
            if score is None:
                continue
            kind = "best" if run is best else "unpaired" if score.significant is None else "worse" if score.significant else "tie"
            used.add(kind)
            ax.errorbar(scaled(key, score.mean), y, xerr=scaled(key, score.ci95), fmt="o", color=colours[kind], capsize=3, ms=6)
        if s in best.scores:
            ax.axvline(scaled(key, best.scores[s].mean), color=colours["best"], lw=0.8, ls="--", alpha=0.6)
        direction = "higher" if higher_is_better(key) else "lower"
        ax.set_title(f"{s} {key} ({'%, ' if key in PERCENT else ''}{direction} is better)")
        ax.grid(axis="x", alpha=0.3)
        ax.set_yticks(range(len(runs)), names)
        ax.set_ylim(len(runs) - 0.5, -0.5)
    for label, run in zip(axes[0][0].get_yticklabels(), runs, strict=True):
        if run is best:
            label.set_fontweight("bold")
    handles = [plt.Line2D([], [], color=colours[k], marker="o", ls="", label=legend[k]) for k in colours if k in used]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=8)
    fig.suptitle(f"{title}: test score ± 95% CI", fontsize=11)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))
    return fig


def cross_domain(root: Path, setting: str | None = None) -> tuple[str, list[str], list[list[str]]]:
    """A trained-on × evaluated-on table of every ``eval*.json`` under ``root``: ``(setting, header, rows)``; each cell
    is the mean ± 95% CI of ``setting`` (default: the first setting found), averaged cells where several runs share a pair."""
    cells: dict[tuple[str, str], list[Score]] = {}
    for path in sorted(root.rglob("eval*.json"), key=natural_key):
        payload = json.loads(path.read_text())
        if "results" not in payload:
            continue
        trained, evaluated = payload.get("trained_on", payload["dataset"]), payload.get("evaluated_on", payload["dataset"])
        for r in payload["results"]:
            name = setting_name(r, payload["protocol"])
            setting = setting or name
            if name == setting:
                key = score_key(r)
                cells.setdefault((trained, evaluated), []).append(Score(key, r[key], r["ci95"], np.asarray(per_item(r)), None))
    if not cells:
        raise ConfigError(f"no eval*.json with a {setting or 'first'} setting under {root}: evaluate runs first (metarun eval)")
    trained_on = list(dict.fromkeys(t for t, _ in cells))
    evaluated_on = list(dict.fromkeys(e for _, e in cells))
    body = []
    for t in trained_on:
        row = [t]
        for e in evaluated_on:
            scores = cells.get((t, e))
            if not scores:
                row.append("—")
                continue
            mean, ci = (
                mean_ci95(np.concatenate([s.items for s in scores]))
                if all(len(s.items) for s in scores)
                else (scores[0].mean, scores[0].ci95)
            )
            row.append(f"{scores[0].show(mean)} ± {scores[0].show(ci)}{scores[0].unit}")
        body.append(row)
    return setting, ["trained on \\ evaluated on", *evaluated_on], body


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="metarun report",
        description="Gathers every run's eval.json under a run or sweep folder into one table (terminal, report.md, "
        "report.csv) and a chart (report.png), written into that folder.",
    )
    parser.add_argument("folder", type=Path, help="a run folder or a sweep folder (outputs/multirun/...)")
    parser.add_argument(
        "--cross-domain",
        action="store_true",
        help="a trained-on × evaluated-on table of the runs' evaluations (metarun eval checkpoint=RUN dataset=...)",
    )
    parser.add_argument("--setting", default=None, help="the setting shown with --cross-domain, e.g. 5w1s (default: the first)")
    args = parser.parse_args(argv)
    root = args.folder.resolve()
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder")
    if args.cross_domain:
        setting, header, body = cross_domain(root, args.setting)
        title = f"{folder_label(root)}: {setting} test score, trained on (rows) × evaluated on (columns)"
        table = Table(*header, title=title)
        for row in body:
            table.add_row(*row)
        Console().print(table)
        write_markdown(root / "cross_domain.md", title, header, body, "", [])
        Console().print(f"written: {root / 'cross_domain.md'}", soft_wrap=True)
        return 0
    runs, skipped = find_runs(root)
    primary, best = compare(runs)
    keys = varying_keys([r.overrides for r in runs])
    header, body = rows(runs, best, keys)
    note = f"{BEST} best by {primary} {best.scores[primary].key}." + (PAIRED_NOTE if paired_settings(runs) else "")
    title = f"{folder_label(root)} ({len(runs)} run{'s' * (len(runs) != 1)})"

    table = Table(*header, title=title, caption=note)
    for row in body:
        table.add_row(*row, style="bold" if row[0] == BEST else None)
    console = Console()
    if not console.is_terminal:  # a file or a pipe: the whole table, unwrapped
        console.width = console.measure(table, options=console.options.update_width(10_000)).maximum
    console.print(table)
    for folder, reason in skipped:
        console.print(f"not in the table: {folder} ({reason})", soft_wrap=True)
    write_markdown(root / "report.md", title, header, body, note, skipped)
    write_csv(root / "report.csv", runs, best, keys)
    plot(root / "report.png", title, runs, best, keys)
    console.print(f"written: {root / 'report.md'}, {root / 'report.csv'}, {root / 'report.png'}", soft_wrap=True)
    return 0

"""The training progress display: a rich bar on a terminal, one line per log step elsewhere (CI, SLURM logs)."""

from __future__ import annotations

import sys

from rich.progress import Progress, TextColumn

from metarun.progress import columns, console


class TrainingProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.live = enabled and sys.stderr.isatty()
        self.progress: Progress | None = None

    def __enter__(self) -> TrainingProgress:
        if self.live:
            self.progress = Progress(*columns(TextColumn("{task.fields[stats]}")), console=console)
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=self.total, completed=self.start, stats="")
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def update(self, step: int, row: dict) -> None:
        stats = " ".join(f"{k} {row[k]:.4g}" for k in ("loss", "acc", "mse") if k in row)
        stats += f" {row['steps_per_s']:.2f} it/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=stats)
        elif self.enabled:
            console.print(f"step {step}/{self.total} {stats}", highlight=False)

    def validation(self, step: int, score: str, value: float, best: float) -> None:
        if self.enabled:
            shown = (lambda v: f"{100 * v:.2f}%") if score == "accuracy" else (lambda v: f"{v:.4f}")
            console.print(f"step {step}: validation {score} {shown(value)} (best {shown(best)})", highlight=False)

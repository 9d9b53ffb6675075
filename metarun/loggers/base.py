"""The logger interface the trainer and evaluation write to."""

from __future__ import annotations

from pathlib import Path


class Logger:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Training or validation metrics at ``step``."""

    def log_eval(self, results: list[dict], protocol: str) -> None:
        """Final evaluation results (one dict per setting, as in ``eval.json``)."""

    def log_checkpoint(self, path: Path) -> None:
        """A checkpoint worth keeping (``best.pt``)."""

    def close(self) -> None:
        pass


class Loggers(Logger):
    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def log(self, step, metrics):
        for lg in self.loggers:
            lg.log(step, metrics)

    def log_eval(self, results, protocol):
        for lg in self.loggers:
            lg.log_eval(results, protocol)

    def log_checkpoint(self, path):
        for lg in self.loggers:
            lg.log_checkpoint(path)

    def close(self):
        for lg in self.loggers:
            lg.close()

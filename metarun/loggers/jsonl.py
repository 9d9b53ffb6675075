"""``metrics.jsonl``: one JSON object per logged step, flushed as written.

On resume the rows past the checkpoint's step (written before the run was
killed) are dropped, so the file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

from metarun.loggers.base import Logger

#: fields that measure time, not learning; excluded when runs are compared
TIMING_FIELDS = ("steps_per_s", "elapsed_s", "tasks_per_s")


class JsonlLogger(Logger):
    def __init__(self, path: Path, truncate_after: int | None = None) -> None:
        self.path = path
        if truncate_after is not None and path.exists():
            rows = [r for r in read_metrics(path) if r["step"] <= truncate_after]
            kept = path.with_name(path.name + ".tmp")  # renamed over the file: a kill now cannot lose the rows
            kept.write_text("".join(json.dumps(r) + "\n" for r in rows))
            kept.replace(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")

    def log(self, step, metrics):
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            break
    return rows

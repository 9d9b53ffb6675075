"""Weights & Biases: the run's config, curves, test results and best checkpoint.

A training run must never wait on the network or ask a question: ``mode=auto``
goes online only when credentials exist, and falls back to offline when the
server cannot be reached. A TCP connection is tried first: without network it
fails within seconds, where ``wandb.init`` would wait out its whole timeout.
Everything W&B writes lives in the run folder (``<run>/wandb/``), so an
offline run is uploaded later with ``wandb sync`` and deleting the run folder
deletes everything.

The run folder remembers its W&B run in ``wandb_run.json`` (id, project,
entity, name, group): a resumed training continues that run and ``metarun
eval`` adds its results to it, in the same project, even when the later command
was given other logger settings.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
from pathlib import Path
from urllib.parse import urlsplit

import wandb
from omegaconf import DictConfig, OmegaConf

from metarun.errors import ConfigError, MetarunError
from metarun.loggers.base import Logger
from metarun.progress import console
from metarun.results import scaled, score_key, setting_name

MODES = ("auto", "online", "offline", "disabled")
IDENTITY_FILE = "wandb_run.json"
#: seconds wandb.init may spend reaching the server (W&B's own default is 90); WANDB_INIT_TIMEOUT overrides
INIT_TIMEOUT = 30.0
#: seconds an auto-mode run waits for a TCP connection to the server before it logs offline
PROBE_TIMEOUT = 5.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
#: the summary name of each score (test/5w1s/acc); others keep their own (test/1w10s/mse)
SUMMARY_NAMES = {"accuracy": "acc"}


def resolve_mode(mode: str) -> str:
    """``auto``: WANDB_MODE if set, else online with credentials (env, netrc or settings file), else offline."""
    if mode not in MODES:
        raise ConfigError(f"logger.wandb.mode={mode}: valid modes are {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb.login(prompt=False, verify=False) else "offline"


def unreachable(base_url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why no TCP connection to the W&B server opens (``host:port: reason``); None when one does.

    None as well behind a proxy, which alone knows whether the server can be reached.
    """
    settings = wandb.setup().settings
    if settings.https_proxy or settings.http_proxy or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None
    url = urlsplit(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as ex:
        return f"{url.hostname}:{port}: {ex.strerror or ex}"
    return None


def eval_summary(results: list[dict], protocol: str) -> dict[str, float]:
    """``test/5w1s/acc`` and ``test/5w1s/ci95`` (percent for accuracy and error, raw for regression losses)."""
    summary = {}
    for r in results:
        key, prefix = score_key(r), f"test/{setting_name(r, protocol)}"
        summary[f"{prefix}/{SUMMARY_NAMES.get(key, key)}"] = scaled(key, r[key])
        summary[f"{prefix}/ci95"] = scaled(key, r["ci95"])
    return summary


def eval_table(results: list[dict], protocol: str) -> wandb.Table:
    key = score_key(results[0])
    columns = ["setting", "ways", "shots", "queries", "episodes", key, "ci95"]
    rows = [
        [
            setting_name(r, protocol),
            r["ways"],
            r["shots"],
            r.get("queries"),
            r.get("episodes", r.get("runs")),
            scaled(key, r[key]),
            scaled(key, r["ci95"]),
        ]
        for r in results
    ]
    return wandb.Table(columns=columns, data=rows)


class WandbLogger(Logger):
    """One W&B run per training run; evaluation joins it or, with ``new_run``, starts its own ``eval`` run."""

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        run_config: DictConfig,
        job_type: str = "train",
        name: str | None = None,
        group: str | None = None,
        resume: bool = False,
    ) -> None:
        wandb.setup(settings=wandb.Settings(silent=True))  # one line of ours replaces W&B's login and run banners
        self.log_checkpoints = cfg.log_checkpoints
        self.checkpoint: Path | None = None
        identity_path = run_dir / IDENTITY_FILE
        stored = json.loads(identity_path.read_text()) if identity_path.exists() else None
        continues = stored is not None and (resume if job_type == "train" else not cfg.new_run)
        if stored is None:
            identity = {
                "project": cfg.project,
                "entity": cfg.entity,
                "name": cfg.name or name or run_dir.name,
                "group": cfg.group or group,
            }
        elif continues:
            identity = {k: stored[k] for k in ("project", "entity", "name", "group")}
        else:  # a new run beside the training run, in its project
            identity = {
                "project": stored["project"],
                "entity": stored["entity"],
                "name": cfg.name or stored["name"],
                "group": cfg.group or stored["group"],
            }
        if continues:  # job type, tags and config stay those of the run being continued
            init = dict(identity, id=stored["id"], resume="allow")
        else:
            init = dict(identity, job_type=job_type, tags=list(cfg.tags), config=OmegaConf.to_container(run_config, resolve=True))
        init["dir"] = str(run_dir)
        self.run = start_run(init, resolve_mode(cfg.mode), cfg.mode == "auto")
        if job_type == "train" and not continues and not self.run.disabled:
            identity_path.write_text(json.dumps({"id": self.run.id, **identity}, indent=1))

    def log(self, step, metrics):
        self.run.log({k if "/" in k else f"train/{k}": v for k, v in metrics.items()}, step=step)

    def log_eval(self, results, protocol):
        self.run.summary.update(eval_summary(results, protocol))
        self.run.log({"test/results": eval_table(results, protocol)})

    def log_checkpoint(self, path):
        self.checkpoint = Path(path)

    def close(self):
        if self.log_checkpoints and self.checkpoint is not None and self.checkpoint.exists():
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model")
            artifact.add_file(str(self.checkpoint))
            self.run.log_artifact(artifact, aliases=["best"])
        self.run.finish()


def start_run(init: dict, mode: str, may_fall_back: bool):
    """``wandb.init`` that never prompts and never blocks for long; says in one line where the run went."""
    timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT))
    settings = wandb.Settings(silent=True, console="off", init_timeout=timeout)
    if mode == "online" and may_fall_back and (reason := unreachable(wandb.setup().settings.base_url)):
        console.print(f"W&B server unreachable ({reason}); logging offline instead", soft_wrap=True)
        mode = "offline"
    try:
        run = wandb.init(**init, mode=mode, settings=settings)
    except wandb.Error as ex:
        reason = str(ex).splitlines()[0]
        if mode != "online" or not may_fall_back:
            hint = " (logger.wandb.mode=offline logs without network)" if mode == "online" else ""
            raise MetarunError(f"W&B could not start the run ({mode}): {reason}{hint}") from ex
        console.print(f"W&B could not start the run online ({reason}); logging offline instead", soft_wrap=True)
        run = wandb.init(**init, mode="offline", settings=settings)
    if run.offline:
        console.print(
            f"W&B run saved offline; upload it with: wandb sync {sync_paths(Path(run.sync_dir), run.id)}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
    elif not run.disabled:
        console.print(f"W&B run: {run.url}", soft_wrap=True)
    return run


def sync_paths(sync_dir: Path, run_id: str) -> str:
    """What ``wandb sync`` needs for this offline run: its folder, or every offline part of a continued run.

    A resumed training or a ``metarun eval`` that joins an offline run writes a
    further ``offline-run-<time>-<id>`` folder; ``wandb sync`` given all of
    them uploads them in order, into the one run.
    """
    parts = list(sync_dir.parent.glob(f"offline-run-*-{run_id}"))
    if len(parts) > 1:
        return f"{shlex.quote(str(sync_dir.parent))}/offline-run-*-{run_id}"
    return shlex.quote(str(sync_dir))


def finish_abandoned_run() -> None:
    """A job that raised never closed its logger: mark its run failed, before the sweep's next job starts one.

    ``wandb.init`` would otherwise hand the next job the same, still open, run.
    """
    if wandb.run is not None:
        wandb.run.finish(exit_code=1)

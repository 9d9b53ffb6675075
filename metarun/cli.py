"""``metarun <command> [hydra overrides]``.

Hydra has no sub-commands, so the command word is taken off ``argv`` (and off
``COMP_LINE`` for shell completion) before Hydra parses the rest; each command
is its own Hydra app with its own primary config and job name.

Errors reach the user as one line: Hydra's composition errors and
:class:`~metarun.errors.ConfigError` exit with 2, other
:class:`~metarun.errors.MetarunError` with 1. ``--debug`` or
``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metarun.allocator import keep_freed_memory
from metarun.errors import describe, user_error

COMMANDS = {
    "train": ("train", "meta-train a model (then evaluate its best checkpoint)"),
    "eval": ("eval", "few-shot accuracy ± 95% CI of a run folder or checkpoint"),
}
EXTRA_COMMANDS = {
    "report": "a table and chart of every run under a run or sweep folder",
    "bench": "the speed benchmark (see `make bench`)",
    "predict": "label your own images with a trained run, from a few labelled examples per class",
}

USAGE = """usage: metarun <command> [overrides] [-m] [--cfg job] [--help] [--debug]

commands:
{commands}

Overrides are Hydra's: `metarun train algo=maml dataset=omniglot task.shots=5`.
`metarun <command> --help` lists the config groups and their options.
"""


#: appended for the ranks other than 0 of a ``torchrun`` launch: they write nothing (no run folder, no
#: ``.hydra/``, no log file); the trainer takes rank 0's run folder, whose name Hydra takes from the clock
SILENT_RANK = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none")


#: Hydra's mutually exclusive flags, by spelling
MODE_FLAGS = {"-m": "--multirun", "--multirun": "--multirun", "-c": "--cfg", "--cfg": "--cfg", "-i": "--info", "--info": "--info"}


def report(ex: BaseException) -> int:
    """Prints ``ex`` as one line and returns its exit code (2: usage/config, 1: run time, 130: Ctrl-C)."""
    line, code = describe(ex)
    hint = " (run with --debug for the traceback)" if code == 1 and user_error(ex) is None else ""
    print(f"error: {line}{hint}", file=sys.stderr)
    return code


def run_and_report(func: Callable[[], Any]) -> Any:
    """Replaces Hydra's reporter (composition errors and anything outside a job)."""
    try:
        return func()
    except (Exception, KeyboardInterrupt) as ex:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(report(ex))


def single_run_errors(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """In a single run, a failing job ends the process with its one line; sweeps handle failures per job."""

    @functools.wraps(task)
    def wrapper(cfg):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
            return task(cfg)
        try:
            return task(cfg)
        except (Exception, KeyboardInterrupt) as ex:
            sys.exit(report(ex))

    return wrapper


def completion(argv: list[str]) -> int | None:
    """Shell completion: route Hydra's ``-sc query=...`` to the command named in ``COMP_LINE``."""
    if not any(a in ("-sc", "--shell-completion") for a in argv) or not any(a.startswith("query=") for a in argv):
        return None
    words = os.environ.get("COMP_LINE", "").split()
    names = list(COMMANDS) + list(EXTRA_COMMANDS)
    typed = os.environ.get("COMP_LINE", "")
    if len(words) >= 2 and words[1] in COMMANDS:
        os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]]) + (" " if typed.endswith(" ") else "")
        os.environ["COMP_POINT"] = str(len(os.environ["COMP_LINE"]))
        return None
    prefix = words[1] if len(words) == 2 and not typed.endswith(" ") else ""
    print(" ".join(n for n in names if n.startswith(prefix)))
    return 0


def run_hydra_command(command: str, argv: list[str]) -> None:
    import hydra
    import hydra._internal.utils as hydra_utils

    from metarun.config import config_dir, register_configs

    register_configs()
    hydra_utils.run_and_report = run_and_report

    def task(cfg):
        """Imports the command's code only once a job starts: torch takes seconds to import, and a typo
        or a value out of range in an override (or ``--help``, ``--cfg job``) deserves its answer before that."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from metarun.config import EvalJobConfig, TrainConfig, check_values

        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        overrides = list(hydra_cfg.overrides.task)
        if not multirun:  # in a sweep, the job checks and records its own failure
            check_values(cfg, TrainConfig if command == "train" else EvalJobConfig)
        if command == "eval":
            from metarun.evaluation import eval_task

            return eval_task(cfg, overrides)
        from metarun.sweep import run_job, run_labels
        from metarun.trainer import train

        run_dir = Path(hydra_cfg.runtime.output_dir)
        name, group = run_labels(hydra_cfg, cfg)
        job = functools.partial(train, cfg, run_dir, run_name=name, run_group=group, overrides=overrides)
        return run_job(job, run_dir, multirun=multirun)  # the best validation score, for sweepers

    modes = {MODE_FLAGS[a] for a in argv if a in MODE_FLAGS}
    if len(modes) > 1:
        print(f"error: {' and '.join(sorted(modes))} cannot be combined: give only one of them", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) > 0:
        argv = [*argv, *SILENT_RANK]
    sys.argv = [f"metarun {command}", *argv]
    hydra.main(config_path=config_dir(), config_name=COMMANDS[command][0], version_base="1.3")(single_run_errors(task))()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ["HYDRA_FULL_ERROR"] = "1"
    if (code := completion(argv)) is not None:
        sys.exit(code)
    if argv and argv[0] in ("-sc", "--shell-completion"):
        argv = ["train", *argv]  # installing completion: any command's script serves all of them
    if not argv or argv[0] in ("-h", "--help", "help"):
        lines = [f"  {name:<8}{desc}" for name, (_, desc) in COMMANDS.items()]
        lines += [f"  {name:<8}{desc}" for name, desc in EXTRA_COMMANDS.items()]
        print(USAGE.format(commands="\n".join(lines)), end="")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    keep_freed_memory()
    if command in COMMANDS:
        run_hydra_command(command, rest)
    elif command == "report":
        from metarun.report import main as report_main

        sys.exit(run_and_report(lambda: report_main(rest)))
    elif command == "bench":
        from metarun.bench import main as bench_main

        sys.exit(run_and_report(lambda: bench_main(rest)))
    elif command == "predict":
        from metarun.predictor import main as predict_main

        sys.exit(run_and_report(lambda: predict_main(rest)))
    else:
        names = ", ".join([*COMMANDS, *EXTRA_COMMANDS])
        print(f"error: unknown command '{command}': valid commands are {names} (see metarun --help)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

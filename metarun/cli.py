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

import os
import re
import sys
from importlib import resources
from typing import Any, Callable

from metarun.errors import ConfigError, MetarunError

COMMANDS = {
    "train": ("train", "meta-train a model (then evaluate its best checkpoint)"),
    "eval": ("eval", "few-shot accuracy ± 95% CI of a run folder or checkpoint"),
}
EXTRA_COMMANDS = {
    "report": "a table and chart of every run under a run or sweep folder",
    "bench": "the speed benchmark (see `make bench`)",
}

USAGE = """usage: metarun <command> [overrides] [-m] [--cfg job] [--help] [--debug]

commands:
{commands}

Overrides are Hydra's: `metarun train algo=maml dataset=omniglot task.shots=5`.
`metarun <command> --help` lists the config groups and their options.
"""


def config_dir() -> str:
    return str(resources.files("metarun.conf"))


def one_line(ex: BaseException) -> str:
    """Hydra's multi-line composition messages, folded into one line a user can act on."""
    text = str(ex)
    if isinstance(ex.__cause__, Exception) and str(ex.__cause__) and str(ex.__cause__) not in text:
        text = f"{text}: {ex.__cause__}"
    text = text.split("\nConfig search path")[0]
    text = re.sub(r"Available options in '([^']+)':\s*", r"valid options for \1: ", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("full_key")]
    joined = lines[0] if lines else type(ex).__name__
    rest = [ln for ln in lines[1:] if not ln.startswith(("object_type", "Set the environment"))]
    if rest and joined.rstrip().endswith(("valid options for", ":")) is False and "valid options for" in text:
        joined = f"{joined} ({', '.join(rest)})" if not joined.endswith(": ") else joined + ", ".join(rest)
    elif rest:
        joined = f"{joined} ({'; '.join(rest)})"
    return re.sub(r"\s+", " ", joined).strip()


def is_config_error(ex: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(ex, (ConfigError, HydraException, OmegaConfBaseException)) or isinstance(
        ex.__cause__, OmegaConfBaseException
    )


def run_and_report(func: Callable[[], Any]) -> Any:
    """Replaces Hydra's reporter: one line and an exit code (2: usage/config, 1: run time)."""
    try:
        return func()
    except Exception as ex:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        code = 2 if is_config_error(ex) else getattr(ex, "exit_code", 1)
        if isinstance(ex, MetarunError) or code == 2:
            print(f"error: {one_line(ex)}", file=sys.stderr)
        else:
            print(f"error: {type(ex).__name__}: {one_line(ex)} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(code)


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

    from metarun.config import register_configs

    register_configs()
    hydra_utils.run_and_report = run_and_report
    if command == "train":
        from metarun.trainer import train_task as task
    else:
        from metarun.evaluation import eval_task as task
    sys.argv = [f"metarun {command}", *argv]
    hydra.main(config_path=config_dir(), config_name=COMMANDS[command][0], version_base="1.3")(task)()


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
    if command in COMMANDS:
        run_hydra_command(command, rest)
    elif command == "report":
        from metarun.report import main as report_main

        sys.exit(run_and_report(lambda: report_main(rest)))
    elif command == "bench":
        from metarun.bench import main as bench_main

        sys.exit(run_and_report(lambda: bench_main(rest)))
    else:
        names = ", ".join([*COMMANDS, *EXTRA_COMMANDS])
        print(f"error: unknown command '{command}': valid commands are {names} (see metarun --help)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

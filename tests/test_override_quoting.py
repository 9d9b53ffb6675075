"""Paths typed on the command line: a value Hydra's grammar cannot read unquoted gets one line showing the quoted
form, and that form (and a plain value with a space, which Hydra reads as it is) reaches the command."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.conftest import run_cli

ODD = "données ü/x"  # a space and non-ASCII letters, as in ~/Données/oiseaux

#: every key a user types a path into, with the command that reads it
PATH_KEYS = [
    ("train", "dataset.path", ["dataset=folder"]),
    ("train", "dataset.root", []),
    ("train", "resume", []),
    ("eval", "checkpoint", []),
    ("eval", "eval.runs_path", ["checkpoint=x"]),
    ("train", "backbone.weights", ["backbone=resnet18"]),
    ("train", "trainer.init_from", ["algo=weightgen"]),
]


def suggested(stderr: str) -> list[str]:
    """The override the error line suggests, split as bash would."""
    return shlex.split(re.search(r"in bash: (.+)$", stderr.strip()).group(1))


@pytest.mark.parametrize(("command", "key", "extra"), PATH_KEYS, ids=[k for _, k, _ in PATH_KEYS])
def test_an_unreadable_value_gets_one_line_with_its_quoted_form(command, key, extra):
    out = run_cli(command, *extra, f"{key}={ODD}", "logger=none")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "LexerNoViableAltException" not in out.stderr
    (line,) = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert line.startswith(f"error: cannot read the value of {key}={ODD} unquoted")
    assert suggested(line) == [f'{key}="{ODD}"']


def test_the_quoted_form_carries_quotes_and_backslashes_through_bash():
    value = 'it\'s "ü" a\\b'
    out = run_cli("train", "dataset=folder", f"dataset.path={value}", "logger=none")
    assert out.returncode == 2, out.stderr
    again = run_cli("train", "dataset=folder", *suggested(out.stderr), "logger=none")
    assert again.returncode == 1 and f"{value} is not a folder" in again.stderr, again.stderr


def test_a_value_with_a_space_reaches_the_command_as_typed():
    out = run_cli("train", "dataset=folder", "dataset.path=my data/x", "logger=none")
    assert out.returncode == 1 and "error: my data/x is not a folder" in out.stderr, out.stderr


def test_quoted_paths_train_evaluate_and_resume(tmp_path, tiny):
    root, run = tmp_path / "my data ü", tmp_path / "runs ü" / "one"
    quoted = {name: f'"{path}"' for name, path in (("root", root), ("run", run))}
    base = [t for t in tiny if not t.startswith("dataset.root=")]
    trained = run_cli("train", *base, f"dataset.root={quoted['root']}", f"hydra.run.dir={quoted['run']}")
    assert trained.returncode == 0, trained.stderr
    assert (root / ".metarun-cache").exists() or any(root.rglob("*")), "the glyphs cache went somewhere else"
    assert (run / "eval.json").is_file()
    evaluated = run_cli(
        "eval", f"checkpoint={quoted['run']}", "eval.episodes=4", "logger=none", f"hydra.run.dir={tmp_path / 'e'}"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    resumed = run_cli("train", f"resume={quoted['run']}", f"hydra.run.dir={tmp_path / 'r'}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"→ {run}" in resumed.stdout + resumed.stderr  # it continued the quoted run, not a new one

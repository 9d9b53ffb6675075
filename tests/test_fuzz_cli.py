"""Random command lines never end in a traceback: exit 0, or one ``error:`` line with exit 1 or 2.

Override lists are drawn from what a user can type: the options of every
config group in conf/, the keys of the schemas in metarun/config.py with
values of their type, of the wrong type, out of range, plus misspelt keys and
broken syntax. Most cases compose with ``--cfg job`` in this process (fast);
a few run a tiny training in a subprocess, where impossible episodes and
run-time checks are met.
"""

from __future__ import annotations

import contextlib
import io
import sys
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import hydra._internal.utils as hydra_utils
import pytest
from hydra.core.global_hydra import GlobalHydra
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metarun.cli import main
from metarun.config import TrainConfig, schemas
from tests.conftest import REPO, run_cli

CONF = REPO / "conf"
GROUPS = {
    d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(CONF.iterdir()) if d.is_dir() and not d.name.startswith("_")
}
DEFAULTS = {"dataset": "glyphs", "backbone": "conv4", "algo": "protonet"}
SCHEMAS = schemas()
JUNK = st.sampled_from(["", "abc", "-1", "1e999", "[1,2]", "{a:1}", "null", "${oops}", "x y", "'quoted'", "true"])


def schema_keys(schema: type, prefix: str = "") -> dict[str, tuple]:
    """``{dotted key: (type, field metadata)}`` for every leaf of a schema."""
    keys = {}
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        hint = hints[f.name]
        if is_dataclass(hint):
            keys |= schema_keys(hint, f"{prefix}{f.name}.")
        elif f.name in DEFAULTS or f.name.startswith("_"):
            continue
        else:
            keys[prefix + f.name] = (hint, f.metadata)
    return keys


def values(hint, metadata) -> st.SearchStrategy[str]:
    """Values of the key's type (edges and the valid choices included), and values of the wrong type."""
    args = typing.get_args(hint)
    if type(None) in args:
        hint = next(a for a in args if a is not type(None))
    typed: list[st.SearchStrategy[str]] = []
    if "choices" in metadata:
        typed.append(st.sampled_from(["null" if c is None else str(c) for c in metadata["choices"]]))
    if hint is int:
        typed.append(st.integers(-3, 60).map(str))
    elif hint is float:
        typed.append(st.sampled_from(["0", "1e-3", "-1.5", "1e9", "nan", "inf"]))
    elif hint is bool:
        typed.append(st.sampled_from(["true", "false"]))
    elif hint is str:
        typed.append(st.text("abcxyz019_-./", min_size=1, max_size=8))
    elif typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        if is_dataclass(item):
            setting = st.builds(lambda w, s: f"{{ways:{w},shots:{s}}}", st.integers(-1, 40), st.integers(-1, 25))
            typed.append(st.lists(setting, max_size=3).map(lambda xs: f"[{','.join(xs)}]"))
        else:
            typed.append(st.lists(st.integers(-2, 64).map(str), max_size=4).map(lambda xs: f"[{','.join(xs)}]"))
    return st.one_of(*typed, JUNK)


@st.composite
def command_lines(draw, run_time: bool = False) -> list[str]:
    groups = dict(DEFAULTS)
    overrides = []
    for group in draw(st.lists(st.sampled_from(sorted(GROUPS)), max_size=0 if run_time else 3, unique=True)):
        option = draw(st.sampled_from(GROUPS[group] + ["nonexistent"]))
        overrides.append(f"{group}={option}")
        groups[group] = option
    keys = schema_keys(TrainConfig)
    for group, option in groups.items():
        schema = SCHEMAS.get(group, {}).get(option)
        if schema is not None:
            keys |= schema_keys(schema, f"{group}.")
    if run_time:  # real runs stay tiny, on the glyphs they have: only the keys that shape episodes and the loop
        keys = {
            k: v
            for k, v in keys.items()
            if k.startswith(
                ("task.", "eval.settings", "eval.queries", "trainer.nan_policy", "trainer.schedule", "trainer.optimizer")
            )
        }
    for key in draw(st.lists(st.sampled_from(sorted(keys)), max_size=5, unique=True)):
        overrides.append(f"{key}={draw(values(*keys[key]))}")
    if not run_time and draw(st.booleans()):
        overrides.append(
            draw(
                st.sampled_from(
                    ["trainer.stepz=3", "+trainer.bogus=1", "~trainer", "task.ways", "=5", "task..ways=1", "dataset.root"]
                )
            )
        )
    return draw(st.permutations(overrides))


def cli(argv: list[str]) -> tuple[int, str, str]:
    """``metarun`` in this process: (exit code, stdout, stderr); an exception escaping it is a traceback for the user."""
    GlobalHydra.instance().clear()
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_reporter = sys.argv, hydra_utils.run_and_report
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(argv)
        code = 0
    except SystemExit as ex:
        code = ex.code if isinstance(ex.code, int) else int(ex.code is not None)
    finally:
        sys.argv, hydra_utils.run_and_report = saved_argv, saved_reporter
        GlobalHydra.instance().clear()
    return code, out.getvalue(), err.getvalue()


def assert_clean_ending(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    if code == 0:
        return
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code in (1, 2), err
    assert lines and lines[-1].startswith("error: ") and sum(ln.startswith("error:") for ln in lines) == 1, err


@pytest.fixture(autouse=True)
def no_forced_tracebacks(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=command_lines())
def test_composing_never_ends_in_a_traceback(overrides):
    code, out, err = cli(["train", "--cfg", "job", *overrides])
    assert_clean_ending(code, err)
    if code == 0:
        assert "trainer:" in out


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=command_lines(run_time=True))
def test_tiny_runs_never_end_in_a_traceback(overrides, tiny, tmp_path_factory):
    run: Path = tmp_path_factory.mktemp("fuzz")
    fast = [*tiny, "trainer.steps=2", "trainer.val_every=2", "trainer.val_episodes=2", "eval.episodes=2", "logger=none"]
    out = run_cli("train", *fast, *overrides, f"hydra.run.dir={run}")
    assert_clean_ending(out.returncode, out.stderr)

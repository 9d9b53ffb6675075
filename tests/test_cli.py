import pytest

from tests.conftest import run_cli


def test_top_level_help_lists_the_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("train", "eval", "report", "bench"):
        assert command in out.stdout


def test_train_help_is_hydras_with_the_config_groups():
    out = run_cli("train", "--help")
    assert out.returncode == 0
    assert "train is powered by Hydra" in out.stdout or "metarun train" in out.stdout
    for group in ("algo:", "backbone:", "dataset:", "device:", "experiment:"):
        assert group in out.stdout


def test_cfg_job_prints_the_composed_config():
    out = run_cli("train", "--cfg", "job", "algo=protonet", "task.ways=7")
    assert out.returncode == 0, out.stderr
    assert "ways: 7" in out.stdout and "_target_: metarun.algorithms.protonet.ProtoNet" in out.stdout


@pytest.mark.parametrize(
    "overrides,code,needle",
    [
        (["algo=nope"], 2, "algo/nope"),
        (["task.ways=0"], 2, "ways=0"),
        (["task.shots=30"], 2, "images in its smallest class"),
        (["dataset.bogus=1"], 2, "bogus"),
        (["task.ways=five"], 2, "five"),
        (["dataset=omniglot", "dataset.root=/nonexistent/omniglot"], 1, "/nonexistent/omniglot"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(overrides, code, needle, tiny):
    out = run_cli(
        "train",
        *[o for o in tiny if o.startswith("dataset.") and not any(x.startswith("dataset=") for x in overrides)],
        *overrides,
        "trainer.steps=1",
    )
    assert out.returncode == code, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), out.stderr
    assert needle in err[0]
    assert "Traceback" not in out.stderr


def test_hydra_modes_that_exclude_each_other_are_one_line():
    out = run_cli("train", "-m", "--cfg", "hydra")
    assert out.returncode == 2 and out.stderr.strip() == "error: --cfg and --multirun cannot be combined: give only one of them"


def test_unknown_command():
    out = run_cli("trian")
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr


def test_shell_completion_sees_through_the_command():
    out = run_cli("-sc", "query=bash", env={"COMP_LINE": "metarun tr", "COMP_POINT": "10"})
    assert out.stdout.split() == ["train"]
    out = run_cli("-sc", "query=bash", env={"COMP_LINE": "metarun train alg", "COMP_POINT": "17"})
    assert "algo=" in out.stdout.split()
    out = run_cli("-sc", "query=bash", env={"COMP_LINE": "metarun train algo=", "COMP_POINT": "18"})
    assert "algo=protonet" in out.stdout.split()

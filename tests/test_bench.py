"""``metarun bench`` as a user runs it: the JSON shape that lets runs be compared over time."""

import json
import sys

import pytest
import torch

import metarun.bench.timing
from metarun.bench.timing import MAX_ROUNDS, measure
from tests.conftest import run_cli

RESULT_KEYS = {"name", "metric", "value", "reference", "reference_value", "ratio", "peak_mem_mb", "shape", "target", "met"}


def test_a_quick_sampler_bench_writes_the_documented_json_and_table(tmp_path):
    done = run_cli("bench", "--quick", "--only", "sampler", "--repeats", "1", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    payload = json.loads((tmp_path / "bench.json").read_text())
    machine = payload["machine"]
    assert {"cpu", "torch", "threads", "device", "cpu_native_bf16", "quick"} <= set(machine)
    assert machine["quick"] is True and isinstance(machine["cpu_native_bf16"], bool)
    rows = payload["results"]
    assert [(r["name"], r["metric"]) for r in rows] == [("sampler", "episodes_per_s"), ("sampler", "metadataset_episodes_per_s")]
    for row in rows:
        assert RESULT_KEYS <= set(row)
        assert row["value"] > 0 and row["reference_value"] > 0
        assert row["ratio"] == pytest.approx(row["value"] / row["reference_value"])
        assert row["met"] == (row["ratio"] >= 10)
    assert rows[1]["reference"] == "one episode at a time" and rows[1]["shape"] == "omniglot-metadataset"
    assert "| sampler |" in (tmp_path / "bench.md").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS high-water mark reset")
def test_measure_times_warm_calls_and_takes_peak_memory_on_one_more():
    calls = {"small": 0, "large": 0}

    def allocate(name: str, mb: int):
        def call() -> None:
            calls[name] += 1
            torch.ones(mb * 2**18)  # mb MB of float32, written (so faulted in)

        return call

    timing = measure(
        {"small": allocate("small", 1), "large": allocate("large", 96)}, repeats=3, warmup=2, device=torch.device("cpu")
    )
    assert calls == {"small": 2 + 3 + 1, "large": 2 + 3 + 1}  # warm-up, the timed repeats, the memory call
    assert timing["small"].rounds == timing["large"].rounds == 3
    assert timing["large"].peak_mb > 80 and timing["small"].peak_mb < 40
    assert all(t.seconds > 0 for t in timing.values())


@pytest.mark.parametrize(("min_seconds", "rounds"), [(0.0, 2), (5.0, 10), (5.1, 11), (100.0, MAX_ROUNDS)])
def test_cheap_calls_are_timed_for_more_rounds_until_they_add_up_to_min_seconds(monkeypatch, min_seconds, rounds):
    clock = {"now": 0.0}
    monkeypatch.setattr(metarun.bench.timing.time, "perf_counter", lambda: clock["now"])

    def takes(seconds: float):
        def call() -> None:
            clock["now"] += seconds

        return call

    timing = measure(
        {"a": takes(0.375), "b": takes(0.125)}, repeats=2, warmup=0, device=torch.device("cpu"), min_seconds=min_seconds
    )
    assert timing["a"].rounds == timing["b"].rounds == rounds  # a round of both paths takes 0.5 s
    assert (timing["a"].seconds, timing["b"].seconds) == (0.375, 0.125)


@pytest.mark.parametrize("args", [["--repeats", "0"], ["--repeats", "-2"], ["--min-seconds", "-1"]])
def test_bad_round_counts_are_refused_in_one_line(args, tmp_path):
    done = run_cli("bench", "--quick", "--only", "sampler", "--out", str(tmp_path), *args)
    assert done.returncode == 2
    assert args[0] in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bench.json").exists()


def test_evaluation_targets_depend_on_the_reference():
    """3x against a plain reference scoring one episode a call; an algorithm timed against its own code one
    episode a call (the model-based and the metric classics) must only not be slower."""
    from metarun.bench.shapes import ALGORITHMS, target

    for name in ALGORITHMS:
        assert target(name, "eval_episodes_per_s", "omniglot-5w1s15q") == (">=", 3.0)
    for name in ("leo", "weightgen", "incontext", "metalstm", "matching", "relation"):
        assert target(name, "eval_episodes_per_s", "omniglot-5w1s15q") == (">=", 1.0)


def test_the_references_run_plain_torch_pooling():
    """The per-task references time plain code: a copy of the backbone without metarun's faster pooling layer."""
    from metarun.bench.references import plain_copy
    from metarun.models.conv4 import Conv4

    conv4 = Conv4((1, 28, 28))
    copy = plain_copy(conv4)
    pools = [m for m in copy.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 4 and all(type(m) is torch.nn.MaxPool2d for m in pools)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(copy(x), conv4(x), rtol=0, atol=0)

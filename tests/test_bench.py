"""``metarun bench`` as a user runs it: the JSON shape that lets runs be compared over time."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F

import metarun.bench.timing
from metarun.bench.timing import MAX_ROUNDS, measure
from tests.conftest import run_cli

RESULT_KEYS = {"name", "metric", "value", "reference", "reference_value", "ratio", "peak_mem_mb", "shape", "target", "met"}


def assert_same_gradients(
    loss, params, expected, expected_params, *, value=None, rtol=1e-3, atol=1e-6, value_rtol=1e-5, value_atol=1e-6
) -> tuple:
    """``loss``'s gradients (of the package) against ``expected``'s (of a reference), parameter by parameter, within
    ``rtol``/``atol``, and ``value`` (the loss itself unless a surrogate's value differs) against ``expected`` within
    ``value_rtol``/``value_atol``; the first gradient non-zero. Returns the gradients."""
    grads = torch.autograd.grad(loss, params)
    expected_grads = torch.autograd.grad(expected, expected_params)
    torch.testing.assert_close(loss.detach() if value is None else value, expected.detach(), rtol=value_rtol, atol=value_atol)
    assert len(grads) == len(expected_grads)
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    assert grads[0].abs().sum() > 0
    return grads


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
    """3x against a plain reference scoring one episode a call, where the package batches episodes; where the
    package scores one a call on a CPU too (matching and relation networks), or is timed against its own code
    one episode a call (the model-based learners), it must only not be slower."""
    from metarun.bench.shapes import ALGORITHMS, BATCHED_EVALUATION, target

    for name in BATCHED_EVALUATION:
        assert target(name, "eval_episodes_per_s", "omniglot-5w1s15q") == (">=", 3.0)
    for name in ("leo", "weightgen", "incontext", "metalstm", "matching", "relation"):
        assert target(name, "eval_episodes_per_s", "omniglot-5w1s15q") == (">=", 1.0)
    assert set(BATCHED_EVALUATION) < set(ALGORITHMS)


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


def test_the_references_run_nchw_whatever_layout_the_package_runs():
    """A one-channel convolution's channels_last weight is contiguous too, and its strides alone would make a
    copy run channels_last (Omniglot's first layer): the copy's weights must have the standard strides."""
    from metarun.bench.references import plain_copy
    from metarun.models.conv4 import Conv4

    conv4 = Conv4((1, 28, 28)).to(memory_format=torch.channels_last)
    first = conv4.features[0][0]
    assert first.weight.is_contiguous() and first.weight.stride() != (9, 9, 3, 1)
    copy = plain_copy(conv4)
    x = torch.randn(3, 1, 28, 28)
    assert not copy.features[0](x).is_contiguous(memory_format=torch.channels_last)
    assert all(p.stride() == torch.empty(p.shape).stride() for p in copy.parameters())


def test_the_references_run_plain_torch_batch_norm_that_follows_eval():
    """metarun's batch norm keeps batch statistics in ``.eval()`` unless told otherwise; the references' copy is
    torch's, whose ``.eval()`` uses the running statistics it was given."""
    from metarun.bench.references import plain_copy
    from metarun.models.conv4 import Conv4
    from metarun.models.norm import EpisodeBatchNorm, norm_statistics

    conv4 = Conv4((1, 28, 28))
    x = torch.randn(6, 1, 28, 28)
    conv4.train()(x)  # the running statistics move away from their initial values
    copy = plain_copy(conv4)
    assert not any(isinstance(m, EpisodeBatchNorm) for m in copy.modules())
    assert sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in copy.modules()) == 4
    torch.testing.assert_close(copy.train()(x), conv4(x), rtol=1e-6, atol=1e-6)
    with norm_statistics(conv4, "running"):
        torch.testing.assert_close(copy.eval()(x), conv4.eval()(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["relation", "matching"])
def test_the_metric_references_compute_the_package_loss_and_gradients(name):
    """The per-episode references of matching and relation networks against the package's batched loss."""
    from metarun.algorithms.matching import MatchingNet
    from metarun.algorithms.relation import RelationNet
    from metarun.bench import references as ref
    from metarun.data.episodes import Episode
    from metarun.models.conv4 import Conv4

    torch.manual_seed(0)
    backbone = Conv4((1, 28, 28), hidden=8)
    if name == "relation":
        net, reference = RelationNet(backbone, ways=4, channels=6, hidden=5), ref.RelationReference
    else:
        net, reference = MatchingNet(backbone, ways=4), ref.MatchingReference
    net.train()
    copy = reference(net, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([2, 0, 1, 3, 0, 2, 1, 3])  # two shots a class, in no particular order
    episode = Episode(
        torch.randn(3, 8, 1, 28, 28, generator=g), labels.expand(3, -1),
        torch.randn(3, 12, 1, 28, 28, generator=g), torch.arange(4).repeat(3).expand(3, -1), 4,
    )  # fmt: skip
    loss, _ = net.tasks_loss(episode)
    expected = torch.stack([copy.loss(episode, t) for t in range(3)]).mean()
    params = [p for opt_group in copy.optimizer.param_groups for p in opt_group["params"]]
    assert_same_gradients(loss, list(net.parameters()), expected, params)


@pytest.mark.parametrize("name", ["incontext", "weightgen"])
def test_the_evaluation_references_score_as_the_package(name):
    """The per-episode evaluation references of the in-context learner and the weight generator against the
    package's batched logits, with running statistics that have moved."""
    from metarun.algorithms.incontext import InContext
    from metarun.algorithms.weightgen import WeightGen
    from metarun.bench import references as ref
    from metarun.data.episodes import Episode
    from metarun.models.conv4 import Conv4

    torch.manual_seed(0)
    backbone = Conv4((1, 28, 28), hidden=8)
    if name == "incontext":
        net = InContext(backbone, ways=4, d_model=16, heads=2, max_ways=6)
    else:
        net = WeightGen(backbone, ways=4, num_train_classes=7, pretrain_steps=0)
        with torch.no_grad():  # away from their initial values, so that each takes part
            for p in (net.phi_avg, net.phi_att, net.keys):
                p.mul_(torch.rand_like(p) + 0.5)
    g = torch.Generator().manual_seed(1)
    net.backbone.train()(torch.randn(10, 1, 28, 28, generator=g) * 2 + 1)  # running statistics away from (0, 1)
    net.eval()
    episode = Episode(
        torch.randn(3, 8, 1, 28, 28, generator=g), torch.tensor([2, 0, 1, 3, 0, 2, 1, 3]).expand(3, -1),
        torch.randn(3, 12, 1, 28, 28, generator=g), torch.arange(4).repeat(3).expand(3, -1), 4,
    )  # fmt: skip
    reference = ref.InContextReference(net, lr=1e-3) if name == "incontext" else ref.EVALUATION_REFERENCES[name](net)
    for m in getattr(reference, "modules", ()):
        m.eval()
    got = net.predict_logits(episode, "running")
    with torch.no_grad():
        expected = torch.stack([reference.logits(episode, t) for t in range(3)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert expected.std() > 0.01  # logits that tell the classes apart


def test_the_incontext_reference_computes_the_package_training_loss_and_gradients():
    """The in-context learner's per-episode reference against the package's batched logits in training (batch
    statistics, support and query each their own), with each task's own label embeddings."""
    from metarun.algorithms.incontext import InContext
    from metarun.algorithms.task_batching import fold_features
    from metarun.bench import references as ref
    from metarun.data.episodes import Episode
    from metarun.models.conv4 import Conv4

    torch.manual_seed(0)
    net = InContext(Conv4((1, 28, 28), hidden=8), ways=4, d_model=16, heads=2, max_ways=6).train()
    reference = ref.InContextReference(net, lr=1e-3)
    for m in reference.modules:
        m.train()
    g = torch.Generator().manual_seed(1)
    episode = Episode(
        torch.randn(3, 8, 1, 28, 28, generator=g), torch.tensor([2, 0, 1, 3, 0, 2, 1, 3]).expand(3, -1),
        torch.randn(3, 12, 1, 28, 28, generator=g), torch.arange(4).repeat(3).expand(3, -1), 4,
    )  # fmt: skip
    ids = torch.stack([torch.randperm(6, generator=g)[:4] for _ in range(3)])
    zs, zq = fold_features(net.backbone, episode.support_x, episode.query_x, "transductive")
    logits = net.logits(zs, episode.support_y, zq, ids)
    loss = F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten())
    expected = torch.stack([F.cross_entropy(reference.logits(episode, t, ids[t]), episode.query_y[t]) for t in range(3)]).mean()
    params = [p for m in reference.modules for p in m.parameters()]
    assert_same_gradients(loss, list(net.parameters()), expected, params)


def test_the_metalstm_reference_computes_the_package_meta_loss_and_gradients():
    """Meta-LSTM's per-episode reference (one flat weight vector through ``nn.LSTMCell``, queries on the support
    set's statistics) against the package's meta-gradient, with gates away from their saturated start."""
    from metarun.algorithms.metalstm import MetaLSTM
    from metarun.bench import references as ref
    from metarun.data.episodes import Episode
    from metarun.models.conv4 import Conv4

    torch.manual_seed(0)
    net = MetaLSTM(Conv4((1, 12, 12), hidden=3, layers=2), 3, inner_steps=3, hidden=4)
    with torch.no_grad():
        net.input.bias.fill_(-1.0)
        net.forget.bias.fill_(1.0)
        for p in [*net.lstm.parameters(), net.input.weight, net.forget.weight]:
            p.normal_(0.0, 0.5)
    net.train()
    reference = ref.MetaLSTMReference(net, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    episode = Episode(
        torch.randn(2, 6, 1, 12, 12, generator=g), torch.tensor([2, 0, 1, 1, 0, 2]).expand(2, -1),
        torch.randn(2, 6, 1, 12, 12, generator=g), torch.arange(3).repeat(2).expand(2, -1), 3,
    )  # fmt: skip
    surrogate, metrics = net.training_loss(episode)
    expected = torch.stack([reference.loss(episode, t) for t in range(2)]).mean()
    params = [p for group in reference.optimizer.param_groups for p in group["params"]]
    grads = assert_same_gradients(surrogate, list(net.parameters()), expected, params, value=metrics["loss"])
    assert all(g.abs().sum() > 0 for g in grads[-6:])  # the meta-learner is trained through the unroll


@pytest.mark.parametrize("first_order", [True, False])
def test_the_protomaml_reference_computes_the_package_meta_loss_and_gradients(first_order):
    """Proto-MAML's per-task reference (MAML's loop from a prototype head) against the package's meta-gradient, in
    float64 (at fp32 the inner steps' rounding alone moved single gradient entries by 0.4%)."""
    from metarun.algorithms.protomaml import ProtoMAML
    from metarun.bench import references as ref
    from metarun.data.episodes import Episode
    from metarun.models.conv4 import Conv4

    torch.manual_seed(0)
    net = ProtoMAML(Conv4((1, 12, 12), hidden=3, layers=2), 3, inner_lr=0.5, inner_steps=2, first_order=first_order)
    net.double().train()
    reference = ref.ProtoMAMLReference(net, lr=1e-3)
    reference.model.double()
    g = torch.Generator().manual_seed(1)
    episode = Episode(
        torch.randn(2, 6, 1, 12, 12, generator=g, dtype=torch.float64), torch.tensor([2, 0, 1, 1, 0, 2]).expand(2, -1),
        torch.randn(2, 6, 1, 12, 12, generator=g, dtype=torch.float64), torch.arange(3).repeat(2).expand(2, -1), 3,
    )  # fmt: skip
    surrogate, metrics = net.training_loss(episode)
    expected = torch.stack([reference.loss(episode, t) for t in range(2)]).mean()
    params = list(reference.model.backbone.parameters())
    assert_same_gradients(
        surrogate,
        list(net.parameters()),
        expected,
        params,
        value=metrics["loss"],
        rtol=1e-8,
        atol=1e-10,
        value_rtol=1e-10,
        value_atol=1e-12,
    )

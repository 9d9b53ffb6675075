"""The weight generator: its equation by hand, the two stages in one run, init_from, the real runner."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.weightgen import ClassEpisode, WeightGen
from metarun.data.episodes import Batch, EpisodeSampler
from metarun.data.split import Split
from metarun.models.conv4 import Conv4
from metarun.trainer import train
from tests.algorithms.test_learning import learns
from tests.conftest import run_cli


def tiny_split(classes=7, per_class=6) -> Split:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes, per_class, 1, 8, 8), generator=g, dtype=torch.uint8)
    return Split(images, [f"c{i}" for i in range(classes)])


def build(**kwargs) -> WeightGen:
    torch.manual_seed(0)
    return WeightGen(Conv4((1, 8, 8), hidden=4, layers=2), 3, num_train_classes=7, **kwargs).double()


def test_generated_weights_follow_the_equation_by_hand():
    model = build()
    with torch.no_grad():
        model.phi_avg.uniform_(0.5, 1.5)
        model.phi_att.uniform_(0.5, 1.5)
        model.keys.normal_()
    zs = torch.randn(1, 4, 16, dtype=torch.float64)
    ys = torch.tensor([[0, 1, 1, 0]])
    exclude = torch.tensor([[False, True, False, False, False, True, False]])
    got = model.generate(zs, ys, 2, exclude)
    base = F.normalize(model.classifier.weight, dim=-1)
    keys = F.normalize(model.keys, dim=-1)
    for c in range(2):
        avg, att = 0, 0
        members = [i for i in range(4) if ys[0, i] == c]
        for i in members:
            z = zs[0, i] / zs[0, i].norm()
            q = model.query(z)
            q = q / q.norm()
            scores = torch.stack([model.attention_scale * q @ keys[b] for b in range(7) if not exclude[0, b]])
            kept = [b for b in range(7) if not exclude[0, b]]
            att = att + sum(w * base[b] for w, b in zip(scores.softmax(0), kept, strict=True))
            avg = avg + z
        expected = model.phi_avg * avg / len(members) + model.phi_att * att / len(members)
        torch.testing.assert_close(got[0, c], expected)


def test_stage_one_is_pre_training_then_episodes_with_the_backbone_frozen():
    model = build(pretrain_steps=2, batch_size=10)
    sampler = EpisodeSampler(tiny_split(), 3, 2, 2, (0.5,), (0.25,), seed=0)
    for step in range(4):
        batch = model.sample_batch(sampler, num_tasks=2)
        assert isinstance(batch, Batch if step < 2 else ClassEpisode)
        if isinstance(batch, Batch):
            batch = Batch(batch.x.double(), batch.y)
        else:
            # the classes are the split's: the sampled images are those classes' images
            assert batch.classes.shape == (2, 3) and batch.classes.max() < 7
            batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()
        model.zero_grad()
        loss, metrics = model.training_loss(batch)
        loss.backward()
        backbone_grad = model.backbone.features[0][0].weight.grad
        if step < 2:
            assert backbone_grad is not None and model.query.weight.grad is None and model.cosine_scale.grad is not None
        else:
            assert backbone_grad is None and model.query.weight.grad.abs().sum() > 0 and model.keys.grad.abs().sum() > 0
    assert int(model.steps_taken) == 4 and "steps_taken" in model.state_dict()


def test_fake_novel_classes_are_left_out_of_attention_and_logits():
    """Making an episode's own class's base weight huge changes nothing: it is excluded everywhere."""
    model = build(pretrain_steps=0)
    sampler = EpisodeSampler(tiny_split(), 3, 2, 2, (0.5,), (0.25,), seed=0)
    batch = model.sample_batch(sampler, num_tasks=1)
    batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()
    model.eval()  # no running-statistics updates between the two calls
    before, _ = model.training_loss(batch)
    with torch.no_grad():
        model.classifier.weight[batch.classes[0, 0]] *= -5
    after, _ = model.training_loss(batch)
    torch.testing.assert_close(before, after)


@pytest.mark.parametrize("bn_mode", ["transductive", "support", "running"])
def test_evaluation_scores_each_task_alone(bn_mode):
    model = build().eval()
    sampler = EpisodeSampler(tiny_split(), 3, 2, 2, (0.5,), (0.25,), seed=0)
    ep = sampler.sample(3)
    ep.support_x, ep.query_x = ep.support_x.double(), ep.query_x.double()
    together = model.evaluate(ep, bn_mode)
    alone = torch.cat([model.evaluate(ep.select(slice(t, t + 1)), bn_mode) for t in range(3)])
    assert together.shape == (3,) and torch.equal(together, alone)


WG_TINY = ["algo=weightgen", "algo.batch_size=16", "algo.pretrain_steps=3", "task.meta_batch=2", "trainer.steps=6"]


def test_train_and_evaluate_through_the_runner(tmp_path, compose_config, tiny):
    train(compose_config("train", [*tiny, *WG_TINY, "eval.bn_mode=support"]), tmp_path / "run")
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert results["bn_mode"] == "support"
    assert [(r["ways"], r["shots"]) for r in results["results"]] == [(5, 1), (5, 5)]
    assert int(torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["model"]["steps_taken"]) == 6


def test_init_from_a_finetune_run(tmp_path, compose_config, tiny, capsys):
    pre = tmp_path / "pre"
    finetune = ["algo=finetune", "algo.head=cosine", "algo.batch_size=16", "algo.finetune_steps=2", "eval.after_train=false"]
    train(compose_config("train", [*tiny, *finetune]), pre)
    loaded = torch.load(pre / "checkpoints" / "best.pt", weights_only=False)["model"]
    run = tmp_path / "wg"
    stage_two = [*tiny, *WG_TINY, f"trainer.init_from={pre}", "algo.pretrain_steps=0"]
    train(compose_config("train", stage_two), run)
    assert "episodes are drawn from their features" in capsys.readouterr().err  # the fixed backbone's, computed once
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(state[k], v) for k, v in loaded.items() if k.startswith("backbone."))  # never trained
    assert not torch.equal(state["classifier.weight"], loaded["classifier.weight"])  # trained from there in stage 2
    # the run's own checkpoints hold what it took: evaluating it needs the earlier run no more
    shutil.rmtree(pre)
    out = run_cli("eval", f"checkpoint={run}", "eval.episodes=4")
    assert out.returncode == 0, out.stderr


def one_line_error(out, code: int = 1) -> str:
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == code and len(lines) == 1, out.stderr
    return lines[0]


def test_init_from_bad_paths_and_backbones_are_one_line(tmp_path, compose_config, tiny):
    stage_two = [*tiny, *WG_TINY, "algo.pretrain_steps=0"]
    out = run_cli("train", *stage_two, f"hydra.run.dir={tmp_path / 'z'}")
    assert "algo.pretrain_steps=0 needs a pre-trained backbone: set trainer.init_from" in one_line_error(out, 2)
    out = run_cli("train", *stage_two, f"trainer.init_from={tmp_path / 'nothing'}", f"hydra.run.dir={tmp_path / 'a'}")
    assert "trainer.init_from" in one_line_error(out) and "does not exist" in out.stderr
    pre = tmp_path / "pre"
    train(
        compose_config("train", [*tiny, "algo=finetune", "algo.batch_size=16", "trainer.steps=1", "eval.after_train=false"]), pre
    )
    out = run_cli("train", *stage_two, "backbone.hidden=8", f"trainer.init_from={pre}", f"hydra.run.dir={tmp_path / 'b'}")
    line = one_line_error(out)
    assert "hidden=16" in line and "shape mismatch" in line
    # a run without a classifier over the training classes (ProtoNet) cannot give the base weights
    proto = tmp_path / "proto"
    train(compose_config("train", [*tiny, "trainer.steps=1", "trainer.seed=7", "eval.after_train=false"]), proto)
    out = run_cli("train", *stage_two, f"trainer.init_from={proto}", f"hydra.run.dir={tmp_path / 'c'}")
    assert "algo=finetune" in one_line_error(out)
    # ... but its backbone can start stage 1, which trains the base classifier
    train(compose_config("train", [*tiny, *WG_TINY, f"trainer.init_from={proto}", "eval.after_train=false"]), tmp_path / "d")
    started = torch.load(proto / "checkpoints" / "best.pt", weights_only=False)["model"]["backbone.features.0.0.weight"]
    trained = torch.load(tmp_path / "d" / "checkpoints" / "last.pt", weights_only=False)["model"]["backbone.features.0.0.weight"]
    train(compose_config("train", [*tiny, *WG_TINY, "eval.after_train=false"]), tmp_path / "e")
    scratch = torch.load(tmp_path / "e" / "checkpoints" / "last.pt", weights_only=False)["model"]["backbone.features.0.0.weight"]
    # 6 steps of Adam at 1e-3 move a weight by at most 0.006; from its own initialisation (seed 0, not 7) it lies far away
    assert (trained - started).abs().max() < 0.05 < (scratch - started).abs().max()


@pytest.mark.slow
def test_learns(tmp_path, compose_config, glyph_root, one_thread):
    """Measured (one thread, sharing 2 cores with another run): 0.801 after 400 steps of pre-training and 200 of the
    generator, 0.536 untrained (the generator at its start: prototypes in a cosine classifier), 2 minutes in all."""
    learns(
        "weightgen",
        ["backbone.hidden=32", "trainer.steps=600", "algo.pretrain_steps=400"],
        compose_config,
        glyph_root,
        tmp_path,
    )

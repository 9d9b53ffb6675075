"""metarun predict and metarun.load: a trained run labels image files as its evaluation scores the same episodes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import metarun
from metarun.algorithms.base import accuracy
from metarun.checkpoint import load_checkpoint
from metarun.config import compose, config_dir
from metarun.data.cross_domain import LUMA, convert_images
from metarun.data.episodes import Episode, fixed_episodes
from metarun.data.split import FewShotDataset, Split
from metarun.device import autocast
from metarun.errors import ConfigError, DataError
from metarun.evaluation import eval_precision, setting_seed
from metarun.factory import build_algorithm, build_dataset, build_sampler
from metarun.predictor import main
from metarun.trainer import train
from tests.conftest import run_cli

WAYS, SHOTS = 3, 2
RUNS = {
    # ProtoNet with its default running statistics; MAML with the support set's (its default, transductive, would let
    # the queries of an episode influence each other). In fp32: in bf16, FOMAML's logits of a task evaluated alone and
    # in a call of 4 tasks differed by up to 0.22, flipping 3 of 60 labels, so evaluation itself depends on its batching.
    "protonet": ["trainer.precision=fp32"],
    "maml": ["algo=fomaml", "task.meta_batch=2", "eval.bn_mode=support", "eval.batch_tasks=4", "trainer.precision=fp32"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny) -> dict[str, Path]:
    """A short glyphs run of each algorithm, 3-way 2-shot, evaluated on 4 test episodes."""
    out = {}
    for name, extra in RUNS.items():
        run = tmp_path_factory.mktemp(name)
        settings = f"eval.settings=[{{ways:{WAYS},shots:{SHOTS}}}]"
        train(compose("train", [*tiny, f"task.ways={WAYS}", f"task.shots={SHOTS}", settings, "eval.episodes=4", *extra]), run)
        out[name] = run
    return out


def evaluation_episodes(run: Path):
    """The run's test split, its evaluation's episode indices and per-episode accuracies (``eval.json``)."""
    cfg = OmegaConf.create(load_checkpoint(run)["config"])
    dataset = build_dataset(cfg.dataset)
    (result,) = json.loads((run / "eval.json").read_text())["results"]
    sampler = build_sampler(
        dataset, "test", ways=WAYS, shots=SHOTS, queries=cfg.eval.queries, seed=0, device=torch.device("cpu"),
        channels_last=cfg.trainer.channels_last, precision=eval_precision(cfg.eval, cfg.trainer),
    )  # fmt: skip
    indices = fixed_episodes(sampler, result["episodes"], setting_seed(cfg.eval.seed, WAYS, SHOTS))
    return dataset, sampler, indices, result["per_episode"]


def episode_pixels(dataset, indices, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[ways, shots + queries, C, H, W]`` of evaluation episode ``e`` and its labels in episode order."""
    images = dataset.splits["test"].images
    return images[indices.classes[e][:, None], indices.images[e]], torch.arange(WAYS)


def save_png(pixels: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = pixels.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


def write_episode(pixels: torch.Tensor, root: Path) -> tuple[Path, Path, dict[str, str]]:
    """Support folder (class ``c<label>``, in the episode's label order) and query PNGs; the query files' true classes."""
    truth = {}
    for label in range(WAYS):
        for j in range(pixels.shape[1]):
            if j < SHOTS:
                save_png(pixels[label, j], root / "support" / f"c{label}" / f"{j}.png")
            else:
                path = root / "query" / f"q{label}_{j}.png"
                save_png(pixels[label, j], path)
                truth[path.name] = f"c{label}"
    return root / "support", root / "query", truth


def read_predictions(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", list(RUNS))
def test_predict_on_image_files_scores_as_the_evaluation_did(runs, name, tmp_path):
    run = runs[name]
    dataset, _, indices, per_episode = evaluation_episodes(run)
    e = min(range(len(per_episode)), key=per_episode.__getitem__)  # the hardest episode: some queries are wrong
    pixels, _ = episode_pixels(dataset, indices, e)
    support, query, truth = write_episode(pixels, tmp_path)
    out = tmp_path / "out"
    done = run_cli("predict", f"checkpoint={run}", f"support={support}", f"query={query}", f"out={out}", "device=cpu")
    assert done.returncode == 0, done.stderr
    rows = read_predictions(out / "predictions.csv")
    assert sorted(Path(r["file"]).name for r in rows) == sorted(truth)
    assert list(rows[0]) == ["file", "predicted", "c0", "c1", "c2"]
    for r in rows:
        probabilities = [float(r[c]) for c in ("c0", "c1", "c2")]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert r["predicted"] == f"c{max(range(WAYS), key=probabilities.__getitem__)}"
    correct = sum(r["predicted"] == truth[Path(r["file"]).name] for r in rows)
    assert correct / len(rows) == pytest.approx(per_episode[e], abs=1e-6)
    assert "transductive" not in done.stdout
    said = " ".join(done.stdout.split())
    assert "predictions" in said and f"written: {out / 'predictions.csv'}" in said


@pytest.mark.parametrize("name", list(RUNS))
def test_the_python_api_gives_the_evaluations_inputs_logits_and_accuracy(runs, name):
    run = runs[name]
    dataset, sampler, indices, per_episode = evaluation_episodes(run)
    model = metarun.load(run, device="cpu")
    for e in range(len(per_episode)):
        pixels, labels = episode_pixels(dataset, indices, e)
        episode = sampler.gather(indices[e : e + 1])
        # as PIL images for the support set, uint8 tensors for the queries: both reach the model as the sampler's floats
        support = [Image.fromarray(p[0].numpy()) for p in pixels[:, :SHOTS].flatten(0, 1)]
        model.fit(support, [f"c{label}" for label in labels.repeat_interleave(SHOTS).tolist()])
        assert torch.equal(model.support[0], episode.support_x[0]) and torch.equal(model.support[1], episode.support_y[0])
        queries = pixels[:, SHOTS:].flatten(0, 1)
        logits = model.predict_logits(queries)
        with autocast(model.device, model.precision):
            expected = model.algorithm.predict_logits(episode, model.bn_mode)[0]
        torch.testing.assert_close(logits, expected.float())
        probabilities = model.predict(queries)
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(len(queries)))
        assert model.classes == ["c0", "c1", "c2"]
        assert float(accuracy(probabilities, episode.query_y[0])) == pytest.approx(per_episode[e], abs=1e-6)


def test_files_pil_images_and_tensors_are_the_same_image(runs, tmp_path):
    model = metarun.load(runs["protonet"], device="cpu")  # glyphs: 1 x 28 x 28
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8, generator=g)
    save_png(grey, tmp_path / "grey.png")
    as_file, as_pil = model.pixels(tmp_path / "grey.png"), model.pixels(Image.open(tmp_path / "grey.png"))
    as_uint8, as_float = model.pixels(grey), model.pixels(grey.float() / 255)
    assert all(torch.equal(x, grey) for x in (as_file, as_pil, as_uint8, as_float, model.pixels(grey[0])))

    colour = torch.randint(0, 256, (3, 56, 56), dtype=torch.uint8, generator=g)
    save_png(colour, tmp_path / "colour.png")
    # a file is decoded as the datasets decode theirs (Pillow: luminance, Lanczos); a tensor as cross-domain data
    pil = Image.fromarray(colour.permute(1, 2, 0).numpy()).convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    assert torch.equal(model.pixels(tmp_path / "colour.png")[0], torch.from_numpy(np.array(pil)))
    assert torch.equal(model.pixels(colour), convert_images(colour, (1, 28, 28)))
    flat = torch.tensor([200, 100, 50], dtype=torch.uint8).view(3, 1, 1).expand(3, 28, 28)
    assert int(model.pixels(flat)[0, 0, 0]) == round(200 * LUMA[0] + 100 * LUMA[1] + 50 * LUMA[2])

    # normalised with the checkpoint's statistics: (x / 255 - mean) / std
    ckpt = load_checkpoint(runs["protonet"])
    x = model.inputs(grey)
    torch.testing.assert_close(x, ((grey.float() / 255 - ckpt["mean"][0]) / ckpt["std"][0])[None])

    with pytest.raises(ConfigError, match=r"spans \[-1, 1\], not \[0, 1\]"):
        model.pixels(torch.linspace(-1, 1, 28 * 28).view(1, 28, 28))
    with pytest.raises(ConfigError, match="give \\[C, H, W\\] with 1 or 3 channels"):
        model.pixels(torch.zeros(4, 28, 28, dtype=torch.uint8))
    with pytest.raises(DataError, match="cannot read image"):
        model.pixels(tmp_path / "missing.png")


def test_predict_before_fit_and_mismatched_labels_are_one_line(runs):
    model = metarun.load(runs["protonet"], device="cpu")
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="fit"):
        model.predict([image])
    with pytest.raises(ConfigError, match="2 support images but 1 labels"):
        model.fit([image, image], ["a"])
    with pytest.raises(ConfigError, match="needs at least 2"):
        model.fit([image, image], ["a", "a"])
    # ProtoNet takes any number of classes; labels of any hashable type, sorted where they sort
    model.fit([image] * 5, [4, 2, 9, 1, 7])
    assert model.classes == [1, 2, 4, 7, 9] and model.predict([image, image]).shape == (2, 5)


def test_transductive_batch_norm_is_said_and_uses_all_queries_at_once(runs, tmp_path):
    dataset, _, indices, _ = evaluation_episodes(runs["protonet"])
    support, query, _ = write_episode(episode_pixels(dataset, indices, 0)[0], tmp_path)
    model = metarun.load(runs["protonet"], device="cpu", bn_mode="transductive")
    assert model.transductive
    files = sorted(query.iterdir())
    model.fit([support / f"c{c}" / "0.png" for c in range(WAYS)], [0, 1, 2])
    # one query batch whatever query_batch says: every query's normalisation uses all of them
    torch.testing.assert_close(model.predict(files, query_batch=2), model.predict(files))
    independent = metarun.load(runs["protonet"], device="cpu").fit([support / f"c{c}" / "0.png" for c in range(WAYS)], [0, 1, 2])
    alone = torch.cat([independent.predict([f]) for f in files])
    torch.testing.assert_close(independent.predict(files, query_batch=4), alone)

    out = tmp_path / "out"
    done = run_cli(
        "predict", f"checkpoint={runs['protonet']}", f"support={support}", f"query={query}", f"out={out}",
        "eval.bn_mode=transductive", "device=cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "each prediction depends on the other queries" in " ".join(done.stdout.split())


# -- bad input: one line, a non-zero exit, nothing written ---------------------------------------------
@pytest.fixture
def folders(runs, tmp_path):
    dataset, _, indices, _ = evaluation_episodes(runs["protonet"])
    support, query, _ = write_episode(episode_pixels(dataset, indices, 0)[0], tmp_path)
    return support, query


def predict(run, support, query, out, *extra):
    return main([f"checkpoint={run}", f"support={support}", *(f"query={q}" for q in query), f"out={out}", "device=cpu", *extra])


def test_a_class_folder_without_a_readable_image_is_refused(runs, folders, tmp_path):
    support, query = folders
    (support / "c9").mkdir()
    (support / "c9" / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder .*c9 holds no readable image"):
        predict(runs["protonet"], support, [query], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unreadable_queries_are_skipped_with_a_warning_until_none_remain(runs, folders, tmp_path, capsys):
    support, query = folders
    bad = query / "broken.png"
    bad.write_bytes(b"\x89PNG truncated")
    predict(runs["protonet"], support, [query], tmp_path / "out")
    captured = capsys.readouterr()
    assert "warning: cannot read image" in captured.err and "broken.png" in captured.err and "skipped" in captured.err
    rows = read_predictions(tmp_path / "out" / "predictions.csv")
    assert len(rows) == len(list(query.glob("q*.png"))) and all("broken" not in r["file"] for r in rows)

    text = tmp_path / "readme.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="none of the 2 query files is a readable image"):
        predict(runs["protonet"], support, [bad, text], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    with pytest.raises(DataError, match="does not exist"):
        predict(runs["protonet"], support, [tmp_path / "nothing"], tmp_path / "out3")


def test_fewer_than_two_classes_is_refused(runs, folders, tmp_path):
    support, query = folders
    one = tmp_path / "one"
    (one / "c0").mkdir(parents=True)
    (one / "c0" / "0.png").write_bytes((support / "c0" / "0.png").read_bytes())
    with pytest.raises(ConfigError, match=r"has 1 class folder \(c0\): few-shot prediction needs at least 2"):
        predict(runs["protonet"], one, [query], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_fixed_way_head_refuses_another_number_of_classes_and_names_the_algorithms_that_take_any(runs, folders, tmp_path):
    support, query = folders
    (support / "c3").mkdir()
    (support / "c3" / "0.png").write_bytes((support / "c0" / "0.png").read_bytes())
    with pytest.raises(ConfigError, match=r"4 classes, but MAML's head was meta-trained with 3 outputs") as ex:
        predict(runs["maml"], support, [query], tmp_path / "out")
    takes_any = set(str(ex.value).split("(")[-1].rstrip(")").split(", "))
    assert {"protonet", "finetune"} <= takes_any and not takes_any & {"maml", "fomaml", "anil", "metasgd", "reptile"}
    assert not (tmp_path / "out").exists()
    predict(runs["protonet"], support, [query], tmp_path / "out")  # ProtoNet takes 4
    assert list(read_predictions(tmp_path / "out" / "predictions.csv")[0]) == ["file", "predicted", "c0", "c1", "c2", "c3"]


def test_usage_errors(runs, folders, tmp_path):
    support, query = folders
    with pytest.raises(ConfigError, match="needs query="):
        main([f"checkpoint={runs['protonet']}", f"support={support}"])
    with pytest.raises(ConfigError, match="unknown key 'queries': valid keys are checkpoint, support, query"):
        main([f"checkpoint={runs['protonet']}", f"support={support}", f"queries={query}"])
    with pytest.raises(ConfigError, match="cannot read 'photos'"):
        main(["photos"])


def test_a_checkpoint_from_another_version_is_one_line_through_the_cli(runs, folders, tmp_path):
    support, query = folders
    ckpt = torch.load(runs["protonet"] / "checkpoints" / "best.pt", weights_only=False)
    ckpt["format"] = 99
    torch.save(ckpt, tmp_path / "old.pt")
    out = tmp_path / "out"
    done = run_cli("predict", f"checkpoint={tmp_path / 'old.pt'}", f"support={support}", f"query={query}", f"out={out}")
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "checkpoint format 99" in done.stderr
    assert not out.exists()
    listed = run_cli("--help")
    assert "predict" in listed.stdout


# -- every algorithm: evaluate scores predict_logits, and queries do not influence each other ------------------
ALGORITHMS = sorted(p.stem for p in (Path(config_dir()) / "algo").glob("*.yaml"))  # every algo= option
#: fewer test-time steps than the defaults, which are sized for real runs
FEWER_STEPS = {"reptile": ["algo.inner_steps_eval=3"], "finetune": ["algo.finetune_steps=5"]}


@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.parametrize("bn_mode", ["running", "support"])
def test_evaluate_is_the_accuracy_of_predict_logits_and_queries_are_independent(algo, bn_mode):
    cfg = compose(
        "train", [f"algo={algo}", "backbone.hidden=8", f"task.ways={WAYS}", "trainer.steps=0", *FEWER_STEPS.get(algo, [])]
    )
    shape = (1, 28, 28)
    data = FewShotDataset("t", {"train": Split(torch.zeros(6, 0, *shape, dtype=torch.uint8), list("abcdef"))}, (0.5,), (0.25,))
    torch.manual_seed(0)
    model = build_algorithm(cfg, data).eval()
    g = torch.Generator().manual_seed(1)
    tasks, queries = 2, 2
    episode = Episode(
        torch.randn(tasks, WAYS * SHOTS, *shape, generator=g),
        torch.arange(WAYS).repeat_interleave(SHOTS).expand(tasks, -1),
        torch.randn(tasks, WAYS * queries, *shape, generator=g),
        torch.randint(0, WAYS, (tasks, WAYS * queries), generator=g),
        WAYS,
    )
    logits = model.predict_logits(episode, bn_mode)
    assert logits.shape == (tasks, WAYS * queries, WAYS)
    torch.testing.assert_close(model.evaluate(episode, bn_mode), accuracy(logits, episode.query_y))
    # each query on its own: the same scores
    alone = torch.cat(
        [
            model.predict_logits(
                Episode(episode.support_x, episode.support_y, episode.query_x[:, i : i + 1], episode.query_y[:, i : i + 1], WAYS),
                bn_mode,
            )
            for i in range(WAYS * queries)
        ],
        1,
    )
    torch.testing.assert_close(alone, logits, rtol=1e-4, atol=1e-4)


def test_the_independence_check_can_fail():
    """With transductive batch norm a query normalised alone is scored differently: the comparison above would see it."""
    cfg = compose("train", ["algo=protonet", "backbone.hidden=8", "trainer.steps=0"])
    data = FewShotDataset("t", {"train": Split(torch.zeros(6, 0, 1, 28, 28, dtype=torch.uint8), list("abcdef"))}, (0.5,), (0.25,))
    model = build_algorithm(cfg, data).eval()
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(1, 4, 1, 28, 28, generator=g), torch.randn(1, 4, 1, 28, 28, generator=g)
    ys, yq = torch.tensor([[0, 0, 1, 1]]), torch.zeros(1, 4, dtype=torch.long)
    together = model.predict_logits(Episode(xs, ys, xq, yq, 2), "transductive")
    alone = model.predict_logits(Episode(xs, ys, xq[:, :1], yq[:, :1], 2), "transductive")
    assert not torch.allclose(alone, together[:, :1], rtol=1e-4, atol=1e-4)

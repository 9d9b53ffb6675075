"""dataset=multi: each training episode from one source by weight, equal shares of validation and test episodes, one
pooled normalisation, and the engine's guarantees (seeded, resumable, sharded as one process) kept."""

from __future__ import annotations

import pytest
import torch

from metarun.data.multi import MultiSourceDataset, per_source, pooled_stats
from metarun.data.multi import load as load_multi
from metarun.data.split import FewShotDataset, Split
from metarun.errors import ConfigError
from metarun.factory import build_dataset, build_sampler
from tests.conftest import dataset_config

SOURCES = {"dark": 10, "mid": 120, "bright": 240}  # every pixel of a source has this value


def constant_dataset(name: str, value: int, classes: int = 6, per_class: int = 4, side: int = 4) -> FewShotDataset:
    def split(n: int) -> Split:
        images = torch.full((n, per_class, 1, side, side), value, dtype=torch.uint8)
        images[:, :, :, 0, 0] = torch.arange(n, dtype=torch.uint8)[:, None, None]  # a class's number in one pixel
        return Split(images, [f"{name}{c}" for c in range(n)])

    return FewShotDataset(name, {"train": split(classes), "val": split(3), "test": split(3)}, (0.5,), (0.25,))


def dataset(weights=(1.0, 1.0, 2.0)) -> MultiSourceDataset:
    sources = {n: constant_dataset(n, v) for n, v in SOURCES.items()}
    total = sum(weights)
    return MultiSourceDataset("x", sources, tuple(w / total for w in weights), (0.5,), (0.25,))


def pixel_values(x: torch.Tensor) -> torch.Tensor:
    """The raw byte values back from normalised images (mean 0.5, std 0.25 in [0, 1] units)."""
    return (x * 0.25 + 0.5).mul(255).round()


def source_of_task(episode, t: int) -> str:
    values = set(pixel_values(torch.cat([episode.support_x[t], episode.query_x[t]]))[..., 1:, 1:].unique().tolist())
    assert len(values) == 1, "an episode mixed sources"
    return {v: n for n, v in SOURCES.items()}[values.pop()]


def test_training_tasks_come_from_one_source_each_by_weight() -> None:
    sampler = build_sampler(dataset(), "train", ways=3, shots=1, queries=2, seed=0, device=torch.device("cpu"))
    counts = dict.fromkeys(SOURCES, 0)
    for _ in range(100):
        idx = sampler.sample_indices(40)
        episode = sampler.gather(idx)
        names = [source_of_task(episode, t) for t in range(40)]
        assert names == sampler.source_of(idx)  # the images are the named source's
        for n in names:
            counts[n] += 1
    # 4000 draws with probabilities 1/4, 1/4, 1/2: each count within 4 standard deviations (about 110)
    assert abs(counts["dark"] - 1000) < 110 and abs(counts["mid"] - 1000) < 110 and abs(counts["bright"] - 2000) < 130


def test_labels_and_classes_are_those_of_the_tasks_source() -> None:
    sampler = build_sampler(dataset(), "train", ways=3, shots=2, queries=1, seed=1, device=torch.device("cpu"))
    idx = sampler.sample_indices(8)
    episode = sampler.gather(idx)
    assert episode.support_y.tolist() == [[0, 0, 1, 1, 2, 2]] * 8 and episode.ways == 3
    # the class-number pixel matches the class drawn for that slot
    assert torch.equal(pixel_values(episode.support_x[:, ::2, 0, 0, 0]).long(), idx.episodes.classes)


def test_validation_and_test_take_equal_shares_in_source_order() -> None:
    sampler = build_sampler(dataset(), "val", ways=3, shots=1, queries=1, seed=0, device=torch.device("cpu"))
    idx = sampler.sample_indices(7, torch.Generator().manual_seed(5))
    assert sampler.source_of(idx) == ["dark", "dark", "dark", "mid", "mid", "bright", "bright"]
    assert per_source([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], list(SOURCES)) == {
        "dark": [0.1, 0.2, 0.3], "mid": [0.4, 0.5], "bright": [0.6, 0.7],
    }  # fmt: skip
    # evaluation's fixed episodes: the same seed gives the same tasks
    again = sampler.sample_indices(7, torch.Generator().manual_seed(5))
    assert torch.equal(idx.episodes.images, again.episodes.images) and torch.equal(idx.episodes.classes, again.episodes.classes)


def test_resuming_continues_the_same_sequence() -> None:
    first = build_sampler(dataset(), "train", ways=3, shots=1, queries=1, seed=3, device=torch.device("cpu"), augment=True)
    first.sample(4)
    state = first.state_dict()
    expected = first.sample(4)
    second = build_sampler(dataset(), "train", ways=3, shots=1, queries=1, seed=3, device=torch.device("cpu"), augment=True)
    second.load_state_dict(state)
    got = second.sample(4)
    assert torch.equal(got.support_x, expected.support_x) and torch.equal(got.query_x, expected.query_x)


@pytest.mark.parametrize("augment", [False, True])
def test_shards_see_the_tasks_one_process_would(augment: bool) -> None:
    def make():
        return build_sampler(dataset(), "train", ways=3, shots=1, queries=1, seed=4, device=torch.device("cpu"), augment=augment)

    whole = make().sample(8)
    parts = [make().sample(8, shard=(rank, 2)) for rank in range(2)]
    assert torch.equal(torch.cat([p.support_x for p in parts]), whole.support_x)
    assert torch.equal(torch.cat([p.query_y for p in parts]), whole.query_y)


def test_pretraining_batches_label_classes_across_sources() -> None:
    sampler = build_sampler(
        dataset(weights=(1.0, 0.0, 0.0)), "train", ways=3, shots=1, queries=1, seed=0, device=torch.device("cpu")
    )
    batch = sampler.sample_images(16)
    assert batch.y.max() < 6  # the first source's classes: 0-5
    sampler = build_sampler(
        dataset(weights=(0.0, 0.0, 1.0)), "train", ways=3, shots=1, queries=1, seed=0, device=torch.device("cpu")
    )
    batch = sampler.sample_images(16)
    assert batch.y.min() >= 12 and batch.y.max() < 18  # the third source's: after 6 + 6
    assert torch.equal(pixel_values(batch.x[:, 0, 0, 0]).long() + 12, batch.y)
    assert dataset().num_train_classes == 18


def test_pooled_statistics_are_those_of_all_training_pixels() -> None:
    a = constant_dataset("a", 0, classes=2)
    b = constant_dataset("b", 0, classes=6, per_class=2)
    a.splits["train"].images.random_(0, 256, generator=torch.Generator().manual_seed(0))
    b.splits["train"].images.random_(0, 100, generator=torch.Generator().manual_seed(1))
    for d in (a, b):
        pixels = d.splits["train"].images.double() / 255
        d.mean, d.std = (pixels.mean().item(),), (pixels.std(unbiased=False).item(),)
    everything = torch.cat([a.splits["train"].images.flatten(), b.splits["train"].images.flatten()]).double() / 255
    mean, std = pooled_stats([a, b])
    assert mean[0] == pytest.approx(everything.mean().item(), abs=1e-12)
    assert std[0] == pytest.approx(everything.std(unbiased=False).item(), abs=1e-12)


def test_sources_from_the_config(tmp_path) -> None:
    cfg = dataset_config(
        "multi",
        sources=f"[{{name:glyphs,root:{tmp_path},num_classes:40,val_classes:5,test_classes:5}},"
        f"{{name:glyphs,root:{tmp_path},num_classes:30,val_classes:5,test_classes:5,seed:1}}]",
        weights="[3,1]",
    )
    ds = build_dataset(cfg)
    assert list(ds.sources) == ["glyphs", "glyphs#1"] and ds.weights == (0.75, 0.25) and ds.name == "glyphs+glyphs#1"
    assert ds.num_train_classes == 30 + 20 and ds.image_shape == (1, 28, 28)


@pytest.mark.parametrize(
    ("sources", "weights", "message"),
    [
        ([], None, "dataset.sources is empty"),
        (["sinusoid"], None, r"dataset.sources\[0\]=sinusoid: a source is one of"),
        (["multi"], None, r"dataset.sources\[0\]=multi"),
        ([{"name": "glyphs", "colour": 1}], None, r"unknown key 'dataset.sources\[0\].colour'"),
        ([{"name": "glyphs"}, {"name": "glyphs", "image_size": 14}], None, "different shapes .*28x28.*14x14"),
        ([{"name": "glyphs"}, {"name": "glyphs"}], [1.0], "one non-negative weight per source"),
        ([{"name": "glyphs"}, {"name": "glyphs"}], [0.0, 0.0], "not all zero"),
    ],
)
def test_bad_sources_are_one_line(tmp_path, sources, weights, message) -> None:
    small = {"root": str(tmp_path), "num_classes": 30, "val_classes": 5, "test_classes": 5}
    sources = [s if isinstance(s, str) else {**s, **small} for s in sources]
    with pytest.raises(ConfigError, match=message) as info:
        load_multi(sources, weights, build_dataset=build_dataset)
    assert "\n" not in str(info.value)


def test_a_source_with_no_training_classes_is_refused(tmp_path, monkeypatch) -> None:
    from metarun.data import traffic_sign
    from tests.data import domain_files

    monkeypatch.setattr(traffic_sign, "TRAFFIC_SIGN_NAMES", domain_files.TRAFFIC_SIGNS)
    domain_files.write_traffic_signs(tmp_path)
    with pytest.raises(ConfigError, match="traffic_sign has no training classes"):
        load_multi([{"name": "traffic_sign", "root": str(tmp_path), "image_size": 8}], build_dataset=build_dataset)


def test_a_source_too_small_for_the_episode_is_named() -> None:
    ds = dataset()
    mid = ds.sources["mid"].splits
    mid["val"] = Split(mid["val"].images[:2], mid["val"].class_names[:2])
    with pytest.raises(ConfigError, match=r"dataset.sources\[1\]=mid: ways=3 but the val split has only 2 classes"):
        build_sampler(ds, "val", ways=3, shots=1, queries=1, seed=0, device=torch.device("cpu"))

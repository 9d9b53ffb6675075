import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metarun.data.augment import augment_batch
from metarun.data.episodes import EpisodeSampler, FusedGather, check_episode, fixed_episodes, fused_gather
from metarun.data.split import FewShotDataset, Split, stack_classes
from metarun.errors import ConfigError
from metarun.factory import build_sampler


def numbered_split(classes: int = 12, per_class: int = 10) -> Split:
    """Each image's pixels hold (class, index): gathered images can be traced back to their source."""
    img = torch.zeros(classes, per_class, 2, 2, 2, dtype=torch.uint8)
    img[:, :, 0] = torch.arange(classes, dtype=torch.uint8)[:, None, None, None]
    img[:, :, 1] = torch.arange(per_class, dtype=torch.uint8)[None, :, None, None]
    return Split(img, [f"c{i}" for i in range(classes)])


def raw(sampler: EpisodeSampler, x: torch.Tensor) -> torch.Tensor:
    """Undo normalisation: back to the (class, index) bytes."""
    return (x * sampler.inv_std.reciprocal() + sampler.mean).mul(255).round().long()


def identities(sampler, x):
    r = raw(sampler, x)
    return r[..., 0, 0, 0], r[..., 1, 0, 0]  # class, index


@settings(max_examples=40, deadline=None)
@given(
    ways=st.integers(1, 12),
    shots=st.integers(1, 5),
    queries=st.integers(1, 5),
    tasks=st.integers(1, 4),
    seed=st.integers(0, 2**31),
)
def test_any_valid_episode_is_well_formed(ways, shots, queries, tasks, seed):
    sampler = EpisodeSampler(numbered_split(), ways, shots, queries, (0.5, 0.5), (0.25, 0.25), seed=seed)
    ep = sampler.sample(tasks)
    assert ep.support_x.shape == (tasks, ways * shots, 2, 2, 2)
    assert ep.query_x.shape == (tasks, ways * queries, 2, 2, 2)
    sc, si = identities(sampler, ep.support_x)
    qc, qi = identities(sampler, ep.query_x)
    for t in range(tasks):
        assert sorted(set(ep.support_y[t].tolist())) == list(range(ways))
        for label in range(ways):
            cls = set(sc[t][ep.support_y[t] == label].tolist()) | set(qc[t][ep.query_y[t] == label].tolist())
            assert len(cls) == 1  # one source class per label
            s_idx = si[t][ep.support_y[t] == label].tolist()
            q_idx = qi[t][ep.query_y[t] == label].tolist()
            assert len(s_idx) == shots and len(q_idx) == queries
            assert len(set(s_idx) | set(q_idx)) == shots + queries  # disjoint, no repeats
        assert len(set(sc[t].tolist())) == ways  # distinct classes per task


def test_padded_classes_never_yield_padding():
    per_class = [torch.full((n, 1, 2, 2), 1 + i, dtype=torch.uint8) for i, n in enumerate([3, 7, 4])]
    split = stack_classes(per_class, ["a", "b", "c"])
    assert split.counts.tolist() == [3, 7, 4]
    sampler = EpisodeSampler(split, 3, 1, 2, (0.0,), (1.0,), seed=0)
    for _ in range(20):
        ep = sampler.sample(4)
        assert (ep.support_x > 0).all() and (ep.query_x > 0).all()


def test_same_seed_same_episodes_and_shards_partition_the_meta_batch():
    def make():
        return EpisodeSampler(numbered_split(), 5, 1, 3, (0.5, 0.5), (0.25, 0.25), seed=7)

    a, b = make(), make()
    full = a.sample(4)
    halves = [make().sample(4, shard=(rank, 2)) for rank in (0, 1)]  # one sampler per process
    b.load_state_dict(a.state_dict())
    assert torch.equal(torch.cat([h.support_x for h in halves]), full.support_x)
    assert torch.equal(torch.cat([h.query_x for h in halves]), full.query_x)
    assert torch.equal(a.sample(2).query_x, b.sample(2).query_x)


def test_fixed_episodes_ignore_the_sampler_state_and_chunking():
    s = EpisodeSampler(numbered_split(), 5, 2, 3, (0.5, 0.5), (0.25, 0.25), seed=1)
    first = fixed_episodes(s, 10, seed=3)
    s.sample(5)  # advances the training generator
    again = fixed_episodes(s, 10, seed=3)
    assert torch.equal(first.classes, again.classes) and torch.equal(first.images, again.images)
    whole = s.gather(first)
    parts = [s.gather(first[i : i + 3]) for i in range(0, 10, 3)]
    assert torch.equal(torch.cat([p.support_x for p in parts]), whole.support_x)


@pytest.mark.parametrize(
    "ways,shots,queries,message",
    [(13, 1, 1, "only 12 classes"), (5, 6, 5, "only 10 images"), (0, 1, 1, "ways=0"), (5, -1, 1, "shots=-1")],
)
def test_impossible_episodes_are_config_errors(ways, shots, queries, message):
    with pytest.raises(ConfigError, match=message):
        check_episode(numbered_split(), ways, shots, queries, "train")


def test_image_batches_carry_split_class_labels():
    sampler = EpisodeSampler(numbered_split(), 5, 1, 1, (0.5, 0.5), (0.25, 0.25), seed=0)
    batch = sampler.sample_images(64)
    cls, _ = identities(sampler, batch.x)
    assert torch.equal(cls, batch.y)


@settings(max_examples=30, deadline=None)
@given(
    split=st.sampled_from(["train", "val", "test"]),
    ways=st.integers(1, 4),
    shots=st.integers(1, 3),
    queries=st.integers(1, 3),
    seed=st.integers(0, 2**31),
)
def test_episodes_come_from_the_requested_split_only(split, ways, shots, queries, seed):
    """The splits' classes carry different numbers (train 0-3, val 10-13, test 20-23), so any image's split is known."""
    splits = {}
    for offset, name in enumerate(("train", "val", "test")):
        numbered = numbered_split(classes=4, per_class=6)
        numbered.images[:, :, 0] += 10 * offset
        splits[name] = numbered
    sampler = build_sampler(
        FewShotDataset("numbered", splits, (0.5, 0.5), (0.25, 0.25)),
        split,
        ways=ways,
        shots=shots,
        queries=queries,
        seed=seed,
        device=torch.device("cpu"),
    )
    ep = sampler.sample(3)
    first = 10 * ("train", "val", "test").index(split)
    for x in (ep.support_x, ep.query_x):
        classes, _ = identities(sampler, x)
        assert set(classes.flatten().tolist()) <= set(range(first, first + 4))


def test_a_constant_channel_is_centred_not_divided_by_zero():
    sampler = EpisodeSampler(numbered_split(), 3, 1, 2, (0.5, 0.5), (0.25, 0.0), seed=0)
    episode = sampler.sample(2)
    assert torch.isfinite(episode.support_x).all() and torch.isfinite(episode.query_x).all()


def random_split(channels: int, classes: int = 12, per_class: int = 10, size: int = 4) -> Split:
    g = torch.Generator().manual_seed(channels)
    images = torch.randint(0, 256, (classes, per_class, channels, size, size), dtype=torch.uint8, generator=g)
    return Split(images, [f"c{i}" for i in range(classes)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("path", ["chunks of 1", "chunks of 3", "one chunk", "fused"])
def test_gathered_images_equal_per_image_normalisation(monkeypatch, channels_last, path, dtype):
    chunk_images = {"chunks of 1": 1, "chunks of 3": 3}.get(path, 1000)  # CHUNK_BYTES in images of 2x4x4 floats
    monkeypatch.setattr("metarun.data.episodes.CHUNK_BYTES", chunk_images * 2 * 4 * 4 * 4)
    split = random_split(2)
    mean, std = (0.3, 0.6), (0.2, 0.4)
    fused = path == "fused"
    sampler = EpisodeSampler(split, 5, 2, 3, mean, std, seed=1, channels_last=channels_last, fused=fused, dtype=dtype)
    idx = sampler.sample_indices(4)
    ep = sampler.gather(idx)
    assert ep.support_x.dtype == ep.query_x.dtype == dtype
    m, s = torch.tensor(mean).view(2, 1, 1), torch.tensor(std).view(2, 1, 1)
    for t in range(4):
        for w in range(5):
            images = split.images[idx.classes[t, w], idx.images[t, w]].float() / 255  # [shots + queries, 2, 4, 4]
            expected = ((images - m) / s).to(dtype)
            torch.testing.assert_close(ep.support_x[t, w * 2 : w * 2 + 2], expected[:2])
            torch.testing.assert_close(ep.query_x[t, w * 3 : w * 3 + 3], expected[2:])
    assert ep.support_x.flatten(0, 1).is_contiguous(memory_format=torch.channels_last) == channels_last
    assert not fused_gather.failed


@pytest.mark.parametrize("channels", [1, 3])
def test_fused_sampling_takes_the_eager_samples_at_any_size(channels):
    """One compiled kernel (symbolic shapes) serves meta-batches and image batches of every size."""
    mean, std = (0.5,) * channels, (0.25,) * channels
    eager = EpisodeSampler(random_split(channels, size=6), 5, 1, 3, mean, std, seed=3)
    fused = EpisodeSampler(random_split(channels, size=6), 5, 1, 3, mean, std, seed=3, fused=True)
    for tasks in (4, 3, 1):
        a, b = eager.sample(tasks), fused.sample(tasks)
        torch.testing.assert_close(b.support_x, a.support_x)
        torch.testing.assert_close(b.query_x, a.query_x)
        assert torch.equal(b.support_y, a.support_y) and torch.equal(b.query_y, a.query_y)
    a, b = eager.sample_images(7), fused.sample_images(7)
    torch.testing.assert_close(b.x, a.x)
    assert torch.equal(b.y, a.y)
    assert fused_gather.compiled is not None and not fused_gather.failed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["chunks", "fused", "augmented"])
def test_reduced_precision_images_are_the_float_images_rounded_once(monkeypatch, dtype, path):
    """What a bf16 or fp16 run's first layer would get from autocast's cast of the float images."""
    monkeypatch.setattr("metarun.data.episodes.CHUNK_BYTES", 3 * 3 * 6 * 6 * 4)  # 3 images a chunk (eager)
    split, mean, std = random_split(3, size=6), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    kwargs = {"fused": path == "fused", "transform": augment_batch if path == "augmented" else None}
    floats = EpisodeSampler(split, 5, 1, 3, mean, std, seed=4, **kwargs)
    rounded = EpisodeSampler(split, 5, 1, 3, mean, std, seed=4, dtype=dtype, **kwargs)
    a, b = floats.sample(3), rounded.sample(3)
    assert b.support_x.dtype == b.query_x.dtype == dtype
    assert torch.equal(b.support_x, a.support_x.to(dtype)) and torch.equal(b.query_x, a.query_x.to(dtype))
    a, b = floats.sample_images(5), rounded.sample_images(5)
    assert torch.equal(b.x, a.x.to(dtype)) and torch.equal(b.y, a.y)


def test_augmented_episodes_are_sampled_eagerly_even_when_fused_is_asked_for():
    """Augmentation runs between the conversion and the normalisation, so there is no one pass to compile."""
    split = random_split(1, size=6)
    plain = EpisodeSampler(split, 5, 1, 3, (0.5,), (0.25,), seed=2, transform=augment_batch)
    asked = EpisodeSampler(split, 5, 1, 3, (0.5,), (0.25,), seed=2, transform=augment_batch, fused=True)
    assert not asked.fused and EpisodeSampler(split, 5, 1, 3, (0.5,), (0.25,), seed=2, fused=True).fused
    assert torch.equal(asked.sample(2).query_x, plain.sample(2).query_x)


def test_fused_sampling_warns_once_and_samples_eagerly_where_compiling_fails(monkeypatch):
    calls = []

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            calls.append(args)
            raise RuntimeError("no C++ compiler found\nsecond line")

        return compiled

    monkeypatch.setattr("metarun.data.episodes.fused_gather", FusedGather())
    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = EpisodeSampler(random_split(2), 5, 1, 3, (0.5, 0.5), (0.25, 0.25), seed=0)
    fused = EpisodeSampler(random_split(2), 5, 1, 3, (0.5, 0.5), (0.25, 0.25), seed=0, fused=True)
    with pytest.warns(UserWarning, match=r"sampling eagerly \(RuntimeError: no C\+\+ compiler found\)$"):
        b = fused.sample(2)
    torch.testing.assert_close(b.query_x, eager.sample(2).query_x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused.sample(2)
    assert len(calls) == 1  # not tried again

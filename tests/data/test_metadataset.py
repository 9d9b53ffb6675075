"""Meta-Dataset episodes (``task.protocol=metadataset``): the procedure's distribution, reproducibility, padded layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metarun.data.episodes import fixed_episodes
from metarun.data.metadataset import EpisodeSpec, MetaDatasetSampler, PaddedEpisode, check_split
from metarun.data.split import FewShotDataset, Split, stack_classes
from metarun.errors import ConfigError
from metarun.factory import build_sampler

SPEC = EpisodeSpec()


def numbered_split(counts: list[int]) -> Split:
    """Class ``c``'s image ``i`` holds the bytes (c, i): a gathered image can be traced back to its source."""
    per_class = []
    for c, n in enumerate(counts):
        img = torch.zeros(n, 2, 1, 1, dtype=torch.uint8)
        img[:, 0] = c
        img[:, 1] = torch.arange(n, dtype=torch.uint8)[:, None, None]
        per_class.append(img)
    return stack_classes(per_class, [f"c{i}" for i in range(len(counts))])


def uneven_counts(classes: int = 70, seed: int = 0) -> list[int]:
    """Classes of 4 to 250 images: small ones bound the queries, large ones the per-class contribution (100)."""
    rng = np.random.RandomState(seed)
    return rng.randint(4, 251, size=classes).tolist()


def sampler_for(counts: list[int], seed: int = 0) -> MetaDatasetSampler:
    return MetaDatasetSampler(numbered_split(counts), (0.0, 0.0), (1.0, 1.0), seed)


def identities(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    raw = (x * 255).round().long()  # mean 0, std 1: the bytes back
    return raw[..., 0, 0, 0], raw[..., 1, 0, 0]


# -- the procedure, re-implemented one episode at a time after meta_dataset/data/sampling.py ------------
def reference_episode(counts: np.ndarray, rng: np.random.RandomState, beta_range=(0.0, 1.0)) -> tuple[int, list, int]:
    """``(ways, support images per class, queries per class)`` of one episode, in numpy, as Meta-Dataset draws it."""
    max_ways = min(SPEC.max_ways, len(counts))
    ways = rng.randint(SPEC.min_ways, max_ways + 1)
    classes = rng.choice(len(counts), ways, replace=False)
    images = counts[classes]
    queries = min(SPEC.max_query, (images // 2).min())
    remaining = images - queries
    beta = rng.uniform(*beta_range)
    size = min(np.floor(beta * np.minimum(SPEC.max_support_per_class, remaining) + 1).sum(), SPEC.max_support)
    weights = images * np.exp(rng.uniform(SPEC.min_log_weight, SPEC.max_log_weight, size=ways))
    shots = np.minimum(np.floor(weights / weights.sum() * (size - ways)).astype(int) + 1, remaining)
    return ways, shots.tolist(), int(queries)


def ks_distance(a, b) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical distribution functions."""
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    grid = np.union1d(a, b)
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


def summaries(ways, shots, queries) -> dict[str, list[float]]:
    """What is compared: ways, support size, queries per class, and the largest class's share of the support set."""
    return {
        "ways": list(ways),
        "support": [sum(s) for s in shots],
        "queries": list(queries),
        "largest share": [max(s) / sum(s) for s in shots],
        "smallest shots": [min(s) for s in shots],
    }


EPISODES = 2000
#: The KS statistic two samples of 2000 from one distribution exceed with probability 0.001 is 1.95 sqrt(2 / 2000);
#: discrete values (ways, queries) only lower it.
KS_BOUND = 1.95 * math.sqrt(2 / EPISODES)


def sampled(counts, episodes: int = EPISODES) -> dict[str, list[float]]:
    idx = sampler_for(counts, seed=1).sample_indices(episodes)
    ways = idx.ways.tolist()
    shots = [row[:w] for row, w in zip(idx.shots.tolist(), ways, strict=True)]
    return summaries(ways, shots, idx.queries.tolist())


def reference(counts, episodes: int = EPISODES, **kwargs) -> dict[str, list[float]]:
    rng = np.random.RandomState(2)
    draws = [reference_episode(np.asarray(counts), rng, **kwargs) for _ in range(episodes)]
    return summaries(*zip(*draws, strict=True))


@pytest.mark.parametrize(
    "counts", [uneven_counts(), [20] * 100, uneven_counts(classes=12, seed=3)], ids=["uneven", "glyphs", "few"]
)
def test_sizes_follow_the_procedure(counts):
    got, expected = sampled(counts), reference(counts)
    for name in got:
        assert ks_distance(got[name], expected[name]) < KS_BOUND, name
    lo, hi = SPEC.min_ways, min(SPEC.max_ways, len(counts))
    assert np.mean(got["ways"]) == pytest.approx((lo + hi) / 2, abs=0.05 * (hi - lo + 1))
    assert set(got["ways"]) == set(range(lo, hi + 1))


def test_the_comparison_tells_a_different_procedure_apart():
    """Guards the test above: β drawn from U[0, 0.5) instead of U[0, 1) shows in the support sizes."""
    counts = uneven_counts()
    assert ks_distance(sampled(counts)["support"], reference(counts, beta_range=(0.0, 0.5))["support"]) > 3 * KS_BOUND


def test_every_episode_keeps_the_procedures_bounds():
    counts = uneven_counts()
    idx = sampler_for(counts).sample_indices(500)
    n = torch.tensor(counts)
    for t in range(500):
        w, q = int(idx.ways[t]), int(idx.queries[t])
        images = n[idx.classes[t, :w]]
        shots = idx.shots[t, :w]
        assert SPEC.min_ways <= w <= SPEC.max_ways and len(set(idx.classes[t, :w].tolist())) == w
        assert q == min(SPEC.max_query, int(images.min()) // 2)
        assert (shots >= 1).all() and (shots + q <= images).all() and int(shots.sum()) <= SPEC.max_support
        assert (idx.shots[t, w:] == 0).all()


def test_padded_episodes_hold_each_class_once_with_distinct_images():
    counts = uneven_counts(classes=30)
    sampler = sampler_for(counts, seed=5)
    idx = sampler.sample_indices(6)
    ep = sampler.gather(idx)
    assert isinstance(ep, PaddedEpisode) and ep.num_tasks == 6
    assert ep.ways == int(idx.ways.max()) and ep.support_x.shape[1] == max(s for _, s, _ in ep.sizes)
    sc, si = identities(ep.support_x)
    qc, qi = identities(ep.query_x)
    for t, (w, s, q) in enumerate(ep.sizes):
        assert (w, s, q) == (int(idx.ways[t]), int(idx.shots[t].sum()), w * int(idx.queries[t]))
        assert ep.support_mask[t].tolist() == [True] * s + [False] * (ep.support_x.shape[1] - s)
        assert ep.query_mask[t].tolist() == [True] * q + [False] * (ep.query_x.shape[1] - q)
        assert ep.class_mask[t].tolist() == [True] * w + [False] * (ep.ways - w)
        for label in range(w):
            source = int(idx.classes[t, label])
            in_support, in_query = ep.support_y[t, :s] == label, ep.query_y[t, :q] == label
            assert int(in_support.sum()) == int(idx.shots[t, label]) and int(in_query.sum()) == int(idx.queries[t])
            assert set(sc[t, :s][in_support].tolist()) | set(qc[t, :q][in_query].tolist()) == {source}
            images = si[t, :s][in_support].tolist() + qi[t, :q][in_query].tolist()
            assert len(set(images)) == len(images) and max(images) < counts[source]  # distinct, never a padded slot
        assert (ep.support_y[t, s:] == 0).all() and (ep.query_y[t, q:] == 0).all()
        task = ep.task(t)
        assert task.support_x.shape[:2] == (1, s) and task.query_x.shape[:2] == (1, q) and task.ways == w


def test_the_same_seed_draws_the_same_episodes():
    counts = uneven_counts()
    a, b = sampler_for(counts, seed=3), sampler_for(counts, seed=3)
    first, second = a.sample(4), b.sample(4)
    assert first.sizes == second.sizes
    assert torch.equal(first.support_x, second.support_x) and torch.equal(first.query_x, second.query_x)
    other = sampler_for(counts, seed=4).sample(4)
    assert other.sizes != first.sizes
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.sample(3).query_x, b.sample(3).query_x)


def test_fixed_episodes_depend_on_the_seed_alone_and_gather_in_any_chunks():
    sampler = sampler_for(uneven_counts(), seed=0)
    first = fixed_episodes(sampler, 70, seed=9)  # more than one chunk of index drawing
    sampler.sample(5)
    again = fixed_episodes(sampler_for(uneven_counts(), seed=1), 70, seed=9)
    for name in first.__dataclass_fields__:
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    ten = first[:10]
    whole = sampler.gather(ten)
    parts = [sampler.gather(ten[i : i + 3]) for i in range(0, 10, 3)]
    assert [s for p in parts for s in p.sizes] == whole.sizes
    for p, start in zip(parts, range(0, 10, 3), strict=True):
        s, q = p.support_x.shape[1], p.query_x.shape[1]
        assert torch.equal(p.support_x, whole.support_x[start : start + 3, :s])
        assert torch.equal(p.query_x, whole.query_x[start : start + 3, :q])


def test_shards_hold_the_meta_batch_one_process_would_draw():
    full = sampler_for(uneven_counts(), seed=2).sample(4)
    halves = [sampler_for(uneven_counts(), seed=2).sample(4, shard=(rank, 2)) for rank in (0, 1)]
    assert halves[0].sizes + halves[1].sizes == full.sizes
    for h, rows in zip(halves, (slice(0, 2), slice(2, 4)), strict=True):
        assert torch.equal(h.support_x, full.support_x[rows, : h.support_x.shape[1]])


@pytest.mark.parametrize(
    ("counts", "message"), [([20] * 4, "only 4 classes"), ([20] * 6 + [1], "a class of 1 image")], ids=["classes", "images"]
)
def test_splits_the_procedure_cannot_draw_from_are_config_errors(counts, message):
    with pytest.raises(ConfigError, match=message):
        check_split(numbered_split(counts), "val", SPEC)
    with pytest.raises(ConfigError, match=message):
        sampler_for(counts)


def test_build_sampler_builds_it_for_the_protocol_and_refuses_generated_tasks(compose_config):
    split = numbered_split([20] * 10)
    dataset = FewShotDataset("numbered", {"train": split}, (0.0, 0.0), (1.0, 1.0))
    sampler = build_sampler(
        dataset, "train", ways=5, shots=1, queries=1, seed=0, device=torch.device("cpu"), protocol="metadataset"
    )
    assert isinstance(sampler, MetaDatasetSampler) and sampler.ways_range == (5, 10)
    from metarun.factory import build_dataset

    sinusoid = build_dataset(compose_config("train", ["dataset=sinusoid"]).dataset)
    with pytest.raises(ConfigError, match="generates its tasks"):
        build_sampler(sinusoid, "train", ways=1, shots=5, queries=5, seed=0, device=torch.device("cpu"), protocol="metadataset")

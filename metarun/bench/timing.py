"""Timing and peak memory: paths interleaved round by round, the median kept."""

from __future__ import annotations

import ctypes
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from metarun.device import synchronize

MAX_ROUNDS = 25  # timed rounds per figure, at most
SAMPLER_ROUNDS = 20  # meta-batches sampled per timed call of a sampler


class PeakMemory:
    """Peak memory of the process above its level at entry, in MB: CUDA allocations on a GPU, RSS otherwise.

    Linux resets the RSS high-water mark on request (``/proc/self/clear_refs``),
    so each measurement gets its own peak; elsewhere the lifetime peak of
    ``getrusage`` is the best available.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            release_free_memory()
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.start = psutil.Process().memory_info().rss
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = rss_peak()
        self.mb = max(peak - self.start, 0) / 2**20


def release_free_memory() -> None:
    """Hands freed heap memory back to the OS (glibc), so that RSS counts what a measurement allocates anew."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_peak() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Timing:
    seconds: float
    peak_mb: float
    rounds: int = 1


def measure(
    paths: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int,
    device: torch.device,
    warm: dict[str, Callable[[], None]] | None = None,
    min_seconds: float = 0.0,
) -> dict[str, Timing]:
    """Median seconds per call of each path, the paths interleaved round by round (order alternating).

    ``warm``: a cheaper call per path for the warm-up, with the same shapes (a few of 600 episodes).
    Peak memory is taken on one more call after the timed ones: measuring it hands the freed heap
    back to the OS first, and a timed call after that would fault all its memory in again, a cost a
    training run pays once, not every step.

    At least ``repeats`` rounds are timed, and more (up to ``MAX_ROUNDS``) until the rounds add up to
    ``min_seconds``: a median of 3 calls of a 0.1 s step swung a ratio by 10% from run to run.
    """
    untimed = {name: (warm or {}).get(name, fn) for name, fn in paths.items()}
    for call in untimed.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {k: [] for k in paths}

    def timed_round(r: int) -> None:
        for name in list(paths) if r % 2 == 0 else list(paths)[::-1]:
            synchronize(device)
            t0 = time.perf_counter()
            paths[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)

    timed_round(0)  # tells how many rounds fit in min_seconds
    spent = sum(t[0] for t in times.values())
    rounds = max(repeats, min(MAX_ROUNDS, math.ceil(min_seconds / spent))) if spent > 0 else repeats
    for r in range(1, rounds):
        timed_round(r)
    peaks = {}
    for name, call in untimed.items():
        with PeakMemory(device) as mem:
            call()
        peaks[name] = mem.mb
    return {k: Timing(statistics.median(v), peaks[k], len(v)) for k, v in times.items()}


def flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()

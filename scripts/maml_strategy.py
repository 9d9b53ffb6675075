"""Times MAML's execution strategies (``algo.strategy``) on Conv4: the measurement behind ``strategy=auto``.

    python scripts/maml_strategy.py [--tasks 32] [--repeats 3] [--threads 2] [--strategies grouped,vmap,loop] [--device cuda]

Prints, per task shape, seconds per meta-step (training: meta-gradient and
backward; evaluation: inner steps and query scores) for each strategy and
each one's speed relative to the loop (> 1: faster than the loop); ``grouped:4`` names a chunk size
(``algo.chunk_size``). The strategies are timed
interleaved and the best of ``--repeats`` is kept, which makes the ratio
robust to other jobs on a shared machine; on a busy machine ``--threads 1
--clock cpu`` (process time) measures the work itself.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from metarun.algorithms.maml import MAML
from metarun.allocator import keep_freed_memory
from metarun.data.episodes import Episode
from metarun.device import resolve_device, synchronize
from metarun.models.conv4 import Conv4


def episode(tasks, ways, shots, queries, device, size=28):
    return Episode(
        torch.randn(tasks, ways * shots, 1, size, size, device=device),
        torch.arange(ways, device=device).repeat_interleave(shots).expand(tasks, -1),
        torch.randn(tasks, ways * queries, 1, size, size, device=device),
        torch.arange(ways, device=device).repeat_interleave(queries).expand(tasks, -1),
        ways,
    )


def one_step(algo, ep, mode):
    if mode == "eval":
        algo.eval()
        algo.evaluate(ep, "transductive")
    else:
        algo.train()
        loss, _ = algo.training_loss(ep)
        loss.backward()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, repeats, device, clock="wall"):
    now = CLOCKS[clock]
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = now()
        fn()
        synchronize(device)
        best = min(best, now() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--eval-tasks", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="1x1,1x3,1x7,1x15,5x5,5x15")
    ap.add_argument("--modes", default="second,first,eval")
    ap.add_argument("--strategies", default="grouped,vmap,loop")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument(
        "--clock", choices=list(CLOCKS), default="wall", help="cpu: process time, robust to other jobs with --threads 1"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as metarun's commands do
    torch.manual_seed(0)
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, Conv4-64 28x28, 5-way, {args.clock} time")
    strategies = args.strategies.split(",")
    if "loop" not in strategies:
        strategies.append("loop")
    heads = "".join(f"{s + ' s':>12s}" for s in strategies) + "".join(f"{s + '/loop':>16s}" for s in strategies if s != "loop")
    print(f"{'mode':7s} {'shots x queries':>15s} {'images/task':>11s}{heads}")
    for mode in args.modes.split(","):
        for shape in args.shapes.split(","):
            shots, queries = map(int, shape.split("x"))
            algo = MAML(Conv4((1, 28, 28)), 5, first_order=mode == "first", inner_steps=1, inner_steps_eval=3).to(device)
            tasks = args.eval_tasks if mode == "eval" else args.tasks
            ep = episode(tasks, 5, shots, queries, device)
            times = {}
            for _ in range(args.repeats):
                for strategy in strategies:
                    algo.strategy, _, chunk = strategy.partition(":")
                    algo.chunk_size = int(chunk) if chunk else None
                    times[strategy] = min(
                        times.get(strategy, float("inf")), timed(partial(one_step, algo, ep, mode), 1, device, args.clock)
                    )
            images = 5 * (shots + queries)
            cells = "".join(f"{times[s]:12.3f}" for s in strategies)
            speed = "".join(f"{times['loop'] / times[s]:16.2f}" for s in strategies if s != "loop")
            print(f"{mode:7s} {shape:>15s} {images:11d}{cells}{speed}", flush=True)


if __name__ == "__main__":
    main()

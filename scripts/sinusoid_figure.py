"""The MAML paper's regression figure (Finn et al. 2017, Figure 2) for a trained sinusoid run.

    metarun train experiment=maml_sinusoid hydra.run.dir=outputs/maml_sinusoid
    python scripts/sinusoid_figure.py outputs/maml_sinusoid [--tasks 3] [--steps 1,10] [--out FILE]

For a few held-out test tasks: the true curve, the K support points (K =
the run's ``task.shots``), the prediction of the meta-learned initialisation
and the predictions after 1 and 10 inner gradient steps on those K points.
Prints each curve's MSE on a dense grid over x in [-5, 5] and writes
``sinusoid.png`` into the run folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from metarun.checkpoint import load_checkpoint, load_model_state
from metarun.factory import build_algorithm, build_dataset, build_sampler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder (or checkpoint) of a dataset=sinusoid training")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--steps", default="1,10", help="inner steps to draw, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    ckpt = load_checkpoint(args.run)
    cfg = OmegaConf.create(ckpt["config"])
    dataset = build_dataset(cfg.dataset)
    algorithm = build_algorithm(cfg, dataset)
    load_model_state(algorithm, ckpt["model"], ckpt["path"])
    algorithm.eval()
    sampler = build_sampler(dataset, "test", ways=1, shots=cfg.task.shots, queries=1, seed=args.seed, device=torch.device("cpu"))
    tasks = sampler.sample_indices(args.tasks)
    episode, amplitude, phase = sampler.gather(tasks), tasks.amplitude, tasks.phase
    grid = torch.linspace(-5, 5, 200).unsqueeze(-1)
    steps = [0, *(int(s) for s in args.steps.split(","))]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, args.tasks, figsize=(4.5 * args.tasks, 3.6), squeeze=False)
    params = algorithm.detached(algorithm.meta_parameters())
    for t, ax in enumerate(axes[0]):
        xs, ys = episode.support_x[t], episode.support_y[t]
        truth = amplitude[t] * torch.sin(grid - phase[t])
        ax.plot(grid, truth, color="black", lw=2, label="ground truth")
        ax.scatter(xs, ys, color="crimson", zorder=5, label=f"{xs.shape[0]} points used for the gradient")
        for k in steps:
            pred = algorithm.solve(params, {}, xs, ys, grid, k, "transductive", True).detach()
            mse = (pred - truth).square().mean().item()
            label = "pre-update" if k == 0 else f"after {k} step{'s' * (k > 1)}"
            ax.plot(grid, pred, ls=":" if k == 0 else "--", label=f"{label} (MSE {mse:.2f})")
            print(f"task {t}: amplitude {amplitude[t]:.2f} phase {phase[t]:.2f}  {label:14s} MSE {mse:.3f}")
        ax.set_xlim(-5, 5)
        ax.legend(fontsize=6.5, loc="best", framealpha=0.8)
    fig.suptitle(f"MAML, K={cfg.task.shots}, inner step {cfg.algo.inner_lr}: held-out sinusoids")
    fig.tight_layout()
    out = args.out or (ckpt["path"].parent.parent / "sinusoid.png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

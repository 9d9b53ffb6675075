"""Few-shot evaluation: mean score ± 95% CI over seeded episodes.

The test episodes of a setting depend only on ``eval.seed``, the setting and
the dataset, never on the algorithm, the batch size or the device: they are
drawn on the CPU up front and gathered in chunks. Two runs evaluated with the
same seed are therefore compared on identical tasks, and ``eval.json`` keeps
the per-episode scores so the comparison can be paired.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from metarun.algorithms.base import Algorithm
from metarun.config import EvalConfig, check_values
from metarun.data.episodes import Episode, check_episode, fixed_episodes
from metarun.data.metadataset import EpisodeSpec, check_split
from metarun.data.multi import MultiSourceDataset, per_source
from metarun.data.split import FewShotDataset, Split
from metarun.device import autocast
from metarun.errors import ConfigError
from metarun.models.norm import check_bn_mode
from metarun.progress import progress_bar
from metarun.results import mean_ci95
from metarun.speed_settings import resolve_speed_settings


def setting_seed(seed: int, ways: int, shots: int) -> int:
    return (seed * 1_000_003 + ways * 1_009 + shots) % (2**63)


def resolve_bn_mode(algorithm: Algorithm, bn_mode: str | None) -> str:
    """``eval.bn_mode``, or the algorithm's documented default when it is unset."""
    return check_bn_mode(bn_mode or algorithm.default_bn_mode)


def eval_precision(eval_cfg: DictConfig, trainer_cfg: DictConfig | None) -> str:
    """``eval.precision``, else the run's ``trainer.precision``: a model trained in bf16 is validated and tested in bf16."""
    if eval_cfg.get("precision") is not None:
        return eval_cfg.precision
    return trainer_cfg.get("precision", "fp32") if trainer_cfg is not None else "fp32"


def score_episodes(
    algorithm: Algorithm,
    sampler,
    *,
    episodes: int,
    seed: int,
    batch_tasks: int,
    bn_mode: str,
    description: str = "",
    precision: str = "fp32",
) -> np.ndarray:
    """Per-episode scores of ``episodes`` seeded tasks, evaluated ``batch_tasks`` at a time (under ``precision``'s autocast)."""
    indices = fixed_episodes(sampler, episodes, seed)
    was_training = algorithm.training
    algorithm.eval()
    scores = []
    try:
        with progress_bar(total=episodes, description=description or "eval", transient=True) as advance:
            for start in range(0, episodes, batch_tasks):
                episode = sampler.gather(indices[start : start + batch_tasks])
                with autocast(episode.support_x.device, precision):
                    scores.append(algorithm.evaluate(episode, bn_mode).float().cpu())
                advance(len(scores[-1]))
    finally:
        algorithm.train(was_training)
    return torch.cat(scores).numpy()


def evaluate_settings(
    algorithm: Algorithm,
    make_sampler,
    settings,
    queries: int,
    episodes: int,
    seed: int,
    batch_tasks: int,
    bn_mode: str,
    precision: str = "fp32",
    sources: Sequence[str] | None = None,
) -> list[dict]:
    """Every ``{ways, shots}`` setting on its own seeded episodes; with the ``sources`` of a ``dataset=multi``, also
    each source's share of them (``by_source``)."""
    results = []
    for s in settings:
        sampler = make_sampler(s["ways"], s["shots"], queries)
        scores = score_episodes(
            algorithm,
            sampler,
            episodes=episodes,
            seed=setting_seed(seed, s["ways"], s["shots"]),
            batch_tasks=batch_tasks,
            bn_mode=bn_mode,
            description=f"{s['ways']}-way {s['shots']}-shot",
            precision=precision,
        )
        mean, ci = mean_ci95(scores)
        results.append(
            {
                "ways": s["ways"],
                "shots": s["shots"],
                "queries": queries,
                "episodes": episodes,
                algorithm.score: mean,
                "ci95": ci,
                "per_episode": scores.tolist(),
            }
            | ({"by_source": by_source(scores, sources, algorithm.score)} if sources else {})
        )
    return results


def by_source(scores: torch.Tensor, sources: Sequence[str], score: str) -> dict[str, dict]:
    """A ``dataset=multi`` evaluation's scores of each source (its equal block of the episodes), with their CI."""
    out = {}
    for name, part in per_source(scores.tolist(), list(sources)).items():
        mean, ci = mean_ci95(torch.tensor(part))
        out[name] = {score: mean, "ci95": ci, "episodes": len(part)}
    return out


#: the ways buckets Meta-Dataset episodes are also scored by (lowest and highest ways of each)
WAYS_BUCKETS = ((5, 9), (10, 19), (20, 34), (35, 50))


def evaluate_metadataset(
    algorithm: Algorithm, sampler, *, episodes: int, seed: int, batch_tasks: int, bn_mode: str, precision: str = "fp32"
) -> list[dict]:
    """``episodes`` Meta-Dataset episodes (``task.protocol=metadataset``) drawn from ``seed``: a row for all of them,
    then one per ways bucket that has episodes, each with its per-episode scores (and ways), so that two runs
    compare pairwise bucket by bucket (``metarun report``)."""
    scores = score_episodes(
        algorithm, sampler, episodes=episodes, seed=seed, batch_tasks=batch_tasks, bn_mode=bn_mode,
        description="metadataset episodes", precision=precision,
    )  # fmt: skip
    ways = fixed_episodes(sampler, episodes, seed).ways.cpu().numpy()  # the same episodes, drawn again
    lo, hi = sampler.ways_range

    def row(label: str, pick: np.ndarray) -> dict:
        mean, ci = mean_ci95(scores[pick])
        return {
            "ways": label,
            "shots": "variable",
            "queries": "variable",
            "episodes": int(pick.sum()),
            algorithm.score: mean,
            "ci95": ci,
            "per_episode": scores[pick].tolist(),
            "per_episode_ways": ways[pick].tolist(),
        }

    rows = [row(f"{lo}-{hi}", np.ones_like(ways, dtype=bool))]
    for a, b in WAYS_BUCKETS:
        a, b = max(a, lo), min(b, hi)
        pick = (ways >= a) & (ways <= b)
        if a <= b and pick.any():
            rows.append(row(f"{a}-{b}" if a < b else str(a), pick))
    return rows


def evaluate_omniglot_runs(
    algorithm: Algorithm,
    runs_path: str,
    image_size: int,
    mean: tuple,
    std: tuple,
    device: torch.device,
    bn_mode: str,
    precision: str = "fp32",
    channels_last: bool = False,
) -> list[dict]:
    """Omniglot's official one-shot runs: error per run, mean ± 95% CI."""
    from metarun.data.omniglot_runs import load_runs

    runs = load_runs(Path(runs_path), image_size=image_size)
    m = torch.tensor(mean, device=device).view(-1, 1, 1)
    s = torch.tensor(std, device=device).view(-1, 1, 1)

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = ((x.to(device).float() / 255.0) - m) / s
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    was_training = algorithm.training
    algorithm.eval()
    errors = []
    try:
        for run in runs:
            ways = run.support.shape[0]
            support_x = prep(run.support.flatten(0, 1))[None]
            episode = Episode(
                support_x, torch.arange(ways, device=device)[None], prep(run.query)[None], run.query_labels.to(device)[None], ways
            )
            with autocast(device, precision):
                errors.append(1.0 - float(algorithm.evaluate(episode, bn_mode)[0]))
    finally:
        algorithm.train(was_training)
    err, ci = mean_ci95(errors)
    ways = runs[0].support.shape[0] if runs else 0
    return [{"ways": ways, "shots": 1, "runs": len(errors), "error": err, "ci95": ci, "per_run": errors}]


def results_table(results: list[dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("setting", "score", "± 95% CI", "episodes"):
        table.add_column(col, justify="right" if col != "setting" else "left")
    for r in results:
        if "error" in r:
            table.add_row(
                f"{r['ways']}-way {r['shots']}-shot (runs)",
                f"{100 * r['error']:.2f}% error",
                f"{100 * r['ci95']:.2f}",
                str(r["runs"]),
            )
        elif "accuracy" in r:
            table.add_row(
                f"{r['ways']}-way {r['shots']}-shot", f"{100 * r['accuracy']:.2f}%", f"{100 * r['ci95']:.2f}", str(r["episodes"])
            )
            for name, part in r.get("by_source", {}).items():
                table.add_row(f"  {name}", f"{100 * part['accuracy']:.2f}%", f"{100 * part['ci95']:.2f}", str(part["episodes"]))
        else:
            key = next(k for k in r if k not in ("ways", "shots", "queries", "episodes", "ci95", "per_episode"))
            table.add_row(f"{r['shots']}-shot", f"{r[key]:.4f} {key}", f"{r['ci95']:.4f}", str(r["episodes"]))
    return table


def write_eval_json(
    path: Path,
    checkpoint: Path,
    dataset: str,
    protocol: str,
    split: str,
    bn_mode: str,
    results: list[dict],
    precision: str = "fp32",
    *,
    trained_on: str | None = None,
) -> None:
    payload = {
        "split": split,
        "checkpoint": str(checkpoint),
        "dataset": dataset,
        "trained_on": trained_on or dataset,
        "evaluated_on": dataset,
        "protocol": protocol,
        "bn_mode": bn_mode,
        "precision": precision,
        "results": results,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def check_settings(dataset, eval_cfg: DictConfig, algorithm: Algorithm, protocol: str = "fixed") -> None:
    """Every evaluation setting against its split and the model as soon as both are built, so that a
    setting neither can serve fails in seconds rather than at the end of a long training run. ``protocol``:
    the run's ``task.protocol`` (``metadataset``: its episodes replace ``eval.settings``)."""
    if eval_cfg.protocol == "omniglot_runs":
        if not eval_cfg.runs_path:
            raise ConfigError("eval.protocol=omniglot_runs needs eval.runs_path=DIR (the folder holding run01, run02, ...)")
        return
    if protocol == "metadataset":
        if not hasattr(dataset, "sampler"):  # (one that generates its tasks is refused by build_sampler)
            check_split(dataset.splits[eval_cfg.split], eval_cfg.split, EpisodeSpec())
        return
    if algorithm.fixed_ways and all(s.ways != algorithm.ways for s in eval_cfg.settings):
        raise ConfigError(
            f"eval.settings: {type(algorithm).__name__}'s head has {algorithm.ways} outputs, so it evaluates {algorithm.ways}-way tasks only"
        )
    if hasattr(dataset, "sampler"):  # generated tasks: any setting can be drawn
        return
    for i, s in enumerate(eval_cfg.settings):
        keys = (f"eval.settings[{i}].ways", f"eval.settings[{i}].shots", "eval.queries")
        check_episode(dataset.splits[eval_cfg.split], s.ways, s.shots, eval_cfg.queries, eval_cfg.split, keys)


def servable_settings(algorithm: Algorithm, settings: list[dict], console: Console) -> list[dict]:
    """The settings the model can be evaluated at: a MAML-family head has a fixed number of outputs, so
    other ways are skipped with a note (a dataset's default settings may list 5- and 20-way tasks;
    :func:`check_settings` has made sure one is left)."""
    if not algorithm.fixed_ways:
        return settings
    kept = [s for s in settings if s["ways"] == algorithm.ways]
    skipped = sorted({s["ways"] for s in settings} - {algorithm.ways})
    if skipped:
        ways = ", ".join(f"{w}-way" for w in skipped)
        console.print(
            f"note: {type(algorithm).__name__}'s head has {algorithm.ways} outputs; skipping the {ways} settings",
            markup=False,
            highlight=False,
        )
    return kept


def run_evaluation(
    cfg: DictConfig,
    eval_cfg: DictConfig,
    checkpoint: Path,
    device: torch.device,
    run_dir: Path,
    logger=None,
    console: Console | None = None,
    *,
    dataset=None,
    algorithm: Algorithm | None = None,
    evaluated_on: DictConfig | None = None,
) -> list[dict]:
    """Evaluates a checkpoint of a run and writes ``eval.json`` into ``run_dir``; the dataset and model are rebuilt
    from the run's config unless given (the trainer passes its own, already on the device).

    ``evaluated_on``: another dataset's config node (cross-domain evaluation): its images are converted to the
    model's input shape and normalised with the checkpoint's statistics (:mod:`metarun.data.cross_domain`), and
    the results go to ``eval_on_<dataset>.json``."""
    from metarun.checkpoint import load_checkpoint, load_model_state
    from metarun.factory import build_algorithm, build_dataset, build_sampler, with_frozen_features

    check_values(eval_cfg, EvalConfig, "eval.")
    ckpt = load_checkpoint(checkpoint)
    given = algorithm is not None
    trained_on = ckpt.get("dataset_name") or _dataset_name(cfg.dataset)
    if evaluated_on is not None:
        from metarun.data.cross_domain import as_input_of

        model_data = trained_shape(cfg, ckpt, build_dataset)
        dataset = as_input_of(build_dataset(evaluated_on), model_data.image_shape, tuple(ckpt["mean"]), tuple(ckpt["std"]))
        algorithm = build_algorithm(cfg, model_data, pretrained_weights=False).to(device)  # the checkpoint has them
    else:
        dataset = dataset if dataset is not None else build_dataset(cfg.dataset)
        algorithm = algorithm if given else build_algorithm(cfg, dataset, pretrained_weights=False).to(device)
        trained_on = dataset.name
    if not given:  # features of a fixed backbone, computed after the weights load
        dataset = with_frozen_features(cfg, dataset, algorithm, device, eval_protocol=eval_cfg.protocol)
    # a run trained on Meta-Dataset episodes is tested on them (a run saved before task.protocol existed is fixed)
    task_protocol = (cfg.get("task") or {}).get("protocol", "fixed")
    check_settings(dataset, eval_cfg, algorithm, protocol=task_protocol)
    load_model_state(algorithm, ckpt["model"], ckpt["path"])
    bn_mode = resolve_bn_mode(algorithm, eval_cfg.bn_mode)
    # the run's speed settings; a config composed but never trained (auto left in it) resolves them as training would
    tr = cfg.get("trainer") or {}
    speed = resolve_speed_settings(
        precision=tr.get("precision", "fp32"), channels_last=tr.get("channels_last", False),
        fused_sampling=tr.get("fused_sampling", False), device=device, channels_last_pays=algorithm.channels_last_pays,
        steps=int(tr.get("steps", 0)),
    )  # fmt: skip
    precision = eval_precision(eval_cfg, {"precision": speed.precision})
    channels_last, fused = speed.channels_last, speed.fused_sampling
    if channels_last and not given:
        algorithm = algorithm.to(memory_format=torch.channels_last)
    console = console or Console()
    if eval_cfg.protocol == "omniglot_runs":
        image_size = cfg.dataset.get("image_size", dataset.image_shape[-1])
        results = evaluate_omniglot_runs(
            algorithm, eval_cfg.runs_path, image_size, dataset.mean, dataset.std, device, bn_mode, precision, channels_last
        )
        protocol = eval_cfg.protocol
    elif task_protocol == "metadataset":
        sampler = build_sampler(
            dataset, eval_cfg.split, ways=0, shots=0, queries=0, seed=0, device=device, channels_last=channels_last,
            fused=fused, precision=precision, protocol="metadataset",
        )  # fmt: skip
        results = evaluate_metadataset(
            algorithm, sampler, episodes=eval_cfg.episodes, seed=eval_cfg.seed, batch_tasks=eval_cfg.batch_tasks,
            bn_mode=bn_mode, precision=precision,
        )  # fmt: skip
        protocol = "metadataset"
    else:
        settings = servable_settings(algorithm, OmegaConf.to_container(eval_cfg.settings, resolve=True), console)

        def make_sampler(ways, shots, queries):
            return build_sampler(
                dataset, eval_cfg.split, ways=ways, shots=shots, queries=queries, seed=0, device=device,
                channels_last=channels_last, fused=fused, precision=precision,
            )  # fmt: skip

        results = evaluate_settings(
            algorithm,
            make_sampler,
            settings,
            eval_cfg.queries,
            eval_cfg.episodes,
            eval_cfg.seed,
            eval_cfg.batch_tasks,
            bn_mode,
            precision,
            sources=list(dataset.sources) if isinstance(dataset, MultiSourceDataset) else None,
        )
        protocol = eval_cfg.protocol
    across = f" (trained on {trained_on}, evaluated on {dataset.name})" if evaluated_on is not None else ""
    console.print(f"evaluated {ckpt['path']}{across}", soft_wrap=True, markup=False, highlight=False)
    title = f"{dataset.name} {eval_cfg.split} ({bn_mode} batch norm{'' if precision == 'fp32' else ', ' + precision})"
    console.print(results_table(results, title))
    name = "eval.json" if evaluated_on is None else f"eval_on_{dataset.name}.json"
    write_eval_json(
        run_dir / name, ckpt["path"], dataset.name, protocol, eval_cfg.split, bn_mode, results, precision,
        trained_on=trained_on,
    )  # fmt: skip
    if logger is not None:
        logger.log_eval(results, protocol)
    return results


def _dataset_name(node: DictConfig) -> str:
    """A dataset's name from its config node: the loader's module (``metarun.data.cub.load`` -> ``cub``)."""
    target = str(node.get("_target_", "dataset"))
    parts = target.split(".")
    return parts[-2] if len(parts) >= 2 else target


def trained_shape(cfg: DictConfig, ckpt: dict, build_dataset) -> FewShotDataset:
    """An image-less stand-in for the run's training data (input shape, training classes) to rebuild its model;
    checkpoints from before these were saved rebuild the run's dataset to read them."""
    if "input_shape" in ckpt and "train_classes" in ckpt:
        shape, classes = tuple(ckpt["input_shape"]), ckpt["train_classes"]
    else:
        real = build_dataset(cfg.dataset)
        shape = tuple(getattr(real, "image_shape", ()))
        classes = real.splits["train"].num_classes if hasattr(real, "splits") else None
    if len(shape) != 3 or classes is None:
        raise ConfigError(
            f"the checkpoint's model takes inputs of shape {shape}, not images: cross-domain evaluation converts between "
            "image datasets only"
        )
    empty = Split(torch.zeros(classes, 0, *shape, dtype=torch.uint8), [str(i) for i in range(classes)])
    return FewShotDataset("trained", {"train": empty}, tuple(ckpt["mean"]), tuple(ckpt["std"]))


def run_eval_config(run_cfg: DictConfig, cfg: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """The run's own ``eval`` settings with the command line's ``eval.*`` overrides on top.

    So ``metarun eval checkpoint=RUN`` repeats exactly the evaluation that
    training ended with (settings, episodes, seed, bn_mode), and
    ``eval.episodes=100`` changes only that (``overrides``: the ones the user typed).
    """
    if "eval" not in run_cfg:
        return cfg.eval
    merged = OmegaConf.merge(OmegaConf.structured(EvalConfig), run_cfg.eval)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "eval":
            merged = cfg.eval
        elif key.startswith("eval."):
            OmegaConf.update(merged, key.removeprefix("eval."), OmegaConf.select(cfg, key), merge=False)
    return merged


def eval_task(cfg: DictConfig, overrides: Sequence[str] = ()) -> float:
    """``metarun eval checkpoint=<run folder or .pt>``; ``overrides``: the ones the user typed."""
    from metarun.checkpoint import load_checkpoint
    from metarun.device import resolve_device
    from metarun.loggers import build_logger

    ckpt = load_checkpoint(cfg.checkpoint)
    run_cfg = OmegaConf.create(ckpt["config"])
    device = resolve_device(cfg.device.type)
    path = ckpt["path"]
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    eval_cfg = run_eval_config(run_cfg, cfg, overrides)
    evaluated_on = cfg.get("dataset")
    logger = build_logger(
        cfg.logger, run_dir, OmegaConf.merge(run_cfg, {k: v for k, v in cfg.items() if k != "dataset"}, {"eval": eval_cfg}),
        job_type="eval",
    )  # fmt: skip
    try:
        results = run_evaluation(run_cfg, eval_cfg, path, device, run_dir, logger, evaluated_on=evaluated_on)
    finally:
        logger.close()
    first = results[0]
    return first.get("accuracy", -first.get("error", first.get("mse", 0.0)))

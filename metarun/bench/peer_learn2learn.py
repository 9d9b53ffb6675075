"""``metarun bench --peer learn2learn``: metarun's training steps against learn2learn's own code, in one process.

learn2learn is a peer measured against, never a dependency: it is imported only here, and only when
``--peer learn2learn`` is given, from the environment ``scripts/install_learn2learn.sh`` builds (its
last release does not install from the registry on current Pythons). Both sides get the same images
(random bytes in Omniglot's shape, 28x28x1, normalised alike), the same episodes' shapes and the same
architecture: learn2learn's ``CNN4Backbone(hidden_size=64, layers=4, channels=1, max_pool=True)``
(conv, batch norm, ReLU, 2x2 max-pool, four times) and a linear head is metarun's ``backbone=conv4``.

What is timed, sampling included on both sides:

* episode sampling: learn2learn's ``TaskDataset(MetaDataset(images), [NWays, KShots, LoadData,
  RemapLabels, ConsecutiveLabels])``, one ``sample()`` per episode, against metarun's sampler;
* MAML (second order, and first order at metarun's ``algo=fomaml`` rate), ANIL and ProtoNet meta-steps
  written as learn2learn's examples write them (``examples/vision/maml_omniglot.py``,
  ``anil_fc100.py``, ``protonet_miniimagenet.py``): per task ``MAML.clone()`` and ``adapt``, the
  query loss backpropagated, the gradients averaged over the meta-batch, one Adam step; ANIL's body
  runs once per task and only ``MAML(head)`` adapts; ProtoNet embeds support and query, averages
  prototypes and takes the negative squared euclidean distances as logits. metarun's side is the
  trainer's own :func:`~metarun.trainer.train_step` on the composed ``metarun train`` config, with
  the settings ``metarun train`` picks by default, and with fp32 forced where those differ.

The inner rates and step counts of learn2learn's side are read from metarun's composed algorithm, so
the two do the same work; learn2learn's side runs as its examples do, eager and in fp32. ``bench``
below is the run's :class:`~metarun.bench.command.Bench` (this module is imported by that one, and not
the other way round).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from metarun.bench.shapes import OMNIGLOT, SHAPES, Shape, default_settings
from metarun.bench.timing import SAMPLER_ROUNDS, measure
from metarun.data.split import Split
from metarun.errors import MetarunError
from metarun.trainer import train_step

NAME = "learn2learn"
#: what ``--only`` names to run the peer rows
ONLY = "peer"
INSTALL = (
    "build its environment with `bash scripts/install_learn2learn.sh` and run the bench from it: "
    "`.venv-learn2learn/bin/metarun bench --peer learn2learn`"
)

MAML_SHAPE = SHAPES["omniglot-5w1s1q"]  # the MAML paper's Omniglot setting: 5-way 1-shot, 1 query, 32 tasks
ANIL_SHAPE = replace(OMNIGLOT, name="omniglot-5w1s5q", queries=5)  # algo=anil's own task keys
#: row name, metarun's algo, shape, and what learn2learn's side is
ROWS = (
    ("maml", MAML_SHAPE, "learn2learn MAML clone/adapt"),
    ("fomaml", MAML_SHAPE, "learn2learn MAML(first_order) clone/adapt"),
    ("anil", ANIL_SHAPE, "learn2learn body + MAML(head) clone/adapt"),
    ("protonet", OMNIGLOT, "learn2learn protonet example step"),
)


def import_learn2learn():
    """learn2learn, or a :class:`MetarunError` of one line saying how to get an environment where it imports."""
    try:
        # gym, which learn2learn imports, prints a notice about its age; torchvision warns about its own
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            import learn2learn
    except Exception as e:  # not installed, or a broken install (torchvision, gym, a stale compiled extension)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MetarunError(f"--peer learn2learn: learn2learn does not import here ({reason}); {INSTALL}") from None
    return learn2learn


# -- learn2learn's side ---------------------------------------------------------------------------------
class ImageClasses(Dataset):
    """One normalised image and its class (an int, as torchvision's datasets give it) per ``__getitem__``."""

    def __init__(self, split: Split, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        images = split.images  # (classes, per class, c, h, w) bytes
        c = images.shape[2]
        self.per_class = images.shape[1]
        m, s = torch.tensor(mean).view(c, 1, 1), torch.tensor(std).view(c, 1, 1)
        self.x = (images.flatten(0, 1).float() / 255.0 - m) / s

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.x[index], index // self.per_class


class Tasks:
    """learn2learn's episode pipeline (as ``l2l.vision.benchmarks`` builds it) over ``split``'s images.

    ``ConsecutiveLabels`` groups a task's samples class by class (labels ``0..ways-1``, remapped in a
    random order); the first ``shots`` of each class are the support set, the mask learn2learn's
    examples build with numpy."""

    def __init__(self, l2l, split: Split, mean, std, ways: int, shots: int, queries: int, device: torch.device) -> None:
        data = ImageClasses(split, mean, std)
        meta = l2l.data.MetaDataset(data, indices_to_labels={i: i // data.per_class for i in range(len(data))})
        t = l2l.data.transforms
        transforms = [t.NWays(meta, ways), t.KShots(meta, shots + queries), t.LoadData(meta), t.RemapLabels(meta),
                      t.ConsecutiveLabels(meta)]  # fmt: skip
        self.tasks = l2l.data.TaskDataset(meta, task_transforms=transforms, num_tasks=-1)
        support = np.zeros(ways * (shots + queries), dtype=bool)
        for offset in range(shots):
            support[np.arange(ways) * (shots + queries) + offset] = True
        self.support, self.query = torch.from_numpy(support), torch.from_numpy(~support)
        self.ways, self.shots, self.device = ways, shots, device

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        data, labels = self.tasks.sample()
        return data.to(self.device), labels.to(self.device)

    def split(self, data: torch.Tensor, labels: torch.Tensor):
        return data[self.support], labels[self.support], data[self.query], labels[self.query]


def conv4(l2l, shape: Shape) -> tuple[nn.Module, int]:
    """learn2learn's Conv4 with max-pooling at ``shape``, and its number of output features."""
    body = l2l.vision.models.CNN4Backbone(hidden_size=shape.hidden, layers=4, channels=shape.image[0], max_pool=True)
    with torch.no_grad():
        features = body(torch.zeros(2, *shape.image)).shape[1]
    return body, features


class MAMLStep:
    """``examples/vision/maml_omniglot.py``'s meta-step: per task ``maml.clone()``, ``adapt`` on the support
    loss, the query loss backpropagated; gradients averaged over the tasks, one Adam step."""

    def __init__(self, l2l, tasks: Tasks, shape: Shape, inner_lr: float, steps: int, first_order: bool, lr: float) -> None:
        body, features = conv4(l2l, shape)
        self.model = nn.Sequential(body, nn.Linear(features, shape.ways)).to(tasks.device)
        self.maml = l2l.algorithms.MAML(self.model, lr=inner_lr, first_order=first_order)
        self.optimizer = torch.optim.Adam(self.maml.parameters(), lr)
        self.tasks, self.steps, self.meta_batch = tasks, steps, shape.meta_batch

    def step(self) -> None:
        self.optimizer.zero_grad()
        for _ in range(self.meta_batch):
            learner = self.maml.clone()
            xs, ys, xq, yq = self.tasks.split(*self.tasks.sample())
            for _ in range(self.steps):
                learner.adapt(F.cross_entropy(learner(xs), ys))
            F.cross_entropy(learner(xq), yq).backward()
        for p in self.maml.parameters():
            p.grad.data.mul_(1.0 / self.meta_batch)
        self.optimizer.step()


class ANILStep:
    """``examples/vision/anil_fc100.py``'s meta-step: per task the body's features once, ``MAML(head).clone()``
    adapted on the support features, the query loss backpropagated into head and body."""

    def __init__(self, l2l, tasks: Tasks, shape: Shape, inner_lr: float, steps: int, first_order: bool, lr: float) -> None:
        body, features = conv4(l2l, shape)
        self.body = body.to(tasks.device)
        self.head = l2l.algorithms.MAML(nn.Linear(features, shape.ways).to(tasks.device), lr=inner_lr, first_order=first_order)
        self.params = [*self.body.parameters(), *self.head.parameters()]
        self.optimizer = torch.optim.Adam(self.params, lr)
        self.tasks, self.steps, self.meta_batch = tasks, steps, shape.meta_batch

    def step(self) -> None:
        self.optimizer.zero_grad()
        for _ in range(self.meta_batch):
            learner = self.head.clone()
            data, labels = self.tasks.sample()
            zs, ys, zq, yq = self.tasks.split(self.body(data), labels)
            for _ in range(self.steps):
                learner.adapt(F.cross_entropy(learner(zs), ys))
            F.cross_entropy(learner(zq), yq).backward()
        for p in self.params:
            p.grad.data.mul_(1.0 / self.meta_batch)
        self.optimizer.step()


def pairwise_distances_logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``examples/vision/protonet_miniimagenet.py``'s logits: negative squared euclidean distances."""
    n, m = a.shape[0], b.shape[0]
    return -((a.unsqueeze(1).expand(n, m, -1) - b.unsqueeze(0).expand(n, m, -1)) ** 2).sum(dim=2)


class ProtoNetStep:
    """``examples/vision/protonet_miniimagenet.py``'s episode: sort by label, embed support and query, class
    means of the support as prototypes, cross entropy of the distances' logits; here the losses of a
    meta-batch of episodes are averaged into one Adam step, as metarun's step does."""

    def __init__(self, l2l, tasks: Tasks, shape: Shape, lr: float) -> None:
        self.model = conv4(l2l, shape)[0].to(tasks.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr)
        self.tasks, self.meta_batch = tasks, shape.meta_batch

    def step(self) -> None:
        self.optimizer.zero_grad()
        ways, shots = self.tasks.ways, self.tasks.shots
        for _ in range(self.meta_batch):
            data, labels = self.tasks.sample()
            order = torch.sort(labels)
            data, labels = data[order.indices], labels[order.indices]
            embeddings = self.model(data)
            support = embeddings[self.tasks.support].reshape(ways, shots, -1).mean(dim=1)
            query = embeddings[self.tasks.query]
            logits = pairwise_distances_logits(query, support)
            (F.cross_entropy(logits, labels[self.tasks.query].long()) / self.meta_batch).backward()
        self.optimizer.step()


# -- the rows --------------------------------------------------------------------------------------------
def settings_to_time(name: str, device: torch.device, precision: str):
    """metarun's default settings for ``name`` (``--precision``'s, ``auto`` unless given) and fp32 forced where
    that differs."""
    default = default_settings(name, device, precision=precision)
    fp32 = default_settings(name, device, precision="fp32")
    return [default] if fp32 == default else [default, fp32]


def quick_shape(shape: Shape, quick: bool) -> Shape:
    """As ``--quick`` shrinks the bench's own shapes: a quarter of the meta-batch where tasks have several queries."""
    return replace(shape, meta_batch=max(2, shape.meta_batch // 4)) if quick and shape.queries > 1 else shape


def tasks_for(l2l, bench, shape: Shape) -> Tasks:
    ds = bench.dataset(shape)
    return Tasks(l2l, ds.splits["train"], ds.mean, ds.std, shape.ways, shape.shots, shape.queries, bench.device)


def bench_sampler(l2l, bench, shape: Shape) -> None:
    tasks, t = tasks_for(l2l, bench, shape), shape.meta_batch

    def repeated(sample: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(SAMPLER_ROUNDS):
                sample()

        return run

    paths, described = {"learn2learn": repeated(lambda: [tasks.sample() for _ in range(t)])}, {}
    for settings in settings_to_time("sampler", bench.device, bench.precision):
        engine = bench.sampler(shape, "train", settings)
        key = f"metarun {settings.precision}"
        paths[key] = repeated(lambda engine=engine: engine.sample(t))
        described[key] = f"device={bench.device.type}, {settings.precision}" + (", fused" if engine.fused else "")
    timing = measure(paths, bench.repeats, bench.warmup, bench.device, min_seconds=bench.min_seconds)
    slow = replace(timing["learn2learn"], seconds=timing["learn2learn"].seconds / SAMPLER_ROUNDS)
    for key, note in described.items():
        fast = replace(timing[key], seconds=timing[key].seconds / SAMPLER_ROUNDS)
        bench.add_rate(
            "sampler", "episodes_per_s", shape.name, count=t, fast=fast, slow=slow,
            reference="learn2learn TaskDataset", settings=note, has_target=False,
        )  # fmt: skip


def bench_step(l2l, bench, name: str, shape: Shape, reference: str) -> None:
    runs = {s: bench.training(name, shape, s) for s in settings_to_time(name, bench.device, bench.precision)}
    first = next(iter(runs.values()))
    algorithm, lr = first.algorithm, first.cfg.trainer.lr
    tasks = tasks_for(l2l, bench, shape)
    torch.manual_seed(0)
    if name == "protonet":
        peer = ProtoNetStep(l2l, tasks, shape, lr)
    else:
        kind = ANILStep if name == "anil" else MAMLStep
        peer = kind(l2l, tasks, shape, algorithm.inner_lr, algorithm.inner_steps, algorithm.first_order, lr)
    paths = {"learn2learn": peer.step}
    for settings, run in runs.items():
        paths[f"metarun {settings.describe()}"] = lambda step=run.step: train_step(step)
    timing = measure(paths, bench.repeats, bench.warmup, bench.device, min_seconds=bench.min_seconds)
    for settings in runs:
        bench.add_rate(
            name, "tasks_per_s", shape.name, count=shape.meta_batch, fast=timing[f"metarun {settings.describe()}"],
            slow=timing["learn2learn"], reference=reference, settings=settings.describe(), has_target=False,
        )  # fmt: skip


def bench_learn2learn(l2l, bench, quick: bool) -> list[str]:
    """The peer rows, added to ``bench``; returns the notes for the report."""
    bench.console.print(f"[bold]peer: learn2learn {l2l.__version__}[/]")
    bench_sampler(l2l, bench, quick_shape(OMNIGLOT, quick))
    for name, shape, reference in ROWS:
        bench_step(l2l, bench, name, quick_shape(shape, quick), reference)
    return [
        f"rows against learn2learn {l2l.__version__} (reference 'learn2learn ...'): its own TaskDataset pipeline and "
        "its examples' MAML / ANIL / ProtoNet meta-steps, eager fp32, on the same shapes and Conv4 (CNN4Backbone(max_pool=True)), "
        "against metarun's sampler and trainer step with the settings in the row; no targets"
    ]

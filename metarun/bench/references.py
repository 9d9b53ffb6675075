"""The plain implementations ``metarun bench`` measures the package against.

Each is written the way few-shot code is commonly written, one task or one
episode at a time, so that the benchmark's ratios answer "how much faster than
the obvious code is this package": a ``torch.utils.data`` dataset served one
image per ``__getitem__`` through an episode batch sampler and a
``DataLoader``; per-task MAML in learn2learn's idiom (fast weights from
``torch.autograd.grad(create_graph=not first_order)``, the query loss
back-propagated per task and accumulated); per-task Reptile with a copied model
and its own optimiser; eager fp32 ProtoNet, matching networks, the
in-context learner and pre-training steps; relation networks as their paper's code scores every
(query, class) pair's concatenated maps; evaluation loops that score one
episode at a time (for the weight generator too, whose training is timed
against its own code one task a step). None of them shares code with the
algorithms it is compared to, so a speed-up cannot come from a shortcut both
take. They compute the same quantities as the package (the tests check the
gradients), on their own copy of the model, in fp32 and contiguous memory.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from metarun.algorithms.metalstm import preprocess  # the paper's elementwise preprocessing, not a shortcut
from metarun.data.episodes import Episode
from metarun.data.metadataset import PaddedEpisode
from metarun.data.split import Split


# -- data: the DataLoader way -------------------------------------------------------------
class ImageDataset(Dataset):
    """One normalised image and its class per ``__getitem__``, as torchvision-style datasets serve them."""

    def __init__(self, split: Split, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.images = split.images
        self.per_class = split.images.shape[1]
        c = split.images.shape[2]
        self.mean = torch.tensor(mean).view(c, 1, 1)
        self.std = torch.tensor(std).view(c, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0] * self.per_class

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        cls, i = divmod(index, self.per_class)
        return (self.images[cls, i].float() / 255.0 - self.mean) / self.std, cls


class EpisodeBatchSampler:
    """Yields the dataset indices of one episode at a time: ``ways`` random classes, ``shots + queries`` images each."""

    def __init__(self, num_classes: int, per_class: int, ways: int, shots: int, queries: int, episodes: int, seed: int) -> None:
        self.num_classes, self.per_class = num_classes, per_class
        self.ways, self.k, self.episodes = ways, shots + queries, episodes
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.episodes

    def __iter__(self):
        for _ in range(self.episodes):
            classes = torch.randperm(self.num_classes, generator=self.generator)[: self.ways]
            yield [
                int(c) * self.per_class + int(i)
                for c in classes
                for i in torch.randperm(self.per_class, generator=self.generator)[: self.k]
            ]


def collate_episode(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in items]), torch.tensor([c for _, c in items])


class DataLoaderEpisodes:
    """Meta-batches of episodes from a ``DataLoader``, split into support and query with labels ``0..ways-1``."""

    def __init__(self, split: Split, mean, std, ways: int, shots: int, queries: int, seed: int = 0, workers: int = 0) -> None:
        self.ways, self.shots, self.queries = ways, shots, queries
        sampler = EpisodeBatchSampler(split.images.shape[0], split.images.shape[1], ways, shots, queries, 10**9, seed)
        loader = DataLoader(
            ImageDataset(split, mean, std),
            batch_sampler=sampler,
            collate_fn=collate_episode,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        self.iterator = iter(loader)

    def episode(self) -> Episode:
        x, _ = next(self.iterator)
        w, s, q = self.ways, self.shots, self.queries
        x = x.view(w, s + q, *x.shape[1:])
        labels = torch.arange(w)
        return Episode(
            x[:, :s].reshape(1, w * s, *x.shape[2:]),
            labels.repeat_interleave(s)[None],
            x[:, s:].reshape(1, w * q, *x.shape[2:]),
            labels.repeat_interleave(q)[None],
            w,
        )

    def sample(self, num_tasks: int) -> list[Episode]:
        return [self.episode() for _ in range(num_tasks)]


class MetaDatasetEpisodes:
    """Meta-Dataset episodes one at a time, as its reference pipeline composes them: each episode's description
    drawn in numpy by the procedure of ``meta_dataset/data/sampling.py`` (ways, classes, queries, support-set size,
    its split over the classes), each image read by one ``__getitem__``; the meta-batch is then padded to its
    largest episode, with masks, as the package's sampler returns it."""

    def __init__(self, split: Split, mean, std, seed: int = 0) -> None:
        self.dataset = ImageDataset(split, mean, std)
        self.per_class = split.images.shape[1]
        self.counts = np.full(split.images.shape[0], self.per_class)
        self.rng = np.random.RandomState(seed)

    def episode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        rng = self.rng
        ways = rng.randint(5, min(50, len(self.counts)) + 1)
        classes = rng.choice(len(self.counts), ways, replace=False)
        images = self.counts[classes]
        queries = min(10, (images // 2).min())
        remaining = images - queries
        size = min(np.floor(rng.uniform() * np.minimum(100, remaining) + 1).sum(), 500)
        weights = images * np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=ways))
        shots = np.minimum(np.floor(weights / weights.sum() * (size - ways)).astype(int) + 1, remaining)
        xs, ys, xq, yq = [], [], [], []
        for label, (c, s, n) in enumerate(zip(classes, shots, images, strict=True)):
            order = rng.permutation(n)
            xs += [self.dataset[c * self.per_class + i][0] for i in order[:s]]
            xq += [self.dataset[c * self.per_class + i][0] for i in order[s : s + queries]]
            ys += [label] * s
            yq += [label] * queries
        return torch.stack(xs), torch.tensor(ys), torch.stack(xq), torch.tensor(yq), ways

    def sample(self, num_tasks: int) -> PaddedEpisode:
        episodes = [self.episode() for _ in range(num_tasks)]
        s, q, w = max(len(e[1]) for e in episodes), max(len(e[3]) for e in episodes), max(e[4] for e in episodes)

        def pad(x: torch.Tensor, n: int) -> torch.Tensor:
            return torch.cat([x, x.new_zeros(n - len(x), *x.shape[1:])])

        return PaddedEpisode(
            torch.stack([pad(e[0], s) for e in episodes]),
            torch.stack([pad(e[1], s) for e in episodes]),
            torch.stack([pad(e[2], q) for e in episodes]),
            torch.stack([pad(e[3], q) for e in episodes]),
            w,
            torch.stack([torch.arange(s) < len(e[1]) for e in episodes]),
            torch.stack([torch.arange(q) < len(e[3]) for e in episodes]),
            torch.stack([torch.arange(w) < e[4] for e in episodes]),
            [(e[4], len(e[1]), len(e[3])) for e in episodes],
        )


# -- models the references train ----------------------------------------------------------
class Classifier(nn.Module):
    """Backbone + linear head: the network of the MAML family, as an ordinary module."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class TorchBatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch's own batch norm (``nn.BatchNorm1d`` / ``2d``'s forward) for inputs of any of their shapes."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        pass


def plain_copy(module: nn.Module) -> nn.Module:
    """An fp32, contiguous copy (the reference never sees channels_last or reduced precision), its pooling
    torch's own ``nn.MaxPool2d`` and its batch norm torch's own, as plain code has them, not metarun's layers
    (a faster CPU pooling; batch norm over task groups, whose statistics do not follow ``.eval()``)."""
    out = copy.deepcopy(module).float()
    for p in out.parameters():
        # not .contiguous(): a one-channel conv's channels_last weight is already contiguous, and its strides would
        # still make the convolution, and every layer after it, run channels_last
        p.data = p.data.clone(memory_format=torch.contiguous_format)
    for parent in list(out.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d) and type(child) is not nn.MaxPool2d:
                torch_pool = nn.MaxPool2d(
                    child.kernel_size, child.stride, child.padding, child.dilation, ceil_mode=child.ceil_mode
                )
                setattr(parent, name, torch_pool)
            elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not type(child).__module__.startswith("torch."):
                torch_norm = TorchBatchNorm(
                    child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
                )
                torch_norm.load_state_dict(child.state_dict())
                setattr(parent, name, torch_norm.train(child.training))
    return out


def task(episode: Episode, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return episode.support_x[t].contiguous(), episode.support_y[t], episode.query_x[t].contiguous(), episode.query_y[t]


def per_task_step(reference, episode: Episode, *modules: nn.Module) -> None:
    """One meta-training step of ``reference``: each task's ``reference.loss(episode, t)`` back-propagated on its
    own, the gradients accumulated, then one step of ``reference.optimizer``; ``modules`` in training mode."""
    for m in modules:
        m.train()
    reference.optimizer.zero_grad()
    for t in range(episode.num_tasks):
        (reference.loss(episode, t) / episode.num_tasks).backward()
    reference.optimizer.step()


# -- ProtoNet -------------------------------------------------------------------------------
class ProtoNetReference:
    """Eager fp32 ProtoNet, one task at a time: each task's loss back-propagated on its own, gradients accumulated."""

    def __init__(self, algorithm, lr: float) -> None:
        self.backbone = plain_copy(algorithm.backbone)
        self.optimizer = torch.optim.Adam(self.backbone.parameters(), lr=lr)

    def logits(self, xs, ys, xq, ways: int) -> torch.Tensor:
        ns = xs.shape[0]
        z = self.backbone(torch.cat([xs, xq]))
        protos = torch.stack([z[:ns][ys == c].mean(0) for c in range(ways)])
        return -((z[ns:, None, :] - protos[None]) ** 2).sum(-1)

    def step(self, episode: Episode) -> None:
        self.backbone.train()
        self.optimizer.zero_grad()
        for t in range(episode.num_tasks):
            xs, ys, xq, yq = task(episode, t)
            loss = F.cross_entropy(self.logits(xs, ys, xq, episode.ways), yq)
            (loss / episode.num_tasks).backward()
        self.optimizer.step()

    def score(self, episode: Episode) -> float:
        """Accuracy of one episode with the model in eval mode (running statistics, ProtoNet's default)."""
        self.backbone.eval()
        with torch.no_grad():
            xs, ys, xq, yq = task(episode, 0)
            return (self.logits(xs, ys, xq, episode.ways).argmax(-1) == yq).float().mean().item()


# -- relation and matching networks ----------------------------------------------------------
class RelationReference:
    """Relation networks one episode at a time, as the paper's code (floodsung/LearningToCompare_FSL) runs them:
    support and query embedded by two calls, each class's maps summed, every (query, class) pair's maps
    concatenated and scored by the relation module, the MSE against the one-hot labels back-propagated per task."""

    def __init__(self, algorithm, lr: float) -> None:
        from metarun.algorithms.relation import map_layers  # which of the backbone's layers keep feature maps

        self.embedding = plain_copy(nn.Sequential(*map_layers(algorithm.backbone, algorithm.unpooled_blocks)[0]))
        r = plain_copy(algorithm.relation)
        self.relation = nn.Sequential(
            r.conv1, r.norm1, nn.ReLU(), nn.MaxPool2d(2), r.conv2, r.norm2, nn.ReLU(), nn.AdaptiveMaxPool2d(1),
            nn.Flatten(), r.fc1, nn.ReLU(), r.fc2, nn.Sigmoid(),
        )  # fmt: skip
        self.optimizer = torch.optim.Adam([*self.embedding.parameters(), *self.relation.parameters()], lr=lr)

    def scores(self, xs, ys, xq, ways: int) -> torch.Tensor:
        """``[queries, ways]`` relation scores."""
        zs, zq = self.embedding(xs), self.embedding(xq)
        classes = zs.new_zeros(ways, *zs.shape[1:]).index_add(0, ys, zs)
        nq = zq.shape[0]
        pairs = torch.cat([classes[None].expand(nq, -1, -1, -1, -1), zq[:, None].expand(-1, ways, -1, -1, -1)], 2)
        return self.relation(pairs.flatten(0, 1)).view(nq, ways)

    def loss(self, episode: Episode, t: int) -> torch.Tensor:
        xs, ys, xq, yq = task(episode, t)
        return F.mse_loss(self.scores(xs, ys, xq, episode.ways), F.one_hot(yq, episode.ways).float())

    def step(self, episode: Episode) -> None:
        per_task_step(self, episode, self.embedding, self.relation)

    def score(self, episode: Episode) -> float:
        """Accuracy of one episode in training mode, as the paper's code tests (batch statistics)."""
        with torch.no_grad():
            xs, ys, xq, yq = task(episode, 0)
            return (self.scores(xs, ys, xq, episode.ways).argmax(-1) == yq).float().mean().item()


class MatchingReference:
    """Matching networks one episode at a time, without full-context embeddings: each query's attention, a softmax
    over its cosine similarities to the support embeddings, mixes the one-hot support labels; the negative log of
    the true class's share is back-propagated per task."""

    def __init__(self, algorithm, lr: float) -> None:
        if algorithm.context is not None:
            raise ValueError("the matching networks reference has no full-context embeddings (algo.fce=false)")
        self.backbone, self.scale = plain_copy(algorithm.backbone), algorithm.scale
        self.optimizer = torch.optim.Adam(self.backbone.parameters(), lr=lr)

    def probabilities(self, g: torch.Tensor, ys: torch.Tensor, f: torch.Tensor, ways: int) -> torch.Tensor:
        attention = torch.softmax(self.scale * F.normalize(f, dim=1) @ F.normalize(g, dim=1).T, 1)
        return attention @ F.one_hot(ys, ways).float()

    def loss(self, episode: Episode, t: int) -> torch.Tensor:
        xs, ys, xq, yq = task(episode, t)
        return F.nll_loss(self.probabilities(self.backbone(xs), ys, self.backbone(xq), episode.ways).log(), yq)

    def step(self, episode: Episode) -> None:
        per_task_step(self, episode, self.backbone)

    def score(self, episode: Episode) -> float:
        """Accuracy of one episode with the model in eval mode (running statistics)."""
        self.backbone.eval()
        with torch.no_grad():
            xs, ys, xq, yq = task(episode, 0)
            z = self.backbone(torch.cat([xs, xq]))
            probabilities = self.probabilities(z[: len(xs)], ys, z[len(xs) :], episode.ways)
            return (probabilities.argmax(-1) == yq).float().mean().item()


# -- Meta-LSTM ---------------------------------------------------------------------------------
class MetaLSTMReference:
    """Meta-LSTM one task at a time: the learner's weights one flat vector, the cell state of an ``nn.LSTMCell`` run
    on every coordinate (its input the preprocessed gradient and loss, held constant as in the paper), each gate an
    ``nn.Linear`` of ``[h, weight, previous gate]``; batch norm on the support set's statistics, for the queries too;
    each task's query loss back-propagated on its own through the unroll."""

    def __init__(self, algorithm, lr: float) -> None:
        self.model = Classifier(plain_copy(algorithm.backbone), plain_copy(algorithm.head))
        self.lstm, self.forget, self.input = (plain_copy(m) for m in (algorithm.lstm, algorithm.forget, algorithm.input))
        self.steps = algorithm.inner_steps
        self.layers = [(n, m) for n, m in self.model.named_modules() if not list(m.children())]
        named = list(self.model.named_parameters())
        self.names, self.shapes = [n for n, _ in named], [p.shape for _, p in named]
        meta = [*self.model.parameters(), *self.lstm.parameters(), *self.forget.parameters(), *self.input.parameters()]
        self.optimizer = torch.optim.Adam(meta, lr=lr)

    def learner(self, w: dict, x: torch.Tensor, support: int) -> torch.Tensor:
        """The learner's outputs with weights ``w`` (by name), batch norm on the first ``support`` samples' statistics."""
        for name, m in self.layers:
            if isinstance(m, nn.Conv2d):
                x = F.conv2d(x, w[f"{name}.weight"], w.get(f"{name}.bias"), m.stride, m.padding)
            elif isinstance(m, nn.Linear):
                x = F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and support == len(x):
                x = F.batch_norm(x, None, None, w[f"{name}.weight"], w[f"{name}.bias"], True, 0.0, m.eps)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                shape = [1, -1] + [1] * (x.dim() - 2)
                var, mean = torch.var_mean(x[:support], [0, *range(2, x.dim())], correction=0, keepdim=True)
                x = (x - mean) * torch.rsqrt(var + m.eps) * w[f"{name}.weight"].view(shape) + w[f"{name}.bias"].view(shape)
            else:
                x = m(x)
        return x

    def unflatten(self, c: torch.Tensor) -> dict:
        parts = c.split([math.prod(s) for s in self.shapes])
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def query_logits(self, xs, ys, xq, steps: int) -> torch.Tensor:
        c = torch.cat([p.flatten() for p in self.model.parameters()])
        n = c.numel()
        h = cell = c.new_zeros(n, self.lstm.hidden_size)
        f = i = c.new_zeros(n, 1)
        for _ in range(steps):
            with torch.enable_grad():
                flat = c.detach().requires_grad_()
                loss = F.cross_entropy(self.learner(self.unflatten(flat), xs, len(xs)), ys)
                (g,) = torch.autograd.grad(loss, flat)
            x = torch.cat([preprocess(g), preprocess(loss.detach()).expand(n, 2)], 1)
            h, cell = self.lstm(x, (h, cell))
            f = torch.sigmoid(self.forget(torch.cat([h, c[:, None], f], 1)))
            i = torch.sigmoid(self.input(torch.cat([h, c[:, None], i], 1)))
            c = f[:, 0] * c - i[:, 0] * g
        return self.learner(self.unflatten(c), torch.cat([xs, xq]), len(xs))[len(xs) :]

    def loss(self, episode: Episode, t: int) -> torch.Tensor:
        xs, ys, xq, yq = task(episode, t)
        return F.cross_entropy(self.query_logits(xs, ys, xq, self.steps), yq)

    def step(self, episode: Episode) -> None:
        per_task_step(self, episode, self.model)

    @torch.no_grad()
    def score(self, episode: Episode) -> float:
        xs, ys, xq, yq = task(episode, 0)
        return (self.query_logits(xs, ys, xq, self.steps).argmax(-1) == yq).float().mean().item()


# -- evaluation of the model-based learners -----------------------------------------------------
class InContextReference:
    """The in-context learner one episode at a time: the episode's support tokens (features projected and
    concatenated with their labels' embeddings) and query tokens (with the unknown label's) through the
    Transformer, each query seeing the support set and itself; its read-out scored against the classes'
    embeddings. In training each task draws its own label embeddings and its loss is back-propagated on its own."""

    def __init__(self, algorithm, lr: float) -> None:
        self.backbone, self.project, self.labels, self.encoder, self.readout = (
            plain_copy(m) for m in (algorithm.backbone, algorithm.project, algorithm.labels, algorithm.encoder, algorithm.readout)
        )  # fmt: skip
        self.modules = (self.backbone, self.project, self.labels, self.encoder, self.readout)
        self.unknown = algorithm.max_ways
        self.optimizer = torch.optim.Adam([p for m in self.modules for p in m.parameters()], lr=lr)

    def logits(self, episode: Episode, t: int, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``[queries, ways]``; class ``c`` uses label embedding ``ids[c]`` (default: ``c``)."""
        xs, ys, xq, _ = task(episode, t)
        ids = torch.arange(episode.ways, device=xs.device) if ids is None else ids
        ns, n = len(xs), len(xs) + len(xq)
        if self.backbone.training:  # support and query with their own batch statistics, as two calls
            z = torch.cat([self.backbone(xs), self.backbone(xq)])
        else:
            z = self.backbone(torch.cat([xs, xq]))
        labels = torch.cat([ids[ys], torch.full((n - ns,), self.unknown, device=ys.device)])
        tokens = torch.cat([self.project(z), self.labels(labels)], 1)
        blocked = torch.ones(n, n, dtype=torch.bool, device=z.device)
        blocked[:, :ns] = False
        blocked.fill_diagonal_(False)
        out = self.encoder(tokens[None], mask=blocked)[0, ns:]
        return self.readout(out) @ self.labels(ids).T

    def loss(self, episode: Episode, t: int) -> torch.Tensor:
        ids = torch.randperm(self.unknown)[: episode.ways]  # each task its own label embeddings
        return F.cross_entropy(self.logits(episode, t, ids), episode.query_y[t])

    def step(self, episode: Episode) -> None:
        per_task_step(self, episode, *self.modules)

    @torch.no_grad()
    def score(self, episode: Episode) -> float:
        for m in self.modules:
            m.eval()
        return (self.logits(episode, 0).argmax(-1) == episode.query_y[0]).float().mean().item()


class WeightGenReference:
    """The weight generator's evaluation one episode at a time: each novel class's weight, its support features'
    mean plus their mean attention over the base classes' weights, in a cosine classifier of the queries."""

    def __init__(self, algorithm) -> None:
        self.backbone, self.query = plain_copy(algorithm.backbone).eval(), plain_copy(algorithm.query)
        a = algorithm
        self.keys, self.base, self.phi_avg, self.phi_att = (
            p.detach().float().clone() for p in (a.keys, a.classifier.weight, a.phi_avg, a.phi_att)
        )
        self.gamma, self.scale = a.attention_scale.item(), a.cosine_scale.item()

    def logits(self, episode: Episode, t: int) -> torch.Tensor:
        xs, ys, xq, _ = task(episode, t)
        z = self.backbone(torch.cat([xs, xq]))
        zs, zq = F.normalize(z[: len(xs)], dim=1), z[len(xs) :]
        attention = torch.softmax(self.gamma * F.normalize(self.query(zs), dim=1) @ F.normalize(self.keys, dim=1).T, 1)
        attended = attention @ F.normalize(self.base, dim=1)
        novel = torch.stack(
            [self.phi_avg * zs[ys == c].mean(0) + self.phi_att * attended[ys == c].mean(0) for c in range(episode.ways)]
        )
        return self.scale * F.normalize(zq, dim=1) @ F.normalize(novel, dim=1).T

    @torch.no_grad()
    def score(self, episode: Episode) -> float:
        return (self.logits(episode, 0).argmax(-1) == episode.query_y[0]).float().mean().item()


#: algorithms timed against their own code in training, whose evaluation has a plain per-episode reference
EVALUATION_REFERENCES = {"weightgen": WeightGenReference}


# -- the MAML family ----------------------------------------------------------------------------
def maml_adapt(
    model: Classifier,
    params: dict,
    xs: torch.Tensor,
    ys: torch.Tensor,
    *,
    steps: int,
    create_graph: bool,
    inner_lr: float,
    lrs: dict | None = None,
    head_only: bool = False,
) -> dict:
    """One task's fast weights after ``steps`` inner SGD steps on ``(xs, ys)``, learn2learn's way: a dict of tensors fed
    to ``functional_call``, gradients from ``torch.autograd.grad(create_graph=...)``. ``lrs``: Meta-SGD's rate per
    weight (by parameter name); ``head_only``: ANIL, whose features are computed once and whose head alone adapts."""
    fast = dict(params)
    if head_only:
        feats = functional_call(model.backbone, {k[9:]: v for k, v in params.items() if k.startswith("backbone.")}, (xs,))
    for _ in range(steps):
        if head_only:
            out = F.linear(feats, fast["head.weight"], fast["head.bias"])
        else:
            out = functional_call(model, fast, (xs,))
        names = ["head.weight", "head.bias"] if head_only else list(fast)
        grads = torch.autograd.grad(F.cross_entropy(out, ys), [fast[n] for n in names], create_graph=create_graph)
        for n, g in zip(names, grads, strict=True):
            fast[n] = fast[n] - (lrs[n] if lrs is not None else inner_lr) * g
    return fast


def maml_query_loss(model: Classifier, params: dict, task: tuple, *, steps: int, first_order: bool, **options) -> torch.Tensor:
    """One task's meta-loss: the query loss of the fast weights (``options``: :func:`maml_adapt`'s)."""
    xs, ys, xq, yq = task
    # first order: the inner gradients are constants, so the query gradient reaches the initial weights unchanged
    fast = maml_adapt(model, params, xs, ys, steps=steps, create_graph=not first_order, **options)
    return F.cross_entropy(functional_call(model, fast, (xq,)), yq)


class MAMLReference:
    """Per-task MAML / FOMAML / ANIL / Meta-SGD on a plain copy of ``algorithm``'s network (:func:`maml_query_loss`).

    Meta-SGD's learned rates are copied too and learned alongside. The tests check the package's
    meta-gradients against the same functions (``tests/algorithms/reference.py``).
    """

    def __init__(self, algorithm, lr: float) -> None:
        self.model = Classifier(plain_copy(algorithm.backbone), plain_copy(algorithm.head))
        self.inner_lr, self.first_order = algorithm.inner_lr, algorithm.first_order
        self.inner_steps, self.inner_steps_eval = algorithm.inner_steps, algorithm.inner_steps_eval
        self.head_only = not algorithm.adapts_backbone
        names = [n for n, _ in self.model.named_parameters()]
        self.lrs = None
        if hasattr(algorithm, "lrs"):  # Meta-SGD: one rate per weight, in the order of backbone then head
            self.lrs = {n: nn.Parameter(r.detach().float().clone()) for n, r in zip(names, algorithm.lrs, strict=True)}
        meta = list(self.model.parameters()) + list((self.lrs or {}).values())
        self.optimizer = torch.optim.Adam(meta, lr=lr)

    def options(self) -> dict:
        return {"inner_lr": self.inner_lr, "lrs": self.lrs, "head_only": self.head_only}

    def step(self, episode: Episode) -> None:
        self.model.train()
        self.optimizer.zero_grad()
        params = dict(self.model.named_parameters())
        for t in range(episode.num_tasks):
            loss = maml_query_loss(
                self.model, params, task(episode, t), steps=self.inner_steps, first_order=self.first_order, **self.options()
            )
            (loss / episode.num_tasks).backward()
        self.optimizer.step()

    def score(self, episode: Episode) -> float:
        """Accuracy of one episode after ``inner_steps_eval`` steps (batch statistics for support and query)."""
        self.model.train()
        xs, ys, xq, yq = task(episode, 0)
        params = {n: p.detach().requires_grad_() for n, p in self.model.named_parameters()}
        fast = maml_adapt(self.model, params, xs, ys, steps=self.inner_steps_eval, create_graph=False, **self.options())
        with torch.no_grad():
            return (functional_call(self.model, fast, (xq,)).argmax(-1) == yq).float().mean().item()


class ProtoMAMLReference(MAMLReference):
    """Per-task Proto-MAML (first order by default, as the paper's fo-Proto-MAML): MAML's loop whose head is made for
    each task from its support set's prototypes (``W = 2 c``, ``b = -||c||²``) and then adapted with the backbone as
    a weight of its own; the meta-gradient reaches the backbone through the prototypes too."""

    def __init__(self, algorithm, lr: float) -> None:
        backbone = plain_copy(algorithm.backbone)
        self.model = Classifier(backbone, nn.Linear(backbone.out_features, 1))  # each task's head replaces its weights
        self.inner_lr, self.first_order = algorithm.inner_lr, algorithm.first_order
        self.inner_steps, self.inner_steps_eval = algorithm.inner_steps, algorithm.inner_steps_eval
        self.head_only, self.lrs = False, None
        self.optimizer = torch.optim.Adam(backbone.parameters(), lr=lr)

    def adapted(self, params: dict, xs, ys, ways: int, *, steps: int, create_graph: bool) -> dict:
        z = functional_call(self.model.backbone, {k[9:]: v for k, v in params.items()}, (xs,))
        protos = torch.stack([z[ys == c].mean(0) for c in range(ways)])
        # views: the inner gradient of the backbone holds the head fixed, not following the path through it
        start = {**{k: v.view_as(v) for k, v in params.items()}, "head.weight": 2 * protos, "head.bias": -protos.square().sum(1)}
        return maml_adapt(self.model, start, xs, ys, steps=steps, create_graph=create_graph, **self.options())

    def loss(self, episode: Episode, t: int) -> torch.Tensor:
        xs, ys, xq, yq = task(episode, t)
        params = dict(self.model.backbone.named_parameters(prefix="backbone"))
        fast = self.adapted(params, xs, ys, episode.ways, steps=self.inner_steps, create_graph=not self.first_order)
        return F.cross_entropy(functional_call(self.model, fast, (xq,)), yq)

    def step(self, episode: Episode) -> None:
        per_task_step(self, episode, self.model)

    def score(self, episode: Episode) -> float:
        """Accuracy of one episode after ``inner_steps_eval`` steps (batch statistics for support and query)."""
        self.model.train()
        xs, ys, xq, yq = task(episode, 0)
        params = {n: p.detach().requires_grad_() for n, p in self.model.backbone.named_parameters(prefix="backbone")}
        fast = self.adapted(params, xs, ys, episode.ways, steps=self.inner_steps_eval, create_graph=False)
        with torch.no_grad():
            return (functional_call(self.model, fast, (xq,)).argmax(-1) == yq).float().mean().item()


class ReptileReference:
    """Per-task Reptile: a copy of the model per task, trained by its own Adam (β₁ = 0) or SGD."""

    def __init__(self, algorithm, lr: float) -> None:
        self.model = Classifier(plain_copy(algorithm.backbone), plain_copy(algorithm.head))
        self.algorithm = algorithm
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)

    def inner_optimizer(self, params) -> torch.optim.Optimizer:
        a = self.algorithm
        if a.inner_optimizer == "adam":
            return torch.optim.Adam(params, lr=a.inner_lr, betas=(0.0, 0.999))
        return torch.optim.SGD(params, lr=a.inner_lr)

    def adapt(self, x, y, steps: int, batch: int | None) -> nn.Module:
        learner = copy.deepcopy(self.model)
        opt = self.inner_optimizer(learner.parameters())
        order = torch.randperm(x.shape[0]).repeat(steps)
        b = x.shape[0] if batch is None else min(batch, x.shape[0])
        for s in range(steps):
            idx = order[s * b : (s + 1) * b]
            opt.zero_grad()
            F.cross_entropy(learner(x[idx]), y[idx]).backward()
            opt.step()
        return learner

    def step(self, episode: Episode) -> None:
        self.model.train()
        self.optimizer.zero_grad()
        for t in range(episode.num_tasks):
            xs, ys, xq, yq = task(episode, t)
            learner = self.adapt(torch.cat([xs, xq]), torch.cat([ys, yq]), self.algorithm.inner_steps, self.algorithm.inner_batch)
            for p, q in zip(self.model.parameters(), learner.parameters(), strict=True):
                delta = (p.detach() - q.detach()) / episode.num_tasks
                p.grad = delta if p.grad is None else p.grad + delta
        self.optimizer.step()

    def score(self, episode: Episode) -> float:
        self.model.train()
        xs, ys, xq, yq = task(episode, 0)
        learner = self.adapt(xs, ys, self.algorithm.inner_steps_eval, None)
        with torch.no_grad():
            return (learner(xq).argmax(-1) == yq).float().mean().item()


# -- the transfer baseline ------------------------------------------------------------------------
class FinetuneReference:
    """Eager fp32 pre-training steps; at test time a new linear head fitted per episode with Adam."""

    def __init__(self, algorithm, lr: float) -> None:
        self.backbone, self.classifier = plain_copy(algorithm.backbone), plain_copy(algorithm.classifier)
        self.steps, self.lr = algorithm.finetune_steps, algorithm.finetune_lr
        self.optimizer = torch.optim.Adam([*self.backbone.parameters(), *self.classifier.parameters()], lr=lr)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.backbone.train()
        self.optimizer.zero_grad()
        F.cross_entropy(self.classifier(self.backbone(x.contiguous())), y).backward()
        self.optimizer.step()

    def score(self, episode: Episode) -> float:
        self.backbone.eval()
        xs, ys, xq, yq = task(episode, 0)
        with torch.no_grad():
            zs, zq = self.backbone(xs), self.backbone(xq)
        head = nn.Linear(zs.shape[1], episode.ways, device=zs.device)
        opt = torch.optim.Adam(head.parameters(), lr=self.lr)
        for _ in range(self.steps):
            opt.zero_grad()
            F.cross_entropy(head(zs), ys).backward()
            opt.step()
        with torch.no_grad():
            return (head(zq).argmax(-1) == yq).float().mean().item()

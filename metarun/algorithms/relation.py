"""Relation networks (Sung et al. 2018).

The embedding module is the backbone's body up to its feature maps, not
flattened. Each class's support maps are summed over its shots, concatenated
channel-wise (class first, as in the paper's code) with each query's map, and
the relation module scores every (query, class) pair in [0, 1]:
2 x [conv 3x3, batch norm, ReLU, max-pool] + FC ``hidden`` + ReLU + FC 1 +
sigmoid. The loss is the mean squared error against the one-hot labels; a
query is assigned the class with the highest score.

Where this departs from the paper and its code (floodsung/LearningToCompare_FSL):

* The embedding is the configured backbone's own blocks, with the max-pool of
  the last ``unpooled_blocks`` of them skipped (the paper's embedding pools
  after its first two blocks only). Conv4 pads every convolution by 1, where
  the paper's first two pad by 0: Omniglot's 28x28 images give 64x7x7 maps
  here and 64x5x5 there (miniImageNet's 84x84 give 21x21 and 19x19).
* The relation module's second max-pool takes the maximum over the whole
  remaining map, so its FC layer has ``channels`` inputs whatever the image
  size (the algorithm is built without it). On Omniglot the paper's second
  pool also ends at 1x1; on miniImageNet its FC takes the flattened 3x3 maps.
* Gradient clipping (0.5 per network in the paper's code) is the trainer's
  ``trainer.grad_clip``, over all parameters at once.

The first convolution of the relation module is linear in its input, so it
runs on the class maps and on the query maps separately (``ways + queries``
maps, not ``ways x queries`` pairs) and the two halves are added for each
pair, exactly what the convolution of the concatenation gives. Everything is
batched over tasks; batch norm sees each task on its own (``tasks`` groups).
On a CPU the tasks go one a call (a training step task by task,
:func:`~metarun.algorithms.base.loss_task_by_task`): a meta-batch's pairs
outgrow the caches, and one call of 32 Omniglot tasks ran at a quarter to
half the speed of 32 calls (``docs/performance.md``).
With ``eval.bn_mode=support`` the relation module is normalised by the
statistics of the pairs of each support image with every class, placed in
front of the query pairs. The default is ``transductive``: the paper's code
never switches its networks to evaluation mode, so its test-time batch norm
uses the batch statistics.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.base import Algorithm, accuracy, loss_task_by_task
from metarun.data.episodes import Episode
from metarun.errors import ConfigError
from metarun.models.norm import BN_MODES, EpisodeBatchNorm, check_bn_mode, norm_statistics
from metarun.schema import at_least

#: layers that turn feature maps into vectors: the embedding stops in front of the first of them
FLATTENING = (nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Linear)


def map_layers(backbone: nn.Module, unpooled: int) -> tuple[list[nn.Module], int]:
    """The backbone's layers that keep images as feature maps (in ``backbone.features``, up to the first
    flattening layer), the last ``unpooled`` of them without their closing max-pool; and the maps' channels."""
    name = type(backbone).__name__
    features = getattr(backbone, "features", None)
    layers = (
        list(itertools.takewhile(lambda m: not isinstance(m, FLATTENING), features))
        if isinstance(features, nn.Sequential)
        else []
    )
    convs = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"algo=relation compares feature maps, and the {name} backbone has none: use backbone=conv4")
    if unpooled > len(layers):
        raise ConfigError(f"algo.unpooled_blocks={unpooled}: the {name} backbone has only {len(layers)} blocks")
    kept = len(layers) - unpooled
    for block in layers[kept:]:
        if not (isinstance(block, nn.Sequential) and isinstance(block[-1], nn.MaxPool2d)):
            raise ConfigError(
                f"algo.unpooled_blocks={unpooled}: the {name} backbone's blocks do not end in a max-pool; "
                "use algo.unpooled_blocks=0 or backbone=conv4"
            )
    return layers[:kept] + [block[:-1] for block in layers[kept:]], convs[-1].out_channels


class RelationModule(nn.Module):
    """Scores ``[tasks, items, ways]`` for every pair of an item map and a class map of the same task."""

    def __init__(self, in_channels: int, channels: int, hidden: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(2 * in_channels, channels, 3, padding=1)
        self.norm1 = EpisodeBatchNorm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = EpisodeBatchNorm(channels)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        for m in self.modules():  # the paper code's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.ones_(m.bias)

    def forward(self, class_maps: torch.Tensor, item_maps: torch.Tensor) -> torch.Tensor:
        """``[tasks, ways, C, h, w]`` and ``[tasks, items, C, h, w]`` -> ``[tasks, items, ways]``."""
        t, ways, c, h, w = class_maps.shape
        items = item_maps.shape[1]
        if min(h, w) < 2:
            raise ConfigError(
                f"algo=relation: the backbone's feature maps are {h}x{w}, too small for the relation module's "
                "pooling: raise algo.unpooled_blocks"
            )
        weight_class, weight_item = self.conv1.weight.split(c, dim=1)
        a = F.conv2d(class_maps.flatten(0, 1), weight_class, None, padding=1)
        b = F.conv2d(item_maps.flatten(0, 1), weight_item, self.conv1.bias, padding=1)
        z = a.view(t, 1, ways, *a.shape[1:]) + b.view(t, items, 1, *b.shape[1:])  # conv1 of every concatenated pair
        z = F.max_pool2d(F.relu(self.norm1(z.flatten(0, 2))), 2)
        z = F.relu(self.norm2(self.conv2(z))).amax((2, 3))  # the second max-pool over the whole map
        return torch.sigmoid(self.fc2(F.relu(self.fc1(z)))).view(t, items, ways)


@dataclass
class RelationConfig:
    _target_: str = "metarun.algorithms.relation.RelationNet"
    #: the backbone's last blocks that run without their max-pool (the paper's embedding: the last 2 of 4)
    unpooled_blocks: int = at_least(0, 2)
    #: channels of the relation module's two conv blocks
    channels: int = at_least(1, 64)
    #: units of the relation module's hidden FC layer
    hidden: int = at_least(1, 8)


class RelationNet(Algorithm):
    Config = RelationConfig
    channels_last_pays = True  # its convolutions are shared by all tasks of a call
    default_bn_mode = "transductive"  # as the paper's code, which never leaves training mode

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        unpooled_blocks: int = 2,
        channels: int = 64,
        hidden: int = 8,
        task_kind: str = "classification",
    ) -> None:
        super().__init__(backbone, ways)
        if task_kind != "classification":
            raise ConfigError("algo=relation scores each query against each class: it needs a classification dataset")
        if unpooled_blocks < 0 or channels < 1 or hidden < 1:
            raise ConfigError(
                f"algo.unpooled_blocks={unpooled_blocks}, algo.channels={channels}, algo.hidden={hidden}: need >= 0, >= 1, >= 1"
            )
        self.unpooled_blocks = unpooled_blocks
        _, map_channels = map_layers(backbone, unpooled_blocks)  # checked now; the layers are looked up at each call
        self.relation = RelationModule(map_channels, channels, hidden)

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C_in, H, W]`` images -> ``[N, C, h, w]`` feature maps."""
        for layer in map_layers(self.backbone, self.unpooled_blocks)[0]:
            x = layer(x)
        return x

    def embed(self, support_x: torch.Tensor, query_x: torch.Tensor, bn_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature maps ``[tasks, n, C, h, w]`` of support and query, each task with its own statistics
        (``transductive``, and in training: support and query each with their own, as the paper's two calls)."""
        t, ns, nq = support_x.shape[0], support_x.shape[1], query_x.shape[1]
        if bn_mode == "transductive":
            with norm_statistics(self.backbone, "batch", tasks=t):
                return self.maps(support_x.flatten(0, 1)).unflatten(0, (t, ns)), self.maps(query_x.flatten(0, 1)).unflatten(
                    0, (t, nq)
                )
        with norm_statistics(self.backbone, BN_MODES[bn_mode], support_size=ns, tasks=t):
            z = self.maps(torch.cat([support_x, query_x], 1).flatten(0, 1)).unflatten(0, (t, ns + nq))
        return z[:, :ns], z[:, ns:]

    def scores(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        """Relation scores ``[tasks, queries, ways]`` in [0, 1]."""
        s, q = self.embed(episode.support_x, episode.query_x, bn_mode)
        onehot = F.one_hot(episode.support_y, episode.ways).to(s.dtype)  # [t, n, ways]
        classes = torch.einsum("tnw,tnchx->twchx", onehot, s)  # each class's maps summed over its shots
        t, ns = s.shape[:2]
        if bn_mode != "support":
            with norm_statistics(self.relation, "batch" if bn_mode == "transductive" else "running", tasks=t):
                return self.relation(classes, q)
        # the support images' pairs in front of the queries': the relation module's statistics are theirs
        with norm_statistics(self.relation, "support", support_size=ns * episode.ways, tasks=t):
            return self.relation(classes, torch.cat([s, q], 1))[:, ns:]

    def training_loss(self, batch: Episode):
        return loss_task_by_task(self, batch, self.tasks_loss)

    def tasks_loss(self, batch: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.scores(batch, "transductive")
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # the loss in at least fp32
        loss = F.mse_loss(scores, F.one_hot(batch.query_y, batch.ways).to(scores.dtype))
        return loss, accuracy(scores, batch.query_y).mean()

    @torch.inference_mode()
    def predict_logits(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        """The log of the relation scores, so that a softmax gives each class its share of the scores.

        On a CPU the tasks go one a call: the relation module's pairs of a meta-batch outgrow the caches
        (``[tasks x items x ways, channels, h, w]``), and each task's statistics are its own either way."""
        bn_mode = check_bn_mode(bn_mode)
        if episode.support_x.device.type == "cpu":
            scores = torch.cat([self.scores(episode.select(slice(i, i + 1)), bn_mode) for i in range(episode.num_tasks)])
        else:
            scores = self.scores(episode, bn_mode)
        return scores.to(torch.promote_types(scores.dtype, torch.float32)).clamp_min(1e-12).log()

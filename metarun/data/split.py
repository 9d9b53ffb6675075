"""The in-memory form every dataset is reduced to.

A split is one uint8 tensor ``[classes, images_per_class, C, H, W]`` so that an
episode is a single gather on whatever device holds it: no DataLoader, no
per-image Python. Datasets whose classes hold different numbers of images pad
to the largest class and record the true ``counts``; the sampler never draws a
padded slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Split:
    images: torch.Tensor  # uint8 [classes, max_per_class, C, H, W]
    class_names: list[str]
    counts: torch.Tensor | None = None  # int64 [classes]; None: every class is full

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 5:
            raise ValueError(
                f"a split is a uint8 [classes, n, C, H, W] tensor, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if len(self.class_names) != self.images.shape[0]:
            raise ValueError(f"{len(self.class_names)} class names for {self.images.shape[0]} classes")

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def min_images_per_class(self) -> int:
        if self.counts is None:
            return self.images.shape[1]
        return int(self.counts.min())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[2:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> Split:
        counts = None if self.counts is None else self.counts.to(device)
        return Split(self.images.to(device), self.class_names, counts)

    def state(self) -> dict:
        """A plain dict for the cache (torch.save of dataclasses is brittle across versions)."""
        return {"images": self.images, "class_names": self.class_names, "counts": self.counts}

    @classmethod
    def from_state(cls, state: dict) -> Split:
        return cls(state["images"], list(state["class_names"]), state["counts"])


@dataclass
class FewShotDataset:
    """Train / val / test splits with disjoint classes, plus the normalisation to apply."""

    name: str
    splits: dict[str, Split]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    meta: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.splits["train"].image_shape

    def state(self) -> dict:
        return {
            "name": self.name,
            "splits": {k: v.state() for k, v in self.splits.items()},
            "mean": list(self.mean),
            "std": list(self.std),
            "meta": self.meta,
        }

    @classmethod
    def from_state(cls, state: dict) -> FewShotDataset:
        return cls(
            state["name"],
            {k: Split.from_state(v) for k, v in state["splits"].items()},
            tuple(state["mean"]),
            tuple(state["std"]),
            dict(state.get("meta", {})),
        )


def split_by_class(
    images: torch.Tensor,
    class_names: list[str],
    fractions: tuple[float, float, float],
    seed: int,
    counts: torch.Tensor | None = None,
) -> dict[str, Split]:
    """A seeded split of classes into train / val / test (disjoint by construction)."""
    n = images.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    out = {}
    for name, idx in parts.items():
        idx = sorted(idx)
        sub_counts = None if counts is None else counts[idx]
        out[name] = Split(images[idx], [class_names[i] for i in idx], sub_counts)
    return out


def stack_classes(per_class: list[torch.Tensor], class_names: list[str]) -> Split:
    """Pads a list of ``[n_c, C, H, W]`` uint8 tensors into one split."""
    sizes = [t.shape[0] for t in per_class]
    full = max(sizes)
    out = torch.zeros((len(per_class), full, *per_class[0].shape[1:]), dtype=torch.uint8)
    for i, t in enumerate(per_class):
        out[i, : t.shape[0]] = t
    counts = None if min(sizes) == full else torch.tensor(sizes, dtype=torch.int64)
    return Split(out, class_names, counts)

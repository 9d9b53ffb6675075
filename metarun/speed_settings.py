"""What ``auto`` means for ``trainer.precision``, ``trainer.channels_last`` and ``trainer.fused_sampling``.

A user who never reads the performance section gets the fastest correct run: bf16 autocast where the
device computes bf16 natively, channels_last where an algorithm's convolutions are shared by all tasks,
fused sampling where it pays for its compile time. An explicit value always wins. ``metarun train``
resolves these once, prints them, and saves the resolved values in the run's config (so a resumed or
re-evaluated run keeps them); ``metarun bench`` measures its default rows with the same rule.
Measurements behind each choice: docs/performance.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AUTO = "auto"
#: a run of fewer steps than this samples eagerly: compiling the fused sampler costs about 3 s at start
FUSED_MIN_STEPS = 1000


@dataclass(frozen=True)
class SpeedSettings:
    """The trainer settings of a fast path, resolved (no ``auto`` left)."""

    precision: str = "fp32"
    channels_last: bool = False
    fused_sampling: bool = False
    compile: bool = False

    def describe(self) -> str:
        flags = ("channels_last", "compile", "fused_sampling")
        return "+".join([self.precision] + [flag for flag in flags if getattr(self, flag)])


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA GPUs that support it; CPUs with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(
            getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        )
    return False


def resolve_speed_settings(
    *,
    precision: str | bool = AUTO,
    channels_last: str | bool = AUTO,
    fused_sampling: str | bool = AUTO,
    compile: bool = False,
    device: torch.device,
    channels_last_pays: bool,
    steps: int,
    data_on_cpu: bool = True,
    augment: bool = False,
) -> SpeedSettings:
    """Each ``auto`` replaced by the measured choice; explicit values kept.

    ``channels_last_pays``: the algorithm's convolutions are shared by all tasks of a call
    (:attr:`metarun.algorithms.base.Algorithm.channels_last_pays`); per-task grouped ones ran slower in NHWC on a CPU.
    """
    if precision == AUTO:
        precision = "bf16" if native_bf16(device) else "fp32"
    if channels_last == AUTO:
        channels_last = device.type == "cuda" or channels_last_pays
    if fused_sampling == AUTO:
        fused_sampling = device.type == "cpu" and data_on_cpu and not augment and steps >= FUSED_MIN_STEPS
    return SpeedSettings(str(precision), bool(channels_last), bool(fused_sampling), bool(compile))

"""Choosing the device and numeric precision of a run."""

from __future__ import annotations

import contextlib

import torch

from metarun.errors import ConfigError


def resolve_device(kind: str) -> torch.device:
    """``auto`` falls back quietly; naming a device the machine lacks is an error."""
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible on this machine: use device=cpu or device=auto")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError("device=mps but Apple's MPS backend is not available here: use device=cpu or device=auto")
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={kind}: valid devices are auto, cpu, cuda, mps")
    return torch.device(kind)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def input_dtype(precision: str) -> torch.dtype:
    """The dtype autocast casts a model's input to under ``precision`` (float32 for ``fp32``)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision}: valid values are {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(device: torch.device, precision: str):
    """Autocast for ``bf16``/``fp16`` on any device type that supports it; a no-op for ``fp32``."""
    dtype = input_dtype(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype operations on ``t`` compute in: autocast's where it is on for ``t``'s device, else ``t``'s own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def compile_step(algorithm):
    """``torch.compile`` of an algorithm's meta-step, for the fixed shapes of one run.

    Second-order meta-gradients through the backbone (MAML, Meta-SGD) compiled without an error but
    came out wrong (torch 2.13: losses off from the second step, gradients from the first), so such
    algorithms refuse (``Algorithm.compiles``). ``dynamic=False``: once a second call made dynamo
    recompile with symbolic shapes, inductor failed on the grouped convolutions ("cannot determine
    truth value of Relational").
    """
    if not algorithm.compiles:
        raise refuse_compile()
    return torch.compile(algorithm.training_loss, dynamic=False)


def refuse_compile() -> ConfigError:
    return ConfigError(
        "trainer.compile=true: torch.compile gets second-order meta-gradients wrong; "
        "use algo.first_order=true (algo=fomaml) or trainer.compile=false"
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

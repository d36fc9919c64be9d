"""Optimizer and learning-rate schedule wiring, shared by every method.

Papers in this field give the backbone and the new layers different learning rates (DeepLab:
10x on the head; SEAM/SC-CAM: 1x/2x/10x/20x for pretrained weights/biases and new
weights/biases) and decay the rate per iteration (poly). So parameters are split into named
groups (``segexp.models.param_groups``), each group gets ``lr * lr_mult[group]`` (biases and
norms no weight decay), and the schedule is a per-step multiplier over the
trainer's total number of optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from segexp.models.param_groups import optimizer_groups

SCHEDULES = ("poly", "cosine", "step", "constant")


def lr_factor(
    step: int,
    total_steps: int,
    name: str = "poly",
    power: float = 0.9,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.1,
    min_lr_ratio: float = 0.0,
    milestones: Sequence[float] = (0.6, 0.9),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based) of ``total_steps``.

    Warm-up is linear from ``warmup_start_factor`` to 1 over ``warmup_steps``; the decay then runs
    over the remaining steps. ``milestones`` of the step schedule are fractions of total steps.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; choose one of {SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, max(0.0, (step - warmup_steps) / span))
    if name == "poly":
        decay = (1.0 - t) ** power
    elif name == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * t))
    elif name == "step":
        decay = gamma ** sum(t >= m for m in milestones)
    else:
        decay = 1.0
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_optimizer(
    factory: Callable[..., torch.optim.Optimizer],
    groups: Mapping[str, Iterable[nn.Parameter]],
    lr_mult: Mapping[str, float],
) -> torch.optim.Optimizer:
    """``factory`` is the Hydra partial of ``schedule.optimizer`` (it carries lr and weight_decay)."""
    kwargs = dict(getattr(factory, "keywords", {}))
    if kwargs.get("lr") is None:
        raise ValueError("schedule.optimizer must set lr")
    trainable = {name: [p for p in params if p.requires_grad] for name, params in groups.items()}
    return factory(optimizer_groups(trainable, kwargs["lr"], kwargs.get("weight_decay", 0.0), lr_mult))

"""Learning-rate schedules and parameter-group multipliers on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from segexp.methods.optim import build_optimizer, lr_factor


def test_poly_decay_matches_formula():
    # (1 - t/T)^0.9 at t = T/2
    assert lr_factor(50, 100, "poly", power=0.9) == pytest.approx(0.5**0.9)
    assert lr_factor(0, 100, "poly") == pytest.approx(1.0)
    assert lr_factor(100, 100, "poly") == pytest.approx(0.0)


def test_linear_warmup_then_decay_over_remaining_steps():
    assert lr_factor(0, 110, "poly", warmup_steps=10, warmup_start_factor=0.1) == pytest.approx(0.1)
    assert lr_factor(5, 110, "poly", warmup_steps=10, warmup_start_factor=0.1) == pytest.approx(0.55)
    # decay starts at 1 right after warm-up and spans the remaining 100 steps
    assert lr_factor(10, 110, "poly", warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(60, 110, "poly", power=1.0, warmup_steps=10) == pytest.approx(0.5)


def test_cosine_and_step_and_floor():
    assert lr_factor(50, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(25, 100, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(59, 100, "step", milestones=(0.6, 0.9), gamma=0.1) == pytest.approx(1.0)
    assert lr_factor(60, 100, "step", milestones=(0.6, 0.9), gamma=0.1) == pytest.approx(0.1)
    assert lr_factor(95, 100, "step", milestones=(0.6, 0.9), gamma=0.1) == pytest.approx(0.01)
    assert lr_factor(100, 100, "poly", min_lr_ratio=0.05) == pytest.approx(0.05)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        lr_factor(0, 10, "linear")


def test_optimizer_groups_get_their_multipliers():
    backbone, head = nn.Linear(3, 3), nn.Linear(3, 2)
    groups = {
        "backbone": [backbone.weight],
        "backbone_no_decay": [backbone.bias],
        "new": [head.weight],
        "new_no_decay": [head.bias],
    }
    import functools

    factory = functools.partial(torch.optim.SGD, lr=0.01, weight_decay=1e-4)
    opt = build_optimizer(
        factory, groups, {"backbone": 1, "backbone_no_decay": 2, "new": 10, "new_no_decay": 20}
    )
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["backbone"]["lr"] == pytest.approx(0.01)
    assert by_name["backbone_no_decay"]["lr"] == pytest.approx(0.02)
    assert by_name["new"]["lr"] == pytest.approx(0.1)
    assert by_name["new_no_decay"]["lr"] == pytest.approx(0.2)
    assert by_name["new"]["weight_decay"] == pytest.approx(1e-4)
    assert by_name["new_no_decay"]["weight_decay"] == 0.0


def test_frozen_parameters_are_left_out():
    import functools

    layer = nn.Linear(2, 2)
    layer.bias.requires_grad_(False)
    opt = build_optimizer(
        functools.partial(torch.optim.SGD, lr=0.1),
        {"new": [layer.weight], "new_no_decay": [layer.bias]},
        {"new": 1, "new_no_decay": 1},
    )
    assert [g["name"] for g in opt.param_groups] == ["new"]

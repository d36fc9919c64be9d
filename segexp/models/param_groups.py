"""Optimizer parameter groups: pretrained vs new layers, decayed vs not.

Segmentation schedules treat these four sets differently: DeepLab trains new layers at the base lr
with weight decay on conv/linear weights only; SEAM/PSA give the backbone biases 2x lr, new-layer
weights 10x and their biases 20x. Splitting once here keeps each method's ``configure_optimizers``
down to a dict of multipliers.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

__all__ = ["GROUP_NAMES", "optimizer_groups", "param_groups"]

GROUP_NAMES = ("backbone", "backbone_no_decay", "new", "new_no_decay")


def _no_weight_decay_names(module: nn.Module) -> set[str]:
    # timm models list parameters that must not decay (pos_embed, cls_token, ...) relative to
    # themselves; collect them as full names wherever they sit in the tree.
    names = set()
    for prefix, m in module.named_modules():
        fn = getattr(m, "no_weight_decay", None)
        if callable(fn):
            names.update(f"{prefix}.{n}" if prefix else n for n in fn())
    return names


def param_groups(
    module: nn.Module,
    backbone_attr: str | None = "backbone",
    no_weight_decay: tuple[str, ...] = (),
) -> dict[str, list[nn.Parameter]]:
    """Split the trainable parameters of ``module`` into :data:`GROUP_NAMES`.

    ``backbone*`` holds parameters under the (dotted) submodule ``backbone_attr`` - the pretrained
    part; ``new*`` everything else. ``*_no_decay`` takes biases, norm weights and any other tensor
    with ndim <= 1 (timm's rule), plus names a timm model lists in ``no_weight_decay()`` and the full
    names in ``no_weight_decay``. Frozen parameters are left out; shared ones appear once.
    """
    backbone_ids: set[int] = set()
    if backbone_attr:
        try:
            backbone = module.get_submodule(backbone_attr)
        except AttributeError as e:
            raise AttributeError(
                f"{type(module).__name__} has no submodule {backbone_attr!r}; pass backbone_attr=None "
                "to treat every parameter as new"
            ) from e
        backbone_ids = {id(p) for p in backbone.parameters()}
    skip = _no_weight_decay_names(module) | set(no_weight_decay)

    groups: dict[str, list[nn.Parameter]] = {k: [] for k in GROUP_NAMES}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        key = "backbone" if id(p) in backbone_ids else "new"
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            key += "_no_decay"
        groups[key].append(p)
    return groups


def optimizer_groups(
    groups: Mapping[str, list[nn.Parameter]],
    lr: float,
    weight_decay: float,
    lr_mult: Mapping[str, float] | None = None,
) -> list[dict]:
    """Turn :func:`param_groups` output into torch optimizer groups.

    Each group gets ``lr * lr_mult[name]`` (default 1) and ``weight_decay`` unless its name ends in
    ``_no_decay``; empty groups are dropped. The ``name`` key lets Lightning's LearningRateMonitor
    label the curves. SEAM/PSA: ``lr_mult={"backbone_no_decay": 2, "new": 10, "new_no_decay": 20}``.
    """
    lr_mult = dict(lr_mult or {})
    unknown = set(lr_mult) - set(groups)
    if unknown:
        raise KeyError(f"lr_mult names unknown groups {sorted(unknown)}; groups are {sorted(groups)}")
    return [
        {
            "name": name,
            "params": params,
            "lr": lr * lr_mult.get(name, 1.0),
            "weight_decay": 0.0 if name.endswith("_no_decay") else weight_decay,
        }
        for name, params in groups.items()
        if params
    ]

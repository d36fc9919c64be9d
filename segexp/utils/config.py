"""Config helpers for the entry points: print the composed config as a tree, instantiate groups."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

TREE_ORDER = ("data", "backbone", "method", "loss", "schedule", "trainer", "logger", "callbacks", "paths")


def print_config_tree(cfg: DictConfig, order: Sequence[str] = TREE_ORDER) -> None:
    """The whole composed config, one branch per group, so a run's log says exactly what ran."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key))
        value = cfg[key]
        if isinstance(value, DictConfig):
            text = OmegaConf.to_yaml(value, resolve=False)
        else:
            text = str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)


def instantiate_named(cfg: DictConfig | None, **kwargs: Any) -> list[Any]:
    """Instantiate every ``_target_`` node of a group like ``logger`` or ``callbacks`` (a dict of nodes)."""
    if not cfg:
        return []
    out = []
    for name, node in cfg.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            log.info("instantiating %s <%s>", name, node._target_)
            out.append(hydra.utils.instantiate(node, **kwargs))
    return out

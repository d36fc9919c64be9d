"""Composing the configs of a pipeline's training runs from the user's overrides.

Why its own module: every step trains with the experiment's config plus a few overrides of its own,
so every step composes ``conf/train.yaml`` the same way the command line does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "compose",
    "container",
    "method_config",
    "method_override_key",
    "without_method",
    "is_stage_setting",
    "train_reader",
]

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def compose(overrides: list[str]) -> DictConfig:
    """The train config of ``overrides`` (``+experiment=`` and friends normalised as on the CLI)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import segexp.resolvers  # noqa: F401
    from segexp.utils.cli import normalize_overrides

    outer = GlobalHydra.instance().hydra  # inside `python -m segexp.pipeline -m`: the sweep's own Hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(config_name="train", overrides=normalize_overrides(list(overrides)))
    finally:
        GlobalHydra.instance().clear()
        if outer is not None:
            GlobalHydra.instance().initialize(outer)  # the next job of a multirun needs it back


def container(node: Any) -> Any:
    """Plain resolved Python data of a config node (anything else unchanged)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def method_override_key(arg: str) -> bool:
    """Whether a command-line override sets the method (``method=...``, ``method.x=...``, ``+method.y``)."""
    key = arg.split("=", 1)[0].lstrip("+~")
    return key == "method" or key.startswith("method.")


def without_method(overrides: list[str]) -> list[str]:
    """The overrides of a pipeline minus those of its stage-1 method (another method trains next)."""
    return [a for a in overrides if not method_override_key(a)]


def method_config(name: str, overrides: list[str] = ()) -> DictConfig:
    """``conf/method/<name>.yaml`` as composed without any experiment (interpolations unresolved,
    so they resolve against the config the node is put into)."""
    return compose([f"method={name}", *overrides]).method


def is_stage_setting(arg: str) -> bool:
    """``pipeline.*=...``: a setting of the pipeline itself (its steps read it; the training runs it
    starts do not need it on their command line)."""
    return arg.split("=", 1)[0].lstrip("+~").startswith(("pipeline.", "pipeline/"))


def train_reader(cfg: DictConfig, role: str = "train") -> Any:
    """The reader of ``data.splits[role]`` with every key the dataset provides (prepared first)."""
    import hydra

    if cfg.data.get("prepare") is not None:
        hydra.utils.instantiate(cfg.data.prepare)()
    return hydra.utils.instantiate(cfg.data.reader)(split=cfg.data.splits[role], keys=None)

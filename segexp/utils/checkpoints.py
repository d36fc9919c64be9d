"""One way to rebuild a trained method: ``load_method(ckpt_path)``, for every stage, eval and notebook.

It lives in ``utils`` because it imports no method: the checkpoint names the class (``_target_``).

Why: a checkpoint written by ``segexp.train`` records the resolved config of its method (key
``hyper_parameters.method_config``, with the method and experiment that made it), so rebuilding needs no
experiment config and no hand-copied defaults. Pretrained-weight settings are switched off on
rebuild: the weights come from the checkpoint, so nothing is fetched again (and nothing fails
offline). Checkpoints older than this record need the config passed explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from segexp.utils.errors import UserError

__all__ = ["load_method", "made_by_record", "recorded_config", "method_config_of", "without_pretrained"]


def without_pretrained(node: Any) -> Any:
    """A copy of a config with every ``pretrained`` setting false (the checkpoint has the weights)."""
    if isinstance(node, Mapping):
        return {k: (False if k == "pretrained" else without_pretrained(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [without_pretrained(v) for v in node]
    return node


def made_by_record(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint records about its maker: its hyperparameters (``SegMethod.record_provenance``),
    or the ``segexp`` key of checkpoints written before they were saved as hyperparameters."""
    return dict(checkpoint.get("hyper_parameters") or checkpoint.get("segexp") or {})


def recorded_config(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    config = made_by_record(checkpoint).get("method_config")
    if config is None:
        raise UserError(
            f"{path}: the checkpoint records no method config (written before checkpoints carried "
            "one); pass the method's config, e.g. from the run's config.yaml"
        )
    return dict(config)


def method_config_of(ckpt_path: str | os.PathLike) -> dict[str, Any]:
    """The method config a checkpoint was trained with: the one it records, else (checkpoints written
    before they recorded it) the ``method`` block of ``config.yaml`` in its run directory."""
    checkpoint = torch.load(str(ckpt_path), map_location="cpu", weights_only=False)
    if made_by_record(checkpoint).get("method_config") is not None:
        return recorded_config(checkpoint, ckpt_path)
    from pathlib import Path

    from omegaconf import OmegaConf

    run_config = Path(ckpt_path).resolve().parent.parent / "config.yaml"
    if not run_config.is_file() or OmegaConf.load(run_config).get("method") is None:
        return recorded_config(checkpoint, ckpt_path)  # raises: says what to pass
    return OmegaConf.to_container(OmegaConf.load(run_config).method, resolve=True)


def load_method(
    ckpt_path: str | os.PathLike,
    method_cfg: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
):
    """The method of ``ckpt_path`` with its weights, in eval mode on ``device``.

    ``method_cfg`` (a resolved method config) replaces the recorded one, e.g. to change inference
    settings (``scales``, ``bg_threshold``); its weights must still fit the checkpoint (strict)."""
    import hydra

    checkpoint = torch.load(str(ckpt_path), map_location="cpu", weights_only=False)
    config = dict(method_cfg) if method_cfg is not None else recorded_config(checkpoint, ckpt_path)
    method = hydra.utils.instantiate(without_pretrained(config))
    method.load_state_dict(checkpoint.get("state_dict", checkpoint), strict=True)
    return method.to(device).eval()

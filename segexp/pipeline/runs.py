"""The pipeline's training runs: keyed by what they depend on, skipped when current, resumed when
interrupted.

Every training step runs in ``<pipeline dir>/<name>`` and writes ``done.json`` with the hash of what
it depends on (:func:`run_key`); a current one is skipped, a ``last.ckpt`` written under the same key
resumes. Settings that change only where or how fast a run computes never retrain a finished step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segexp.pipeline.compose import compose, container, method_config, without_method
from segexp.utils.atomic import write_json
from segexp.utils.hashing import file_key, stable_hash

log = logging.getLogger(__name__)

__all__ = [
    "PipelineContext",
    "run_key",
    "best_checkpoint",
    "cam_network_key",
    "train_run",
    "RUNTIME_SETTINGS",
]

#: settings that change where or how fast a run computes, not what it learns (``device`` only changes
#: results numerically, e.g. CPU vs CUDA kernels; moving a pipeline to another machine reuses its runs)
RUNTIME_SETTINGS = frozenset({"num_workers", "eval_batch_size", "cache_dir", "device", "progress"})


def without_runtime_settings(node: Any) -> Any:
    """``node`` without :data:`RUNTIME_SETTINGS` at any depth."""
    if isinstance(node, dict):
        return {k: without_runtime_settings(v) for k, v in node.items() if k not in RUNTIME_SETTINGS}
    if isinstance(node, (list, tuple)):
        return [without_runtime_settings(v) for v in node]
    return node


def run_key(depends: Any, length: int = 16) -> str:
    """Hash of what a run depends on: more workers, another cache folder or the device never retrain
    a finished step, while any setting that changes the result does."""
    return stable_hash(without_runtime_settings(depends), length)


def cam_network_key(cfg: DictConfig) -> dict[str, Any]:
    """What the stage-1 network depends on, including the local weights file behind
    ``backbone.pretrained`` (path, size and mtime): a retrained file at the same path retrains."""
    key = {k: container(cfg.get(k)) for k in ("method", "backbone", "data", "schedule", "seed")}
    pretrained = OmegaConf.select(cfg, "backbone.pretrained", default=None)
    if isinstance(pretrained, str) and Path(pretrained).expanduser().is_file():
        key["pretrained_file"] = file_key(Path(pretrained).expanduser())
    return key


def best_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint a training run kept (``epoch_*.ckpt``), else its ``last.ckpt``."""
    ckpts = sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    last = run_dir / "checkpoints" / "last.ckpt"
    if ckpts:
        return ckpts[-1]
    if last.is_file():
        return last
    raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}")


def _done(path: Path, key: str) -> dict[str, Any] | None:
    try:
        record = json.loads((path / "done.json").read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == key else None


def train_run(
    overrides: list[str],
    run_dir: Path,
    key: str,
    patch: dict[str, Any] | None = None,
    method: str | None = None,
    method_overrides: list[str] = (),
) -> dict[str, Any]:
    """Run, resume or skip one training run in ``run_dir``; returns ``{key, ckpt, metrics}``.

    ``patch`` sets config values that cannot be spelled as overrides (e.g. a train wrapper holding a
    stage config). ``method`` trains another method than the experiment's (AffinityNet, the stage-2
    network): its config is composed on its own, with ``method_overrides``, and replaces the
    experiment's ``method`` node, because an experiment's own ``method:`` block (weights of SEAM,
    FBR, ...) would not fit another method's arguments.
    """
    from segexp.runner import train

    record = _done(run_dir, key)
    if record is not None:
        log.info("step %s is current: skipped", run_dir.name)
        return record
    run_dir.mkdir(parents=True, exist_ok=True)
    extra = [f"paths.output_dir={run_dir}"]
    last = run_dir / "checkpoints" / "last.ckpt"
    key_file = run_dir / "key.txt"
    if last.is_file() and key_file.is_file() and key_file.read_text() == key:
        log.info("step %s: resuming from %s", run_dir.name, last)
        extra.append(f"ckpt_path={last}")
    key_file.write_text(key)
    if method is not None:
        overrides = without_method(overrides)
    cfg = compose(overrides + extra)
    if method is not None:
        cfg.method = method_config(method, list(method_overrides))
    for dotted, value in (patch or {}).items():
        OmegaConf.update(cfg, dotted, value, force_add=True)
    metrics = train(cfg)
    record = {"key": key, "ckpt": str(best_checkpoint(run_dir)), "metrics": metrics}
    write_json(run_dir / "done.json", record)
    return record


@dataclass
class PipelineContext:
    """What a step may use: the composed config, the user's overrides (minus ``pipeline.*``), the
    pipeline directory, the train-split reader and the report so far."""

    cfg: DictConfig
    overrides: list[str]
    root: Path
    reader: Any = None
    report: dict[str, Any] = field(default_factory=dict)

    def train(
        self,
        name: str,
        overrides: list[str],
        depends_on: Any,
        patch: dict[str, Any] | None = None,
        method: str | None = None,
        method_overrides: list[str] = (),
    ) -> dict[str, Any]:
        """A training run in ``<dir>/<name>`` keyed by ``depends_on`` (see :func:`train_run`)."""
        key = run_key({"on": depends_on, "method": method, "method_overrides": list(method_overrides)})
        return train_run(list(overrides), self.root / name, key, patch, method, list(method_overrides))

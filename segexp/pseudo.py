"""Make pseudo labels with a stage: ``python -m segexp.pseudo stage=grabcut data=voc_boxes [...]``.

A stage is any object built from ``conf/stage/<name>.yaml`` with

* ``name`` (its cache sub-directory),
* ``run(reader, evaluate=..., workers=...) -> dict``: fill its cache for one split (parallel,
  resumable: only missing or stale items are computed) and return a report (counts, speed and,
  with ``evaluate``, the mIoU of its masks against the GT masks of that split),
* ``cache_for(reader)`` / ``get(reader, index)``: what :class:`segexp.data.pseudo_labels.PseudoLabels`
  reads at training time.

``grabcut`` and ``box_rect`` (:class:`segexp.postprocess.grabcut.GrabCutStage`) exist now; later
stages (``cam``, ``crf``, ``rw``) add a config file with their ``_target_`` and, if they need a
trained network, a ``ckpt_path`` setting of their own: this entry point does not change.

Reports go to ``<run dir>/pseudo_report.json`` and are printed as a table.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

import segexp.utils.resolvers  # noqa: F401  (registers ${segexp.*} resolvers)
from segexp.utils.cli import normalize_overrides

log = logging.getLogger(__name__)

DEFAULT_STAGE = "grabcut"


def normalize_pseudo_overrides(argv: list[str]) -> list[str]:
    """``stage=NAME`` works with and without an experiment (see ``conf/pseudo.yaml``).

    Without an experiment the stage group is not in the defaults list, so ``stage=NAME`` becomes
    ``+stage=NAME`` and, if absent, ``+stage=grabcut`` is added. With an experiment (which selects
    its stage) ``stage=NAME`` overrides that choice as usual.
    """
    out = normalize_overrides(argv)
    keys = [a.split("=", 1)[0] for a in out if "=" in a]
    has_experiment = "experiment" in keys
    if has_experiment:
        return out
    if "stage" in keys:
        return ["+" + a if a.split("=", 1)[0] == "stage" else a for a in out]
    if "+stage" not in keys:
        out.append(f"+stage={DEFAULT_STAGE}")
    return out


def build_reader(cfg: DictConfig, role: str) -> Any:
    """The reader of ``data.splits[role]`` with every key the dataset provides (prepared first)."""
    if cfg.data.get("prepare") is not None:
        hydra.utils.instantiate(cfg.data.prepare)()
    splits = cfg.data.splits
    if role not in splits:
        raise KeyError(f"data '{cfg.data.name}' has no '{role}' split (splits: {dict(splits)})")
    reader = hydra.utils.instantiate(cfg.data.reader)
    return reader(split=splits[role], keys=None)


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"stage {report['stage']} | split {report['split']} | {report['images']} images "
        f"({report['computed']} computed, {report['reused']} reused) in {report['seconds']} s"
        + (f" = {report['images_per_s']} images/s" if report.get("images_per_s") else "")
        + f" with {report['processes']} processes",
        f"cache: {report['cache_dir']}",
    ]
    if "pseudo" in report:
        lines.append(f"{'class':<16} {'pseudo IoU':>10} {'box IoU':>10}")
        for name, iou in report["pseudo"]["iou"].items():
            box = report["box_rect"]["iou"].get(name)
            fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"
            lines.append(f"{name:<16} {fmt(iou):>10} {fmt(box):>10}")
        lines.append(
            f"{'mIoU':<16} {100 * report['pseudo']['mIoU']:>10.2f} {100 * report['box_rect']['mIoU']:>10.2f}"
            f"   ({report['scored_images']} images with GT)"
        )
    return "\n".join(lines)


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run ``cfg.stage`` over ``cfg.roles``; returns one report per split (also written as JSON)."""
    from pathlib import Path

    from segexp.utils.atomic import write_json

    if cfg.get("stage") is None:
        raise ValueError("no stage selected: pass stage=NAME (conf/stage/) or an experiment that selects one")
    stage = hydra.utils.instantiate(cfg.stage)
    reports = []
    for role in cfg.roles:
        reader = build_reader(cfg, role)
        report = stage.run(reader, evaluate=bool(cfg.evaluate), workers=cfg.get("workers"))
        report["role"] = role
        print(format_report(report), flush=True)
        reports.append(report)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "pseudo_report.json", reports)
    print(f"run directory: {out}")
    return reports


@hydra.main(version_base="1.3", config_path="../conf", config_name="pseudo")
def main(cfg: DictConfig) -> None:
    from segexp.utils.config import print_config_tree

    print_config_tree(cfg, order=("stage", "data", "paths"))
    run(cfg)


if __name__ == "__main__":
    sys.argv[1:] = normalize_pseudo_overrides(sys.argv[1:])
    main()

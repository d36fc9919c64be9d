"""Make pseudo labels with a stage: ``python -m segexp.pseudo stage=grabcut data=voc_boxes [...]``.

A stage is any object built from ``conf/stage/<name>.yaml`` with

* ``name`` (its cache sub-directory),
* ``run(reader, evaluate=..., workers=...) -> dict``: fill its cache for one split (parallel,
  resumable: only missing or stale items are computed) and return a report (counts, speed and,
  with ``evaluate``, the mIoU of its masks against the GT masks of that split),
* ``cache_for(reader)`` / ``get(reader, index)``: what :class:`segexp.data.pseudo_labels.PseudoLabels`
  reads at training time.

Stages: ``grabcut`` and ``box_rect`` (:class:`segexp.stages.grabcut.GrabCutStage`), ``cam``
(CAM export of the network ``ckpt_path=...`` with the experiment's method), ``crf`` (dense CRF of
those CAMs) and ``rw`` (AffinityNet random walk), one ``conf/stage/<name>.yaml`` each:
``python -m segexp.pseudo stage=cam +experiment=seam_shapes ckpt_path=<run>/checkpoints/last.ckpt``.

Reports go to ``<run dir>/pseudo_report.json`` and are printed as a table.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

import segexp.resolvers  # noqa: F401  (registers ${segexp.*} resolvers)
from segexp.utils.cli import check_config_choices, normalize_overrides
from segexp.utils.errors import user_errors

log = logging.getLogger(__name__)

DEFAULT_STAGE = "grabcut"


def normalize_pseudo_overrides(argv: list[str]) -> list[str]:
    """``stage=NAME`` works with and without an experiment (see ``conf/pseudo.yaml``).

    Without an experiment the stage group is not in the defaults list, so ``stage=NAME`` becomes
    ``+stage=NAME`` and, if absent, ``+stage=grabcut`` is added. With an experiment that selects a
    stage (box2seg) ``stage=NAME`` overrides that choice; with one that does not (the image-level
    experiments) it is added.
    """
    out = normalize_overrides(argv)
    keys = [a.split("=", 1)[0] for a in out if "=" in a]
    if "experiment" in keys and ("stage" not in keys or _experiment_selects_stage(out)):
        return out
    if "stage" in keys:
        return ["+" + a if a.split("=", 1)[0] == "stage" else a for a in out]
    if "+stage" not in keys:
        out.append(f"+stage={DEFAULT_STAGE}")
    return out


def _experiment_selects_stage(overrides: list[str]) -> bool:
    """Whether the experiment's defaults list has a stage (so ``stage=NAME`` overrides it)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException

    probe = [a for a in overrides if a.split("=", 1)[0] in ("experiment", "stage")]
    GlobalHydra.instance().clear()
    try:
        conf_dir = str(Path(__file__).resolve().parents[1] / "conf")
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            compose(config_name="pseudo", overrides=probe)
        return True
    except ConfigCompositionException:
        return False
    finally:
        GlobalHydra.instance().clear()


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
        # a stage may score a reference alongside (GrabCut: the filled boxes)
        ref = report.get("box_rect")
        fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
        lines.append(f"{'class':<16} {'pseudo IoU':>10}" + (f" {'box IoU':>10}" if ref else ""))
        for name, iou in report["pseudo"]["iou"].items():
            lines.append(f"{name:<16} {fmt(iou):>10}" + (f" {fmt(ref['iou'].get(name)):>10}" if ref else ""))
        lines.append(
            f"{'mIoU':<16} {fmt(report['pseudo']['mIoU']):>10}" + (f" {fmt(ref['mIoU']):>10}" if ref else "")
            + f"   ({report['scored_images']} images with GT)"
        )
    elif "best_mIoU" in report:  # CAM export: the background-threshold curve
        lines.append(
            f"CAM mIoU {100 * report['best_mIoU']:.2f} at background threshold {report['best_threshold']:.2f}"
            f" (best on this split; {report['scored_images']} images with GT)"
        )
        if report.get("fscore_at_best_threshold") is not None:
            lines.append(f"CAM F-score {100 * report['fscore_at_best_threshold']:.2f} at that threshold")
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
    with user_errors():
        run(cfg)


if __name__ == "__main__":
    with user_errors():
        check_config_choices(sys.argv[1:])
    sys.argv[1:] = normalize_pseudo_overrides(sys.argv[1:])
    main()

"""SC-CAM's iterative rounds as stage 1 of the image-level pipeline (``pipeline.cam_network``).

Round 0 trains the plain CAM network (``round0_overrides``, default ``method=cam``: psa's
``res38_cls``). Round r = 1..R extracts the features of round r-1's network
(:class:`~segexp.stages.subcategory.FeatureStage`), clusters them per parent class
(:class:`~segexp.stages.subcategory.SubCategoryStage`) and trains a fresh SC-CAM network from
the initial weights on parent + sub-category labels (the experiment's ``method=sccam``, with the
``SubCategoryLabels`` train wrapper pointed at round r-1). The network of round r is the checkpoint
after ``checkpoint_epochs[r-1]`` epochs of a poly schedule whose horizon stays ``schedule.epochs``
(released: epochs 30/40/50 of 61, so the learning rate is never annealed to 0). The CAM export of
the pipeline then reads the last round.

Every round is a :meth:`~segexp.pipeline.runs.PipelineContext.train` run in ``<dir>/round0`` and
``<dir>/round<r>_K<K>_<hash>`` keyed by everything it depends on (its config, the previous round's
key and checkpoint, the clustering settings; their hash is in the name, so runs with other settings
in the same directory never overwrite each other): finished rounds are skipped, an interrupted one
resumes, and round 0 is shared by pipelines whose round-0 network is the same (e.g. a K sweep).
Features and clusterings live in the stage cache. With ``evaluate_rounds`` each round's multi-scale
CAMs are exported and scored on the train split (the paper's Table 2 protocol; the last round's
export is the pipeline's stage 2, reused from the cache; mIoU and F-score at the best threshold and
at the method's ``bg_threshold``); the per-round report goes to
``<dir>/rounds_report.json`` and ``report["rounds"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from segexp.data.synth import body_subtypes
from segexp.metrics.testbed import subtype_purity
from segexp.pipeline.compose import compose, container, train_reader
from segexp.pipeline.runs import PipelineContext, cam_network_key, run_key
from segexp.stages.subcategory import image_label_reader
from segexp.utils.atomic import write_json

log = logging.getLogger(__name__)

__all__ = ["StopAfterEpoch", "train_rounds", "WRAPPER_TARGET"]

WRAPPER_TARGET = "segexp.stages.subcategory.SubCategoryLabels"
CHECKPOINTS = ("last", "best")


class StopAfterEpoch(pl.Callback):
    """Stop training after ``epoch`` epochs while the lr schedule keeps the horizon it was built
    with (``schedule.epochs``): the fit loop's limit is lowered once the optimizer exists."""

    def __init__(self, epoch: int | None = None):
        if epoch is not None and epoch < 1:
            raise ValueError(f"StopAfterEpoch: epoch must be >= 1, got {epoch}")
        self.epoch = epoch

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epoch is not None and self.epoch < trainer.fit_loop.max_epochs:
            trainer.fit_loop.max_epochs = self.epoch


def _wrappers_reading(
    cfg: DictConfig, method: dict[str, Any] | None, ckpt: str | None
) -> list[dict[str, Any]]:
    """``data.train_wrappers`` with the sub-category stage's features taken from (method, ckpt)."""
    wrappers = container(cfg.data.get("train_wrappers")) or []
    ours = [w for w in wrappers if w.get("_target_") == WRAPPER_TARGET]
    if len(ours) != 1:
        raise ValueError(
            f"SC-CAM rounds need exactly one {WRAPPER_TARGET} in data.train_wrappers, found {len(ours)} "
            "(see conf/experiment/sccam_shapes.yaml)"
        )
    features = ours[0]["stage"]["features"]
    features["method"], features["ckpt_path"] = method, ckpt
    return wrappers


def round0_argv(overrides: Sequence[str], round0: Sequence[str]) -> list[str]:
    """The user's overrides + ``round0`` minus the ``method.*`` ones the round-0 method lacks
    (e.g. ``method.num_subcategories``, which only SC-CAM has); the train wrappers are dropped."""
    from omegaconf import OmegaConf

    others = [o for o in overrides if not o.lstrip("+~").startswith("method.")]
    probe = compose([*others, *round0])
    kept = []
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key.startswith("method.") and OmegaConf.select(probe, key, default=_ABSENT) is _ABSENT:
            log.info("round 0 (%s) ignores %s", probe.method.name, o)
            continue
        kept.append(o)
    return [*kept, *round0, "data.train_wrappers=[]"]


_ABSENT = object()


def _checkpoint(record: dict[str, Any], which: str) -> str:
    best = Path(record["ckpt"])
    return str(best.parent / "last.ckpt") if which == "last" else str(best)


def _evaluate(context: PipelineContext, method: dict[str, Any], ckpt: str) -> dict[str, Any]:
    """Multi-scale CAM export of one round's network on the train split, scored over the curve
    (mIoU and F-score, as the paper's Table 2)."""
    import hydra

    if context.reader is None:
        context.reader = train_reader(context.cfg)
    cam_cfg = container(context.cfg.pipeline.stages.cam)
    cam_cfg.update(method=method, ckpt_path=ckpt)
    report = hydra.utils.instantiate(cam_cfg).run(context.reader, evaluate=True)
    keep = (
        "best_mIoU",
        "best_threshold",
        "mIoU_at_threshold",
        "fscore_at_best_threshold",
        "fscore_at_threshold",
        "computed",
        "seconds",
    )
    return {k: report[k] for k in keep if k in report}


def _cluster_purity(context: PipelineContext, wrappers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Purity of the sub-categories a round trained on against the part set's body sub-types (the
    testbed's ground truth for SC-CAM's clusters); None when the data is not a part set."""
    import hydra

    prepare = context.cfg.data.get("prepare") or {}
    if (prepare.get("testbed") or {}).get("parts") is None:
        return None
    ours = next(w for w in wrappers if w.get("_target_") == WRAPPER_TARGET)
    stage = hydra.utils.instantiate(ours["stage"])
    if context.reader is None:
        context.reader = train_reader(context.cfg)
    clusters, _ = stage.clusters(context.reader)
    bodies = body_subtypes(prepare["root"], context.cfg.data.splits.train)
    return {
        **subtype_purity(clusters, [bodies[i] for i in image_label_reader(context.reader).ids]),
        "k": stage.num_subcategories,
    }


def train_rounds(
    context: PipelineContext,
    rounds: int = 3,
    round0_overrides: Sequence[str] = ("method=cam",),
    checkpoint_epochs: Sequence[int | None] = (30, 40, 50),
    checkpoint: str = "last",
    evaluate_rounds: bool = True,
    stop_callback: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rounds 0..``rounds``; returns the last round's ``{key, ckpt, metrics, method}``.

    Args:
        rounds: clustering rounds after round 0 (paper: 3).
        round0_overrides: overrides giving the round-0 CAM network (after the experiment's).
        checkpoint_epochs: epochs after which round r's network is taken (one per round;
            None = the whole ``schedule.epochs``).
        checkpoint: ``last`` = the network at that epoch (released), ``best`` = the best one by
            ``optimized_metric`` among the epochs trained.
        evaluate_rounds: score every round's CAMs on the train split.
        stop_callback: config of the callback that ends round r after ``checkpoint_epochs[r-1]``
            epochs (:class:`StopAfterEpoch`; its ``epoch`` is filled in per round).
    """
    if not stop_callback:
        raise ValueError("pipeline.cam_network.stop_callback: set it (see conf/experiment/sccam_shapes.yaml)")
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"pipeline.cam_network.checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
    if len(checkpoint_epochs) != rounds:
        raise ValueError(
            f"pipeline.cam_network.checkpoint_epochs has {len(checkpoint_epochs)} entries for {rounds} rounds"
        )
    overrides = list(context.overrides)
    r0 = round0_argv(overrides, round0_overrides)
    cfg0 = compose(r0)
    record = context.train("round0", r0, {"round": 0, "network": cam_network_key(cfg0)})
    method, ckpt = container(cfg0.method), _checkpoint(record, checkpoint)
    summary: list[dict[str, Any]] = [
        {"round": 0, "dir": "round0", "ckpt": ckpt, "metrics": record["metrics"]}
    ]
    if evaluate_rounds:
        summary[-1]["cam"] = _evaluate(context, method, ckpt)

    cfg = compose(overrides)
    k = int(cfg.method.num_subcategories)
    for r, epoch in enumerate(checkpoint_epochs, start=1):
        wrappers = _wrappers_reading(cfg, method, ckpt)
        stop = {**container(stop_callback), "epoch": epoch}
        depends = {
            "round": r,
            "network": cam_network_key(cfg),
            "previous": {"key": record["key"], "ckpt": ckpt},
            "wrappers": wrappers,
            "stop_after_epoch": epoch,
        }
        name = f"round{r}_K{k}_{run_key(depends, 6)}"  # other settings never overwrite a round
        patch = {"data.train_wrappers": wrappers, "callbacks.sccam_stop_after_epoch": stop}
        record = context.train(name, overrides, depends, patch=patch)
        method, ckpt = container(cfg.method), _checkpoint(record, checkpoint)
        summary.append({"round": r, "dir": name, "ckpt": ckpt, "metrics": record["metrics"]})
        if evaluate_rounds:
            summary[-1]["cam"] = _evaluate(context, method, ckpt)
            purity = _cluster_purity(context, wrappers)
            if purity is not None:
                summary[-1]["clusters"] = purity
        log.info("SC-CAM round %d done: %s", r, summary[-1].get("cam", ckpt))

    context.report["rounds"] = summary
    write_json(context.root / "rounds_report.json", summary)
    return {"key": record["key"], "ckpt": ckpt, "metrics": record["metrics"], "method": method}

"""What the entry points do, as plain functions of a composed config (callable from notebooks).

``train(cfg)``: seed, build data/method/trainer from config, fit (or resume), test the best
checkpoint, write ``metrics.json`` and ``config.yaml`` into the run directory.
``evaluate(cfg)``: build the same objects, test a given checkpoint, write the metrics and the
per-class table.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from segexp.reporting.dump import PredictionDump, SaliencyDump
from segexp.utils.atomic import write_json, write_text
from segexp.utils.checkpoints import made_by_record
from segexp.utils.config import instantiate_named
from segexp.utils.errors import UserError

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The DataModule loads exactly the keys the configured method declares it needs."""
    return hydra.utils.instantiate(
        cfg.data,
        train_keys=list(cfg.method.train_keys),
        eval_keys=list(cfg.method.eval_keys),
        _recursive_=True,
    )


def check_data(cfg: DictConfig, datamodule: pl.LightningDataModule, stage: str) -> None:
    """Open the dataset before any model is built: a missing or wrong data root fails in seconds,
    with the setting that points at it, instead of after minutes of model building."""
    from segexp.data.io import DatasetError

    try:
        try:  # a real data set is opened first: a mix of real and generated data (bottomup_coco_ade)
            datamodule.setup(stage)  # reports its missing real folder before minutes of generation
        except DatasetError as missing:
            generated = datamodule.generated_root() if hasattr(datamodule, "generated_root") else None
            if generated is None or not str(missing.path).startswith(str(generated)):
                raise  # a real data set's file: generating the synthetic part would not help
            datamodule.prepare_data()  # the synthetic set: generated once, then opened
            datamodule.setup(stage)
    except DatasetError as err:
        raise UserError(
            f"data '{cfg.data.get('name', '?')}': {err}\n"
            f"  datasets are read under paths.data_dir={cfg.paths.data_dir}: set paths.data_dir=DIR "
            "or SEGEXP_DATA=DIR (expected layouts: README, 'Real datasets')"
        ) from err


def provenance(cfg: DictConfig) -> dict[str, Any]:
    """What a checkpoint records about its maker (checked by :func:`check_checkpoint`)."""
    from hydra.core.hydra_config import HydraConfig

    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return {
        "method": cfg.method.get("name"),
        "method_target": cfg.method.get("_target_"),
        "experiment": choices.get("experiment") or cfg.get("run_name"),
        "method_config": OmegaConf.to_container(cfg.method, resolve=True),  # load_method(ckpt) rebuilds it
    }


def same_class(target: str, other: str) -> bool:
    """Whether two ``_target_`` strings name one class (a renamed method keeps its old name as an alias)."""
    if target == other:
        return True
    try:
        return hydra.utils.get_class(target) is hydra.utils.get_class(other)
    except Exception:  # a class that no longer exists is another method
        return False


def check_checkpoint(path: Path, cfg: DictConfig, method: pl.LightningModule) -> None:
    """Refuse, in one line, a checkpoint another method made (or one whose weights do not fit)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    made_by = made_by_record(ckpt)
    wanted = cfg.method.get("_target_")
    if made_by.get("method_target") and not same_class(made_by["method_target"], wanted):
        raise UserError(
            f"ckpt_path={path} was trained by method '{made_by.get('method')}' (experiment "
            f"'{made_by.get('experiment')}'), this config builds '{cfg.method.get('name')}': "
            f"evaluate it with +experiment={made_by.get('experiment')}"
        )
    have, need = set(ckpt.get("state_dict", {})), set(method.state_dict())
    if have != need:
        missing, extra = sorted(need - have), sorted(have - need)
        raise UserError(
            f"ckpt_path={path}: its weights do not fit method '{cfg.method.get('name')}' "
            f"({len(missing)} missing, {len(extra)} unexpected, e.g. {(missing or extra)[0]!r}); "
            "was it made by another experiment?"
        )


def build_dump(cfg: DictConfig, method: pl.LightningModule, datamodule: Any, out: Path, split: str) -> Any:
    """What ``dump.*`` asks an evaluation to write: label PNGs + per-image CSV for segmentation
    methods; for salient-object methods the continuous maps, in ``segexp.sod_eval``'s layout."""
    from segexp.methods.sod_base import SODMethod

    dump = cfg.get("dump") or {}
    if isinstance(method, SODMethod):
        if not dump.get("predictions"):
            return None
        names = list(getattr(datamodule, "test_set_names", None) or []) if split == "test" else []
        return SaliencyDump(out, cfg.method.get("name", "method"), names or [cfg.data.name])
    if dump.get("predictions") or dump.get("per_image"):
        return PredictionDump(
            out, method.num_classes, method.class_names, method.ignore_index,
            predictions=bool(dump.get("predictions")), per_image=bool(dump.get("per_image")),
        )  # fmt: skip
    return None


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list, **overrides: Any) -> pl.Trainer:
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)


def check_launch(cfg: DictConfig) -> None:
    """A local multirun cannot host multi-process DDP jobs (Lightning re-launches the script per
    rank, outside the sweep): stop with the fix instead of leaving stray run directories."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    devices = cfg.trainer.get("devices", 1)
    many = (
        (isinstance(devices, int) and devices > 1)
        or devices in (-1, "auto")
        or cfg.trainer.get("num_nodes", 1) > 1
    )
    strategy = str(cfg.trainer.get("strategy", "auto"))
    local_launcher = "basic" in str(hc.launcher.get("_target_", "")).lower()
    if hc.mode == RunMode.MULTIRUN and many and strategy.startswith("ddp") and local_launcher:
        raise RuntimeError(
            "multi-process DDP inside a local multirun is not supported: each rank would re-run the "
            "whole sweep. Use hydra/launcher=submitit_slurm (one SLURM job per sweep point, "
            "its ranks launched by SLURM) or hydra/launcher=submitit_local, or run the jobs one by one."
        )


def _scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if key.startswith(prefix):
            v = float(value)
            out[key] = v if math.isfinite(v) else float("nan")
    return out


def log_config(loggers: list, cfg: DictConfig) -> None:
    params = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(params)


def finish_loggers(loggers: list) -> None:
    """One W&B run per job: close it so the next multirun job in this process starts its own."""
    from pytorch_lightning.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            wandb.finish()


def checkpoint_to_test(trainer: pl.Trainer, weights: str) -> str | None:
    """The checkpoint ``trainer.test`` loads: the best on ``optimized_metric`` (whose choice depends on
    how often validation runs), or None for the weights as training left them (``last``)."""
    if weights == "last":
        return None
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best:
        log.warning("no best checkpoint (checkpointing off or fast_dev_run): testing current weights")
    return best or None


def train(cfg: DictConfig) -> dict[str, float]:
    pl.seed_everything(cfg.seed, workers=True)
    check_launch(cfg)
    out = output_dir(cfg)
    datamodule = build_datamodule(cfg)
    check_data(cfg, datamodule, "fit")
    method = hydra.utils.instantiate(cfg.method)
    method.record_provenance(provenance(cfg))
    callbacks = instantiate_named(cfg.get("callbacks"))
    loggers = instantiate_named(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, out / "config.yaml", resolve=False)
    log_config(loggers, cfg)

    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        trainer.fit(method, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics.update(_scalars(trainer.callback_metrics, "val/"))
        ckpt_cb = trainer.checkpoint_callback
        if ckpt_cb is not None and ckpt_cb.best_model_score is not None:
            metrics[f"{ckpt_cb.monitor}_best"] = float(ckpt_cb.best_model_score)
    if cfg.get("test", True):
        weights = checkpoint_to_test(trainer, cfg.test_weights)
        trainer.test(method, datamodule=datamodule, ckpt_path=weights)
        metrics.update(_scalars(trainer.callback_metrics, "test/"))

    if trainer.is_global_zero:
        write_json(out / "metrics.json", metrics)
        log.info("metrics: %s", metrics)
        print(f"run directory: {out}")
    finish_loggers(loggers)
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, float]:
    from pytorch_lightning.callbacks import ModelCheckpoint

    from segexp.metrics.semantic import per_class_table

    pl.seed_everything(cfg.seed, workers=True)
    out = output_dir(cfg)
    ckpt = Path(cfg.ckpt_path)
    if not ckpt.is_file():
        raise UserError(f"ckpt_path={ckpt}: no such checkpoint file")
    split = cfg.get("split", "test")
    if split not in ("val", "test"):
        raise UserError(f"split={split!r}: choose val or test")
    datamodule = build_datamodule(cfg)
    check_data(cfg, datamodule, "fit" if split == "val" else "test")
    method = hydra.utils.instantiate(cfg.method)
    check_checkpoint(ckpt, cfg, method)
    method.dump = build_dump(cfg, method, datamodule, out, split)
    loggers = instantiate_named(cfg.get("logger"))
    # evaluation writes no checkpoint: without a ModelCheckpoint, Lightning does not warn that the
    # loaded checkpoint's directory differs from this run's
    callbacks = [c for c in instantiate_named(cfg.get("callbacks")) if not isinstance(c, ModelCheckpoint)]
    trainer = build_trainer(cfg, callbacks, loggers, enable_checkpointing=False)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, out / "config.yaml", resolve=False)
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    # Lightning names test-loop metrics test/*; they are renamed after the split actually evaluated.
    with warnings.catch_warnings():
        # the checkpoint holds the training run's callback states (ModelCheckpoint, EarlyStopping...);
        # an evaluation restores only the weights, so Lightning's advice to add those callbacks is noise
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
        trainer.test(method, dataloaders=loader, ckpt_path=str(ckpt))
    tested = _scalars(trainer.callback_metrics, "test/")
    metrics = {f"{split}/{k[len('test/'):]}": v for k, v in tested.items()}
    if trainer.is_global_zero:
        write_json(out / "metrics.json", metrics)
        if any(f"{split}/IoU_{n}" in metrics for n in method.class_names):  # not for entity methods
            result = {
                "iou": torch.tensor(
                    [metrics.get(f"{split}/IoU_{n}", float("nan")) for n in method.class_names]
                ),
                "mIoU": metrics.get(f"{split}/mIoU", float("nan")),
            }
            write_text(out / "per_class.md", per_class_table(result, method.class_names))
        print(f"run directory: {out}")
        if isinstance(method.dump, SaliencyDump):
            print(f"saliency maps: {method.dump.root} ({method.dump.count} images); score them with the "
                  f"SOD toolkit: python -m segexp.sod_eval --pred-root {method.dump.root} "
                  f"--methods {method.dump.method} --datasets {' '.join(method.dump.datasets)} --gt-root ...")
    finish_loggers(loggers)
    return metrics

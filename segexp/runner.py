"""What the entry points do, as plain functions of a composed config (callable from notebooks).

``train(cfg)``: seed, build data/method/trainer from config, fit (or resume), test the best
checkpoint, write ``metrics.json`` and ``config.yaml`` into the run directory.
``evaluate(cfg)``: build the same objects, test a given checkpoint, write the metrics and the
per-class table.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from segexp.utils.atomic import write_json, write_text
from segexp.utils.config import instantiate_named
from segexp.utils.dump import PredictionDump

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


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> pl.Trainer:
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


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


def train(cfg: DictConfig) -> dict[str, float]:
    pl.seed_everything(cfg.seed, workers=True)
    check_launch(cfg)
    out = output_dir(cfg)
    datamodule = build_datamodule(cfg)
    method = hydra.utils.instantiate(cfg.method)
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
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("no best checkpoint (checkpointing off or fast_dev_run): testing current weights")
        trainer.test(method, datamodule=datamodule, ckpt_path=best or None)
        metrics.update(_scalars(trainer.callback_metrics, "test/"))

    if trainer.is_global_zero:
        write_json(out / "metrics.json", metrics)
        log.info("metrics: %s", metrics)
        print(f"run directory: {out}")
    finish_loggers(loggers)
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, float]:
    from segexp.metrics.semantic import per_class_table

    pl.seed_everything(cfg.seed, workers=True)
    out = output_dir(cfg)
    ckpt = Path(cfg.ckpt_path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt}: no such checkpoint file")
    datamodule = build_datamodule(cfg)
    method = hydra.utils.instantiate(cfg.method)
    dump = cfg.get("dump") or {}
    if dump.get("predictions") or dump.get("per_image"):
        method.dump = PredictionDump(out, method.num_classes, method.class_names, method.ignore_index,
                                     predictions=bool(dump.get("predictions")),
                                     per_image=bool(dump.get("per_image")))
    loggers = instantiate_named(cfg.get("logger"))
    trainer = build_trainer(cfg, instantiate_named(cfg.get("callbacks")), loggers)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, out / "config.yaml", resolve=False)
    split = cfg.get("split", "test")
    if split not in ("val", "test"):
        raise ValueError(f"split={split!r}: choose val or test")
    datamodule.setup("fit" if split == "val" else "test")
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    # Lightning names test-loop metrics test/*; they are renamed after the split actually evaluated.
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
    finish_loggers(loggers)
    return metrics

"""The entry points as a user runs them: train, resume, evaluate, DDP on CPU, W&B offline, sweeps.

Each test runs ``python -m segexp.train`` / ``segexp.eval`` in a subprocess on a small synthetic
set (the generator writes the real VOC format, so the real reader is exercised).
"""

from __future__ import annotations

import csv

import pytest
import torch

from tests.conftest import CLI_BASE as BASE
from tests.conftest import REPO, SMALL_SYNTH, assert_ok, read_metrics, run_cli


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    """A 2-epoch training run (reused by the resume and eval tests)."""
    run_dir = tmp_path_factory.mktemp("run")
    proc = run_cli(
        "segexp.train",
        [*BASE, "schedule.epochs=2", f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}"],
        cwd=REPO,
    )
    assert_ok(proc)
    return run_dir, proc


def test_train_writes_metrics_config_checkpoints_and_prints_run_dir(trained_run):
    run_dir, proc = trained_run
    metrics = read_metrics(run_dir)
    for key in ("val/mIoU", "val/pixel_acc", "test/mIoU", "test/pixel_acc", "val/mIoU_best"):
        assert key in metrics, key
    assert metrics["val/mIoU_best"] >= metrics["val/mIoU"] - 1e-6  # the best epoch is at least the last
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert f"run directory: {run_dir}" in proc.stdout
    assert "CONFIG" in proc.stdout  # the composed config is printed as a tree
    panels = list((run_dir / "csv").rglob("val_panels_*.png"))
    assert panels, "image panels were not written for the CSV logger"


def test_resume_from_last_ckpt_continues_the_same_run(trained_run, data_dir):
    run_dir, _ = trained_run
    last = run_dir / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=False)
    assert first["epoch"] == 1
    steps_per_epoch = first["global_step"] // 2
    # no hydra.run.dir: resuming continues in the checkpoint's own run directory
    proc = run_cli(
        "segexp.train",
        [*BASE, "schedule.epochs=3", f"paths.data_dir={data_dir}", f"ckpt_path={last}"],
        cwd=REPO,
    )
    assert_ok(proc)
    assert f"run directory: {run_dir}" in proc.stdout
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 2  # one more epoch, not three from scratch
    assert ckpt["global_step"] == 3 * steps_per_epoch  # optimizer/loop state carried over
    with open(run_dir / "csv" / "metrics.csv") as fh:
        epochs = {int(r["epoch"]) for r in csv.DictReader(fh) if r.get("val/mIoU")}
    assert epochs == {0, 1, 2}, "the CSV log must continue, keeping the first run's epochs"


def test_eval_writes_metrics_table_dumps_and_runs_tta(trained_run, data_dir, tmp_path):
    run_dir, _ = trained_run
    best = sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))[-1]
    proc = run_cli(
        "segexp.eval",
        [*BASE, f"paths.data_dir={data_dir}", f"ckpt_path={best}", f"hydra.run.dir={tmp_path}",
         "dump.predictions=true"],
        cwd=REPO,
    )
    assert_ok(proc)
    assert "Be aware that when using `ckpt_path`" not in proc.stderr  # callback states: not an eval's concern
    # the training run tested this same (best) checkpoint on the same split: identical numbers
    assert read_metrics(tmp_path)["test/mIoU"] == pytest.approx(read_metrics(run_dir)["test/mIoU"], abs=1e-6)
    assert (tmp_path / "per_class.md").read_text().count("|") > 10
    with open(tmp_path / "per_image.csv") as fh:
        rows = list(csv.DictReader(fh))
    pngs = sorted((tmp_path / "predictions").glob("*.png"))
    assert len(rows) == len(pngs) > 0
    assert {r["id"] for r in rows} == {p.stem for p in pngs}

    # multi-scale + flip TTA is an evaluation option; it runs and yields a valid metric
    tta_dir = tmp_path / "tta"
    proc = run_cli(
        "segexp.eval",
        [*BASE, f"paths.data_dir={data_dir}", f"ckpt_path={best}", f"hydra.run.dir={tta_dir}",
         "method.tta.scales=[0.75,1.0,1.25]", "method.tta.flip=true", "split=val"],
        cwd=REPO,
    )
    assert_ok(proc)
    tta, plain = read_metrics(tta_dir)["val/mIoU"], read_metrics(run_dir)["val/mIoU_best"]
    assert tta != plain and abs(tta - plain) < 0.2  # other predictions (TTA ran), of the same network


def test_ddp_on_cpu_with_two_processes_gives_the_same_metric_keys(trained_run, data_dir, tmp_path):
    run_dir, _ = trained_run
    proc = run_cli(
        "segexp.train",
        [
            "experiment=supervised_shapes",
            *SMALL_SYNTH,
            "data.num_workers=0",
            "trainer=ddp_cpu",
            "data.batch_size=8",  # as CLI_BASE: 29 train images over 2 ranks still fill a batch
            "schedule.epochs=1",
            f"paths.data_dir={data_dir}",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO,
    )
    assert_ok(proc)
    assert set(read_metrics(tmp_path)) == set(read_metrics(run_dir))
    assert "world_size: 2" in (proc.stdout + proc.stderr) or "GLOBAL_RANK: 1" in (proc.stdout + proc.stderr)
    assert "sync_dist" not in proc.stderr  # epoch metrics are reduced before logging: no advice to add it


def test_a_run_is_reproducible_from_its_seed(data_dir, tmp_path):
    """Two runs of one config and seed end with identical weights (augmentation included: albumentations
    keeps a generator of its own, which seed_everything does not reach - segexp.data.transforms)."""
    weights = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        args = [*BASE, "trainer.max_steps=3", "test=false", "trainer.limit_val_batches=1",
                f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}"]  # fmt: skip
        assert_ok(run_cli("segexp.train", args, cwd=REPO))
        weights.append(torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

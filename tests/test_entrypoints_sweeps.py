"""The entry points in sweeps and with other loggers: W&B offline, Optuna, submitit, failure modes.

Each test runs ``python -m segexp.train`` / ``segexp.eval`` in a subprocess on a small synthetic
set (the generator writes the real VOC format, so the real reader is exercised).
"""

from __future__ import annotations

import sqlite3

from tests.conftest import CLI_BASE as BASE
from tests.conftest import REPO, assert_ok, read_metrics, run_cli


def test_local_multirun_with_multiprocess_ddp_stops_with_a_clear_message(data_dir, tmp_path):
    proc = run_cli(
        "segexp.train",
        [
            "-m",
            *BASE,
            "trainer=ddp_cpu",
            "seed=1",
            f"paths.data_dir={data_dir}",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=REPO,
    )
    assert proc.returncode != 0
    assert "submitit" in proc.stderr + proc.stdout
    assert not list(tmp_path.rglob("*.ckpt"))


def test_unknown_config_key_fails_with_hydras_message(tmp_path):
    proc = run_cli("segexp.train", ["data.batchsize=4", f"hydra.run.dir={tmp_path}"], cwd=REPO)
    assert proc.returncode != 0
    assert "data.batchsize" in proc.stderr and "Traceback" not in proc.stderr


def test_wandb_offline_writes_a_run_with_metrics_and_images(data_dir, tmp_path):
    proc = run_cli(
        "segexp.train",
        [
            *BASE,
            "logger=wandb",
            "schedule.epochs=1",
            f"paths.data_dir={data_dir}",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO,
        env={"WANDB_API_KEY": "", "WANDB_MODE": ""},
    )
    assert_ok(proc)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one offline W&B run"
    # wandb >= 0.20 keeps history, summary and config inside the binary run file (protobuf records,
    # keys stored as plain strings) until `wandb sync`; the media files are written beside it.
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"val/mIoU", b"test/mIoU", b"train/loss", b"supervised_shapes"):
        assert key in record, key
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png")), "image panels logged to W&B"
    assert list((runs[0] / "files" / "media" / "images").rglob("*.mask.png")), "class-labelled masks"


def test_optuna_study_resumed_from_storage_proposes_new_points(data_dir, tmp_path):
    """One trial, then the same command again: the study continues (2 trials) at a new point."""
    db = tmp_path / "optuna.db"
    for run in range(2):
        proc = run_cli(
            "segexp.train",
            [
                "-m",
                *BASE,
                "hparams_search=supervised_optuna",
                "hydra.sweeper.n_trials=1",
                "hydra.sweeper.sampler.n_startup_trials=10",  # random phase: a fixed seed repeats itself
                f"hydra.sweeper.storage=sqlite:///{db}",
                "schedule.epochs=1",
                "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=1",
                "test=false",
                f"paths.data_dir={data_dir}",
                f"hydra.sweep.dir={tmp_path / f'sweep{run}'}",
            ],
            cwd=REPO,
        )
        assert_ok(proc)
    assert (tmp_path / "sweep0" / "optimization_results.yaml").is_file()
    with sqlite3.connect(db) as con:
        states = [r[0] for r in con.execute("select state from trials order by trial_id")]
        rows = con.execute("select trial_id, param_name, param_value from trial_params").fetchall()
    assert states == ["COMPLETE"] * 2
    points = {}
    for trial, name, value in rows:
        points.setdefault(trial, {})[name] = value
    first, resumed = points.values()
    assert resumed != first, (first, resumed)  # a fixed sampler seed re-proposed the first point


def test_submitit_local_launcher_runs_a_sweep_job(data_dir, tmp_path):
    proc = run_cli(
        "segexp.train",
        [
            "-m",
            *BASE,
            "hydra/launcher=submitit_local",
            "schedule.epochs=1",
            "test=false",
            f"paths.data_dir={data_dir}",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=REPO,
    )
    assert_ok(proc)
    assert "val/mIoU" in read_metrics(tmp_path / "0")

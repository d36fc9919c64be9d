"""Mechanism-testbed recipes: ``python -m segexp.bench testbed [--quick] [--to-target] [--json out.json]``.

* steps/s: each ``*_shapes`` recipe's training step (forward, the method's losses, backward, AdamW) on
  a real batch of its own data module at its configured batch and image size, one process;
  ``minutes/run`` = the configured number of steps at that rate (data generation, validation and
  stages not included);
* ``--to-target``: trains ``supervised_shapes`` and ``cam_shapes`` as configured (``segexp.train`` in a
  subprocess, fresh data directory) and reports the wall time at which the val metric first reaches
  the issue's target (supervised val mIoU 0.85; CAM multi-label F1 0.9), the final value and the total
  wall time. Report the machine's load with the figures: every number here is CPU time shared.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# recipe -> the val metric and target the testbed issue sets (None: speed only)
RECIPES: dict[str, tuple[str, float] | None] = {
    "supervised_shapes": ("val/mIoU", 0.85),
    "cam_shapes": ("val/cls_F1", 0.90),
    "seam_shapes": None,
    "fbr_shapes": None,
    "ppc_shapes": None,
    "box2seg_shapes": None,
    "box_rect_shapes": None,
    "cas_shapes_sod": None,
    "ldf_shapes_sod": None,
    "bottomup_shapes": None,
}


def first_batch(cfg) -> dict:
    """The first training batch of ``cfg``'s data module (its data prepared first)."""
    from segexp.runner import build_datamodule

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def step_rate(experiment: str, data_dir: Path, steps: int) -> dict:
    """Training steps per second of one recipe on a batch of its own data."""
    import hydra
    from omegaconf import OmegaConf

    from segexp.pipeline.compose import compose

    cfg = compose([f"+experiment={experiment}", f"paths.data_dir={data_dir}", "data.num_workers=0"])
    train_images = round(cfg.data.prepare.num_images * cfg.data.prepare.split_fractions[0])
    planned = -(-train_images // cfg.data.batch_size) * cfg.schedule.epochs  # the recipe's steps
    OmegaConf.update(cfg, "data.prepare.num_images", 64)  # a batch is all the timing needs
    batch = first_batch(cfg)
    method = hydra.utils.instantiate(cfg.method)
    method.train()
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        loss = torch.stack(list(method.compute_losses(batch).values())).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):  # warm-up: allocator, lazy buffers
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    rate = steps / (time.perf_counter() - t0)
    return {
        "recipe": experiment,
        "backbone": cfg.backbone.name,
        "image_size": cfg.data.image_size,
        "batch": cfg.data.batch_size,
        "steps_per_s": round(rate, 2),
        "planned_steps": planned,
        "minutes_per_run": round(planned / rate / 60, 1),
    }


def time_to_target(experiment: str, metric: str, target: float, workdir: Path) -> dict:
    """Train the recipe as configured; wall time when ``metric`` first reaches ``target``."""
    run_dir = workdir / experiment
    cmd = [sys.executable, "-m", "segexp.train", f"+experiment={experiment}",
           f"paths.data_dir={workdir / 'data'}", f"hydra.run.dir={run_dir}", "test=false"]  # fmt: skip
    t0 = time.perf_counter()
    reached, curve = None, []
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        while True:
            done = proc.poll() is not None
            curve = _curve(run_dir / "csv" / "metrics.csv", metric)
            if reached is None and any(v >= target for _, v in curve):
                reached = time.perf_counter() - t0
            if done:
                break
            time.sleep(2.0)
    return {
        "recipe": experiment,
        "metric": metric,
        "target": target,
        "minutes_to_target": None if reached is None else round(reached / 60, 2),
        "final": curve[-1][1] if curve else None,
        "best": max((v for _, v in curve), default=None),
        "minutes_total": round((time.perf_counter() - t0) / 60, 2),
        "exit_code": proc.returncode,
        "curve": curve,
    }


def _curve(path: Path, metric: str) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [(int(r["step"]), round(float(r[metric]), 4)) for r in csv.DictReader(handle) if r.get(metric)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m segexp.bench.testbed", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 steps of two recipes")
    parser.add_argument("--to-target", action="store_true", help="also train the recipes that have a target")
    parser.add_argument("--recipes", nargs="*", default=None, help=f"default: all of {list(RECIPES)}")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    recipes = args.recipes or (["supervised_shapes", "cam_shapes"] if args.quick else list(RECIPES))
    results: dict[str, list] = {"steps": [], "to_target": []}
    with tempfile.TemporaryDirectory(prefix="segexp-bench-testbed-") as tmp:
        for name in recipes:
            row = step_rate(name, Path(tmp) / "data", 3 if args.quick else 20)
            results["steps"].append(row)
            print(f"{name:18s} {row['backbone']:14s} {row['image_size']:3d} px  batch {row['batch']:2d}  "
                  f"{row['steps_per_s']:6.2f} steps/s  {row['planned_steps']:5d} steps = "
                  f"{row['minutes_per_run']:5.1f} min", flush=True)  # fmt: skip
        if args.to_target:
            for name in recipes:
                if RECIPES.get(name) is None:
                    continue
                row = time_to_target(name, *RECIPES[name], Path(tmp))
                results["to_target"].append(row)
                print(
                    f"{name:18s} {row['metric']} >= {row['target']}: {row['minutes_to_target']} min "
                    f"(final {row['final']}, best {row['best']}, {row['minutes_total']} min in all)",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

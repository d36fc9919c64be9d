"""Training throughput at paper resolution per method and precision: ``python -m segexp.bench gpu``.

One script for a GPU machine (at most ~8 minutes on one modern GPU with the defaults), runnable on CPU
with ``--quick`` (small sizes; what the tests run). For every method:

* the network, losses and batch size of its *paper* experiment (``cam_voc``, ``seam_voc``, ``cas_duts``
  ... : backbone from scratch, ``backbone.pretrained=false``), on a real batch of its *testbed*
  experiment's data module generated at the paper's crop size (the same train keys, wrappers and
  augmentation code path; no dataset download);
* one training step = the method's ``compute_losses`` summed, backward, an optimizer step (AdamW over
  all parameters: the method's own optimizer groups and lr schedule change nothing measurable), under
  ``torch.autocast`` for ``16-mixed`` (with a gradient scaler) and ``bf16-mixed``, as Lightning runs them;
* images/s over ``--steps`` timed steps after ``--warmup`` steps, and the peak memory allocated by torch
  on the GPU (``null`` on CPU, where torch keeps no such count);
* ``--ddp``: where two or more GPUs exist, the same step in a 2-process DistributedDataParallel group
  (NCCL; ``--ddp-backend gloo`` runs it on CPU processes, for the tests), images/s of both together;
* ``--channels-last`` / ``--compile``: the speed options of ``conf/callbacks/default.yaml: speed``
  (``segexp/utils/speed.py``), to decide per machine whether they help.

``--json out.json`` writes every row. Methods whose build fails are reported with the error and skipped,
so one broken recipe never hides the others' figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from segexp.bench.testbed import first_batch
from segexp.utils.speed import to_channels_last

#: method -> (paper experiment: network, losses, batch and crop; testbed experiment: the data)
METHODS: dict[str, tuple[str, str]] = {
    "supervised": ("supervised_voc", "supervised_shapes"),
    "cam": ("cam_voc", "cam_shapes"),
    "seam": ("seam_voc", "seam_shapes"),
    "sccam": ("sccam_voc", "sccam_shapes"),
    "fbr_ppc": ("fbr_voc", "fbr_ppc_shapes"),
    "fbr_seam": ("fbr_seam_voc", "fbr_shapes"),
    "cas": ("cas_duts", "cas_shapes_sod"),
    "ldf": ("ldf_duts", "ldf_shapes_sod"),
    "box2seg": ("box2seg_voc", "box2seg_shapes"),
    "bottomup": ("bottomup_coco_ade", "bottomup_shapes"),
}
PRECISIONS = ("32", "16-mixed", "bf16-mixed")
QUICK_SIZE, QUICK_BATCH = 64, 2
CLASS_KEYS = ("num_classes", "class_names", "ignore_index")  # the paper config takes the testbed's


#: method settings in pixels of the paper's crop (PPC's second view: 128 of a 448 crop)
CROP_PIXEL_KEYS = ("method.view_size",)


def paper_setting(method: str, quick: bool, size: int | None = None) -> tuple[Any, int, int]:
    """The paper experiment's composed config, its crop size and batch (``--quick``: small; ``size``:
    this crop). At a crop other than the paper's, its pixel settings (``CROP_PIXEL_KEYS``) are scaled
    with the crop: unscaled, PPC's 128-px second view is as large as a 128-px first view, and a small
    CPU crop would time two full forwards where the paper has one and a 8 % one."""
    from omegaconf import OmegaConf

    from segexp.pipeline.compose import compose

    paper, _ = METHODS[method]
    cfg = compose([f"+experiment={paper}", "backbone.pretrained=false"])
    crop, batch = int(cfg.data.image_size), int(cfg.data.batch_size)
    size = size or (QUICK_SIZE if quick else crop)
    for key in CROP_PIXEL_KEYS:
        value = OmegaConf.select(cfg, key)
        if value is not None:
            OmegaConf.update(cfg, key, max(8, round(int(value) * size / crop)))
    return cfg, size, (QUICK_BATCH if quick else batch)


def testbed_batch(paper_cfg: Any, method: str, size: int, batch: int, data_dir: Path) -> dict[str, Any]:
    """A real batch of the testbed experiment's data at ``size`` px (generated at that size); the
    paper config takes the testbed's classes (its method reads them from ``data``)."""
    from omegaconf import OmegaConf

    from segexp.pipeline.compose import compose

    _, shapes = METHODS[method]
    cfg = compose([f"+experiment={shapes}", f"paths.data_dir={data_dir}", "data.num_workers=0"])
    for key, value in {
        "data.image_size": size,
        "data.batch_size": batch,
        "data.prepare.size": max(size, 64),
        "data.prepare.num_images": max(4 * batch, 20),
    }.items():
        OmegaConf.update(cfg, key, value)
    for key in CLASS_KEYS:
        OmegaConf.update(paper_cfg, f"data.{key}", cfg.data[key])
    return first_batch(cfg)


def _to(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return to_channels_last(moved) if channels_last else moved


def build_method(cfg: Any, device: torch.device, channels_last: bool, compile_net: bool) -> Any:
    import hydra

    method = hydra.utils.instantiate(cfg.method).to(device)
    if channels_last:
        method.to(memory_format=torch.channels_last)
    if compile_net:
        getattr(method, "model", method).compile()
    return method.train()


def make_step(module: torch.nn.Module, loss_of, batch, device: torch.device, precision: str):
    """One optimizer step of ``loss_of(batch)`` on ``module``'s parameters at ``precision``."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")

    def step() -> None:
        autocast = (
            torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        )
        with autocast:
            loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def total_loss(method):
    return lambda batch: torch.stack([v.float() for v in method.compute_losses(batch).values()]).sum()


def timed(step, device: torch.device, warmup: int, steps: int) -> tuple[float, float | None]:
    """Seconds per step and the peak GPU memory (MB; None on CPU) over the timed steps."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return seconds, peak


def run_one(method: str, precision: str, args: argparse.Namespace, batch: dict, cfg: Any) -> dict:
    device = torch.device(args.device)
    net = build_method(cfg, device, args.channels_last, args.compile)
    data = _to(batch, device, args.channels_last)
    step = make_step(net, total_loss(net), data, device, precision)
    seconds, peak = timed(step, device, args.warmup, args.steps)
    return figures(int(data["image"].shape[0]), seconds, peak)


def figures(images: int, seconds: float, peak: float | None) -> dict:
    return {"images_per_s": round(images / seconds, 2), "s_per_step": round(seconds, 4),
            "peak_MB": None if peak is None else round(peak, 1)}  # fmt: skip


# -- 2-process DistributedDataParallel ---------------------------------------------------------------


class _LossModule(torch.nn.Module):
    """The method behind DDP: ``forward(batch)`` = its summed losses, so DDP's gradient hooks see
    every parameter the step uses."""

    def __init__(self, method: torch.nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return total_loss(self.method)(batch)


def _ddp_worker(rank: int, world: int, port: int, job: dict, out: str) -> None:
    import torch.distributed as dist
    from omegaconf import OmegaConf

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(job["backend"], rank=rank, world_size=world)
    try:
        device = torch.device(f"cuda:{rank}") if job["backend"] == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        cfg, _, _ = paper_setting(job["method"], job["quick"])
        for key, value in job["classes"].items():
            OmegaConf.update(cfg, f"data.{key}", value)
        net = build_method(cfg, device, job["channels_last"], False)
        ids = [rank] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(
            _LossModule(net), device_ids=ids, find_unused_parameters=True  # some heads skip terms
        )
        batch = _to(torch.load(job["batch"], weights_only=False), device, job["channels_last"])
        seconds, peak = timed(make_step(ddp, ddp, batch, device, job["precision"]), device, job["warmup"],
                              job["steps"])  # fmt: skip
        dist.barrier()
        if rank == 0:
            Path(out).write_text(json.dumps(figures(int(batch["image"].shape[0]) * world, seconds, peak)))
    finally:
        dist.destroy_process_group()


def run_ddp(method: str, precision: str, args: argparse.Namespace, batch: dict, cfg: Any, tmp: Path
            ) -> dict:  # fmt: skip
    import socket

    import torch.multiprocessing as mp
    from omegaconf import OmegaConf

    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.save(batch, tmp / "batch.pt")
    job = {"method": method, "precision": precision, "quick": args.quick, "backend": args.ddp_backend,
           "channels_last": args.channels_last, "warmup": args.warmup, "steps": args.steps,
           "batch": str(tmp / "batch.pt"),
           "classes": {k: OmegaConf.to_container(cfg.data, resolve=True)[k] for k in CLASS_KEYS}}  # fmt: skip
    out = tmp / "ddp.json"
    mp.spawn(_ddp_worker, args=(2, port, job, str(out)), nprocs=2, join=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m segexp.bench gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SIZE} px, batch {QUICK_BATCH}")
    parser.add_argument("--methods", nargs="*", default=None, help=f"default: all of {list(METHODS)}")
    parser.add_argument("--precisions", nargs="*", default=None, help=f"default: {PRECISIONS} on GPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 1 with --quick)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--ddp", action="store_true", help="also a 2-process DDP step (2 GPUs, or gloo)")
    parser.add_argument("--ddp-backend", default="nccl", choices=("nccl", "gloo"))
    parser.add_argument("--data-dir", type=Path, default=None, help="where testbed batches are generated")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.steps = args.steps if args.steps is not None else (1 if args.quick else 10)
    on_gpu = args.device.startswith("cuda")
    precisions = args.precisions or (list(PRECISIONS) if on_gpu else ["32", "bf16-mixed"])
    methods = args.methods or list(METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; available: {list(METHODS)}")
    ddp = args.ddp and (args.ddp_backend == "gloo" or torch.cuda.device_count() >= 2)
    if args.ddp and not ddp:
        print(f"--ddp: {torch.cuda.device_count()} GPU(s) here, a DDP step needs 2: skipped")
    where = f" ({torch.cuda.get_device_name()})" if on_gpu else f", {torch.get_num_threads()} threads"
    print(f"device {args.device}{where}, warmup {args.warmup}, {args.steps} timed steps")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="segexp-bench-gpu-") as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        for method in methods:
            try:
                cfg, size, batch_size = paper_setting(method, args.quick)
                batch = testbed_batch(cfg, method, size, batch_size, data_dir)
            except Exception as exc:  # one broken recipe must not hide the others
                rows.append({"method": method, "error": f"{type(exc).__name__}: {exc}"})
                print(f"{method:10s} build failed: {rows[-1]['error']}", flush=True)
                traceback.print_exc()
                continue
            for precision in precisions:
                row = {"method": method, "experiment": METHODS[method][0], "size": size, "batch": batch_size,
                       "backbone": str(cfg.backbone.name), "precision": precision}  # fmt: skip
                for kind in ["1 device", "ddp x2"] if ddp else ["1 device"]:
                    try:
                        if kind == "1 device":
                            result = run_one(method, precision, args, batch, cfg)
                        else:
                            result = run_ddp(method, precision, args, batch, cfg, Path(tmp))
                        rows.append({**row, "mode": kind, **result})
                    except Exception as exc:
                        rows.append({**row, "mode": kind, "error": f"{type(exc).__name__}: {exc}"})
                    r = rows[-1]
                    shown = (
                        f"failed: {r['error']}" if "error" in r
                        else f"{r['images_per_s']:8.2f} images/s  peak {r['peak_MB']} MB"
                    )
                    print(f"{method:10s} {row['backbone']:16s} {size:4d} px  batch {batch_size:3d}  "
                          f"{precision:10s} {kind:8s} {shown}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()

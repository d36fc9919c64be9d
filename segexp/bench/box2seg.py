"""Benchmark: Box2Seg costs on this machine.

* GrabCut stage throughput (images/s) with 1 and 2 processes on a synthetic shapes set, each
  from an empty cache (pool start-up included: that is what a user waits for; and without it, the
  pool's own scaling), the spawn pool's start-up on its own, and the machine's 1 -> 2 process
  ceiling (``_parallel``) to judge them by; and the time to reuse the fully cached stage.
* Training-step throughput (images/s, forward + backward + SGD step) of Box2Seg (three heads, all
  loss terms) vs the bare DeepLabV3+ / CE baseline at the same size and backbone.
* Peak memory of the affinity term (forward + backward) at several image sizes vs its stated bound
  (batch x max_pixels^2 x 4 bytes per pairwise tensor) and vs the dense (HW)^2 matrix it avoids.
  On CPU the peak is the growth of the process's peak RSS (``VmHWM``, reset through
  ``/proc/self/clear_refs``); on CUDA ``torch.cuda.max_memory_allocated``.

``python -m segexp.bench box2seg [--quick]``; ``main(argv)`` prints and returns the numbers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def bench_grabcut(num_images: int, size: int, processes: tuple[int, ...] = (1, 2)) -> dict:
    from segexp.bench._parallel import cpu_ceiling, spawn_startup_seconds
    from segexp.data.readers.voc import VOCSegmentation
    from segexp.data.synth import CLASS_NAMES, ensure_synthetic
    from segexp.stages.grabcut import GrabCutStage

    out = {"pool_startup_s": spawn_startup_seconds(max(processes)), **cpu_ceiling()}
    with tempfile.TemporaryDirectory() as tmp:
        root = ensure_synthetic(Path(tmp) / "shapes", num_images=num_images, size=size, seed=0)
        reader = VOCSegmentation(root / "VOCdevkit" / "VOC2012", "train", class_names=CLASS_NAMES)
        for n in processes:
            stage = GrabCutStage(cache_dir=Path(tmp) / f"cache{n}", progress=False)
            t0 = time.perf_counter()
            report = stage.run(reader, evaluate=False, workers=n)
            dt = time.perf_counter() - t0
            out[f"grabcut_{n}proc_images_per_s"] = round(report["computed"] / dt, 2)
            if n > 1:  # the pool's start-up, paid once per run, weighs on a short benchmark only
                compute = dt - out["pool_startup_s"]
                out[f"grabcut_{n}proc_images_per_s_after_startup"] = round(report["computed"] / compute, 2)
        one = out[f"grabcut_{processes[0]}proc_images_per_s"]
        for n in processes[1:]:
            for suffix in ("", "_after_startup"):
                faster = out[f"grabcut_{n}proc_images_per_s{suffix}"]
                out[f"grabcut_speedup_{n}proc{suffix}"] = round(faster / one, 2)
        last = GrabCutStage(cache_dir=Path(tmp) / f"cache{processes[-1]}", progress=False)
        t0 = time.perf_counter()  # everything cached: the runner must not start a pool for nothing
        last.run(reader, evaluate=False, workers=processes[-1])
        out[f"grabcut_reuse_cached_{processes[-1]}proc_s"] = round(time.perf_counter() - t0, 3)
        out["grabcut_images"] = len(reader)
        out["grabcut_image_size"] = size
        stage = GrabCutStage(cache_dir=Path(tmp) / "cache1", progress=False)
        rep = stage.run(reader, evaluate=True, workers=1)
        out["grabcut_pseudo_mIoU"] = round(rep["pseudo"]["mIoU"], 4)
        out["box_rect_mIoU"] = round(rep["box_rect"]["mIoU"], 4)
    return out


def _train_steps(step, params, steps: int, batch: int) -> float:
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    step(opt)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step(opt)
    return steps * batch / (time.perf_counter() - t0)


def bench_training(batch: int, size: int, steps: int) -> dict:
    from segexp.losses.box2seg import Box2SegLoss, box_masks
    from segexp.models.backbone import Backbone
    from segexp.models.box2seg import Box2SegNet
    from segexp.models.deeplab import DeepLabV3Plus
    from segexp.pipeline.compose import compose

    torch.manual_seed(0)
    num_classes = 6
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, num_classes, (batch, size, size))
    boxes = [torch.tensor([[size * 0.1, size * 0.1, size * 0.6, size * 0.7]])] * batch
    labels = [torch.tensor([2])] * batch

    base = DeepLabV3Plus(Backbone("resnet18", output_stride=16), num_classes).train()

    def base_step(opt):
        opt.zero_grad()
        F.cross_entropy(base(x), target).backward()
        opt.step()

    net = Box2SegNet(Backbone("resnet18", output_stride=16), num_classes).train()
    loss_fn = Box2SegLoss(weights=dict(compose(["loss=box2seg"]).loss.weights))  # their one home: the YAML

    def box2seg_step(opt):
        opt.zero_grad()
        out = net(x)
        b = box_masks(boxes, labels, num_classes, (size, size))
        terms = loss_fn(out["seg"], torch.sigmoid(out["att"]), out["emb"], target, b)
        sum(terms.values()).backward()
        opt.step()

    base_ips = _train_steps(base_step, base.parameters(), steps, batch)
    b2s_ips = _train_steps(box2seg_step, net.parameters(), steps, batch)
    return {
        "train_batch": batch,
        "train_size": size,
        "baseline_images_per_s": round(base_ips, 2),
        "box2seg_images_per_s": round(b2s_ips, 2),
        "box2seg_vs_baseline": round(b2s_ips / base_ips, 3),
    }


def _rss_peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bench_affinity_memory(
    batch: int, sizes: tuple[int, ...], max_pixels: int = 1024, stride: int = 8
) -> dict:
    from segexp.losses.box2seg import affinity_loss, affinity_memory_bytes

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    out = {}
    for size in sizes:
        emb = torch.randn(batch, 32, size // 4, size // 4, device=device)
        emb = F.normalize(emb, dim=1).requires_grad_(True)
        probs = torch.softmax(torch.randn(batch, 21, size, size, device=device), 1).requires_grad_(True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
            before = _rss_kib() * 1024
        affinity_loss(emb, probs, image_size=(size, size), stride=stride, max_pixels=max_pixels).backward()
        peak = (torch.cuda.max_memory_allocated() if cuda else _rss_peak_kib() * 1024) - before
        grid = (size // stride) ** 2
        bound = affinity_memory_bytes(batch, (size, size), stride, max_pixels)
        out[f"affinity_{size}px"] = {
            "measured_peak_MiB": round(peak / 2**20, 2),
            "bound_per_pairwise_tensor_MiB": round(bound / 2**20, 2),
            "dense_stride8_grid_MiB": round(batch * grid * grid * 4 / 2**20, 1),
            "dense_full_res_GiB": round(batch * (size * size) ** 2 * 4 / 2**30, 1),
        }
        del emb, probs
    out["affinity_batch"] = batch
    out["affinity_device"] = device
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.quick:
        results = {**bench_grabcut(40, 128), **bench_training(4, 128, 3),
                   **bench_affinity_memory(4, (128, 256))}
    else:
        results = {**bench_grabcut(600, 256), **bench_training(8, 128, 10),
                   **bench_affinity_memory(8, (128, 321, 512))}
    for key, value in results.items():
        print(f"{key:<36} {value}")
    return results


if __name__ == "__main__":
    main()

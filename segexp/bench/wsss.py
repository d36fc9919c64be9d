"""Image-level pipeline throughput: ``python -m segexp.bench.wsss [--quick] [--size 128] [--json out.json]``.

* CAM export: images/s of multi-scale (0.5, 1, 1.5, 2) x flip CAMs (ResNet-18 CAM net, random init:
  the cost does not depend on the weights);
* dense CRF (SEAM settings, 10 iterations, 21 labels): images/s with 1 and 2 processes;
* random walk (rw stage per image: AffinityNet ResNet-18 embedding, dense affinity, beta 8, logt 6, label):
  seconds per image, the size of its dense (hw)^2 matrices and, on CUDA, the allocator's peak.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time

import numpy as np
import torch

from segexp.utils.device import resolve_device


def _crf_job(args):
    from segexp.postprocess.crf import cam_crf_scores, crf_inference

    image, cams = args
    return crf_inference(image, cam_crf_scores(cams, "power", 4.0)).argmax(0)


def bench_cam_export(size: int, n: int) -> dict:
    from segexp.methods.cam import CAMMethod
    from segexp.models.backbone import Backbone
    from segexp.models.cam_head import CAMNet

    torch.manual_seed(0)
    net = CAMNet(Backbone("resnet18", output_stride=8), num_classes=21)
    m = CAMMethod(model=net, num_classes=21, class_names=[str(i) for i in range(21)], schedule={}).eval()
    x = torch.randn(1, 3, size, size)
    labels = torch.zeros(1, 20)
    labels[0, :2] = 1
    m.multiscale_cams(x, labels)  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        m.multiscale_cams(x, labels)
    dt = time.perf_counter() - t0
    return {"size": size, "images": n, "images_per_s": round(n / dt, 3), "passes": "4 scales x flip"}


def bench_crf(size: int, n: int) -> dict:
    rng = np.random.default_rng(0)
    jobs = [
        (rng.integers(0, 255, (size, size, 3), dtype=np.uint8), rng.random((20, size, size), np.float32))
        for _ in range(n)
    ]
    out = {"size": size, "images": n, "labels": 21}
    t0 = time.perf_counter()
    for j in jobs:
        _crf_job(j)
    out["images_per_s_1proc"] = round(n / (time.perf_counter() - t0), 3)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_crf_job, jobs[:2])  # start-up not timed
        t0 = time.perf_counter()
        pool.map(_crf_job, jobs)
        out["images_per_s_2proc"] = round(n / (time.perf_counter() - t0), 3)
    return out


def bench_rw(size: int, n: int) -> dict:
    """The rw stage's per-image work (:func:`segexp.postprocess.rw_stage.random_walk_label`): AffinityNet
    (ResNet-18 at stride 8, random init) -> pair affinities -> dense matrix -> walk -> label, 20 classes."""
    from segexp.methods.affinitynet import AffinityNetMethod
    from segexp.models.affinitynet import AffinityNet
    from segexp.models.backbone import Backbone
    from segexp.postprocess.rw_stage import random_walk_label

    torch.manual_seed(0)
    device = resolve_device()
    net = AffinityNet(Backbone("resnet18", output_stride=8))
    names = [str(i) for i in range(21)]
    method = AffinityNetMethod(model=net, num_classes=21, class_names=names, schedule={})
    method = method.to(device).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    cams = rng.random((20, size, size), dtype=np.float32)
    random_walk_label(method, image, cams, device=device)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(n):
        random_walk_label(method, image, cams, beta=8, logt=6, alpha=6, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / n
    g = -(-size // 8)
    hw = g * g
    out = {
        "size": size,
        "grid": [g, g],
        "device": device,
        "seconds_per_image": round(dt, 4),
        "dense_matrices_MB": round(3 * hw * hw * 4 / 2**20, 2),  # affinity + T + T @ T (fp32)
    }
    if device == "cuda":
        out["peak_cuda_MB"] = round(torch.cuda.max_memory_allocated() / 2**20, 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="image-level WSSS pipeline throughput")
    p.add_argument("--quick", action="store_true", help="few images, small size (CI)")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    size = args.size or (64 if args.quick else 320)
    n = 2 if args.quick else 10
    result = {
        "threads": torch.get_num_threads(),
        "cam_export": bench_cam_export(size, n),
        "crf": bench_crf(size, 2 * n),
        "random_walk": bench_rw(max(size, 320) if not args.quick else size, n),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()

"""Image-level pipeline throughput: ``python -m segexp.bench.wsss [--quick] [--size 128] [--json out.json]``.

* CAM export: images/s of multi-scale (0.5, 1, 1.5, 2) x flip CAMs (ResNet-18 CAM net, random init:
  the cost does not depend on the weights), one image per call and ``--batch`` images of one size per call;
* dense CRF (SEAM settings, 10 iterations, 21 labels): images/s with 1 and 2 processes (pool start-up
  not timed), beside the machine's own 1 -> 2 process ceiling (``_parallel.cpu_ceiling``);
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

from segexp.bench._parallel import cpu_ceiling
from segexp.utils.device import resolve_device


def _crf_job(args):
    """One image's CRF; the worker makes its own inputs (as a stage worker reads its own from the cache),
    so the pool's figure is not the cost of pickling 8 MB of CAMs to it."""
    from segexp.inference.crf import cam_crf_scores, crf_inference

    seed, size = args
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    cams = rng.random((20, size, size), np.float32)
    return crf_inference(image, cam_crf_scores(cams, "power", 4.0)).argmax(0).astype(np.uint8)


def bench_cam_export(size: int, n: int, batch: int = 8) -> dict:
    """The export's passes one image at a time (as the cam stage runs them) and ``batch`` images of one
    size per call (what a batched export would do): images/s of both and their largest difference."""
    from omegaconf import OmegaConf

    from segexp.methods.cam import CAM
    from segexp.models.backbone import Backbone
    from segexp.models.cam_head import CAMNet
    from segexp.pipeline.compose import compose

    torch.manual_seed(0)
    net = CAMNet(Backbone("resnet18", output_stride=8), num_classes=21)
    inference = OmegaConf.to_container(compose(["method=cam"]).method.inference)  # the export passes
    m = CAM(model=net, num_classes=21, class_names=[str(i) for i in range(21)], schedule={},
            inference=inference).eval()  # fmt: skip
    batch = max(1, min(batch, n))
    x = torch.randn(n, 3, size, size)
    labels = (torch.rand(n, 20) < 0.15).float()
    labels[:, 0] = 1
    out = {"size": size, "images": n, "passes": "4 scales x flip", "batch": batch}
    cams = {}
    for b in sorted({1, batch}):
        m.multiscale_cams(x[:b], labels[:b])  # warm-up
        t0 = time.perf_counter()
        cams[b] = torch.cat([m.multiscale_cams(x[i : i + b], labels[i : i + b]) for i in range(0, n, b)])
        out["images_per_s" if b == 1 else "images_per_s_batched"] = round(n / (time.perf_counter() - t0), 3)
    if batch > 1:
        out["batched_speedup"] = round(out["images_per_s_batched"] / out["images_per_s"], 2)
        out["batched_max_abs_diff"] = float((cams[1] - cams[batch]).abs().max())
    return out


def bench_crf(size: int, n: int) -> dict:
    jobs = [(seed, size) for seed in range(n)]
    out = {"size": size, "images": n, "labels": 21}
    # Both figures through a spawn pool (the stage's way), one image per task: with map's default
    # chunks (n / 8), one worker may still have a whole chunk left when the other is done.
    for procs in (1, 2):
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            pool.map(_crf_job, jobs[:procs], chunksize=1)  # start-up not timed
            t0 = time.perf_counter()
            pool.map(_crf_job, jobs, chunksize=1)
            out[f"images_per_s_{procs}proc"] = round(n / (time.perf_counter() - t0), 3)
    out["speedup"] = round(out["images_per_s_2proc"] / out["images_per_s_1proc"], 2)
    return {**out, **cpu_ceiling()}


def bench_rw(size: int, n: int) -> dict:
    """The rw stage's per-image work (:func:`segexp.stages.random_walk.random_walk_label`): AffinityNet
    (ResNet-18 at stride 8, random init) -> pair affinities -> dense matrix -> walk -> label, 20 classes."""
    from segexp.methods.affinitynet import AffinityNetMethod
    from segexp.models.affinitynet import AffinityNet
    from segexp.models.backbone import Backbone
    from segexp.pipeline.compose import compose
    from segexp.stages.random_walk import random_walk_label

    torch.manual_seed(0)
    device = resolve_device()
    net = AffinityNet(Backbone("resnet18", output_stride=8))
    names = [str(i) for i in range(21)]
    weights = dict(compose(["method=affinitynet"]).method.weights)  # their one home: the YAML
    method = AffinityNetMethod(model=net, weights=weights, num_classes=21, class_names=names, schedule={})
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
    out = {"size": size, "grid": [g, g], "device": device, "seconds_per_image": round(dt, 4)}
    if device == "cuda":
        out["peak_cuda_MB"] = round(torch.cuda.max_memory_allocated() / 2**20, 2)
    return out


def _dense_walk(scores: torch.Tensor, affinity: torch.Tensor, beta: float, logt: int) -> torch.Tensor:
    """The released computation (psa / SEAM infer_aff.py), kept here only as the reference: T^(2^logt)
    by logt dense (hw)^2 squarings, then v T."""
    t = affinity.pow(beta)
    t = t / t.sum(0, keepdim=True)
    for _ in range(logt):
        t = t @ t
    return scores.reshape(scores.shape[0], -1) @ t


def bench_rw_methods(height: int = 375, width: int = 500, stride: int = 8, radius: int = 5) -> dict:
    """Sparse walk vs the released dense squarings on one VOC-sized image's grid (21 score rows),
    at SEAM's (logt 6) and psa's (logt 8) settings: seconds, speed-up, same labels, matrix memory."""
    from segexp.inference.random_walk import random_walk, sparse_affinity
    from segexp.models.affinitynet import pair_affinity, pair_indices

    torch.manual_seed(0)
    h, w = -(-height // stride), -(-width // stride)
    src, dst = pair_indices(h, w, radius)
    affinity = sparse_affinity(pair_affinity(torch.randn(1, 32, h, w), src, dst)[0], src, dst, h * w)
    scores = torch.rand(21, h, w)
    dense = affinity.to_dense()
    out = {
        "grid": [h, w],
        "pairs": int(src.numel()),
        "dense_matrix_MB": round(h * w * h * w * 4 / 2**20, 1),  # the reference holds 3 at a time
        "sparse_T_MB": round(affinity.values().numel() * (4 + 2 * 8) / 2**20, 2),  # values + COO indices
    }
    for logt in (6, 8):
        t0 = time.perf_counter()
        reference = _dense_walk(scores, dense, 8.0, logt).reshape(21, h, w)
        t_dense = time.perf_counter() - t0
        t0 = time.perf_counter()
        walked = random_walk(scores, affinity, beta=8.0, logt=logt)
        t_sparse = time.perf_counter() - t0
        out[f"logt{logt}"] = {
            "dense_s": round(t_dense, 3),
            "sparse_s": round(t_sparse, 4),
            "speedup": round(t_dense / t_sparse, 1),
            "same_labels": bool(torch.equal(walked.argmax(0), reference.argmax(0))),
            "max_rel_diff": float(((walked - reference).abs().max() / reference.abs().max()).item()),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="image-level WSSS pipeline throughput")
    p.add_argument("--quick", action="store_true", help="few images, small size (CI)")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--batch", type=int, default=8, help="images of one size per CAM-export call")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    size = args.size or (64 if args.quick else 320)
    n = 2 if args.quick else 10
    result = {
        "threads": torch.get_num_threads(),
        "cam_export": bench_cam_export(size, n if args.quick else 2 * args.batch, args.batch),
        "crf": bench_crf(size, 4 * n),  # 40 images: the last image, one worker alone, weighs 1/40
        "random_walk": bench_rw(max(size, 320) if not args.quick else size, n),
        "random_walk_vs_dense": bench_rw_methods(*((120, 160) if args.quick else (375, 500))),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()

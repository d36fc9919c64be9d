"""FBR costs: ``python -m segexp.bench.fbr [--quick]``.

* NROI clustering: per-image k-means (k 8) of a batch's background-pixel features, our batched torch
  k-means (:func:`segexp.losses.fbr.nroi_centroids`, one call for the batch) vs scikit-learn
  ``KMeans`` called once per image as released (``n_init=1``, the >= 1.4 "auto" default for
  k-means++, and ``n_init=10``, the older default), with the inertia of both (quality check).
  Target: the clustering must not dominate an FBR step.
* FBR step overhead: one training step (forward + backward) of ``method=fbr`` / ``method=fbr_ppc``
  vs the same step with every FBR weight 0 (the SEAM / PPC base) on a ResNet-18 CAM network (CPU,
  random init).
"""

from __future__ import annotations

import argparse
import time

import torch


def _bg_batch(n: int, grid: int, dim: int, bg_fraction: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # a few well-separated modes per image, like background "stuff" regions
    centers = torch.randn(n, 6, dim, generator=g) * 3
    assign = torch.randint(0, 6, (n, grid * grid), generator=g)
    x = centers[torch.arange(n)[:, None], assign] + torch.randn(n, grid * grid, dim, generator=g)
    feats = x.transpose(1, 2).reshape(n, dim, grid, grid).relu()
    bg = torch.rand(n, grid, grid, generator=g) < bg_fraction
    return feats, bg


def _inertia(x: torch.Tensor, centers: torch.Tensor) -> float:
    return float(torch.cdist(x, centers).min(1)[0].pow(2).sum())


def bench_kmeans(n: int, grid: int, dim: int = 128, k: int = 8, repeats: int = 3) -> dict:
    from sklearn.cluster import KMeans

    from segexp.losses.fbr import nroi_centroids

    feats, bg = _bg_batch(n, grid, dim, 0.6)
    per_image = [feats[i].flatten(1).T[bg[i].flatten()] for i in range(n)]
    nroi_centroids(feats, bg, k)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        ours = nroi_centroids(feats, bg, k, n_init=1, max_iter=300)
    t_ours = (time.perf_counter() - t0) / repeats
    p = f"kmeans{grid}_"  # one block of keys per grid size
    out = {
        f"{p}batch": f"{n} images, {grid}x{grid} grid, {dim}-d, k={k}, ~60% background",
        f"{p}torch_batched_ms": round(1000 * t_ours, 1),
        f"{p}torch_inertia": round(
            sum(_inertia(x, ours[i * k : (i + 1) * k]) for i, x in enumerate(per_image)), 1
        ),
    }
    for n_init in (1, 10):
        t0 = time.perf_counter()
        for _ in range(repeats):
            centers = [
                KMeans(n_clusters=k, n_init=n_init, random_state=0).fit(x.numpy()).cluster_centers_
                for x in per_image
            ]
        out[f"{p}sklearn_n_init{n_init}_ms"] = round(1000 * (time.perf_counter() - t0) / repeats, 1)
        out[f"{p}sklearn_n_init{n_init}_inertia"] = round(
            sum(_inertia(x, torch.from_numpy(c).float()) for x, c in zip(per_image, centers)), 1
        )
    return out


def bench_step(batch: int, size: int, steps: int) -> dict:
    """One step of each base without / with FBR (``*_base`` rows: every FBR weight 0)."""
    from segexp.methods.fbr import FBR, FBRPPC
    from segexp.models.backbone import Backbone
    from segexp.models.fbr import FBRNet

    out = {"step_setting": f"ResNet-18 OS8, batch {batch}, {size} px, 6 classes, mean of {steps} steps"}
    off = {"sim": 0.0, "bg_seg": 0.0, "nroi": 0.0, "fg": 0.0}
    rows = (
        ("seam_base", FBR, off, {}),
        ("fbr", FBR, {}, {}),
        ("fbr_quirks", FBR, {}, {}),
        ("ppc_base", FBRPPC, off, {"view_size": max(16, size * 2 // 7)}),  # released 128 / 448
        ("fbr_ppc", FBRPPC, {}, {"view_size": max(16, size * 2 // 7)}),
    )
    for name, cls, weights, extra in rows:
        torch.manual_seed(0)
        net = FBRNet(Backbone("resnet18", output_stride=8), num_classes=6, background_first=True, pcm={})
        m = cls(
            model=net,
            num_classes=6,
            class_names=[str(i) for i in range(6)],
            schedule={},
            weights=weights,
            official_quirks=name == "fbr_quirks",
            contrast_size=size // 8,
            **extra,
        ).train()
        x = torch.randn(batch, 3, size, size)
        labels = (torch.rand(batch, 5) < 0.4).float()
        labels[:, 0] = 1
        b = {"image": x, "labels": labels, "saliency": torch.rand(batch, size, size)}
        sum(m.compute_losses(b).values()).backward()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            sum(m.compute_losses(b).values()).backward()
        out[f"step_{name}_s"] = round((time.perf_counter() - t0) / steps, 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        results = {**bench_kmeans(4, 16, repeats=1), **bench_step(2, 64, 1)}
    else:
        results = {**bench_kmeans(8, 16), **bench_kmeans(8, 56, repeats=1), **bench_step(8, 96, 3)}
    for key, value in results.items():
        print(f"{key:<36} {value}")
    return results


if __name__ == "__main__":
    main()

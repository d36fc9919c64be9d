"""SC-CAM sub-category discovery cost: ``python -m segexp.bench.sccam [--quick] [--json out.json]``.

* feature extraction (:class:`~segexp.stages.subcategory.FeatureStage`): images/s of the
  GAP feature of a CAM network's backbone, one image at a time at its own size (as the stage runs);
  random init (the cost does not depend on the weights);
* clustering: seconds for ``n`` x ``dim`` features (default 10,000 x 2,048) into K = 10 clusters,
  ``n_init`` = 10, ``max_iter`` = 300, seed 0, with each backend of the stage
  (:func:`~segexp.stages.subcategory.kmeans_labels`: ``sklearn`` = ``KMeans(algorithm="lloyd")``,
  ``torch`` = :func:`segexp.utils.kmeans.kmeans` on ``--device``) on a planted Gaussian mixture;
  parity = inertia ratio and adjusted Rand index between the two partitions (determinism for a seed
  is a test: ``tests/test_kmeans.py``, ``tests/test_sccam.py``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from segexp.utils.device import resolve_device


def _method_cfg(backbone: str) -> dict:
    return {
        "_target_": "segexp.methods.cam.CAM",
        "num_classes": 21,
        "class_names": [str(i) for i in range(21)],
        "schedule": {},
        "model": {
            "_target_": "segexp.models.cam_head.CAMNet",
            "backbone": {"_target_": "segexp.models.backbone.Backbone", "name": backbone, "output_stride": 8},
            "num_classes": 21,
        },
    }


def bench_features(backbone: str, size: int, n: int, device: str) -> dict:
    from segexp.stages.subcategory import FeatureStage

    stage = FeatureStage(_method_cfg(backbone), ckpt_path=None, device=device, progress=False)
    rng = np.random.default_rng(0)
    samples = [
        {"image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "labels": np.ones(20)}
        for _ in range(n)
    ]
    feature = stage.compute(samples[0])["feature"]  # warm-up (and builds the network)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in samples:
        stage.compute(s)
    dt = time.perf_counter() - t0
    return {
        "backbone": backbone,
        "size": size,
        "images": n,
        "device": device,
        "dim": int(feature.shape[0]),
        "images_per_s": round(n / dt, 3),
    }


def planted_mixture(n: int, dim: int, k: int, seed: int = 0) -> np.ndarray:
    """``n`` points around ``k`` random centres (unit noise, centres at spread 1.5 per dimension)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.5, (k, dim)).astype(np.float32)
    return (centres[rng.integers(0, k, n)] + rng.normal(0, 1, (n, dim))).astype(np.float32)


def _timed_kmeans(
    x: np.ndarray, k: int, backend: str, n_init: int, device: str
) -> tuple[float, np.ndarray, float]:
    from segexp.stages.subcategory import kmeans_labels

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    labels, inertia = kmeans_labels(x, k, backend, n_init, 0, 300, 1e-4, device)
    return time.perf_counter() - t0, labels, inertia


def bench_clustering(n: int, dim: int, k: int, n_init: int, device: str) -> dict:
    from sklearn.metrics import adjusted_rand_score

    x = planted_mixture(n, dim, k)
    sk_s, sk_labels, sk_inertia = _timed_kmeans(x, k, "sklearn", n_init, "cpu")
    torch_s, torch_labels, torch_inertia = _timed_kmeans(x, k, "torch", n_init, device)
    return {
        "points": n,
        "dim": dim,
        "k": k,
        "n_init": n_init,
        "sklearn_s": round(sk_s, 3),
        "torch_device": device,
        "torch_s": round(torch_s, 3),
        "inertia_ratio_torch_over_sklearn": round(torch_inertia / sk_inertia, 6),
        "adjusted_rand_torch_vs_sklearn": round(float(adjusted_rand_score(sk_labels, torch_labels)), 6),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="SC-CAM feature extraction and clustering cost")
    p.add_argument("--quick", action="store_true", help="small sizes (CI)")
    p.add_argument(
        "--backbone", default="resnet18", help="timm name of the feature network (released: resnet38d)"
    )
    p.add_argument("--size", type=int, default=None, help="image side for feature extraction")
    p.add_argument("--points", type=int, default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    size = args.size or (64 if args.quick else 320)
    result = {
        "threads": torch.get_num_threads(),
        "features": bench_features(args.backbone, size, 3 if args.quick else 20, device),
        "clustering": bench_clustering(
            args.points or (1000 if args.quick else 10_000),
            args.dim or (64 if args.quick else 2048),
            10,
            2 if args.quick else 10,
            device,
        ),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        from segexp.utils.atomic import write_json

        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()

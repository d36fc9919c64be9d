"""Benchmark: bottom-up entity segmentation costs on this machine.

* Mean-shift: our batched spherical mean-shift (segexp.inference.meanshift) vs scikit-learn's
  ``MeanShift`` on the same features of a 128x128 map (``--quick``: 64x64): planted entities
  (Voronoi cells, each a random orthogonal line in D = 128, Gaussian noise). Ours gets the
  features with random antipodal flips (it is sign-invariant); sklearn, whose Euclidean kernel is
  not, gets them sign-canonicalised towards a common reference, with the chord bandwidth of a
  45 degree angle (``2 sin(22.5 deg)``, the same neighbourhoods). Reported: time of each, the
  speed ratio (target >= 20x), agreement with each other and with the truth (adjusted Rand index,
  and whether the partitions are identical up to relabelling), cluster counts.
* Loss cost: one training step (forward + backward + SGD) of the bottom-up network (ResNet-18,
  64-channel decoder) with all loss terms vs the same network with a bare ``mean()`` loss (the
  network alone; the two alternate, medians), and each term alone (forward + backward on a fixed
  map; each includes the target lines), for the paper's loss settings (D = 128, eigh, ReCo 256 x
  512) and the CPU shapes run's.

``python -m segexp.bench bottomup [--quick] [--only loss --setting paper --steps 5]``; at the paper's
resolution: ``-- --only loss --setting paper --size 512 --batch 2 --backbone paper --steps 2``
(a fixed-size ReCo weighs less against a 512-px step). ``main(argv)`` prints and returns the numbers.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F


def planted_map(size: int, k: int = 8, d: int = 128, noise_angle_deg: float = 12.0, seed: int = 0):
    """(features (size*size, D) unit with random signs, truth labels, reference-signed features)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:, :k].T
    sites = torch.rand(k, 2, generator=g) * size
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pix = torch.stack([yy, xx], -1).reshape(-1, 2).float()
    truth = torch.cdist(pix, sites).argmin(1)
    sigma = math.tan(math.radians(noise_angle_deg)) / math.sqrt(d)  # typical noise angle
    x = F.normalize(centres[truth] + sigma * torch.randn(len(truth), d, generator=g), dim=1)
    ref = F.normalize(centres.sum(0), dim=0)
    canonical = x * torch.sign(x @ ref)[:, None]
    flipped = x * torch.where(torch.rand(len(x), generator=g) < 0.5, -1.0, 1.0)[:, None]
    return flipped, truth, canonical


def _identical(a, b) -> bool:
    import numpy as np

    pairs = np.unique(np.stack([a, b]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def bench_meanshift(size: int, sklearn_repeats: int = 1) -> dict:
    from sklearn.cluster import MeanShift
    from sklearn.metrics import adjusted_rand_score

    from segexp.inference.meanshift import spherical_meanshift

    flipped, truth, canonical = planted_map(size)
    spherical_meanshift(flipped[:1000], generator=torch.Generator().manual_seed(0))  # warm-up
    t0 = time.perf_counter()
    ours, modes = spherical_meanshift(flipped, bandwidth_deg=45.0, generator=torch.Generator().manual_seed(0))
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(sklearn_repeats):
        ref = MeanShift(bandwidth=2 * math.sin(math.radians(22.5))).fit(canonical.numpy()).labels_
    t_sk = (time.perf_counter() - t0) / sklearn_repeats
    ours_np, truth_np = ours.numpy(), truth.numpy()
    return {
        "map": f"{size}x{size}x128",
        "ours_s": round(t_ours, 3),
        "sklearn_s": round(t_sk, 3),
        "speedup": round(t_sk / t_ours, 1),
        "ari_ours_vs_sklearn": round(adjusted_rand_score(ref, ours_np), 4),
        "identical_ours_vs_sklearn": _identical(ref, ours_np),
        "ari_ours_vs_truth": round(adjusted_rand_score(truth_np, ours_np), 4),
        "ari_sklearn_vs_truth": round(adjusted_rand_score(truth_np, ref), 4),
        "clusters_ours": int(len(modes)),
        "clusters_sklearn": int(len(set(ref.tolist()))),
        "clusters_truth": int(len(truth.unique())),
    }


SETTINGS = {
    # the paper's D and the ReCo defaults, exact eigenvectors
    "paper": {
        "embed_dim": 128,
        "lines": {"solver": "eigh"},
        "contrast": {"num_queries": 256, "num_negatives": 512},
    },
    # conf/experiment/bottomup_shapes.yaml (the CPU run)
    "shapes_cpu": {
        "embed_dim": 32,
        "lines": {"solver": "power"},
        "contrast": {"num_queries": 64, "num_negatives": 64},
    },
}
WEIGHTS = {"attraction": 1, "repulsion": 1, "contrast": 0.125, "mse": 0.025, "grad": 0.05, "reg": 1.0}


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_loss(batch: int, size: int, steps: int, setting: str, backbone: str = "resnet18") -> dict:
    """Training-step time with all terms vs a bare ``mean()`` loss (medians over ``steps``
    alternating pairs; the overhead is the median of the pairs' ratios), and each term's own cost
    (forward + backward of the loss alone on a fixed feature map)."""
    from segexp.losses.bottomup import BottomUpLoss
    from segexp.models.backbone import Backbone
    from segexp.models.bottomup import BottomUpNet

    cfg = SETTINGS[setting]
    torch.manual_seed(0)
    if backbone == "paper":  # the paper experiment's own network (ConvNeXt-B, RefineNet 256), one builder
        import hydra

        from segexp.pipeline.compose import compose

        paper = compose(["+experiment=bottomup_coco_ade", "backbone.pretrained=false"])
        net = hydra.utils.instantiate(paper.method.model).train()
        backbone = f"{paper.backbone.name} (bottomup_coco_ade's network)"
    else:
        net = BottomUpNet(
            Backbone(backbone, out_indices=[1, 2, 3, 4]), embed_dim=cfg["embed_dim"], decoder_channels=64
        ).train()
    loss_fn = BottomUpLoss(weights=WEIGHTS, lines=cfg["lines"], contrast=cfg["contrast"])
    x = torch.randn(batch, 3, size, size)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ent = ((yy * 3 // size) * 3 + (xx * 3 // size) + 1)[None].repeat(batch, 1, 1)  # 9 entities
    ent[:, : size // 8] = 0  # a background band
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)

    def step(full: bool) -> None:
        opt.zero_grad()
        raw = net(x)
        total = sum(loss_fn(raw, ent)[0].values()) if full else raw.mean()
        total.backward()
        opt.step()

    def timed(fn) -> float:
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return round((time.perf_counter() - t0) / steps, 3)

    out = {
        "setting": f"{setting}: {backbone}, batch {batch}, {size}px, D={cfg['embed_dim']}, "
        f"9 entities + background, {cfg['lines']['solver']}, ReCo "
        f"{cfg['contrast']['num_queries']}x{cfg['contrast']['num_negatives']}"
    }
    # bare and full steps alternate, so that the load of a shared machine weighs on both alike
    step(False), step(True)  # warm-up
    pairs = []
    for _ in range(steps):
        pairs.append([_seconds(lambda full=full: step(full)) for full in (False, True)])
    out["bare_step_s"] = round(statistics.median(b for b, _ in pairs), 3)
    out["full_loss_step_s"] = round(statistics.median(f for _, f in pairs), 3)
    out["loss_overhead_x"] = round(statistics.median(f / b for b, f in pairs), 2)
    with torch.no_grad():
        raw = net(x)
    for term in WEIGHTS:
        alone = BottomUpLoss(weights={term: 1.0}, lines=cfg["lines"], contrast=cfg["contrast"])
        leaf = raw.detach().requires_grad_()
        out[f"term_{term}_s"] = timed(lambda fn=alone, f=leaf: sum(fn(f, ent)[0].values()).backward())
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m segexp.bench bottomup", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["meanshift", "loss"], help="run one of the two parts")
    parser.add_argument("--setting", choices=list(SETTINGS), help="loss: one setting only")
    parser.add_argument("--steps", type=int, help="loss: alternating step pairs (default 3, quick 1)")
    parser.add_argument("--size", type=int, help="loss: px (default 128, quick 64; the paper trains at 512)")
    parser.add_argument("--batch", type=int, help="loss: images per step (default 8, quick 2)")
    parser.add_argument("--backbone", default="resnet18",
                        help="loss: timm name, or 'paper': bottomup_coco_ade's network")  # fmt: skip
    args = parser.parse_args(argv)
    batch, size, steps = (2, 64, 1) if args.quick else (8, 128, 3)
    batch, size = args.batch or batch, args.size or size
    results = {}
    if args.only != "loss":
        results["meanshift"] = bench_meanshift(64 if args.quick else 128)
    if args.only != "meanshift":
        for setting in [args.setting] if args.setting else SETTINGS:
            results[f"loss_{setting}"] = bench_loss(batch, size, args.steps or steps, setting, args.backbone)
    for section, numbers in results.items():
        print(f"[{section}]")
        for k, v in numbers.items():
            print(f"  {k}: {v}")
    return results


if __name__ == "__main__":
    main()

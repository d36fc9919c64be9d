"""Benchmark: our metrics against their references, same inputs, one run, side by side.

* SOD: :class:`segexp.metrics.sod.SODMetrics` vs ``py_sod_metrics`` (Fmeasure, MAE, Smeasure,
  Emeasure, WeightedFmeasure stepped per image, as PySODEvalToolkit does) on random uint8
  map/GT pairs -- largest absolute difference per metric, seconds and the speed ratio. The two
  are timed chunk by chunk in alternation so that both see the same machine load; wall time
  and process CPU time (all threads) are both reported.
* mIoU: :class:`segexp.metrics.semantic.ConfusionMatrix` vs a plain numpy ``bincount`` (21 classes).
* Boundary IoU: throughput of :class:`segexp.metrics.boundary.BoundaryIoU` (image pairs / s).

``main(argv)`` prints a report and returns the numbers; ``--quick`` uses 100 pairs.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from segexp.metrics.boundary import BoundaryIoU
from segexp.metrics.semantic import ConfusionMatrix
from segexp.metrics.sod import SODMetrics

SOD_KEYS = ("MAE", "maxF", "meanF", "adpF", "S", "maxE", "meanE", "adpE", "wF")


def random_pairs(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """GT: 1-3 random ellipses (0/255); prediction: blurred GT with noise and a random gain."""
    yy, xx = np.mgrid[:size, :size]
    gts = np.zeros((n, size, size), np.uint8)
    preds = np.empty((n, size, size), np.uint8)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.1, 0.9, 2) * size
            ry, rx = rng.uniform(0.05, 0.3, 2) * size
            gts[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = 255
        noise = rng.normal(0, rng.uniform(10, 80), (size, size))
        shift = rng.integers(-size // 20, size // 20 + 1, 2)
        preds[i] = np.clip(np.roll(gts[i], tuple(shift), (0, 1)) * rng.uniform(0.4, 1.0) + noise + 30, 0, 255)
    return preds, gts


def _reference_step(ref, preds, gts, normalize=True):
    for p, g in zip(preds, gts):
        for m in ref.values():
            m.step(p, g, normalize=normalize)


def _reference_results(ref) -> dict:
    f, e = ref["fm"].get_results()["fm"], ref["em"].get_results()["em"]
    return {"MAE": ref["mae"].get_results()["mae"], "maxF": f["curve"].max(), "meanF": f["curve"].mean(),
            "adpF": f["adp"], "S": ref["sm"].get_results()["sm"], "maxE": e["curve"].max(),
            "meanE": e["curve"].mean(), "adpE": e["adp"], "wF": ref["wfm"].get_results()["wfm"]}


def bench_sod(n: int, size: int, batch: int, seed: int, float_maps: bool = False) -> dict:
    import py_sod_metrics as psm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = {"fm": psm.Fmeasure(), "mae": psm.MAE(), "sm": psm.Smeasure(), "em": psm.Emeasure(),
               "wfm": psm.WeightedFmeasure()}
    ours = SODMetrics()
    rng = np.random.default_rng(seed)
    t_ref = t_ours = c_ref = c_ours = 0.0
    for start in range(0, n, batch):
        preds, gts = random_pairs(rng, min(batch, n - start), size)
        if float_maps:  # the reference's normalize=False path: float32 maps in [0,1], bool GT
            preds, gts = (preds / 255).astype(np.float32), gts > 128
        w0, c0 = time.perf_counter(), time.process_time()
        _reference_step(ref, preds, gts, normalize=not float_maps)
        w1, c1 = time.perf_counter(), time.process_time()
        ours.update(torch.from_numpy(preds), torch.from_numpy(gts))
        w2, c2 = time.perf_counter(), time.process_time()
        t_ref, t_ours = t_ref + w1 - w0, t_ours + w2 - w1
        c_ref, c_ours = c_ref + c1 - c0, c_ours + c2 - c1
    w0 = time.perf_counter()
    got = ours.compute()
    t_ours += time.perf_counter() - w0
    want = _reference_results(ref)
    diffs = {k: abs(got[k] - float(want[k])) for k in SOD_KEYS}
    return {"n": n, "size": size, "ours": {k: got[k] for k in SOD_KEYS},
            "ref": {k: float(v) for k, v in want.items()}, "max_abs_diff": diffs,
            "seconds_ours": t_ours, "seconds_ref": t_ref,
            "cpu_seconds_ours": c_ours, "cpu_seconds_ref": c_ref, "maxF_pr": got["maxF_pr"]}


def bench_miou(n: int, size: int, num_classes: int, seed: int, chunk: int = 50) -> dict:
    rng = np.random.default_rng(seed)
    m = ConfusionMatrix(num_classes)
    cm = np.zeros((num_classes, num_classes), np.int64)
    t_ours = t_np = 0.0
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        target = rng.integers(0, num_classes, (k, size, size), dtype=np.uint8)
        target[rng.random(target.shape) < 0.05] = 255
        pred = np.where(rng.random(target.shape) < 0.7, np.minimum(target, num_classes - 1),
                        rng.integers(0, num_classes, target.shape, dtype=np.uint8)).astype(np.uint8)
        t0 = time.perf_counter()
        m.update(torch.from_numpy(pred), torch.from_numpy(target))
        t1 = time.perf_counter()
        valid = target != 255
        cm += np.bincount(target[valid].astype(np.int64) * num_classes + pred[valid],
                          minlength=num_classes**2).reshape(num_classes, num_classes)
        t2 = time.perf_counter()
        t_ours, t_np = t_ours + t1 - t0, t_np + t2 - t1
    ours = m.compute()
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    ref_miou = float(np.mean(inter[union > 0] / union[union > 0]))
    return {"n": n, "identical_confmat": bool(np.array_equal(m.confmat.numpy(), cm)),
            "mIoU": ours["mIoU"], "mIoU_numpy": ref_miou, "seconds_ours": t_ours, "seconds_numpy": t_np}


def bench_boundary(n: int, size: int, seed: int) -> dict:
    _, gts = random_pairs(np.random.default_rng(seed), n, size)
    preds = np.roll(gts, 3, axis=2) > 128
    m = BoundaryIoU()
    t0 = time.perf_counter()
    for i in range(0, n, 16):
        m.update(torch.from_numpy(preds[i:i + 16]), torch.from_numpy(gts[i:i + 16] > 128))
    value = float(m.compute())
    dt = time.perf_counter() - t0
    return {"n": n, "size": size, "boundary_iou": value, "seconds": dt, "images_per_s": n / dt}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="segexp.bench.metrics", description=__doc__.split("\n")[0])
    ap.add_argument("--num", type=int, default=1000, help="number of map/GT pairs")
    ap.add_argument("--size", type=int, default=320, help="side of the square maps")
    ap.add_argument("--batch", type=int, default=10, help="pairs per chunk (the sides alternate)")
    ap.add_argument("--float-maps", action="store_true", help="float32 maps instead of uint8 (PNG-like)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="100 pairs")
    args = ap.parse_args(argv)
    n = 100 if args.quick else args.num

    sod = bench_sod(n, args.size, args.batch, args.seed, args.float_maps)
    kind = "float32" if args.float_maps else "uint8"
    print(f"SOD metrics: {n} pairs of {args.size}x{args.size} {kind} maps (ours vs py_sod_metrics)")
    print(f"  {'metric':6s} {'ours':>12s} {'reference':>12s} {'|diff|':>10s}")
    for k in SOD_KEYS:
        print(f"  {k:6s} {sod['ours'][k]:12.8f} {sod['ref'][k]:12.8f} {sod['max_abs_diff'][k]:10.2e}")
    print(f"  (maxF_pr, F of the mean P/R curves: {sod['maxF_pr']:.6f}; maxF above is maxF_curve)")
    ratio = sod["seconds_ref"] / sod["seconds_ours"]
    cpu_ratio = sod["cpu_seconds_ref"] / max(sod["cpu_seconds_ours"], 1e-9)
    print(f"  wall: ours {sod['seconds_ours']:.2f} s ({1e3 * sod['seconds_ours'] / n:.2f} ms/img), "
          f"reference {sod['seconds_ref']:.2f} s ({1e3 * sod['seconds_ref'] / n:.2f} ms/img) -> {ratio:.1f}x")
    print(f"  cpu : ours {sod['cpu_seconds_ours']:.2f} s, reference {sod['cpu_seconds_ref']:.2f} s "
          f"-> {cpu_ratio:.1f}x   (torch threads {torch.get_num_threads()})")
    sod["speedup_wall"], sod["speedup_cpu"] = ratio, cpu_ratio

    miou = bench_miou(n, args.size, 21, args.seed)
    print(f"mIoU: {n} label maps, 21 classes: ours {miou['mIoU']:.8f} vs numpy {miou['mIoU_numpy']:.8f}, "
          f"confusion matrices identical: {miou['identical_confmat']}; "
          f"{miou['seconds_ours']:.2f} s vs {miou['seconds_numpy']:.2f} s")

    bnd = bench_boundary(n, args.size, args.seed)
    print(f"Boundary IoU: {n} mask pairs of {args.size}x{args.size}: {bnd['images_per_s']:.0f} pairs/s "
          f"(mean Boundary IoU {bnd['boundary_iou']:.4f})")
    return {"sod": sod, "miou": miou, "boundary": bnd}


if __name__ == "__main__":
    main()

"""Evaluate saliency maps of several methods on several datasets, like the community toolkits.

    python -m segexp.sod_eval --pred-root DIR --gt-root DIR --methods A B --datasets X Y --out OUT

Layout: ``pred_root/<method>/<dataset>/<stem>.{png,jpg,bmp}`` (what ``segexp.eval ... dump.predictions=true``
writes for CAS/LDF under ``<run dir>/saliency``) and ``gt_root/<dataset>/<stem>.{png,jpg,bmp}``
(``--gt-dir`` names another folder per dataset); files are matched by stem, every GT needs a
prediction (a missing one is an error naming the expected file). GTs are read as 8-bit
grayscale with ``cv2.imread(..., IMREAD_GRAYSCALE)``; predictions at their own depth
(``IMREAD_ANYDEPTH``; colour files converted to grey by OpenCV, as for 8 bits). A prediction whose
size differs from its GT is resized to the GT size with bilinear interpolation
(``cv2.INTER_LINEAR``) -- metrics are always computed at GT resolution. 8-bit maps then follow the
``uint8`` conventions of :mod:`segexp.metrics.sod` (``/ 255`` and a per-image min-max stretch, GT
``> 128``), i.e. PySODMetrics'. 16-bit maps (PNG) are read at full precision: ``/ 65535``, the same
per-image min-max stretch in float64, then the float path of the metrics (an 8-bit reader would
keep the high byte only; PySODMetrics' ``cv2.imread(.., IMREAD_GRAYSCALE)`` does that).

Writes to ``OUT``: ``results.md``, ``results.csv``, ``results.tex`` (rows: methods; columns:
dataset x MAE, maxF, meanF, adpF, S, maxE, meanE, adpE, wF; "maxF" is the max of the
image-averaged F curve, as PySODEvalToolkit reports), ``results.json`` (all numbers, with
``maxF_pr`` and the curves; curve index i is threshold i, 0 -> 255, the reverse of the MATLAB
toolbox's and PySODMetrics' 255 -> 0 order), and ``curves_<dataset>.png`` with the PR curves and the
F-measure-versus-threshold curves of all methods.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from segexp.metrics.sod import SODMetrics

__all__ = ["main", "evaluate", "TABLE_METRICS"]

TABLE_METRICS = ("MAE", "maxF", "meanF", "adpF", "S", "maxE", "meanE", "adpE", "wF")
LOWER_IS_BETTER = {"MAE"}
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def _index(folder: Path) -> dict[str, Path]:
    """stem -> file for the image files of ``folder`` (an error if a stem appears twice)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    out: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() in EXTENSIONS:
            if f.stem in out:
                raise ValueError(f"{folder}: two files with stem {f.stem!r} ({out[f.stem].name}, {f.name})")
            out[f.stem] = f
    return out


def _read_gray(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError(f"{path}: cannot decode image")
    return img


def _read_map(path: Path) -> np.ndarray:
    """A saliency map: uint8 as stored, or a 16-bit map as float64 in [0, 1] (``/ 65535`` and the
    per-image min-max stretch the uint8 path applies inside the metrics)."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if img is None:
        raise ValueError(f"{path}: cannot decode image")
    if img.dtype == np.uint8:
        return img
    if img.dtype != np.uint16:
        raise ValueError(f"{path}: unsupported saliency map depth {img.dtype} (8 or 16 bit)")
    x = img.astype(np.float64) / 65535.0
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi != lo else x


def _read_pair(pred_path: Path, gt_path: Path) -> tuple[np.ndarray, np.ndarray]:
    gt = _read_gray(gt_path)
    pred = _read_map(pred_path)
    if pred.shape != gt.shape:
        pred = cv2.resize(pred, (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_LINEAR)
        if pred.dtype != np.uint8:  # bilinear stays within [min, max] up to rounding
            pred = np.clip(pred, 0.0, 1.0)
    return pred, gt


def evaluate(pred_dir: Path, gt_dir: Path, batch_size: int = 16, workers: int = 4) -> dict:
    """All SOD numbers of one method on one dataset (see :func:`segexp.metrics.sod.summarise`)."""
    gts = _index(gt_dir)
    if not gts:
        raise ValueError(f"{gt_dir}: no ground-truth images")
    preds = _index(pred_dir)
    pairs = []
    for stem, gt_path in gts.items():
        if stem not in preds:
            raise FileNotFoundError(f"missing prediction {pred_dir / (stem + '.png')} for GT {gt_path}")
        pairs.append((preds[stem], gt_path))
    metric = SODMetrics()
    buckets: dict[tuple, list] = defaultdict(list)  # batches need equal sizes and map types

    def flush(key):
        p, g = zip(*buckets.pop(key))
        metric.update(np.stack(p), np.stack(g))

    with ThreadPoolExecutor(workers) as pool:
        for pred, gt in pool.map(lambda pg: _read_pair(*pg), pairs):
            key = (gt.shape, pred.dtype.str)  # uint8 and float maps take different metric paths
            buckets[key].append((pred, gt))
            if len(buckets[key]) == batch_size:
                flush(key)
    for key in list(buckets):
        flush(key)
    return metric.compute()


# ----------------------------------------------------------------------------- outputs

def _best(results, datasets, methods) -> dict:
    best = {}
    for d in datasets:
        for m in TABLE_METRICS:
            vals = [results[meth][d][m] for meth in methods]
            best[d, m] = min(vals) if m in LOWER_IS_BETTER else max(vals)
    return best


def write_tables(results: dict, methods: list[str], datasets: list[str], out: Path, digits: int = 3) -> None:
    """Markdown (best in bold), CSV (full precision) and LaTeX (best in bold) tables."""
    best = _best(results, datasets, methods)
    fmt = lambda v: f"{v:.{digits}f}"
    cols = [f"{d} {m}" for d in datasets for m in TABLE_METRICS]
    md = ["| Method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for meth in methods:
        cells = []
        for d in datasets:
            for m in TABLE_METRICS:
                v = results[meth][d][m]
                cells.append(f"**{fmt(v)}**" if fmt(v) == fmt(best[d, m]) and len(methods) > 1 else fmt(v))
        md.append(f"| {meth} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(md) + "\n")

    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", *[f"{d}/{m}" for d in datasets for m in TABLE_METRICS]])
        for meth in methods:
            w.writerow([meth, *[repr(results[meth][d][m]) for d in datasets for m in TABLE_METRICS]])

    esc = lambda s: s.replace("_", r"\_").replace("&", r"\&").replace("%", r"\%")
    k = len(TABLE_METRICS)
    tex = [r"\begin{tabular}{l" + ("|" + "c" * k) * len(datasets) + "}", r"\hline",
           "Method & " + " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{esc(d)}}}" for d in datasets) + r" \\",
           " & " + " & ".join(m for _ in datasets for m in TABLE_METRICS) + r" \\", r"\hline"]
    for meth in methods:
        cells = []
        for d in datasets:
            for m in TABLE_METRICS:
                v = fmt(results[meth][d][m])
                cells.append(rf"\textbf{{{v}}}" if v == fmt(best[d, m]) and len(methods) > 1 else v)
        tex.append(esc(meth) + " & " + " & ".join(cells) + r" \\")
    tex += [r"\hline", r"\end{tabular}"]
    (out / "results.tex").write_text("\n".join(tex) + "\n")


def plot_curves(results: dict, methods: list[str], dataset: str, path: Path) -> None:
    """PR curves and F-measure vs threshold for every method on one dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_pr, ax_f) = plt.subplots(1, 2, figsize=(11, 4.5))
    thr = np.arange(256)
    for meth in methods:
        r = results[meth][dataset]
        ax_pr.plot(r["recall"], r["precision"], label=meth)
        ax_f.plot(thr, r["f_curve"], label=f"{meth} (maxF {r['maxF']:.3f})")
    ax_pr.set(xlabel="Recall", ylabel="Precision", title=f"{dataset}: PR curves", xlim=(0, 1), ylim=(0, 1.02))
    ax_f.set(xlabel="Threshold", ylabel="F-measure", title=f"{dataset}: F-measure vs threshold",
             xlim=(0, 255), ylim=(0, 1.02))
    for ax in (ax_pr, ax_f):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _jsonable(r: dict) -> dict:
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m segexp.sod_eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--pred-root", type=Path, required=True, help="<pred-root>/<method>/<dataset>/<stem>.png")
    ap.add_argument("--gt-root", type=Path, required=True, help="<gt-root>/<gt-dir>/<stem>.png")
    ap.add_argument(
        "--gt-dir",
        default="{dataset}",
        help="each dataset's GT folder under --gt-root, '{dataset}' replaced by its name "
        "(default: %(default)s); the synthetic set: --gt-root <data root>/SOD --gt-dir test/Mask",
    )
    ap.add_argument("--methods", nargs="+", required=True)
    ap.add_argument("--datasets", nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--digits", type=int, default=3)
    args = ap.parse_args(argv)

    results: dict = {m: {} for m in args.methods}
    for d in args.datasets:
        for m in args.methods:
            gt_dir = args.gt_root / args.gt_dir.format(dataset=d)
            results[m][d] = evaluate(args.pred_root / m / d, gt_dir, args.batch_size)
            print(f"{m:>16s} {d:>12s}  " + "  ".join(f"{k} {results[m][d][k]:.3f}" for k in TABLE_METRICS))
    args.out.mkdir(parents=True, exist_ok=True)
    write_tables(results, args.methods, args.datasets, args.out, args.digits)
    for d in args.datasets:
        plot_curves(results, args.methods, d, args.out / f"curves_{d}.png")
    (args.out / "results.json").write_text(json.dumps(
        {m: {d: _jsonable(r) for d, r in per.items()} for m, per in results.items()}, indent=1))
    return results


if __name__ == "__main__":
    main()

"""Where the attention terms' cost on clean masks lies: test mIoU of each job's best checkpoint on the
test images whose boxes of *different* classes overlap vs the rest (results.md, fully supervised section).

    python experiments/study_box2seg/overlap_split.py logs/train/multiruns/study_box2seg_fullsup_r0.0

Prints one Markdown row per (missing_rate, variant): mean +- std over the seeds of mIoU and fg_class_acc on
each group, and the overall test mIoU as a check against the job's metrics.json.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf

import segexp.resolvers  # noqa: F401 - the saved config's resolvers
from segexp.data.readers.voc import VOCSegmentation
from segexp.data.transforms import image_tensor
from segexp.metrics.semantic import confusion_matrix, foreground_scores, scores_from_confusion
from segexp.utils.checkpoints import load_method


def cross_class_overlap(boxes: np.ndarray, labels: np.ndarray) -> bool:
    """Whether two boxes of different classes intersect (x0, y0, x1, y1)."""
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if labels[i] == labels[j]:
                continue
            a, b = boxes[i], boxes[j]
            if min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1]):
                return True
    return False


def job_scores(job: Path) -> tuple[tuple[str, str], dict[str, float]]:
    cfg = OmegaConf.load(job / "config.yaml")
    overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
    root = Path(OmegaConf.select(cfg, "data.prepare.root")) / "VOCdevkit" / "VOC2012"
    names = list(cfg.data.class_names)
    reader = VOCSegmentation(root, "test", keys=["image", "mask", "boxes", "box_labels"], class_names=names)
    ckpt = sorted((job / "checkpoints").glob("epoch_*.ckpt"))[-1]  # the best: what its test/mIoU used
    method = load_method(ckpt, OmegaConf.to_container(cfg.method, resolve=True))
    cms = {g: torch.zeros(len(names), len(names), dtype=torch.long) for g in ("overlap", "rest")}
    out = {"n_overlap": 0}
    with torch.no_grad():
        for i in range(len(reader)):
            s = reader[i]
            pred = method.predict(image_tensor(s["image"])).argmax(1)
            group = "overlap" if cross_class_overlap(s["boxes"], s["box_labels"]) else "rest"
            out["n_overlap"] += group == "overlap"
            target = torch.from_numpy(s["mask"].astype(np.int64))[None]
            cms[group] += confusion_matrix(pred, target, len(names))
    for g, cm in cms.items():
        out[f"mIoU_{g}"] = scores_from_confusion(cm)["mIoU"]
        out[f"fg_class_acc_{g}"] = foreground_scores(cm)["fg_class_acc"]
    out["mIoU_all"] = scores_from_confusion(cms["overlap"] + cms["rest"])["mIoU"]
    return (overrides["missing_rate"], overrides["variant"]), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path)
    args = parser.parse_args()
    rows: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    for sweep in args.sweeps:
        for job in sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file()):
            key, scores = job_scores(job)
            rows[key].append(scores)
    keys = ["mIoU_overlap", "mIoU_rest", "fg_class_acc_overlap", "fg_class_acc_rest", "mIoU_all"]
    print("| missing_rate | variant | n | images with overlap | " + " | ".join(keys) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(keys))
    for (rate, variant), runs in rows.items():
        cells = [f"{statistics.mean(r[k] for r in runs):.3f} ± {statistics.stdev(r[k] for r in runs):.3f}"
                 for k in keys]  # fmt: skip
        print(f"| {rate} | {variant} | {len(runs)} | {runs[0]['n_overlap']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

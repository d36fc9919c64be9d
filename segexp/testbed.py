"""``python -m segexp.testbed diagnose RUN_DIR``: measure a trained CAM network on its testbed mechanism.

Why: the testbed's sets are built so that a paper's problem appears (segexp/data/testbed.py); these
diagnostics say whether it did, for any trained image-level run (cam, seam, sccam, ppc, fbr ...):

* co-occurrence set: share of the class's CAM (> 0.5) on its co-occurring stuff (val images that show
  both), the classifier's false-positive rate on stuff-only images and its miss rate on class-only
  images (the test split's counterfactuals), next to the rates where the pairing holds;
* part set: CAM recall on the badge and on the body, and the badge's share of the object's CAM; and
  SC-CAM's question, whether the body sub-types form clusters: per-class k-means (K = the body
  sub-types one class has, as SC-CAM clusters) of the network's features of the train images (global
  average of the backbone's last map, SC-CAM's feature), purity against each image's body sub-type, next
  to the purity of putting every image in one cluster; and, for a run trained on sub-categories
  (SC-CAM's k-means clusters, the probe's true or shuffled sub-types), the purity of those
  (``parts/trained_subcategories``).

Everything is read from the generated root's files (VOC JPEG/PNG, COCO panoptic for the stuff kinds,
COCO instances ``attributes.badge`` for the badges). ``--root`` diagnoses a run on another root, e.g.
a model trained without the mechanism on the co-occurrence set; ``--ckpt init`` reads the network the
run started from (e.g. whether sub-types cluster before any training). The report is printed and written to
``RUN_DIR/testbed_diagnostics.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pycocotools import mask as coco_mask

from segexp.data.io import IGNORE_INDEX, read_image, read_label_png, read_split_file, rgb_to_id
from segexp.data.synth import (
    CLASS_NAMES,
    COMPLETE_MARKER,
    STUFF_NAMES,
    SynthLayout,
    body_subtypes,
    stuff_category_id,
)
from segexp.data.testbed import Testbed
from segexp.metrics.testbed import DIAGNOSTICS_FILE, CoocDiagnostics, PartDiagnostics, subtype_purity
from segexp.utils.atomic import write_json

__all__ = ["DiagnosticsCallback", "diagnose", "diagnose_method", "main", "trained_subcategory_purity"]


def _checkpoint(run_dir: Path, which: str) -> Path:
    if which not in ("last", "best"):
        return Path(which)
    if which == "last":
        return run_dir / "checkpoints" / "last.ckpt"
    best = sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    if not best:
        raise FileNotFoundError(f"no epoch_*.ckpt in {run_dir / 'checkpoints'}; pass --ckpt last or a path")
    return best[-1]


def _run_config(run_dir: Path):
    import segexp.resolvers  # noqa: F401 - the config's resolvers

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: RUN_DIR must be a segexp.train run directory")
    return OmegaConf.load(config)


def _load_run(run_dir: Path, which: str):
    """The run's method (from its saved config.yaml) with the chosen checkpoint's weights, and its root."""
    from segexp.utils.checkpoints import load_method

    cfg = _run_config(run_dir)
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    root = Path(OmegaConf.select(cfg, "data.prepare.root", throw_on_resolution_failure=True))
    if which == "init":
        return _initial_method(method_cfg, int(cfg.seed)), root
    return load_method(_checkpoint(run_dir, which), method_cfg), root


def _initial_method(method_cfg: dict[str, Any], seed: int):
    """The network a run starts from: its config instantiated under its seed - the random init, or
    the weights of ``backbone.pretrained`` - so a probe can be read before and after training."""
    import hydra

    pl.seed_everything(seed, verbose=False)
    return hydra.utils.instantiate(method_cfg).eval()


class _Root:
    """Per-image reads of a generated root (real files, the writer's layout)."""

    def __init__(self, root: Path):
        self.layout = SynthLayout(root)
        marker = root / COMPLETE_MARKER
        if not marker.is_file():
            raise FileNotFoundError(f"{marker} not found: {root} is not a complete synthetic set")
        self.testbed = Testbed.from_dict(json.loads(marker.read_text())["testbed"])

    def images(self, split: str, limit: int | None) -> Iterator[dict[str, Any]]:
        ids = read_split_file(self.layout.voc_split_file(split))[:limit]
        panoptic = json.loads(self.layout.coco_panoptic_json(split).read_text())
        segments = {Path(a["file_name"]).stem: a["segments_info"] for a in panoptic["annotations"]}
        instances = json.loads(self.layout.coco_instances_json(split).read_text())
        by_image: dict[int, list] = {}
        for ann in instances["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        image_ids = {Path(im["file_name"]).stem: im["id"] for im in instances["images"]}
        for sid in ids:
            ids_map = rgb_to_id(read_label_png(self.layout.coco_panoptic_png(split, sid)))
            stuff = {name: np.zeros(ids_map.shape, bool) for name in STUFF_NAMES}
            for seg in segments[sid]:
                for s, name in enumerate(STUFF_NAMES):
                    if seg["category_id"] == stuff_category_id(s):
                        stuff[name] |= ids_map == seg["id"]
            yield {
                "id": sid,
                "image": read_image(self.layout.voc_jpeg(sid)),
                "semantic": read_label_png(self.layout.voc_class_png(sid)),
                "stuff": stuff,
                "objects": by_image.get(image_ids[sid], []),
            }


@torch.no_grad()
def _cams_and_probabilities(method, image: np.ndarray, present: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Label-masked normalised single-scale CAMs (K, H, W) and class probabilities (K,)."""
    from segexp.data.transforms import image_tensor

    x = image_tensor(image)
    labels = torch.zeros(1, len(CLASS_NAMES) - 1)
    labels[0, [c - 1 for c in present]] = 1
    cams = method.single_scale_cams(x, labels)[0].numpy()
    probabilities = torch.sigmoid(method.fg_logits(method(x)["cam"]))[0].numpy()
    return cams, probabilities


def _cooc_report(method, root: _Root, limit: int | None) -> dict[str, Any]:
    report = {}
    for cls_name, stuff_name in root.testbed.cooc.pairs.items():
        c = CLASS_NAMES.index(cls_name)
        diag = CoocDiagnostics()
        for split in ("val", root.testbed.cooc.counterfactual_split or "test"):
            for item in root.images(split, limit):
                present = sorted({int(v) for v in np.unique(item["semantic"]) if 0 < v < IGNORE_INDEX})
                has_class, has_stuff = c in present, bool(item["stuff"][stuff_name].any())
                cams, probabilities = _cams_and_probabilities(method, item["image"], present)
                group = ("class_on_stuff" if has_stuff else "class_without_stuff") if has_class else (
                    "stuff_without_class" if has_stuff else "neither")  # fmt: skip
                diag.update_score(group, probabilities[c - 1])
                if group == "class_on_stuff" and split == "val":
                    diag.update_cam(cams[c - 1], item["stuff"][stuff_name], item["semantic"] == c)
        report[f"{cls_name}/{stuff_name}"] = diag.report()
    return report


def _decode(rle: dict[str, Any]) -> np.ndarray:
    return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def _parts_report(method, root: _Root, limit: int | None) -> dict[str, Any]:
    diag = PartDiagnostics()
    for item in root.images("val", limit):
        present = sorted({int(ann["category_id"]) for ann in item["objects"]})
        cams, _ = _cams_and_probabilities(method, item["image"], present)
        for ann in item["objects"]:
            badge, obj = _decode(ann["attributes"]["badge"]), _decode(ann["segmentation"])
            diag.update(cams[ann["category_id"] - 1], badge, obj)
    return {**diag.report(), **_subtype_purity(method, root, limit)}


@torch.no_grad()
def _subtype_purity(method, root: _Root, limit: int | None) -> dict[str, float]:
    """Per-class k-means of the train images' features vs the body sub-type of each class's largest object."""
    from segexp.data.transforms import image_tensor
    from segexp.stages.subcategory import cluster_per_class

    bodies = body_subtypes(root.layout.root, "train")
    features, labels, subtypes = [], [], []
    for item in root.images("train", limit):
        features.append(method.model.backbone(image_tensor(item["image"]))[-1].mean((2, 3))[0].numpy())
        subtypes.append(bodies[item["id"]])
        labels.append([float(body != "") for body in subtypes[-1]])
    k = len(root.testbed.parts.bodies_of(1))  # the sub-types one class has (all bodies, or its window)
    clusters, _ = cluster_per_class(np.stack(features), np.array(labels), k)
    return {**subtype_purity(clusters, subtypes), "k": k}


def trained_subcategory_purity(
    dataset: Any, root: str | Path, split: str = "train"
) -> dict[str, float] | None:
    """Purity of the sub-categories a run trained on (SC-CAM's k-means clusters, or the probe's true or
    shuffled sub-types) against the part set's body sub-types, beside one cluster per class; None when
    no train wrapper of ``dataset`` gives sub-categories. ``k``: the most clusters one class has."""
    reader = dataset
    while reader is not None and not hasattr(type(reader), "subcategory_clusters"):
        reader = reader.__dict__.get("reader")  # the wrapped reader, without a wrapper's delegation
    if reader is None:
        return None
    clusters = reader.subcategory_clusters()
    bodies = body_subtypes(Path(root), split)
    return {**subtype_purity(clusters, [bodies[i] for i in reader.ids]), "k": int(clusters.max()) + 1}


def diagnose(run_dir: str | Path, root: str | Path | None = None, ckpt: str = "last",
             limit: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The mechanism diagnostics of a run (see the module docstring)."""
    run_dir = Path(run_dir)
    method, run_root = _load_run(run_dir, ckpt)
    report = {"run": str(run_dir), "ckpt": ckpt, **diagnose_method(method, root or run_root, limit)}
    if "parts" in report and ckpt != "init":
        trained = _run_subcategory_purity(_run_config(run_dir))
        if trained is not None:
            report["parts"]["trained_subcategories"] = trained
    return report


def _run_subcategory_purity(cfg) -> dict[str, float] | None:
    """:func:`trained_subcategory_purity` of a run's train split, rebuilt from its saved config (the
    sub-categories are read from the stage cache, or clustered again as in training)."""
    from segexp.runner import build_datamodule

    if not cfg.data.get("train_wrappers"):
        return None
    dataset = build_datamodule(cfg).build_dataset("train")
    return trained_subcategory_purity(dataset, cfg.data.prepare.root, cfg.data.splits.train)


def diagnose_method(method, root: str | Path, limit: int | None = None) -> dict[str, Any]:
    """The mechanism diagnostics of a method (eval mode) on a generated root."""
    data = _Root(Path(root))
    report: dict[str, Any] = {"root": str(data.layout.root)}
    if data.testbed.cooc is not None:
        report["cooc"] = _cooc_report(method, data, limit)
    if data.testbed.parts is not None:
        report["parts"] = _parts_report(method, data, limit)
    if len(report) == 1:
        raise ValueError(f"{data.layout.root}: its testbed has neither cooc nor parts; nothing to diagnose")
    return report


class DiagnosticsCallback(pl.Callback):
    """Runs the diagnostics on the trained network at the end of ``fit`` and writes them to
    ``<run>/testbed_diagnostics.json``, which ``segexp.report`` reads beside ``metrics.json`` (as
    ``testbed/...``): a study's multirun then tabulates them like any metric
    (``conf/study/testbed_diagnostics.yaml``). On a part set it adds
    the purity of the sub-categories the run trained on (:func:`trained_subcategory_purity`), which only
    the training data knows: ``parts/trained_subcategories/...``."""

    def __init__(
        self, root: str | Path, output_dir: str | Path, limit: int | None = None, split: str = "train"
    ):
        self.root, self.output_dir, self.limit, self.split = Path(root), Path(output_dir), limit, split

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        was_training = pl_module.training
        pl_module.eval()
        report = diagnose_method(pl_module.cpu(), self.root, self.limit)
        pl_module.to(trainer.strategy.root_device).train(was_training)
        datasets = getattr(trainer.datamodule, "datasets", {})
        if "parts" in report and "train" in datasets:
            trained = trained_subcategory_purity(datasets["train"], self.root, self.split)
            if trained is not None:
                report["parts"]["trained_subcategories"] = trained
        write_json(self.output_dir / DIAGNOSTICS_FILE, {"ckpt": "end of fit", **report})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segexp.testbed", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("diagnose", help="mechanism diagnostics of a trained image-level run")
    d.add_argument("run_dir", type=Path, help="a segexp.train run directory (config.yaml + checkpoints/)")
    d.add_argument("--root", type=Path, help="another generated root to diagnose on (default: the run's)")
    d.add_argument("--ckpt", default="last",
                   help="last | best | a checkpoint path | init (the network before training: the run's "
                        "config under its seed, pretrained weights included)")  # fmt: skip
    d.add_argument("--max-images", type=int, help="per split (default: all)")
    args = parser.parse_args(argv)
    try:
        report = diagnose(args.run_dir, args.root, args.ckpt, args.max_images)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json(args.run_dir / DIAGNOSTICS_FILE, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

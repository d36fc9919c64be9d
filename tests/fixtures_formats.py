"""Writers of tiny datasets in the real on-disk layouts, for the reader and check tests.

Each writer returns the arrays it wrote, so tests compare what a reader yields with the truth
instead of with another decoding of the same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segexp.data.io import (
    VOCObject,
    voc_palette,
    write_jpeg,
    write_palette_png,
    write_rgb_png,
)
from segexp.utils.atomic import write_text

VOC_IDS = ("2007_000032", "2008_000002", "2011_003276")


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth colour gradient (JPEG keeps it within a few levels), different for every seed."""
    base = np.random.default_rng(seed).integers(40, 160, size=3)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = (yy * 40 // max(h, 1) + xx * 40 // max(w, 1))[..., None]
    return (base + ramp).astype(np.uint8)


def voc_sample(index: int, h: int = 24, w: int = 32) -> dict:
    """Two rectangles (classes 1+index and 15 = person) with a 255 void band around the first."""
    mask = np.zeros((h, w), np.uint8)
    inst = np.zeros((h, w), np.uint8)
    c1 = 1 + index
    mask[3:10, 4:14] = 255
    mask[4:9, 5:13] = c1
    inst[3:10, 4:14] = 255
    inst[4:9, 5:13] = 1
    mask[12:20, 18:30] = 15
    inst[12:20, 18:30] = 2
    # VOC XML corners are 1-based inclusive: object pixels x 5..12 -> xmin 6, xmax 13.
    objects = [
        VOCObject(name=_voc_name(c1), box=(6, 5, 13, 9)),
        VOCObject(name="person", box=(19, 13, 30, 20), difficult=index == 1),
    ]
    boxes = np.array([[5, 4, 13, 9], [18, 12, 30, 20]], np.float32)
    return {
        "image": random_image(h, w, index),
        "mask": mask,
        "instances": inst,
        "objects": objects,
        "boxes": boxes,
        "box_labels": np.array([c1, 15], np.int64),
        "classes": {c1, 15},
    }


def _voc_name(c: int) -> str:
    from segexp.data.readers.voc import VOC_CLASSES

    return VOC_CLASSES[c]


def write_voc_tree(root: Path, ids=VOC_IDS, splits=None, jpeg_quality: int = 100) -> dict[str, dict]:
    """A VOC2012 folder with palette masks, objects, XML and split lists; returns the truth by id."""
    root = Path(root)
    splits = splits or {"train": list(ids[:2]), "val": list(ids[2:]), "trainval": list(ids)}
    truth = {}
    for i, image_id in enumerate(ids):
        s = voc_sample(i)
        h, w = s["mask"].shape
        write_jpeg(root / "JPEGImages" / f"{image_id}.jpg", s["image"], quality=jpeg_quality)
        write_palette_png(root / "SegmentationClass" / f"{image_id}.png", s["mask"])
        write_palette_png(root / "SegmentationObject" / f"{image_id}.png", s["instances"])
        write_voc_xml_text(root / "Annotations" / f"{image_id}.xml", image_id, w, h, s["objects"])
        truth[image_id] = s
    for name, members in splits.items():
        write_text(root / "ImageSets" / "Segmentation" / f"{name}.txt", "\n".join(members) + "\n")
    return truth


def write_voc_xml_text(path: Path, image_id: str, w: int, h: int, objects, float_coords: bool = True) -> None:
    """Hand-written XML like the awkward real files: float corners, empty ``<difficult/>``."""
    parts = [
        "<annotation>",
        "  <folder>VOC2012</folder>",
        f"  <filename>{image_id}.jpg</filename>",
        f"  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>",
        "  <segmented>1</segmented>",
    ]
    for o in objects:
        coords = [f"{v:.1f}" if float_coords else str(int(v)) for v in o.box]
        difficult = "<difficult>1</difficult>" if o.difficult else "<difficult/>"
        parts += [
            "  <object>",
            f"    <name>{o.name}</name><pose>Unspecified</pose><truncated>0</truncated>{difficult}",
            "    <bndbox>"
            + "".join(f"<{t}>{c}</{t}>" for t, c in zip(("xmin", "ymin", "xmax", "ymax"), coords))
            + "</bndbox>",
            "  </object>",
        ]
    parts.append("</annotation>")
    write_text(path, "\n".join(parts) + "\n")


def write_rgb_mask(path: Path, index: np.ndarray) -> None:
    """A VOC mask stored as RGB colours instead of palette indices (as some mirrors ship it)."""
    write_rgb_png(path, voc_palette()[index])


CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"


def data_config(name: str, data_dir: Path, overrides: dict | None = None):
    """``conf/data/<name>.yaml`` resolved against ``paths.data_dir`` (of its defaults list only the
    synthetic generator block is kept, so this tests the reader wiring without the transform configs).

    ``overrides`` maps dotted keys below ``data`` to values, like command-line overrides.
    """
    from omegaconf import OmegaConf

    import segexp.resolvers  # noqa: F401 - the root name's resolver

    data = OmegaConf.load(CONF_DATA / f"{name}.yaml")
    if any("synth@prepare" in entry for entry in data.pop("defaults", []) if not isinstance(entry, str)):
        data.prepare = OmegaConf.load(CONF_DATA / "synth" / "default.yaml")
    cfg = OmegaConf.create({"paths": {"data_dir": str(data_dir)}, "data": data})
    for key, value in (overrides or {}).items():
        OmegaConf.update(cfg, f"data.{key}", value, force_add=True)
    OmegaConf.resolve(cfg)
    return cfg.data


def reader_from_config(
    name: str, data_dir: Path, split_key: str = "train", keys=None, node: str = "reader", overrides=None
):
    """Build the reader exactly as the DataModule does: ``instantiate(reader)(split=..., keys=...)``."""
    from hydra.utils import instantiate

    data = data_config(name, data_dir, overrides)
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.select(data, node))(split=data.splits[split_key], keys=keys)


# ---------------------------------------------------------------------------------------------
# COCO instances / panoptic
# ---------------------------------------------------------------------------------------------


def uncompressed_rle(binary: np.ndarray) -> dict:
    """COCO's uncompressed RLE (as crowd annotations store it): column-major runs, zeros first."""
    flat = binary.astype(np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(binary.shape), "counts": counts}


def compressed_rle(binary: np.ndarray) -> dict:
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rect(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    out = np.zeros((h, w), bool)
    out[y0:y1, x0:x1] = True
    return out


COCO_CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
]


def write_coco_instances(root: Path, split: str = "val2017", h: int = 20, w: int = 30) -> dict:
    """Three images: polygons, compressed RLE, a crowd uncompressed RLE, an annotation with id 0,
    an image without annotations and a sparse category id (90). Returns the expected maps."""
    root = Path(root)
    images = [
        {"id": 1, "file_name": "000000000001.jpg", "width": w, "height": h},
        {"id": 2, "file_name": "000000000002.jpg", "width": w, "height": h},
        {"id": 42, "file_name": "000000000042.jpg", "width": w, "height": h},
    ]
    for i, info in enumerate(images):
        write_jpeg(root / split / info["file_name"], random_image(h, w, i), quality=100)
    car = rect(h, w, 12, 4, 20, 12)  # RLE
    crowd = rect(h, w, 18, 10, 28, 18)  # crowd, partly under the car
    annotations = [
        # id 0 is a valid annotation id; polygon [2,2)-(10,16) covers pixels x 2..9, y 2..15
        {"id": 0, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 112.0,
         "segmentation": [[2, 2, 10, 2, 10, 16, 2, 16]], "bbox": [2, 2, 8, 14]},
        {"id": 5, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 64.0,
         "segmentation": compressed_rle(car), "bbox": [12, 4, 8, 8]},
        {"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 80.0,
         "segmentation": uncompressed_rle(crowd), "bbox": [18, 10, 10, 8]},
        # float polygon coordinates, two parts of one object
        {"id": 9, "image_id": 42, "category_id": 90, "iscrowd": 0, "area": 40.0,
         "segmentation": [[1.0, 1.0, 5.0, 1.0, 5.0, 6.0, 1.0, 6.0], [20, 10, 25, 10, 25, 15, 20, 15]],
         "bbox": [1.0, 1.0, 24.0, 14.0]},
    ]  # fmt: skip
    write_json_file(
        root / "annotations" / f"instances_{split}.json",
        {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES},
    )
    person = rect(h, w, 2, 2, 10, 16)
    mask1 = np.zeros((h, w), np.uint8)
    mask1[crowd] = 255
    mask1[car] = 2
    mask1[person] = 1
    inst1 = np.zeros((h, w), np.int32)
    inst1[car] = 2
    inst1[person] = 1
    tooth = rect(h, w, 1, 1, 5, 6) | rect(h, w, 20, 10, 25, 15)
    return {
        1: {"mask": mask1, "instances": inst1,
            "boxes": np.array([[2, 2, 10, 16], [12, 4, 20, 12]], np.float32), "box_labels": [1, 2],
            "labels": [1, 1, 0]},
        2: {"mask": np.zeros((h, w), np.uint8), "instances": np.zeros((h, w), np.int32),
            "boxes": np.zeros((0, 4), np.float32), "box_labels": [], "labels": [0, 0, 0]},
        42: {"mask": tooth.astype(np.uint8) * 3, "instances": tooth.astype(np.int32),
             "boxes": np.array([[1, 1, 25, 15]], np.float32), "box_labels": [3], "labels": [0, 0, 1]},
    }  # fmt: skip


def write_json_file(path: Path, obj) -> None:
    import json

    write_text(path, json.dumps(obj))


PANOPTIC_CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 3, "name": "car", "isthing": 1},
    {"id": 184, "name": "tree-merged", "isthing": 0},
    {"id": 187, "name": "sky-other-merged", "isthing": 0},
]


def write_coco_panoptic(root: Path, split: str = "val2017", h: int = 16, w: int = 24) -> dict:
    """Two images with RGB-encoded segment ids that use all three bytes, things, stuff, a crowd
    segment and unlabeled pixels. Returns per image id: the expected instances and mask."""
    from segexp.data.io import id_to_rgb

    root = Path(root)
    truth = {}
    images, annotations = [], []
    # segment ids chosen so R, G and B all matter (a reader decoding only R would merge them)
    ids = [0x0A0B0C, 0x0A0B0D, 0x010000 * 7 + 3, 0x000100 * 9, 0x0C0B0A]
    for n, image_id in enumerate((3, 11)):
        info = {"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": w, "height": h}
        write_jpeg(root / split / info["file_name"], random_image(h, w, 10 + n), quality=100)
        seg = np.zeros((h, w), np.int64)  # 0 = unlabeled
        seg[:8, :] = ids[0]  # sky (stuff)
        seg[8:, :] = ids[1]  # tree (stuff)
        seg[2:12, 3:9] = ids[2]  # person
        seg[6:14, 12:20] = ids[3]  # car, crowd on the second image
        seg[:, 22:] = 0  # unlabeled strip
        segments = [
            {"id": ids[2], "category_id": 1, "iscrowd": 0},
            {"id": ids[3], "category_id": 3, "iscrowd": int(n == 1)},
            {"id": ids[0], "category_id": 187, "iscrowd": 0},
            {"id": ids[1], "category_id": 184, "iscrowd": 0},
            {"id": ids[4], "category_id": 3, "iscrowd": 0},  # listed but has no pixels
        ]
        write_rgb_png(root / "annotations" / f"panoptic_{split}" / f"{image_id:012d}.png", id_to_rgb(seg))
        images.append(info)
        annotations.append(
            {"image_id": image_id, "file_name": f"{image_id:012d}.png", "segments_info": segments}
        )
        entity = {ids[2]: 1, ids[3]: 2, ids[0]: 3, ids[1]: 4}
        classes = {ids[2]: 1, ids[3]: 2, ids[0]: 4, ids[1]: 3}  # contiguous in id order: 1,3,184,187
        instances = np.zeros((h, w), np.int32)
        mask = np.full((h, w), 255, np.uint8)
        for sid in entity:
            instances[seg == sid] = entity[sid]
            mask[seg == sid] = classes[sid]
        truth[image_id] = {"instances": instances, "mask": mask, "crowd_entity": 2 if n == 1 else None}
    write_json_file(
        root / "annotations" / f"panoptic_{split}.json",
        {"images": images, "annotations": annotations, "categories": PANOPTIC_CATEGORIES},
    )
    return truth


# ---------------------------------------------------------------------------------------------
# Salient-object sets
# ---------------------------------------------------------------------------------------------


def write_sod_set(
    root: Path, image_dir: str = "images", mask_dir: str = "gt", h: int = 18, w: int = 26
) -> dict:
    """Four images in every awkward encoding real SOD sets use; returns the expected saliency by stem.

    a: .jpg image + 8-bit 0/255 .png mask     b: .png image + 16-bit .png mask (soft values)
    c: .jpg image + RGB .bmp mask              d: .bmp image + 1-bit .png mask
    """
    from PIL import Image

    root = Path(root)
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    (root / mask_dir).mkdir(parents=True, exist_ok=True)
    obj = rect(h, w, 4, 3, 15, 12)
    truth = {}
    write_jpeg(root / image_dir / "a.jpg", random_image(h, w, 1), quality=100)
    Image.fromarray(obj.astype(np.uint8) * 255, mode="L").save(root / mask_dir / "a.png")
    truth["a"] = obj.astype(np.float32)

    Image.fromarray(random_image(h, w, 2)).save(root / image_dir / "b.png")
    soft = (obj * 65535).astype(np.uint16)
    soft[0, 0] = 32768
    Image.fromarray(soft).save(root / mask_dir / "b.png")  # uint16 -> 16-bit PNG
    truth["b"] = soft.astype(np.float32) / 65535.0

    write_jpeg(root / image_dir / "c.jpg", random_image(h, w, 3), quality=100)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[obj] = (255, 255, 255)
    Image.fromarray(rgb, mode="RGB").save(root / mask_dir / "c.bmp")
    truth["c"] = obj.astype(np.float32)

    Image.fromarray(random_image(h, w, 4)).save(root / image_dir / "d.bmp")
    Image.fromarray(obj).convert("1").save(root / mask_dir / "d.png")
    truth["d"] = obj.astype(np.float32)
    return truth


# ---------------------------------------------------------------------------------------------
# SBD (benchmark_RELEASE/dataset) and the VOC-aug lists
# ---------------------------------------------------------------------------------------------

SBD_ID = "2011_000010"


def write_sbd_mats(
    sbd_root: Path, image_id: str, instances: np.ndarray, categories, semantic: np.ndarray
) -> None:
    """``inst/<id>.mat`` and ``cls/<id>.mat`` as SBD stores them (MATLAB structs GTinst / GTcls)."""
    from scipy.io import savemat

    sbd_root = Path(sbd_root)
    (sbd_root / "inst").mkdir(parents=True, exist_ok=True)
    (sbd_root / "cls").mkdir(parents=True, exist_ok=True)
    boundaries = np.empty((len(categories), 1), dtype=object)
    for k in range(len(categories)):
        boundaries[k, 0] = np.zeros((1, 1), np.uint8)
    gtinst = {
        "Segmentation": instances.astype(np.uint8),
        "Boundaries": boundaries,
        "Categories": np.asarray(categories, np.uint8).reshape(-1, 1),
    }
    savemat(sbd_root / "inst" / f"{image_id}.mat", {"GTinst": gtinst})
    gtcls = {
        "Segmentation": semantic.astype(np.uint8),
        "CategoriesPresent": np.unique(semantic[semantic > 0]),
    }
    savemat(sbd_root / "cls" / f"{image_id}.mat", {"GTcls": gtcls})


def write_voc_aug(voc_root: Path, sbd_root: Path, truth: dict) -> dict:
    """Add SegmentationClassAug, pair-format train_aug/val lists and one SBD-only id to a VOC tree.

    The SBD-only id has a JPEG but no XML, SegmentationClass or SegmentationObject, like most
    train_aug ids; its instances and classes live in SBD .mat files. Returns its truth.
    """
    from segexp.data.io import write_gray_png

    voc_root = Path(voc_root)
    h, w = 24, 32
    inst = np.zeros((h, w), np.uint8)
    inst[2:8, 3:12] = 1  # a cat (8)
    inst[10:22, 15:31] = 2  # a dog (12)
    inst[14:18, 1:4] = 3  # another cat
    semantic = np.array([0, 8, 12, 8], np.uint8)[inst]
    write_jpeg(voc_root / "JPEGImages" / f"{SBD_ID}.jpg", random_image(h, w, 7), quality=100)
    write_gray_png(voc_root / "SegmentationClassAug" / f"{SBD_ID}.png", semantic)
    write_sbd_mats(sbd_root, SBD_ID, inst, [8, 12, 8], semantic)
    for image_id, t in truth.items():
        write_gray_png(voc_root / "SegmentationClassAug" / f"{image_id}.png", t["mask"])
    ids = list(truth)
    pair = "/JPEGImages/{0}.jpg /SegmentationClassAug/{0}.png\n"
    lists = voc_root / "ImageSets" / "SegmentationAug"
    write_text(lists / "train_aug.txt", "".join(pair.format(i) for i in [*ids[:2], SBD_ID]))
    write_text(lists / "val.txt", "".join(pair.format(i) for i in ids[2:]))
    return {
        "instances": inst.astype(np.int32),
        "mask": semantic,
        "boxes": np.array([[3, 2, 12, 8], [15, 10, 31, 22], [1, 14, 4, 18]], np.float32),
        "box_labels": np.array([8, 12, 8]),
    }


# ---------------------------------------------------------------------------------------------
# ADE20K
# ---------------------------------------------------------------------------------------------


def write_ade_challenge(root: Path, split: str = "validation", h: int = 12, w: int = 16) -> dict:
    """ADEChallengeData2016 with 8-bit class PNGs (0 = other) and R/G instance PNGs."""
    from segexp.data.io import write_gray_png

    root = Path(root)
    truth = {}
    for n in range(2):
        stem = f"ADE_{'val' if split == 'validation' else 'train'}_{n + 1:08d}"
        raw = np.zeros((h, w), np.uint8)  # 0 = other
        raw[:6, :] = 3  # sky
        raw[6:, :8] = 150  # flag (the last class)
        raw[6:, 8:] = 13  # person
        inst_rgb = np.zeros((h, w, 3), np.uint8)
        inst_rgb[6:, 8:12] = (13, 40, 0)  # person, instance code 40
        inst_rgb[6:, 12:] = (13, 7, 0)  # another person, code 7
        inst_rgb[0, 0] = (0, 9, 0)  # an instance code without category: not an instance
        write_jpeg(root / "images" / split / f"{stem}.jpg", random_image(h, w, 20 + n), quality=100)
        write_gray_png(root / "annotations" / split / f"{stem}.png", raw)
        write_rgb_png(root / "annotations_instance" / split / f"{stem}.png", inst_rgb)
        instances = np.zeros((h, w), np.int32)
        instances[6:, 12:] = 1  # code 7 ranks first
        instances[6:, 8:12] = 2
        truth[stem] = {"raw": raw, "instances": instances}
    return truth


def write_ade_full(root: Path, split: str = "training", h: int = 10, w: int = 14) -> dict:
    """Full ADE20K: images/ADE/<split>/<scene>/<name>.jpg + <name>_seg.png (class in R/G, instance in B)."""
    root = Path(root)
    folder = root / "images" / "ADE" / split / "cultural" / "apse__indoor"
    name = "ADE_frame_00000007"
    cls = np.zeros((h, w), np.int64)
    cls[:5] = 2977  # wall: R = 2977 // 256 * 10 = 110, G = 2977 % 256 = 161
    cls[5:, :7] = 312
    inst_code = np.zeros((h, w), np.uint8)
    inst_code[:5] = 3
    inst_code[5:, :7] = 1
    inst_code[5:, 7:] = 200  # B set on unlabelled pixels: ignored
    seg = np.stack([(cls // 256) * 10, cls % 256, inst_code], -1).astype(np.uint8)
    write_jpeg(folder / f"{name}.jpg", random_image(h, w, 30), quality=100)
    write_rgb_png(folder / f"{name}_seg.png", seg)
    instances = np.zeros((h, w), np.int32)
    instances[:5] = 2
    instances[5:, :7] = 1
    return {"id": f"cultural/apse__indoor/{name}", "instances": instances, "classes": cls}


# ---------------------------------------------------------------------------------------------
# EVICAN
# ---------------------------------------------------------------------------------------------

EVICAN_CATEGORIES = [{"id": 1, "name": "Cell", "supercategory": "cell"}, {"id": 2, "name": "Nucleus"}]


def write_evican(root: Path, h: int = 20, w: int = 24) -> dict:
    """train2019 + eval2019 with three difficulty JSONs; grayscale JPEGs; nuclei inside cells.

    Eval annotations have no ``bbox`` (EVICAN's evaluation JSONs carry segmentations only).
    Returns the expected instance and semantic maps of the train image and of eval level 'easy'.
    """
    from PIL import Image

    root = Path(root)
    cell = rect(h, w, 2, 2, 16, 16)
    nucleus = rect(h, w, 6, 6, 10, 10)
    cell2 = rect(h, w, 17, 3, 23, 12)
    anns = [
        (1, cell, "polygon", [[2, 2, 16, 2, 16, 16, 2, 16]]),
        (2, nucleus, "rle", None),
        (1, cell2, "rle", None),
    ]
    gray = (random_image(h, w, 40)[..., 0]).astype(np.uint8)
    for folder in ("train2019", "eval2019"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(gray, mode="L").save(root / folder / "cells_0001.jpg", quality=100)
    images = [{"id": 0, "file_name": "cells_0001.jpg", "width": w, "height": h}]

    def annotations(n: int, with_bbox: bool) -> list:
        out = []
        for i, (cat, m, kind, poly) in enumerate(anns[:n]):
            ann = {"id": i, "image_id": 0, "category_id": cat, "iscrowd": 0,
                   "segmentation": poly if kind == "polygon" else compressed_rle(m)}  # fmt: skip
            if with_bbox:
                ys, xs = np.nonzero(m)
                ann["bbox"] = [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]
            out.append(ann)
        return out

    def write(name: str, n: int, with_bbox: bool) -> None:
        data = {"images": images, "annotations": annotations(n, with_bbox), "categories": EVICAN_CATEGORIES}
        write_json_file(root / "annotations" / name, data)

    write("instances_train2019.json", 3, True)
    for n, level in enumerate(("easy", "medium", "difficult"), 1):
        write(f"instances_eval2019_{level}.json", n, False)
    full_inst = np.zeros((h, w), np.int32)
    full_inst[cell], full_inst[cell2], full_inst[nucleus] = 1, 3, 2
    full_mask = np.zeros((h, w), np.uint8)
    full_mask[cell | cell2], full_mask[nucleus] = 1, 2
    easy_inst = cell.astype(np.int32)
    return {"train": (full_inst, full_mask), "eval_easy": (easy_inst, cell.astype(np.uint8))}

"""Reading and writing the on-disk primitives of segmentation datasets.

Every reader and the synthetic generator go through these functions, so the formats are
written and read by one piece of code, and every failure names the file and the problem.

Conventions (the sample contract of ``docs/architecture.md``):
  * images are returned as RGB ``uint8`` arrays of shape HxWx3;
  * label PNGs are returned as the *stored index values* (VOC palette PNGs are indices into the
    palette, never the RGB colours), ``uint8`` or ``uint16`` HxW.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from segexp.utils.atomic import atomic_path

IGNORE_INDEX = 255


class DatasetError(ValueError):
    """A problem with a file of a dataset on disk; the message always names the file.

    A DataLoader worker's error is rebuilt in the main process from its message alone (one
    argument: the worker's traceback text); the last line of that text is the original message."""

    user_facing = True  # segexp.utils.errors.user_errors prints it in one line

    def __init__(self, path: str | os.PathLike, problem: str | None = None):
        if problem is None:  # rebuilt from a worker's message
            last = str(path).strip().splitlines()[-1] if str(path).strip() else ""
            message = last.split("DatasetError: ", 1)[-1]
            self.path, _, self.problem = message.partition(": ")
            super().__init__(message)
            return
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map (bit-interleaved), ``n`` x 3 uint8; index 255 is (224,224,192)."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def _open(path: str | os.PathLike) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "file not found")
    try:
        img = Image.open(path)
        img.load()  # decode now, so a truncated file fails here with its name
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(path, f"cannot decode image ({exc})") from exc
    return img


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 HxWx3 from any format PIL reads (grayscale and RGBA are converted). 16-bit
    grayscale (microscopy TIFF/PNG) is scaled 0..65535 -> 0..255: PIL's own conversion clips it,
    which turns a typical 16-bit image almost entirely white."""
    img = _open(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.asarray(img).astype(np.float64) * (255.0 / 65535.0)
        return np.repeat(gray.clip(0, 255).round().astype(np.uint8)[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """The stored values of a label image: palette indices for 'P' PNGs, gray levels for 'L'/'I;16'.

    RGB-stored labels are returned as HxWx3 so that the caller decides how to decode them
    (VOC colours via :func:`rgb_to_index`, COCO panoptic ids via :func:`rgb_to_id`).
    """
    img = _open(path)
    if img.mode in ("P", "L"):
        return np.asarray(img, dtype=np.uint8).copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(img).astype(np.int64).copy()
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8).copy()
    if img.mode in ("RGB", "RGBA"):
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    raise DatasetError(path, f"unsupported label image mode {img.mode!r}")


def rgb_to_index(rgb: np.ndarray, palette: np.ndarray, path: str | os.PathLike = "<array>") -> np.ndarray:
    """Map an RGB-encoded label image back to palette indices; unknown colours are an error."""
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    pal_codes = (palette[:, 0].astype(np.int64) << 16) | (palette[:, 1].astype(np.int64) << 8) | palette[:, 2]
    lut = {int(c): i for i, c in reversed(list(enumerate(pal_codes)))}
    uniq, inv = np.unique(codes, return_inverse=True)
    missing = [u for u in uniq.tolist() if u not in lut]
    if missing:
        cols = [((m >> 16) & 255, (m >> 8) & 255, m & 255) for m in missing[:5]]
        raise DatasetError(path, f"colours not in the palette: {cols}")
    return np.array([lut[u] for u in uniq.tolist()], dtype=np.uint8)[inv].reshape(codes.shape)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic encoding: id = R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, (ids // 65536) % 256], axis=-1).astype(np.uint8)


def write_palette_png(path: str | os.PathLike, index: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write an index map as a palette ('P') PNG, as VOC stores SegmentationClass/Object."""
    if index.dtype != np.uint8:
        if index.min() < 0 or index.max() > 255:
            raise ValueError(f"{path}: palette PNG holds indices 0..255, got {index.min()}..{index.max()}")
        index = index.astype(np.uint8)
    img = Image.fromarray(index, mode="P")
    pal = voc_palette() if palette is None else palette
    img.putpalette(pal.astype(np.uint8).reshape(-1).tolist())
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def write_gray_png(path: str | os.PathLike, arr: np.ndarray) -> None:
    """8-bit ('L') or 16-bit ('I;16') grayscale PNG, chosen by dtype."""
    if arr.dtype == np.uint16:
        img = Image.fromarray(arr)  # Pillow picks 'I;16' (an explicit mode= is rejected by Pillow 13)
    else:
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def write_rgb_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(tmp, format="PNG")


def write_jpeg(path: str | os.PathLike, rgb: np.ndarray, quality: int = 95) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(tmp, format="JPEG", quality=quality)


# ---------------------------------------------------------------------------------------------
# VOC Annotations/*.xml
# ---------------------------------------------------------------------------------------------


@dataclass
class VOCObject:
    name: str
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax in VOC's 1-based pixel coordinates
    difficult: bool = False
    truncated: bool = False
    occluded: bool = False


@dataclass
class VOCAnnotation:
    filename: str
    width: int
    height: int
    objects: list[VOCObject] = field(default_factory=list)
    segmented: bool = False


def _flag(node: ET.Element, tag: str, path) -> bool:
    """VOC flags appear as '0'/'1', empty elements (``<difficult/>``) or not at all: empty/absent = False."""
    el = node.find(tag)
    if el is None or el.text is None or not el.text.strip():
        return False
    try:
        return bool(int(float(el.text.strip())))
    except ValueError as exc:
        raise DatasetError(path, f"<{tag}> is not a number: {el.text!r}") from exc


def read_voc_xml(path: str | os.PathLike) -> VOCAnnotation:
    """Parse a VOC annotation XML; coordinates may be floats (some tools write '273.5')."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DatasetError(path, f"malformed XML ({exc})") from exc
    size = root.find("size")
    if size is None:
        raise DatasetError(path, "no <size> element")

    def num(node: ET.Element, tag: str) -> float:
        el = node.find(tag)
        if el is None or el.text is None:
            raise DatasetError(path, f"missing <{tag}>")
        try:
            return float(el.text.strip())
        except ValueError as exc:
            raise DatasetError(path, f"<{tag}> is not a number: {el.text!r}") from exc

    ann = VOCAnnotation(
        filename=(root.findtext("filename") or "").strip(),
        width=int(num(size, "width")),
        height=int(num(size, "height")),
        segmented=_flag(root, "segmented", path),
    )
    for obj in root.findall("object"):
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DatasetError(path, "an <object> without <bndbox>")
        name = (obj.findtext("name") or "").strip()
        ann.objects.append(
            VOCObject(
                name=name,
                box=(num(bnd, "xmin"), num(bnd, "ymin"), num(bnd, "xmax"), num(bnd, "ymax")),
                difficult=_flag(obj, "difficult", path),
                truncated=_flag(obj, "truncated", path),
                occluded=_flag(obj, "occluded", path),
            )
        )
    return ann


def write_voc_xml(path: str | os.PathLike, ann: VOCAnnotation, folder: str = "VOC2012") -> None:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = ann.filename
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(ann.width)
    ET.SubElement(size, "height").text = str(ann.height)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "1" if ann.segmented else "0"
    for o in ann.objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = o.name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(o.truncated))
        ET.SubElement(obj, "occluded").text = str(int(o.occluded))
        ET.SubElement(obj, "difficult").text = str(int(o.difficult))
        bnd = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), o.box):
            ET.SubElement(bnd, tag).text = str(int(v)) if float(v).is_integer() else str(v)
    ET.indent(root)
    with atomic_path(path) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=False)


def read_split_file(path: str | os.PathLike) -> list[str]:
    """Image ids of a split list: bare ids, or VOC-aug pairs
    '/JPEGImages/x.jpg /SegmentationClassAug/x.png'."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "split file not found")
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        first = line.split()[0]
        ids.append(Path(first).stem if ("/" in first or "." in Path(first).name) else first)
    if not ids:
        raise DatasetError(path, "split file lists no images")
    return ids

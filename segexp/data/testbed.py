"""What the synthetic generator draws: learnability knobs and one switchable mechanism per paper.

Why a spec object: a generated root must never serve another setting, so every knob that changes
the drawing lives in one frozen dataclass, is recorded whole in the root's completion marker and
hashed into the root's directory name (``testbed_key``). Each default lives here once; the CLI and
``conf/data/testbed/*.yaml`` only state what they change.

Learnability knobs (identity always stays in the shape; see ``shared/testbed.md``):
a from-scratch network must otherwise learn colour-invariant shape features before any signal
appears (1,000+ steps). A dark outline, objects brighter than the stuff under them, few large
objects, bounded occlusion and objects kept inside the frame make the shapes learnable in
hundreds of steps on a CPU. ``LEGACY`` is the format-1 rendering (textured, colour-neutral).

Mechanisms (each ``None`` = off):
- ``cooc``: co-occurring background (FBR): a class sits on a fixed-appearance stuff.
- ``parts``: a discriminative badge on a body with sub-types (SEAM, SC-CAM): class-neutral bodies, or
  each class drawing from its own window of bodies (``class_bodies``).
- ``clutter``: object-coloured blobs touching the object inside its box (Box2Seg).
- ``sod_noise``: wrong saliency labels in the training split's SOD masks (CAS).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

STYLES = ("textured", "plain")
CONTRASTS = ("none", "bright")
FIXED_STUFF = ("water", "grass")  # stuff kinds with a fixed appearance, drawn only by `cooc`
BODIES = ("disc", "bar", "ring", "plate", "half")
SOD_NOISE_KINDS = ("fp_stuff", "fn_part", "dilate", "drop_object")
SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross")  # synth.CLASS_NAMES[1:]


def _pair(value: Any, kind: type, name: str) -> tuple:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"testbed.{name} must be a pair [min, max], got {value!r}")
    low, high = kind(value[0]), kind(value[1])
    if low > high:
        raise ValueError(f"testbed.{name} must have min <= max, got {value!r}")
    return low, high


def _probability(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"testbed.{name} must be in [0, 1], got {value}")
    return value


@dataclass(frozen=True)
class Cooc:
    """Co-occurring background (FBR's problem): an object of a paired class sits on its stuff.

    An image holding a paired class gets that stuff as its whole background with probability
    ``p``; an image without the class gets it with probability ``q``. On ``counterfactual_split``
    the pairing is broken on purpose: half the images show the class without its stuff, half the
    stuff without its class, so a CAM that fires on the stuff is caught.
    """

    pairs: Mapping[str, str] = field(default_factory=lambda: {"circle": "water"})
    p: float = 0.9
    q: float = 0.05
    counterfactual_split: str | None = "test"

    def __post_init__(self) -> None:
        for cls, stuff in self.pairs.items():
            if cls not in SHAPE_CLASSES:
                raise ValueError(f"testbed.cooc.pairs: unknown class {cls!r}; choose from {SHAPE_CLASSES}")
            if stuff not in FIXED_STUFF:
                raise ValueError(f"testbed.cooc.pairs: unknown stuff {stuff!r}; choose from {FIXED_STUFF}")
        object.__setattr__(self, "pairs", dict(sorted(self.pairs.items())))
        object.__setattr__(self, "p", _probability(self.p, "cooc.p"))
        object.__setattr__(self, "q", _probability(self.q, "cooc.q"))


@dataclass(frozen=True)
class Parts:
    """Discriminative part (SEAM/SC-CAM): each object is a body carrying a small badge whose shape is
    the class. GT = body + badge, so a CAM that finds only the badge is incomplete. The body sub-type
    (disc | bar | ring | plate | half) is SC-CAM's sub-category.

    ``class_bodies`` 0: any body for any class, so the body is class-neutral and a classifier never needs
    it. ``class_bodies`` k >= 1: class c draws its body from its own window of k consecutive ``bodies``
    (cyclic, :func:`class_body_window`), so with k = 2 and 5 bodies each body is shared by two classes: the
    body says something about the class, less than the badge, and telling a class's sub-types apart needs
    body features that are also class evidence - the situation SC-CAM's sub-categories are meant for.
    """

    bodies: tuple[str, ...] = BODIES[:3]
    badge_scale: tuple[float, float] = (0.35, 0.5)  # badge radius / body radius
    class_bodies: int = 0

    def __post_init__(self) -> None:
        bodies = tuple(self.bodies)
        if not bodies or any(b not in BODIES for b in bodies) or len(set(bodies)) != len(bodies):
            raise ValueError(f"testbed.parts.bodies must be distinct names from {BODIES}, got {bodies}")
        object.__setattr__(self, "bodies", bodies)
        low, high = _pair(self.badge_scale, float, "parts.badge_scale")
        if not 0.1 <= low <= high <= 0.6:
            raise ValueError(f"testbed.parts.badge_scale must lie in [0.1, 0.6], got {self.badge_scale}")
        object.__setattr__(self, "badge_scale", (low, high))
        if not 0 <= int(self.class_bodies) <= len(bodies):
            raise ValueError(
                f"testbed.parts.class_bodies must lie in [0, {len(bodies)}] (0 = class-neutral bodies; at "
                f"most len(bodies)), got {self.class_bodies}"
            )
        object.__setattr__(self, "class_bodies", int(self.class_bodies))

    def bodies_of(self, class_index: int) -> tuple[str, ...]:
        """The bodies an object of ``class_index`` (1-based, as in the masks) may have."""
        return class_body_window(self.bodies, self.class_bodies, class_index - 1)


def class_body_window(bodies: tuple[str, ...] | list[str], class_bodies: int, c: int) -> tuple[str, ...]:
    """Class ``c``'s (0-based) bodies in sub-type order: all ``bodies`` when ``class_bodies`` is 0, else
    the ``class_bodies`` consecutive entries from position ``c`` on, wrapping around."""
    bodies = tuple(bodies)
    if class_bodies == 0:
        return bodies
    return tuple(bodies[(c + j) % len(bodies)] for j in range(class_bodies))


@dataclass(frozen=True)
class Clutter:
    """Cluttered boxes (Box2Seg's problem): with probability ``p`` an object gets ``blobs`` background
    blobs whose colour lies within ``colour_distance`` (RGB) of the object's, touching it inside its
    box, so a colour model of the box (GrabCut) takes them for the object."""

    p: float = 1.0
    blobs: tuple[int, int] = (3, 5)
    colour_distance: float = 30.0
    blob_scale: tuple[float, float] = (0.7, 1.2)  # blob radius / object radius (GrabCut 0.71 mIoU at 64 px)

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", _probability(self.p, "clutter.p"))
        object.__setattr__(self, "blobs", _pair(self.blobs, int, "clutter.blobs"))
        object.__setattr__(self, "blob_scale", _pair(self.blob_scale, float, "clutter.blob_scale"))
        if self.blobs[0] < 1:
            raise ValueError(f"testbed.clutter.blobs must be >= 1, got {self.blobs}")


@dataclass(frozen=True)
class SodNoise:
    """Wrong saliency labels (CAS's low-fidelity data), written into the *training* split's SOD masks
    only (val/test stay clean). Each train image is corrupted with probability ``rate`` by one kind
    drawn from ``kinds``: a stuff region marked salient, part of an object erased, the mask dilated or
    eroded by ``radius`` px, or one object dropped."""

    rate: float = 0.25
    kinds: tuple[str, ...] = SOD_NOISE_KINDS
    radius: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate", _probability(self.rate, "sod_noise.rate"))
        kinds = tuple(self.kinds)
        if not kinds or any(k not in SOD_NOISE_KINDS for k in kinds):
            raise ValueError(f"testbed.sod_noise.kinds must be a non-empty subset of {SOD_NOISE_KINDS}")
        object.__setattr__(self, "kinds", kinds)
        if int(self.radius) < 1:
            raise ValueError(f"testbed.sod_noise.radius must be >= 1 px, got {self.radius}")


_MECHANISMS = {"cooc": Cooc, "parts": Parts, "clutter": Clutter, "sod_noise": SodNoise}
MECHANISMS = tuple(_MECHANISMS)


@dataclass(frozen=True)
class Testbed:
    """Every drawing setting of a synthetic set (defaults: the learnable rendering, no mechanism)."""

    __test__ = False  # not a pytest test class, despite the name
    style: str = "plain"  # plain = flat colours | textured
    outline_px: int = 1  # dark contour drawn inside every object's outer boundary (0 = none)
    figure_contrast: str = "bright"  # bright: objects U(140,255) per channel on stuff darkened x0.45
    count: tuple[int, int] = (1, 3)  # objects per image
    extent: tuple[float, float] = (0.25, 0.5)  # object diameter as a fraction of the image side
    max_occlusion: float = 0.2  # largest fraction of an object later objects may hide (1 = any)
    inside_frame: bool = True  # objects are never clipped by the image border
    min_contrast: float = 80.0  # RGB distance of an object's colour from what it covers (contrast none)
    cooc: Cooc | None = None
    parts: Parts | None = None
    clutter: Clutter | None = None
    sod_noise: SodNoise | None = None

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"testbed.style must be one of {STYLES}, got {self.style!r}")
        if self.figure_contrast not in CONTRASTS:
            raise ValueError(
                f"testbed.figure_contrast must be one of {CONTRASTS}, got {self.figure_contrast!r}"
            )
        if not 0 <= int(self.outline_px) <= 4:
            raise ValueError(f"testbed.outline_px must be 0-4, got {self.outline_px}")
        count = _pair(self.count, int, "count")
        if not 1 <= count[0] <= count[1] <= 8:
            raise ValueError(f"testbed.count must lie in [1, 8], got {self.count}")
        extent = _pair(self.extent, float, "extent")
        if not 0.05 <= extent[0] <= extent[1] <= 0.9:
            raise ValueError(f"testbed.extent must lie in [0.05, 0.9], got {self.extent}")
        object.__setattr__(self, "outline_px", int(self.outline_px))
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "extent", extent)
        object.__setattr__(self, "max_occlusion", _probability(self.max_occlusion, "max_occlusion"))
        object.__setattr__(self, "inside_frame", bool(self.inside_frame))
        object.__setattr__(self, "min_contrast", float(self.min_contrast))
        for name, kind in _MECHANISMS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, _build(kind, value, f"testbed.{name}"))
        if self.parts is not None and self.clutter is not None:
            raise ValueError("testbed.parts and testbed.clutter cannot be combined; switch one off")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | Testbed | None) -> Testbed:
        """A spec from a (possibly partial) mapping, e.g. a Hydra node; unknown keys are errors."""
        if isinstance(values, Testbed):
            return values
        return _build(cls, values or {}, "testbed")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (tuples as lists), as recorded in the completion marker."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def key(self) -> str:
        """Short stable hash of the whole spec: part of a generated root's directory name."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:8]


def _build(kind: type, values: Mapping[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    plain = {k: (dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, list | tuple) else v)
             for k, v in values.items()}  # fmt: skip
    return kind(**plain)


# The format-1 rendering: textured, object and stuff colours from one distribution, 1-4 objects of
# 0.15-0.45 of the side, any occlusion, clipped at the border. Colour alone cannot find the objects.
LEGACY = Testbed(
    style="textured",
    outline_px=0,
    figure_contrast="none",
    count=(1, 4),
    extent=(0.15, 0.45),
    max_occlusion=1.0,
    inside_frame=False,
)


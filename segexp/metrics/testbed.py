"""Diagnostics of the testbed's mechanisms: does a CAM network show the problem each paper targets?

Pure accumulators over numpy maps (no model, no files), so each number is testable on hand-made
inputs; ``segexp.testbed diagnose`` feeds them from a trained run.

* :class:`CoocDiagnostics` (FBR's problem): how much of a class's CAM lies on the stuff it co-occurs
  with, and how often that stuff alone makes the classifier say the class is there.
* :class:`PartDiagnostics` (SEAM/SC-CAM's problem): how much of the object a CAM covers on the badge
  (the discriminative part) versus on the class-neutral body.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DIAGNOSTICS_FILE = "testbed_diagnostics.json"  # a run's diagnostics (segexp.testbed), read by segexp.report

__all__ = ["CoocDiagnostics", "PartDiagnostics", "purity"]


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


@dataclass
class CoocDiagnostics:
    """For one (class, stuff) pair.

    ``update_cam``: an image that shows the class *on* its stuff; of the pixels where the class's
    (label-masked, normalised) CAM exceeds ``threshold``, the shares on the stuff and on the class.
    ``update_score``: one image-level prediction (probability of the class), grouped by what the image
    shows; ``false_positive_rate(group)`` = share of predictions > 0.5 (for groups without the class),
    ``miss_rate(group)`` = share <= 0.5 (for groups with it).
    """

    threshold: float = 0.5
    high: int = 0
    high_on_stuff: int = 0
    high_on_class: int = 0
    scores: dict[str, list[float]] = field(default_factory=dict)

    def update_cam(self, cam: np.ndarray, stuff: np.ndarray, cls: np.ndarray) -> None:
        high = cam > self.threshold
        self.high += int(high.sum())
        self.high_on_stuff += int((high & stuff).sum())
        self.high_on_class += int((high & cls).sum())

    def update_score(self, group: str, probability: float) -> None:
        self.scores.setdefault(group, []).append(float(probability))

    def false_positive_rate(self, group: str) -> float:
        values = self.scores.get(group, [])
        return _ratio(sum(v > 0.5 for v in values), len(values))

    def miss_rate(self, group: str) -> float:
        values = self.scores.get(group, [])
        return _ratio(sum(v <= 0.5 for v in values), len(values))

    def report(self) -> dict[str, float]:
        out = {
            "cam_share_on_stuff": _ratio(self.high_on_stuff, self.high),
            "cam_share_on_class": _ratio(self.high_on_class, self.high),
        }
        for group in sorted(self.scores):
            rate = self.miss_rate if group.startswith("class") else self.false_positive_rate
            name = "miss_rate" if group.startswith("class") else "fp_rate"
            out[f"{name}/{group}"] = rate(group)
            out[f"n/{group}"] = len(self.scores[group])
        return out


@dataclass
class PartDiagnostics:
    """CAM coverage of badge and body: recall = |CAM > t on the part| / |part|, and the share of the
    object's high-CAM pixels that lie on the badge (the badge is ~10-20 % of the object's area)."""

    threshold: float = 0.5
    badge: int = 0
    badge_high: int = 0
    body: int = 0
    body_high: int = 0

    def update(self, cam: np.ndarray, badge: np.ndarray, obj: np.ndarray) -> None:
        high = cam > self.threshold
        body = obj & ~badge
        self.badge += int(badge.sum())
        self.badge_high += int((high & badge).sum())
        self.body += int(body.sum())
        self.body_high += int((high & body).sum())

    def report(self) -> dict[str, float]:
        return {
            "badge_recall": _ratio(self.badge_high, self.badge),
            "body_recall": _ratio(self.body_high, self.body),
            "badge_share_of_object_cam": _ratio(self.badge_high, self.badge_high + self.body_high),
            "badge_share_of_object_area": _ratio(self.badge, self.badge + self.body),
        }


def purity(clusters: np.ndarray, truth: np.ndarray) -> float:
    """Cluster purity: each cluster votes its most frequent true label; the share of items that match."""
    clusters, truth = np.asarray(clusters), np.asarray(truth)
    if clusters.size == 0:
        return float("nan")
    matched = 0
    for c in np.unique(clusters):
        _, counts = np.unique(truth[clusters == c], return_counts=True)
        matched += int(counts.max())
    return matched / clusters.size


def subtype_purity(clusters: np.ndarray, subtypes: list[list[str]]) -> dict[str, float]:
    """Purity of per-class clusters (N, C; -1 where absent) against each image's sub-type of that class,
    pooled over classes, beside the purity of one cluster per class (the share of each class's most
    common sub-type: what a clustering that finds nothing scores)."""
    matched = one_cluster = total = 0.0
    for c in range(clusters.shape[1]):
        members = np.flatnonzero(clusters[:, c] >= 0)
        if members.size == 0:
            continue
        truth = np.array([subtypes[n][c] for n in members])
        matched += purity(clusters[members, c], truth) * members.size
        one_cluster += purity(np.zeros(members.size), truth) * members.size
        total += members.size
    if total == 0:
        return {"subtype_purity": float("nan"), "subtype_purity_one_cluster": float("nan")}
    return {"subtype_purity": matched / total, "subtype_purity_one_cluster": one_cluster / total}

"""Walk every sample of a configured dataset and report what is there and what is broken.

``python -m segexp.data.check data=NAME paths.data_dir=DIR [split=train] [limit=100] [keys=[mask]]``

Why: a missing or mis-sized file in a 10k-image set otherwise surfaces as a crash hours into a
run, one file at a time. The check builds each split's reader exactly as the DataModule would
(the config's ``reader`` partial), loads every sample, and collects *all* problems (missing,
corrupt or mis-sized files, label values outside the class set) with their paths before
exiting non-zero. It also prints counts, the class histogram, the image-size range and which
supervision keys each split actually has.

A key that fails on *every* sample of a split (ADE20K without its optional instance files, say)
is reported as unavailable there rather than as one problem per image; partial failures are
problems.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segexp.data.io import DatasetError

ReaderFactory = Callable[..., Any]


@dataclass
class Problem:
    path: str
    problem: str
    index: int | None = None
    key: str | None = None

    def __str__(self) -> str:
        where = (
            f" [sample {self.index}{', ' + self.key if self.key else ''}]" if self.index is not None else ""
        )
        return f"{self.path}: {self.problem}{where}"


@dataclass
class SplitReport:
    """What one split of one dataset holds, and everything wrong with it."""

    name: str
    split: str
    num_samples: int = 0
    checked: int = 0
    class_names: Sequence[str] = ()
    keys_available: list[str] = field(default_factory=list)
    keys_unavailable: dict[str, str] = field(default_factory=dict)  # key -> example error
    images_per_class: Counter = field(default_factory=Counter)
    pixels_per_class: Counter = field(default_factory=Counter)
    heights: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_sample(sample: dict[str, Any], num_classes: int, ignore_index: int = 255) -> list[str]:
    """Contract checks that hold for any reader (a reader may not check its own output)."""
    issues = []
    image = sample.get("image")
    if not (
        isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    ):
        issues.append(
            f"image is not uint8 HxWx3 (got {getattr(image, 'dtype', type(image))} {np.shape(image)})"
        )
        return issues
    hw = image.shape[:2]
    for key in ("mask", "instances", "saliency"):
        if key in sample and np.shape(sample[key]) != hw:
            issues.append(f"{key} shape {np.shape(sample[key])} differs from the image's {hw}")
    if "mask" in sample:
        values = np.unique(sample["mask"])
        bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
        if bad.size:
            issues.append(f"mask values {bad[:8].tolist()} outside the class set 0..{num_classes - 1}")
    if "instances" in sample and np.min(sample["instances"], initial=0) < 0:
        issues.append("negative instance ids")
    if "saliency" in sample:
        sal = sample["saliency"]
        if not np.all(np.isfinite(sal)) or sal.min(initial=0) < 0 or sal.max(initial=0) > 1:
            issues.append("saliency outside [0, 1]")
    if "box_labels" in sample:
        labels = np.asarray(sample["box_labels"])
        if labels.size and (labels.min() < 1 or labels.max() >= num_classes):
            issues.append(f"box labels {sorted(set(labels.tolist()))} outside 1..{num_classes - 1}")
    return issues


def _present_classes(
    sample: dict[str, Any], num_classes: int, ignore_index: int
) -> tuple[list[int], Counter]:
    """Classes in the sample (from the mask, else image labels, else box labels) and mask pixel counts."""
    pixels: Counter = Counter()
    if "mask" in sample:
        values, counts = np.unique(sample["mask"], return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            if v != ignore_index:
                pixels[v] += c
        return sorted(pixels), pixels
    if "labels" in sample:
        return (np.nonzero(sample["labels"])[0] + 1).tolist(), pixels
    if "box_labels" in sample:
        return sorted(set(np.asarray(sample["box_labels"]).tolist())), pixels
    if "saliency" in sample:
        sal = sample["saliency"] >= 0.5
        pixels[0], pixels[1] = int((~sal).sum()), int(sal.sum())
        return [c for c in (0, 1) if pixels[c]], pixels
    return [], pixels


def _error_of(exc: BaseException, fallback: str) -> Problem:
    if isinstance(exc, DatasetError):
        return Problem(exc.path, exc.problem)
    return Problem(fallback, f"{type(exc).__name__}: {exc}")


def check_split(
    make_reader: ReaderFactory,
    split: str,
    keys: Sequence[str] | None = None,
    limit: int | None = None,
    name: str = "dataset",
) -> SplitReport:
    """Load every sample of ``make_reader(split=split, keys=keys)``, collecting every problem."""
    report = SplitReport(name=name, split=split)
    try:
        reader = make_reader(split=split, keys=list(keys) if keys is not None else None)
    except (DatasetError, OSError, ValueError, KeyError) as exc:
        report.problems.append(_error_of(exc, f"{name}:{split}"))
        return report
    report.num_samples = len(reader)
    report.class_names = tuple(getattr(reader, "class_names", ()))
    num_classes = len(report.class_names) or 256
    ignore = getattr(reader, "ignore_index", 255)
    wanted = sorted(set(reader.keys) - {"image", "meta"})
    if "boxes" in wanted:  # box labels and flags come with the boxes, from the same file
        wanted = [k for k in wanted if k not in ("box_labels", "box_difficult")]
    per_key_readers: dict[str, Any] = {}
    failures: dict[str, list[Problem]] = {k: [] for k in wanted}
    total = report.num_samples if limit is None else min(limit, report.num_samples)

    def single_key_reader(key: str):
        if key not in per_key_readers:
            per_key_readers[key] = make_reader(split=split, keys=[key])
        return per_key_readers[key]

    for i in range(total):
        report.checked += 1
        fallback = f"{name}:{split}[{i}]"
        try:
            sample = reader[i]
        except Exception as exc:  # noqa: BLE001 - a check reports every failure, whatever its kind
            sample = None
            first = _error_of(exc, fallback)
        if sample is None:
            sample = _attribute_failure(single_key_reader, wanted, i, fallback, report, failures)
            if sample is None:
                continue
            if not any(failures[k] and failures[k][-1].index == i for k in wanted):
                first.index = i
                report.problems.append(first)  # fails together but not alone: still report it
        path = str(sample.get("meta", {}).get("path", fallback))
        for issue in validate_sample(sample, num_classes, ignore):
            report.problems.append(Problem(path, issue, index=i))
        if "image" in sample:
            report.heights.append(int(sample["image"].shape[0]))
            report.widths.append(int(sample["image"].shape[1]))
        classes, pixels = _present_classes(sample, num_classes, ignore)
        report.images_per_class.update(classes)
        report.pixels_per_class.update(pixels)

    key_problems = []
    for key in wanted:
        fails = failures[key]
        if total > 0 and len(fails) == total and all("not found" in p.problem for p in fails):
            report.keys_unavailable[key] = str(fails[0])
        else:
            report.keys_available.append(key)
            key_problems.extend(fails)
    report.problems.extend(_merge_keys(key_problems))
    report.problems.sort(key=lambda p: (p.index if p.index is not None else -1, p.key or ""))
    return report


def _attribute_failure(
    single_key_reader: Callable[[str], Any],
    wanted: Sequence[str],
    index: int,
    fallback: str,
    report: SplitReport,
    failures: dict[str, list[Problem]],
) -> dict[str, Any] | None:
    """Reload a failed sample key by key, so each broken file is named with the key it breaks.

    Returns what could be loaded (None if even the image fails, which is then the problem).
    """
    try:
        sample = dict(single_key_reader("image")[index])
    except Exception as exc:  # noqa: BLE001 - a check reports every failure, whatever its kind
        problem = _error_of(exc, fallback)
        problem.index, problem.key = index, "image"
        report.problems.append(problem)
        return None
    for key in wanted:
        try:
            sample.update(single_key_reader(key)[index])
        except Exception as exc:  # noqa: BLE001
            problem = _error_of(exc, fallback)
            problem.index, problem.key = index, key
            failures[key].append(problem)
    return sample


def _merge_keys(problems: list[Problem]) -> list[Problem]:
    """One problem per (sample, file, message): a bad mask breaks 'mask' and 'labels' alike."""
    merged: dict[tuple, Problem] = {}
    for p in problems:
        slot = (p.index, p.path, p.problem)
        if slot in merged:
            keys = set(merged[slot].key.split(", ")) | {p.key}
            merged[slot].key = ", ".join(sorted(keys))
        else:
            merged[slot] = Problem(p.path, p.problem, p.index, p.key)
    return list(merged.values())


def format_report(report: SplitReport) -> str:
    lines = [
        f"== {report.name} / split '{report.split}': {report.num_samples} samples ({report.checked} checked)"
    ]
    lines.append(f"   keys available: {', '.join(['image', *report.keys_available])}")
    for key, example in report.keys_unavailable.items():
        lines.append(f"   key unavailable in this split: {key} (e.g. {example})")
    if report.heights:
        lines.append(
            f"   image size: H {min(report.heights)}..{max(report.heights)}, "
            f"W {min(report.widths)}..{max(report.widths)}"
        )
    if report.images_per_class:
        total_pixels = sum(report.pixels_per_class.values())
        lines.append(
            "   classes (images containing it" + (", share of labelled pixels)" if total_pixels else ")")
        )
        for c in sorted(report.images_per_class):
            name = report.class_names[c] if c < len(report.class_names) else str(c)
            share = f" {100.0 * report.pixels_per_class[c] / total_pixels:6.2f}%" if total_pixels else ""
            lines.append(f"     {c:>3} {name:<24} {report.images_per_class[c]:>7}{share}")
    lines.append(f"   problems: {len(report.problems)}")
    lines.extend(f"     {p}" for p in report.problems)
    return "\n".join(lines)


def run_check(cfg: Any) -> list[SplitReport]:
    """Prepare the dataset if its config says how, then check each configured split (and test set)."""
    from hydra.utils import instantiate

    data = cfg.data
    if data.get("prepare") is not None:
        prepared = instantiate(data.prepare)
        if callable(prepared):  # a partial (the DataModule calls it in prepare_data)
            prepared()
    roles = [cfg.split] if cfg.get("split") else list(data.splits)
    keys = list(cfg.keys) if cfg.get("keys") is not None else None
    limit = cfg.get("limit")
    reports, seen = [], set()
    make_reader = instantiate(data.reader)
    expected = dict(data.get("expected_sizes") or {})
    for role in roles:
        if role not in data.splits:
            raise KeyError(f"data '{data.name}' has no split role {role!r}; it has {list(data.splits)}")
        split = data.splits[role]
        if split in seen:  # e.g. val and test are both 'val'
            continue
        seen.add(split)
        reports.append(check_split(make_reader, split, keys, limit, name=str(data.name)))
        _check_size(reports[-1], expected.get(split))
    for set_name, node in (data.get("test_sets") or {}).items() if cfg.get("test_sets", True) else ():
        reports.append(check_split(instantiate(node), "test", keys, limit, name=f"{data.name}/{set_name}"))
        _check_size(reports[-1], expected.get(set_name))
    return reports


def _check_size(report: SplitReport, expected: int | None) -> None:
    """A split with another count than the official release's (``data.expected_sizes``) is a problem:
    training would refuse it (:class:`~segexp.data.datamodule.SegDataModule`)."""
    if expected is not None and report.num_samples and report.num_samples != expected:
        issue = f"{report.num_samples} images, the official release {expected} (data.expected_sizes)"
        report.problems.insert(0, Problem(f"{report.name}:{report.split}", issue))


def _main(cfg: Any) -> None:
    reports = run_check(cfg)
    for report in reports:
        print(format_report(report))
    problems = sum(len(r.problems) for r in reports)
    print(f"== {problems} problem(s) in {len(reports)} split(s)")
    if problems:
        sys.exit(1)


def main() -> None:
    import hydra

    import segexp.resolvers  # noqa: F401  (registers ${segexp.*} resolvers configs may use)

    hydra.main(version_base="1.3", config_path="../../conf", config_name="check")(_main)()


if __name__ == "__main__":
    main()

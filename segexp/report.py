"""Mean ± std over seeds from run directories: ``python -m segexp.report DIR [DIR ...] [options]``.

Why: one seed on CPU decides nothing (two runs of one config differ by ~1.5 points), so every
results table of a study is made here from the runs themselves, never typed by hand.

A *job* is a directory holding ``.hydra/overrides.yaml`` (a ``segexp.train`` / ``segexp.eval`` run or
multirun job, grid or Optuna) or ``pipeline_report.json`` (a ``segexp.pipeline`` run). Its metrics come
from ``metrics.json`` (pipeline: the report, flattened per stage: ``train/...``, ``cam/best_mIoU``,
``crf/pseudo_mIoU``, ``retrain/test/mIoU``). A job without metrics is *failed* (crashed or unfinished):
it is counted and listed, never averaged.

Jobs are grouped by the overrides that differ between them, except ``seed`` (``--by`` names the keys
instead); where none differ (a one-row study), by the keys its ``multirun.yaml`` declares swept, so the
row still says what it is. ``--compare KEY[=BASELINE]`` adds, within each group of the other keys, the
difference of every value of KEY to the baseline value and whether it is *beyond 2 std* (|Δ| > 2 × the
larger of the two groups' std): the test each study's ``results.md`` applies. Where both rows ran the same
seeds, it adds the *paired* view too - the per-seed differences' mean ± std, how many seeds move the same
way, and the two-sided p of a paired t-test - since runs of one seed share data order and initialisation,
and a seed-to-seed spread larger than the effect can hide a difference every seed shows.

Writes ``report.md``, ``report.csv`` and ``report.png`` (bars with std error bars) into ``--out``
(default: the first DIR) and prints the Markdown, and ``jobs.csv``: every job's overrides, wall time
and metrics. A DIR holding no job but a ``jobs.csv`` is read from that file, so a study's reports can be
pooled with new runs after its run directories are gone (``report experiments/<study>/<run> logs/...``).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from segexp.metrics.testbed import DIAGNOSTICS_FILE
from segexp.utils.atomic import atomic_path, write_text

JOBS_FILE = "jobs.csv"  # one row per job: its overrides (JSON), wall time and metrics

#: overrides that say where or how a job ran, not what it is
NON_GROUPING = ("seed", "paths.*", "hydra.*", "data.num_workers", "trainer.accelerator", "trainer.devices")


@dataclass
class Job:
    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float] | None  # None: the job has no metrics (failed or unfinished)
    wall_s: float | None = None


@dataclass
class Group:
    key: tuple[tuple[str, str], ...]
    jobs: list[Job] = field(default_factory=list)

    @property
    def done(self) -> list[Job]:
        return [j for j in self.jobs if j.metrics is not None]

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if j.metrics is None]

    def values(self, metric: str) -> list[float]:
        out = []
        for job in self.done:
            v = job.metrics.get(metric)
            if v is not None and math.isfinite(v):
                out.append(float(v))
        return out

    def label(self, short: dict[str, str]) -> str:
        return ", ".join(f"{short[k]}={shown(v)}" for k, v in self.key) or "all"


def shown(value: str) -> str:
    """An absolute path under the working directory as a relative one (a checkpoint swept as
    ``backbone.pretrained``), so tables and chart labels stay readable; the CSV keeps the full value."""
    if not value.startswith("/"):
        return value
    try:
        return str(Path(value).relative_to(Path.cwd()))
    except ValueError:
        return value


def parse_overrides(lines: Iterable[str]) -> dict[str, str]:
    """``['+experiment=x', 'loss=ce']`` -> ``{'experiment': 'x', 'loss': 'ce'}`` (``+``, ``~`` dropped)."""
    out = {}
    for line in lines:
        key, sep, value = str(line).partition("=")
        out[key.lstrip("+~")] = value if sep else ""
    return out


def _flatten(node: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):  # e.g. SC-CAM rounds
            out.update(_flatten({str(n): v for n, v in enumerate(value)}, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def pipeline_metrics(report: dict) -> dict[str, float]:
    """A pipeline report flattened to ``<stage>/<metric>``: each stage's score, one row per run
    (lists of records by position: ``rounds/<r>/cam/best_mIoU``)."""
    skip = {"dir", "overrides", "wall_s"}
    return _flatten({k: v for k, v in report.items() if k not in skip and isinstance(v, (dict, list))})


def read_job(path: Path) -> Job:
    """One job directory -> :class:`Job` (metrics ``None`` when it has none: failed or unfinished)."""
    pipeline = path / "pipeline_report.json"
    if pipeline.is_file():
        rep = json.loads(pipeline.read_text())
        return Job(path, parse_overrides(rep.get("overrides", [])), pipeline_metrics(rep), rep.get("wall_s"))
    overrides = parse_overrides(yaml.safe_load((path / ".hydra" / "overrides.yaml").read_text()) or [])
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        return Job(path, overrides, None)
    metrics = {k: float(v) for k, v in json.loads(metrics_file.read_text()).items() if v is not None}
    diagnostics = path / DIAGNOSTICS_FILE  # `segexp.testbed` mechanism diagnostics, when the run made them
    if diagnostics.is_file():
        metrics.update(_flatten(json.loads(diagnostics.read_text()), "testbed/"))
    start = path / ".hydra" / "config.yaml"  # written when the job starts
    wall = metrics_file.stat().st_mtime - start.stat().st_mtime if start.is_file() else None
    return Job(path, overrides, metrics, wall)


def _job_order(path: Path) -> tuple:
    """Multirun jobs in launch order (``2`` before ``10``), then by name."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def find_jobs(roots: Sequence[Path]) -> list[Job]:
    """Every job under ``roots`` (a job directory itself, a multirun/sweep directory, or any tree).

    A pipeline's own training runs (``<pipeline>/train``, ``<pipeline>/retrain``) are its stages, not jobs.
    """
    dirs: set[Path] = set()
    recorded: list[Job] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such run directory")
        found: set[Path] = set()
        found.update(p.parent for p in root.rglob("pipeline_report.json"))
        found.update(p.parent.parent for p in root.rglob(".hydra/overrides.yaml"))
        if not found and (root / JOBS_FILE).is_file():
            recorded += read_jobs_file(root / JOBS_FILE)
        dirs |= found
    pipelines = {d for d in dirs if (d / "pipeline_report.json").is_file()}
    jobs = [d for d in dirs if not any(p in d.parents for p in pipelines)]
    return recorded + [read_job(d) for d in sorted(jobs, key=_job_order)]


def jobs_text(jobs: Sequence[Job]) -> str:
    """``jobs.csv``: a job per row (``failed`` 1 where it has no metrics), every metric any job has."""
    metrics = list(dict.fromkeys(m for j in jobs if j.metrics for m in j.metrics))  # first-seen order
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["job", "overrides", "failed", "wall_s", *metrics])
    for j in jobs:
        values = [j.metrics.get(m, "") if j.metrics else "" for m in metrics]
        wall = "" if j.wall_s is None else j.wall_s
        writer.writerow([str(j.path), json.dumps(j.overrides), int(j.metrics is None), wall, *values])
    return buf.getvalue()


def read_jobs_file(path: Path) -> list[Job]:
    """The jobs a ``jobs.csv`` recorded (see :func:`jobs_text`)."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    fixed = {"job", "overrides", "failed", "wall_s"}

    def metrics(row: dict[str, str]) -> dict[str, float] | None:
        return None if row["failed"] == "1" else {k: float(v) for k, v in row.items() if k not in fixed and v}

    return [
        Job(Path(row["job"]), json.loads(row["overrides"]), metrics(row),
            float(row["wall_s"]) if row["wall_s"] else None)  # fmt: skip
        for row in rows
    ]


def _ignored(key: str, ignore: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in ignore)


def swept_keys(jobs: Sequence[Job], ignore: Sequence[str] = NON_GROUPING) -> list[str]:
    """Override keys whose value is not the same in every job (missing counts as a value)."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    return [k for k in keys if not _ignored(k, ignore) and len({j.overrides.get(k) for j in jobs}) > 1]


def declared_sweep_keys(roots: Sequence[Path], ignore: Sequence[str] = NON_GROUPING) -> list[str]:
    """Keys the multiruns under ``roots`` declare as swept (each ``multirun.yaml``: the sweeper's
    ``params`` and the command line's sweep overrides), even where the command line pinned one value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys: list[str] = []
    for path in sorted(p for root in roots for p in Path(root).rglob("multirun.yaml")):
        hydra_cfg = (yaml.safe_load(path.read_text()) or {}).get("hydra", {})
        params = hydra_cfg.get("sweeper", {}).get("params") or {}
        task = (hydra_cfg.get("overrides") or {}).get("task") or []
        parsed = OverridesParser.create().parse_overrides(task)
        swept = [o.key_or_group for o in parsed if o.is_sweep_override()]
        keys += [k for k in [*params, *swept] if k not in keys and not _ignored(k, ignore)]
    return keys


def group_jobs(jobs: Sequence[Job], by: Sequence[str] | None = None) -> tuple[list[str], list[Group]]:
    """Jobs grouped by ``by`` (default: the swept keys other than seed), groups in launch order."""
    keys = list(by) if by is not None else swept_keys(jobs)
    groups: dict[tuple, Group] = {}
    for job in jobs:
        key = tuple((k, job.overrides.get(k, "-")) for k in keys)
        groups.setdefault(key, Group(key)).jobs.append(job)
    return keys, list(groups.values())


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """The last dotted component of each key where that is unambiguous (``sod_noise.rate`` -> ``rate``)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def select_metrics(groups: Sequence[Group], patterns: Sequence[str] | None) -> list[str]:
    """Metric names in first-seen order, filtered by glob ``patterns`` (in the patterns' order)."""
    seen: list[str] = []
    for g in groups:
        for job in g.done:
            seen += [m for m in job.metrics if m not in seen]
    if not patterns:
        return seen
    out: list[str] = []
    for pattern in patterns:
        out += [m for m in seen if fnmatch.fnmatchcase(m, pattern) and m not in out]
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (n - 1); std is NaN for a single value (nothing to estimate it from)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def _fmt(value: float, digits: int) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def cell(values: Sequence[float], n_jobs: int, digits: int) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    text = _fmt(m, digits) if len(values) == 1 else f"{_fmt(m, digits)} ± {_fmt(s, digits)}"
    return text if len(values) == n_jobs else f"{text} (n={len(values)})"


@dataclass
class Comparison:
    group: Group
    baseline: Group
    metric: str
    delta: float
    beyond_2std: bool | None  # None: a side has fewer than 2 values, no std to judge by
    paired: list[float] = field(default_factory=list)  # per-seed differences, in seed order

    def paired_text(self, digits: int) -> tuple[str, str, str]:
        """(paired Δ mean ± std, how many seeds move which way, p of the paired t-test); '-' when unpaired."""
        n = len(self.paired)
        if n < 2:
            return "-", "-", "-"
        mean, std = mean_std(self.paired)
        higher = sum(d > 0 for d in self.paired)
        lower = sum(d < 0 for d in self.paired)
        seeds = f"{higher}/{n} higher" if higher >= lower else f"{lower}/{n} lower"
        return f"{mean:+.{digits}f} ± {std:.{digits}f}", seeds, f"{paired_t_p(self.paired):.3g}"


def paired_t_p(differences: Sequence[float]) -> float:
    """Two-sided p of the one-sample t-test of the per-seed differences against 0 (n - 1 dof)."""
    from scipy import stats

    mean, std = mean_std(differences)
    if std == 0:  # every seed moved by the same amount: scipy's t is undefined (0 / 0) or infinite
        return 1.0 if mean == 0 else 0.0
    return float(stats.ttest_1samp(differences, 0.0).pvalue)


def paired_differences(group: Group, baseline: Group, metric: str) -> list[float]:
    """``group - baseline`` of each seed both ran once (none if a seed ran twice in a row: ambiguous)."""

    def by_seed(g: Group) -> dict[str, float] | None:
        seeds = [j.overrides.get("seed") for j in g.done]
        if None in seeds or len(set(seeds)) < len(seeds):
            return None
        values = {s: j.metrics.get(metric) for s, j in zip(seeds, g.done)}
        return {s: float(v) for s, v in values.items() if v is not None and math.isfinite(v)}

    a, b = by_seed(group), by_seed(baseline)
    if a is None or b is None:
        return []
    common = sorted(a.keys() & b.keys(), key=lambda s: (len(s), s))
    return [a[s] - b[s] for s in common]


def compare(
    groups: Sequence[Group], keys: Sequence[str], spec: str, metrics: Sequence[str]
) -> list[Comparison]:
    """Each group against the group that differs only in ``KEY`` and has the baseline value."""
    key, _, base_value = spec.partition("=")
    if key not in keys:
        raise ValueError(
            f"--compare {spec}: {key!r} is not a grouping key (grouping keys: {', '.join(keys) or 'none'})"
        )
    i = keys.index(key)
    if not base_value:
        base_value = groups[0].key[i][1]
    if base_value not in {g.key[i][1] for g in groups}:
        raise ValueError(f"--compare {spec}: no group has {key}={base_value}")
    rest = lambda g: g.key[:i] + g.key[i + 1 :]  # noqa: E731
    base = {rest(g): g for g in groups if g.key[i][1] == base_value}
    out = []
    for g in groups:
        b = base.get(rest(g))
        if b is None or b is g:
            continue
        for m in metrics:
            gv, bv = g.values(m), b.values(m)
            if not gv or not bv:
                continue
            (gm, gs), (bm, bs) = mean_std(gv), mean_std(bv)
            judged = len(gv) > 1 and len(bv) > 1
            beyond = abs(gm - bm) > 2 * max(gs, bs) if judged else None
            out.append(Comparison(g, b, m, gm - bm, beyond, paired_differences(g, b, m)))
    return out


def markdown(keys, groups, metrics, comparisons, digits: int = 3) -> str:
    short = short_names(keys)
    lines = ["| " + " | ".join([*map(short.get, keys), "n", *metrics, "wall s/job"]) + " |"]
    lines.append("|" + "---|" * len(keys) + "---:|" * (len(metrics) + 2))
    for g in groups:
        n = f"{len(g.done)}" + (f" (+{len(g.failed)} failed)" if g.failed else "")
        walls = [j.wall_s for j in g.done if j.wall_s is not None]
        wall = f"{statistics.fmean(walls):.0f}" if walls else "-"
        cells = [cell(g.values(m), len(g.done), digits) for m in metrics]
        row = [shown(v) for _, v in g.key] + [n] + cells + [wall]
        lines.append("| " + " | ".join(row) + " |")
    if comparisons:
        lines += [
            "",
            "| group | vs | metric | Δ mean | beyond 2 std | paired Δ (per seed) | seeds | p (paired t) |",
            "|---|---|---|---:|---|---:|---|---:|",
        ]
        verdict = {True: "yes", False: "no", None: "n < 2"}
        for c in comparisons:
            cells = [c.group.label(short), c.baseline.label(short), c.metric, f"{c.delta:+.{digits}f}"]
            cells += [verdict[c.beyond_2std], *c.paired_text(digits)]
            lines.append("| " + " | ".join(cells) + " |")
    failed = [j for g in groups for j in g.failed]
    if failed:
        lines += ["", "Failed or unfinished jobs (no metrics): " + ", ".join(str(j.path) for j in failed)]
    return "\n".join(lines) + "\n"


def csv_text(keys, groups, metrics) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        [*keys, "n", "failed", *[f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")], "wall_s"]
    )
    for g in groups:
        stats = []
        for m in metrics:
            values = g.values(m)
            stats += [*mean_std(values), len(values)]
        walls = [j.wall_s for j in g.done if j.wall_s is not None]
        wall = statistics.fmean(walls) if walls else float("nan")
        writer.writerow([v for _, v in g.key] + [len(g.done), len(g.failed), *stats, wall])
    return buf.getvalue()


def tick_label(label: str, width: int = 40) -> str:
    """``label`` cut in the middle to ``width`` characters: a swept list or path as long as the chart
    would squeeze the bars away (the table and CSV keep it whole); both ends tell such labels apart."""
    if len(label) <= width:
        return label
    head = (width - 1) // 2
    return label[:head] + "\u2026" + label[len(label) - (width - 1 - head) :]


def bar_chart(path: Path, keys, groups, metrics) -> None:
    """One panel per metric, one bar per group, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = short_names(keys)
    labels = [tick_label(g.label(short)) for g in groups]
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(max(4.0, 0.5 * len(groups) + 2) * len(metrics), 4), squeeze=False
    )
    for ax, m in zip(axes[0], metrics):
        stats = [mean_std(g.values(m)) for g in groups]
        means = [s[0] for s in stats]
        errs = [0 if math.isnan(s[1]) else s[1] for s in stats]
        ax.bar(range(len(groups)), means, yerr=errs, capsize=3)
        shown = [(mu - e, mu + e) for mu, e in zip(means, errs) if math.isfinite(mu)]
        if shown:  # zoom on the values: differences of a few points must be visible
            lo, hi = min(a for a, _ in shown), max(b for _, b in shown)
            pad = 0.25 * (hi - lo) or 0.05 * abs(hi) or 0.05
            ax.set_ylim(lo - pad if lo - pad > 0 or lo < 0 else 0, hi + pad)
        ax.set_xticks(range(len(groups)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(m)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def report(
    dirs: Sequence[str | Path],
    out: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    by: Sequence[str] | None = None,
    compare_spec: str | None = None,
    digits: int = 3,
    plot: bool = True,
) -> str:
    """Write ``report.md/.csv/.png`` for the jobs under ``dirs`` and return the Markdown."""
    jobs = find_jobs([Path(d) for d in dirs])
    if not jobs:
        raise FileNotFoundError(
            f"{', '.join(map(str, dirs))}: no run found (no .hydra/overrides.yaml or pipeline_report.json)"
        )
    if by is None and not swept_keys(jobs):  # one group: name it by what the multirun declared swept
        by = [k for k in declared_sweep_keys([Path(d) for d in dirs]) if any(k in j.overrides for j in jobs)]
    keys, groups = group_jobs(jobs, by)
    names = select_metrics(groups, metrics)
    if metrics and not names:
        raise ValueError(f"--metrics {' '.join(metrics)}: no job has such a metric")
    comparisons = compare(groups, keys, compare_spec, names) if compare_spec else []
    text = markdown(keys, groups, names, comparisons, digits)
    out = Path(out) if out is not None else Path(dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.md", text)
    write_text(out / "report.csv", csv_text(keys, groups, names))
    write_text(out / JOBS_FILE, jobs_text(jobs))
    if plot and names:
        bar_chart(out / "report.png", keys, groups, names)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segexp.report", description=__doc__.split("\n")[0])
    parser.add_argument(
        "dirs", nargs="+", help="multirun/sweep directories, pipeline directories or single runs"
    )
    parser.add_argument("--metrics", nargs="+", help="metric names or globs, in table order (default: all)")
    parser.add_argument(
        "--by", nargs="+", help="group by these override keys (default: the swept keys but seed)"
    )
    parser.add_argument(
        "--compare", metavar="KEY[=BASELINE]", help="differences to the baseline value of KEY"
    )
    parser.add_argument("--out", help="where report.md/.csv/.png go (default: the first dir)")
    parser.add_argument("--digits", type=int, default=3)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    try:
        text = report(args.dirs, args.out, args.metrics, args.by, args.compare, args.digits, not args.no_plot)
    except (FileNotFoundError, ValueError) as err:
        print(f"segexp.report: {err}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

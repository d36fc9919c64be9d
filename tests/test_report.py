"""`segexp.report` on run directories written as Hydra and the pipeline write them."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from segexp import report as rp


def make_job(sweep: Path, num: int, overrides: list[str], metrics: dict | None) -> Path:
    """A multirun job directory: ``<sweep>/<num>/.hydra/{overrides,config}.yaml`` (+ ``metrics.json``)."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text("seed: 0\n")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


CE = {0: 0.80, 1: 0.84, 2: 0.82}
CAS = {0: 0.90, 1: 0.91, 2: 0.92}


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    """loss x seed, launch order as Hydra numbers it; one CAS job lacks MAE."""
    sweep = tmp_path / "multirun"
    num = 0
    for loss, scores in (("ce", CE), ("cas", CAS)):
        for seed, s in scores.items():
            metrics = {"test/S": s, "test/MAE": 1 - s}
            if loss == "cas" and seed == 2:
                del metrics["test/MAE"]
            make_job(sweep, num, ["+experiment=study", f"loss={loss}", f"seed={seed}"], metrics)
            num += 1
    return sweep


def test_groups_by_swept_keys_without_seed(grid):
    keys, groups = rp.group_jobs(rp.find_jobs([grid]))
    assert keys == ["loss"]
    assert [g.key for g in groups] == [(("loss", "ce"),), (("loss", "cas"),)]
    assert [len(g.done) for g in groups] == [3, 3]


def test_mean_and_sample_std(grid):
    _, groups = rp.group_jobs(rp.find_jobs([grid]))
    m, s = rp.mean_std(groups[0].values("test/S"))
    assert m == pytest.approx(0.82)
    assert s == pytest.approx(0.02)  # sqrt(((-0.02)^2 + 0.02^2 + 0) / 2)
    assert rp.cell(groups[0].values("test/S"), 3, 3) == "0.820 ± 0.020"


def test_missing_metric_shows_its_own_n(grid, tmp_path):
    text = rp.report([grid], out=tmp_path / "out", metrics=["test/S", "test/MAE"], plot=False)
    cas_row = next(line for line in text.splitlines() if line.startswith("| cas "))
    assert "0.095 ± 0.007 (n=2)" in cas_row  # MAE of seeds 0, 1 only: 0.10, 0.09
    assert "0.910 ± 0.010" in cas_row


def test_failed_job_is_counted_and_listed_not_averaged(grid, tmp_path):
    failed = make_job(grid, 6, ["+experiment=study", "loss=ce", "seed=3"], None)
    text = rp.report([grid], out=tmp_path / "out", metrics=["test/S"], plot=False)
    ce_row = next(line for line in text.splitlines() if line.startswith("| ce "))
    assert "| 3 (+1 failed) |" in ce_row
    assert "0.820 ± 0.020" in ce_row
    assert str(failed) in text


def test_compare_flags_differences_beyond_two_std(grid):
    keys, groups = rp.group_jobs(rp.find_jobs([grid]))
    (s,) = rp.compare(groups, keys, "loss=ce", ["test/S"])
    assert s.delta == pytest.approx(0.09)
    assert s.beyond_2std is True  # 0.09 > 2 * 0.02
    keys, groups = rp.group_jobs(rp.find_jobs([grid]))
    groups[1].jobs[0].metrics["test/S"] = 0.80  # CAS 0.80, 0.91, 0.92: std 0.067
    (s,) = rp.compare(groups, keys, "loss=ce", ["test/S"])
    assert s.beyond_2std is False


def test_compare_pairs_within_the_other_keys(tmp_path):
    sweep = tmp_path / "m"
    num = 0
    for rate in ("0.0", "0.5"):
        for loss in ("ce", "cas"):
            for seed in range(2):
                s = {"ce": 0.8, "cas": 0.9}[loss] - float(rate) * (loss == "ce") + 0.01 * seed
                make_job(sweep, num, [f"loss={loss}", f"rate={rate}", f"seed={seed}"], {"S": s})
                num += 1
    keys, groups = rp.group_jobs(rp.find_jobs([sweep]))
    comps = rp.compare(groups, keys, "loss=ce", ["S"])
    assert [(dict(c.group.key)["rate"], round(c.delta, 6)) for c in comps] == [("0.0", 0.1), ("0.5", 0.6)]


def test_compare_names_a_wrong_key(grid):
    keys, groups = rp.group_jobs(rp.find_jobs([grid]))
    with pytest.raises(ValueError, match="'lr' is not a grouping key"):
        rp.compare(groups, keys, "lr", ["test/S"])


def test_outputs_csv_markdown_and_chart(grid, tmp_path):
    out = tmp_path / "out"
    rp.report([grid], out=out, metrics=["test/S"])
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["loss"] for r in rows] == ["ce", "cas"]
    assert float(rows[1]["test/S_mean"]) == pytest.approx(0.91)
    assert float(rows[1]["test/S_std"]) == pytest.approx(statistics.stdev(CAS.values()))
    assert (out / "report.md").read_text().startswith("| loss | n | test/S |")
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jobs_csv_keeps_every_job_so_a_report_pools_with_new_runs_after_the_runs_are_gone(grid, tmp_path):
    crashed = tmp_path / "crashed"
    make_job(crashed, 0, ["+experiment=study", "loss=cas", "seed=3"], None)
    kept = tmp_path / "experiments" / "study"
    rp.report([grid, crashed], out=kept)  # writes jobs.csv beside report.md, as a study's folder keeps it
    more = tmp_path / "more"
    make_job(more, 0, ["+experiment=study", "loss=ce", "seed=3"], {"test/S": 0.86, "test/MAE": 0.14})
    pooled_from_runs = rp.report([grid, crashed, more], out=tmp_path / "a")
    pooled_from_file = rp.report([kept, more], out=tmp_path / "b")  # kept holds no run, only jobs.csv
    assert pooled_from_file == pooled_from_runs
    assert "| ce | 4 |" in pooled_from_file
    assert f"Failed or unfinished jobs (no metrics): {crashed / '0'}" in pooled_from_file  # still failed


def test_one_row_study_is_named_by_the_keys_its_multirun_declared_swept(tmp_path):
    sweep = tmp_path / "one_row"
    for seed in (0, 1):
        overrides = ["+experiment=study", "variant=er", f"seed={seed}", "paths.data_dir=/d"]
        make_job(sweep, seed, overrides, {"x": seed})
    hydra_cfg = {"sweeper": {"params": {"variant": "cam,er", "seed": "0,1,2"}},
                 "overrides": {"task": ["+experiment=study", "variant=er", "seed=0,1", "lr=0.1,0.2"]}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra_cfg}))
    assert rp.declared_sweep_keys([sweep]) == ["variant", "lr"]  # seed is never a group key
    text = rp.report([sweep], out=tmp_path / "out", plot=False)
    assert text.startswith("| variant | n | x |") and "| er | 2 | 0.500 ± 0.707 |" in text
    # without a multirun.yaml (single runs) there is nothing to name the row by
    (sweep / "multirun.yaml").unlink()
    assert rp.report([sweep], out=tmp_path / "out2", plot=False).startswith("| n | x |")


def test_launch_order_is_numeric(tmp_path):
    sweep = tmp_path / "m"
    for num in (10, 2, 1):
        make_job(sweep, num, [f"lr={num}"], {"x": num})
    assert [j.path.name for j in rp.find_jobs([sweep])] == ["1", "2", "10"]


def test_optuna_trials_are_groups_of_one(tmp_path):
    sweep = tmp_path / "optuna"
    for num, lr in enumerate((0.01, 0.003)):
        make_job(sweep, num, [f"schedule.optimizer.lr={lr}", "seed=0"], {"val/mIoU": 0.5 + lr})
    (sweep / "optimization_results.yaml").write_text("best_value: 0.51\n")
    text = rp.report([sweep], out=tmp_path / "out", plot=False)
    assert "| 0.01 | 1 | 0.510 |" in text  # one value: no ± (no std from one run)


def test_pipeline_runs_flatten_each_stage(tmp_path):
    for seed, (cam, crf, retrain) in enumerate(((0.35, 0.45, 0.50), (0.37, 0.47, 0.54))):
        root = tmp_path / f"pipe{seed}"
        make_job(root, 0, [], {"val/mIoU": 0.1}).rename(root / "train")  # a stage's own run: not a job
        report = {
            "dir": str(root),
            "overrides": ["+experiment=seam_shapes", f"seed={seed}"],
            "wall_s": 100.0 + seed,
            "train": {"val/cls_F1": 0.9},
            "cam": {"best_mIoU": cam, "best_threshold": 0.3},
            "crf": {"pseudo_mIoU": crf},
            "retrain": {"test/mIoU": retrain},
            "rounds": [
                {"round": 0, "cam": {"best_mIoU": cam}},
                {"round": 1, "clusters": {"subtype_purity": crf}},
            ],
        }
        (root / "pipeline_report.json").write_text(json.dumps(report))
    jobs = rp.find_jobs([tmp_path])
    assert [j.path.name for j in jobs] == ["pipe0", "pipe1"]
    keys, groups = rp.group_jobs(jobs)
    assert keys == [] and len(groups) == 1
    metrics = rp.select_metrics(groups, ["cam/best_mIoU", "crf/pseudo_mIoU", "retrain/test/mIoU"])
    assert metrics == ["cam/best_mIoU", "crf/pseudo_mIoU", "retrain/test/mIoU"]
    assert rp.mean_std(groups[0].values("retrain/test/mIoU"))[0] == pytest.approx(0.52)
    assert statistics.fmean(j.wall_s for j in jobs) == pytest.approx(100.5)
    # SC-CAM's rounds (a list of records) flatten by position
    assert rp.mean_std(groups[0].values("rounds/1/clusters/subtype_purity"))[0] == pytest.approx(0.46)
    assert rp.mean_std(groups[0].values("rounds/0/cam/best_mIoU"))[0] == pytest.approx(0.36)


def test_cli_error_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert rp.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no run found" in err and "empty" in err


def test_cli_unknown_metric_is_named(grid, capsys):
    assert rp.main([str(grid), "--metrics", "test/Sx", "--no-plot"]) == 2
    assert "test/Sx" in capsys.readouterr().err


def test_nan_metric_is_left_out_of_the_mean(tmp_path):
    sweep = tmp_path / "m"
    make_job(sweep, 0, ["seed=0"], {"x": 1.0})
    make_job(sweep, 1, ["seed=1"], {"x": float("nan")})
    _, (group,) = rp.group_jobs(rp.find_jobs([sweep]))
    assert group.values("x") == [1.0]
    assert math.isnan(rp.mean_std(group.values("x"))[1])


def test_testbed_diagnostics_beside_metrics_are_metrics_too(tmp_path):
    """A run's `testbed_diagnostics.json` (segexp.testbed) joins its metrics as testbed/...; the
    strings in it (run, root) are not metrics."""
    for seed, fp in enumerate((0.2, 0.4)):
        job = make_job(tmp_path / "multirun", seed, [f"seed={seed}"], {"val/cam_best_mIoU": 0.3})
        diagnostics = {"root": "/data/x", "cooc": {"circle/water": {"fp_rate/stuff_without_class": fp}}}
        (job / "testbed_diagnostics.json").write_text(json.dumps(diagnostics))
    (group,) = rp.group_jobs(rp.find_jobs([tmp_path / "multirun"]))[1]
    fp_rates = group.values("testbed/cooc/circle/water/fp_rate/stuff_without_class")
    assert rp.mean_std(fp_rates)[0] == pytest.approx(0.3)
    assert not any(m.startswith("testbed/root") for m in group.done[0].metrics)


def test_absolute_paths_under_the_working_directory_are_shown_relative(tmp_path, monkeypatch):
    sweep = tmp_path / "m"
    ckpt = tmp_path / "logs" / "pre" / "last.ckpt"
    for num, value in enumerate(("null", str(ckpt))):
        make_job(sweep, num, [f"backbone.pretrained={value}", "seed=0"], {"x": float(num)})
    monkeypatch.chdir(tmp_path)
    text = rp.report([sweep], out=tmp_path / "out", compare_spec="backbone.pretrained=null", plot=False)
    assert "| logs/pre/last.ckpt | 1 |" in text
    assert "| pretrained=logs/pre/last.ckpt | pretrained=null |" in text
    assert str(tmp_path) not in text
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert rows[1]["backbone.pretrained"] == str(ckpt)  # the CSV keeps the value as run


def test_chart_of_long_swept_values_lays_out_without_warnings(tmp_path):
    """A swept transform list is ~100 characters: its tick label is cut in the middle (both ends kept),
    so matplotlib's tight_layout still fits; the table keeps the value whole."""
    import warnings

    sweep = tmp_path / "m"
    resize = "_target_:albumentations.Resize,height:{0},width:{0},interpolation:1,mask_interpolation:0"
    values = ["[{" + resize.format(s) + "}]" for s in (128, 64)]
    for num, value in enumerate(values):
        make_job(sweep, num, [f"data.transforms.eval={value}", "seed=0"], {"x": float(num)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tight_layout's "not compatible" warning fails the test
        text = rp.report([sweep], out=tmp_path / "out", metrics=["x"])
    assert values[0] in text
    short = rp.tick_label(values[1])
    assert len(short) == 40 and short.startswith("[{_target_") and short.endswith("interpolation:0}]")
    assert rp.tick_label("cam") == "cam"


def test_paired_view_shows_a_difference_every_seed_has_under_a_larger_seed_spread(tmp_path):
    """Seeds spread 0.1-0.9 and the variant adds 0.04-0.06 to each: the 2-std test cannot see it, the
    per-seed differences can (mean 0.05, std 0.01, 3 of 3 higher; t = 0.05 / (0.01 / sqrt 3) = 8.66 on
    2 dof: p = 0.0131)."""
    sweep = tmp_path / "m"
    base, gain = {0: 0.1, 1: 0.5, 2: 0.9}, {0: 0.04, 1: 0.05, 2: 0.06}
    num = 0
    for variant in ("base", "new"):
        for seed, value in base.items():
            value += gain[seed] if variant == "new" else 0.0
            make_job(sweep, num, [f"variant={variant}", f"seed={seed}"], {"m": value})
            num += 1
    keys, groups = rp.group_jobs(rp.find_jobs([sweep]))
    (c,) = rp.compare(groups, keys, "variant=base", ["m"])
    assert c.beyond_2std is False and c.paired == pytest.approx([0.04, 0.05, 0.06])
    mean_std, seeds, p = c.paired_text(3)
    assert (mean_std, seeds) == ("+0.050 ± 0.010", "3/3 higher")
    assert float(p) == pytest.approx(0.0131, abs=5e-4)
    text = rp.report([sweep], out=tmp_path / "out", compare_spec="variant=base", plot=False)
    assert "| variant=new | variant=base | m | +0.050 | no | +0.050 ± 0.010 | 3/3 higher | 0.0131 |" in text


def test_paired_view_needs_the_same_seeds_once_per_row(tmp_path):
    """Only seeds both rows ran count; a seed that ran twice in a row makes the pairing ambiguous."""
    sweep = tmp_path / "m"
    rows = [("base", 0, 0.5), ("base", 1, 0.6), ("base", 2, 0.7)]
    rows += [("new", 1, 0.4), ("new", 2, 0.6), ("new", 3, 0.9)]
    for num, (variant, seed, value) in enumerate(rows):
        make_job(sweep, num, [f"variant={variant}", f"seed={seed}"], {"m": value})
    keys, groups = rp.group_jobs(rp.find_jobs([sweep]))
    (c,) = rp.compare(groups, keys, "variant=base", ["m"])
    assert c.paired == pytest.approx([-0.2, -0.1])  # seeds 1 and 2
    assert c.paired_text(2)[1] == "2/2 lower"
    make_job(sweep, 6, ["variant=new", "seed=1"], {"m": 0.45})
    keys, groups = rp.group_jobs(rp.find_jobs([sweep]))
    (c,) = rp.compare(groups, keys, "variant=base", ["m"])
    assert c.paired == [] and c.paired_text(2) == ("-", "-", "-")

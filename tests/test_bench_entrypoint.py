"""``python -m segexp.bench``: a benchmark's own options reach it; misuse is refused with the reason."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, assert_ok, run_cli


def test_options_of_one_named_benchmark_reach_it():
    proc = run_cli("segexp.bench", ["metrics", "--num", "6", "--size", "24", "--batch", "3"], cwd=REPO)
    assert_ok(proc)
    assert "6 label maps" in proc.stdout  # --num 6 reached segexp.bench.metrics (its default is 1000)
    assert "24x24" in proc.stdout


def test_options_after_a_double_dash_reach_the_benchmark():
    """The form the package docstring gives: ``segexp.bench NAME -- --opt value`` (argparse alone would
    read everything after ``--`` as benchmark names)."""
    proc = run_cli("segexp.bench", ["metrics", "--", "--num", "5", "--size", "20", "--batch", "3"], cwd=REPO)
    assert_ok(proc)
    assert "5 label maps" in proc.stdout
    assert "20x20" in proc.stdout


def test_options_with_several_benchmarks_are_refused():
    proc = run_cli("segexp.bench", ["metrics", "wsss", "--size", "24"], cwd=REPO)
    assert proc.returncode == 2
    assert "belong to one benchmark" in proc.stderr


def test_unknown_benchmark_is_named():
    proc = run_cli("segexp.bench", ["no_such_bench"], cwd=REPO)
    assert proc.returncode == 2
    assert "no_such_bench" in proc.stderr


def test_gpu_bench_runs_the_paper_network_on_a_testbed_batch_on_cpu(tmp_path, monkeypatch):
    """`segexp.bench gpu --quick` on CPU: the paper experiment's network (cam_voc: ResNet-38) trained a
    step on a real testbed batch; a recipe that cannot be built is a row with its error, not a crash."""
    import json

    from segexp.bench import gpu

    monkeypatch.setitem(gpu.METHODS, "broken", ("no_such_experiment", "cam_shapes"))
    out = tmp_path / "gpu.json"
    rows = gpu.main(["--quick", "--methods", "cam", "broken", "--precisions", "32", "bf16-mixed",
                     "--data-dir", str(tmp_path / "data"), "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == rows
    cam = [r for r in rows if r["method"] == "cam"]
    assert [r["precision"] for r in cam] == ["32", "bf16-mixed"]
    for r in cam:
        assert r["backbone"] == "resnet38d" and (r["batch"], r["size"], r["mode"]) == (2, 64, "1 device")
        assert r["images_per_s"] > 0 and r["peak_MB"] is None  # CPU: torch keeps no peak count
    (broken,) = [r for r in rows if r["method"] == "broken"]
    assert "no_such_experiment" in broken["error"]


@pytest.mark.slow
def test_gpu_bench_ddp_step_on_two_cpu_processes(tmp_path):
    from segexp.bench import gpu

    rows = gpu.main(["--quick", "--methods", "cam", "--precisions", "32", "--ddp", "--ddp-backend", "gloo",
                     "--data-dir", str(tmp_path / "data")])  # fmt: skip
    assert [r["mode"] for r in rows] == ["1 device", "ddp x2"] and all(r["images_per_s"] > 0 for r in rows)


def test_methods_bench_reference_is_the_plain_loss_of_the_same_network(tmp_path):
    """`segexp.bench methods`: for the plain CAM method the reference *is* its loss (same value), and for
    SEAM it is that loss on SEAM's own network (one forward, no second view, no ER/PCM terms)."""
    import torch

    from segexp.bench.gpu import build_method, paper_setting, testbed_batch, total_loss
    from segexp.bench.methods import reference_loss
    from segexp.methods.cam import CAM

    for name in ("cam", "seam"):
        cfg, _, _ = paper_setting(name, quick=True)
        batch = testbed_batch(cfg, name, 64, 2, tmp_path / "data")
        torch.manual_seed(0)
        method = build_method(cfg, torch.device("cpu"), False, False).eval()  # eval: no dropout draws
        with torch.no_grad():
            plain = reference_loss(method)(batch)
            full = total_loss(method)(batch)
            cam_loss = CAM.compute_losses(method, batch)["cls"]
        assert plain.item() == pytest.approx(cam_loss.item())
        if name == "cam":
            assert plain.item() == pytest.approx(full.item())
        else:  # SEAM's loss has more terms than the plain one
            assert len(method.compute_losses(batch)) > 1


def test_bench_crops_keep_the_papers_view_proportions():
    """PPC's second view is 128 px of a 448-px crop: a benchmark at 128 px times a 37-px view, not a
    second full-size forward; at the paper's crop the setting is the paper's."""
    from segexp.bench.gpu import paper_setting

    cfg, size, _ = paper_setting("fbr_ppc", quick=False)
    assert (size, cfg.method.view_size) == (448, 128)
    cfg, size, _ = paper_setting("fbr_ppc", quick=True, size=128)
    assert (size, cfg.method.view_size) == (128, 37)
    cfg, size, _ = paper_setting("fbr_ppc", quick=True)
    assert (size, cfg.method.view_size) == (64, 18)


def test_cam_export_bench_batches_images_without_changing_their_cams():
    """`bench wsss`'s batched export (images of one size per call): the same CAMs as one image per call."""
    from segexp.bench.wsss import bench_cam_export

    out = bench_cam_export(size=24, n=4, batch=2)
    assert out["batch"] == 2 and out["images_per_s"] > 0 and out["images_per_s_batched"] > 0
    assert out["batched_max_abs_diff"] < 1e-5


def test_method_overhead_is_the_median_of_paired_ratios_with_quartiles():
    """Rounds 2 and 3 ran while the machine was busy, on both steps of their pair: their ratios are
    those of the quiet rounds, whereas the ratio of the two medians (1.4) would count the spell."""
    from segexp.bench.methods import ratio_summary

    method = [1.2, 2.6, 12.0, 1.4, 1.1]
    reference = [1.0, 2.0, 10.0, 1.0, 1.0]  # ratios 1.2, 1.3, 1.2, 1.4, 1.1
    out = ratio_summary(method, reference)
    assert out == {"ratio": 1.2, "ratio_q1": 1.2, "ratio_q3": 1.3}
    assert ratio_summary([3.0], [2.0]) == {"ratio": 1.5, "ratio_q1": 1.5, "ratio_q3": 1.5}

"""Image-level pipeline: dense CRF, random walk, CAM export cache and a resumed pipeline."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from segexp.inference.crf import cam_crf_scores, crf_inference
from segexp.inference.random_walk import random_walk
from segexp.losses.affinity import dense_affinity, pair_offsets


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_crf_improves_a_blurred_cam_on_a_synthetic_image():
    import cv2

    rng = np.random.default_rng(0)
    gt = np.zeros((64, 64), bool)
    gt[20:44, 16:40] = True
    image = np.where(gt[..., None], [200, 40, 40], [30, 90, 160]).astype(np.float32)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    cam = cv2.GaussianBlur(gt.astype(np.float32), (0, 0), 6)
    cam = cam / cam.max()
    thr = 0.26
    before = _iou(cam > thr, gt)
    q = crf_inference(image, cam_crf_scores(cam[None], "constant", bg_threshold=thr))
    after = _iou(q.argmax(0) == 1, gt)
    assert after > before + 0.05 and after > 0.9


def test_random_walk_spreads_a_seed_in_its_region_not_across_a_strong_edge():
    h, w = 6, 6
    feats = torch.zeros(1, h, w)
    feats[:, :, 3:] = 10.0  # strong edge between columns 2 and 3
    aff = dense_affinity(feats, radius=5)
    assert torch.allclose(aff, aff.T) and torch.all(aff.diagonal() == 1)
    scores = torch.zeros(2, h, w)
    scores[0] = 0.02  # background everywhere
    scores[1, 2, 0] = 1.0  # one seed in the left region
    out = random_walk(scores, aff, beta=8, logt=6)
    label = out.argmax(0)
    assert torch.all(label[:, :3] == 1)  # the whole left region
    assert torch.all(label[:, 3:] == 0)  # nothing across the edge
    assert out[1, :, 3:].max() < 1e-6


def test_pair_offsets_match_psa_radius_5():
    offs = pair_offsets(5)
    assert len(offs) == 34 and (0, 1) in offs and (4, 0) in offs and (4, 3) not in offs


TINY = [
    "data.prepare.num_images=24",
    "data.prepare.size=48",
    "data.image_size=48",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "schedule.epochs=1",
    "method.inference.scales=[1.0]",
    "method.inference.flip=false",
    "logger=csv",
    "callbacks.progress_bar.refresh_rate=1000",
    "trainer.enable_model_summary=false",
]


def test_pipeline_resumes_an_interrupted_stage(tmp_path, caplog):
    from segexp.pipeline import run

    overrides = ["+experiment=cam_shapes", f"paths.data_dir={tmp_path / 'data'}", *TINY]
    out = tmp_path / "pipe"
    first = run(overrides, str(out), stop_after="cam")
    assert first["cam"]["computed"] == first["cam"]["images"] > 0
    ckpt = out / "train" / "checkpoints" / "last.ckpt"
    mtime = ckpt.stat().st_mtime_ns

    # interrupt: half of the CAM entries lost, stage 1 marker gone (its last.ckpt survives)
    entries = sorted((tmp_path / "data" / "stage_cache" / "cam").glob("*/entries/*.npz"))
    for e in entries[::2]:
        e.unlink()
    (out / "train" / "done.json").unlink()
    with caplog.at_level(logging.INFO, logger="segexp.pipeline"):
        second = run(overrides, str(out), stop_after="cam")
    assert any("resuming from" in r.message for r in caplog.records)
    assert second["cam"]["computed"] == len(entries[::2])
    assert second["cam"]["reused"] == len(entries) - len(entries[::2])
    assert second["cam"]["best_mIoU"] == pytest.approx(first["cam"]["best_mIoU"], abs=1e-6)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="segexp.pipeline"):
        third = run(overrides, str(out), stop_after="cam")
    assert any("is current: skipped" in r.message for r in caplog.records)
    assert third["cam"]["computed"] == 0 and ckpt.stat().st_mtime_ns >= mtime


def test_pseudo_entry_point_reads_the_pipeline_stage_files(tmp_path):
    """`segexp.pseudo stage=crf` and the pipeline compose the same conf/stage files: the CAMs the
    pipeline exported are reused (same cache key), and the CRF labels are scored."""
    from hydra import compose, initialize_config_dir

    from segexp.pipeline import run as run_pipeline
    from segexp.pseudo import normalize_pseudo_overrides
    from segexp.pseudo import run as run_pseudo

    overrides = ["+experiment=cam_shapes", f"paths.data_dir={tmp_path / 'data'}", *TINY]
    first = run_pipeline(overrides, str(tmp_path / "pipe"), stop_after="cam")
    ckpt = sorted((tmp_path / "pipe" / "train" / "checkpoints").glob("*.ckpt"))
    record = __import__("json").loads((tmp_path / "pipe" / "train" / "done.json").read_text())
    argv = normalize_pseudo_overrides(
        [*overrides, "stage=crf", f"ckpt_path={record['ckpt']}", f"paths.output_dir={tmp_path / 'pseudo'}"]
    )
    assert ckpt and "+stage=crf" in argv
    conf_dir = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose(config_name="pseudo", overrides=argv)
    (report,) = run_pseudo(cfg)
    assert report["stage"] == "crf" and "upstream" not in report  # CAMs came from the pipeline's cache
    assert report["computed"] == first["cam"]["images"]
    assert report["scored_images"] == report["images"] and report["pseudo"]["mIoU"] > 0.05


def test_pipeline_retrains_a_supervised_network_on_the_last_stage(tmp_path):
    """Stages 1-4 end to end with SEAM; SEAM's method overrides do not leak into stage 2's network."""
    import yaml

    from segexp.pipeline import run

    overrides = [
        "+experiment=seam_shapes",
        f"paths.data_dir={tmp_path / 'data'}",
        *TINY,
        "method.weights.amp=0.5",  # a SEAM-only key: composing it into the supervised net would fail
        "pipeline.retrain_epochs=1",
        "pipeline.stages.crf.iterations=2",
    ]
    report = run(overrides, str(tmp_path / "pipe"))
    assert report["crf"]["scored_images"] == report["crf"]["images"] and report["crf"]["pseudo_mIoU"] > 0.05
    assert "val/mIoU" in report["retrain"] and "test/mIoU" in report["retrain"]
    retrain_cfg = yaml.safe_load((tmp_path / "pipe" / "retrain" / "config.yaml").read_text())
    assert retrain_cfg["method"]["_target_"].endswith("Supervised")
    assert retrain_cfg["method"]["target_key"] == "pseudo"
    stage1_cfg = yaml.safe_load((tmp_path / "pipe" / "train" / "config.yaml").read_text())
    assert stage1_cfg["method"]["weights"]["amp"] == 0.5
    assert (tmp_path / "pipe" / "pipeline_report.json").is_file()


def test_run_keys_ignore_runtime_settings_and_follow_the_rest():
    from segexp.pipeline.runs import cam_network_key, run_key
    from tests.conftest import compose

    def key(*extra: str) -> str:
        return run_key(cam_network_key(compose(["+experiment=sccam_shapes", *extra])))

    base = key()
    # more loader workers, another cache folder, another device: the finished stage is reused
    assert key("data.num_workers=2", "data.eval_batch_size=16", "paths.cache_dir=/elsewhere") == base
    assert key("data.train_wrappers.0.stage.features.device=cuda") == base
    # anything that changes what the network learns retrains it
    assert key("data.batch_size=4") != base
    assert key("data.train_wrappers.0.stage.random_state=1") != base
    assert key("seed=1") != base


def test_run_key_follows_the_weights_file_behind_backbone_pretrained(tmp_path):
    import os

    from segexp.pipeline.runs import cam_network_key, run_key
    from tests.conftest import compose

    weights = tmp_path / "backbone.pth"
    weights.write_bytes(b"first")

    def key() -> str:
        return run_key(cam_network_key(compose(["+experiment=cam_shapes", f"backbone.pretrained={weights}"])))

    first = key()
    assert key() == first
    weights.write_bytes(b"second, retrained")  # same path, another file
    os.utime(weights, ns=(1, 1))
    assert key() != first


@pytest.mark.parametrize("logt", [6, 8])
def test_sparse_walk_equals_the_released_dense_squarings(logt):
    """psa/SEAM: T^(2^logt) by logt dense squarings, then v T. Here: 2^logt sparse products of v.
    Same numbers to float rounding, same labels, on a radius-5 affinity of a 20 x 24 grid."""
    from segexp.inference.random_walk import sparse_affinity
    from segexp.models.affinitynet import pair_affinity, pair_indices

    torch.manual_seed(0)
    h, w = 20, 24
    src, dst = pair_indices(h, w, 5)
    aff = pair_affinity(torch.randn(1, 8, h, w), src, dst)[0]
    scores = torch.rand(4, h, w)
    sparse = sparse_affinity(aff, src, dst, h * w)
    t = sparse.to_dense().double().pow(8)
    t = t / t.sum(0, keepdim=True)
    for _ in range(logt):  # the released computation, in float64 as the reference
        t = t @ t
    reference = (scores.reshape(4, -1).double() @ t).reshape(4, h, w)
    walked = random_walk(scores, sparse, beta=8, logt=logt)
    assert torch.allclose(walked.double(), reference, rtol=1e-4, atol=1e-6)
    assert torch.equal(walked.argmax(0), reference.argmax(0))
    from_dense = random_walk(scores, sparse.to_dense(), beta=8, logt=logt)
    assert torch.allclose(from_dense, walked)  # a dense affinity gives the same


def test_former_pipeline_flags_become_overrides():
    from segexp.pipeline.__main__ import translate_flags

    argv = ["+experiment=cam_shapes", "--dir", "/x/p", "--stop-after=cam", "seed=1"]
    want = ["+experiment=cam_shapes", "hydra.run.dir=/x/p", "stop_after=cam", "seed=1"]
    assert translate_flags(argv) == want


@pytest.mark.slow
def test_pipeline_sweeps_like_train_one_directory_per_job(tmp_path):
    """`python -m segexp.pipeline -m`: a Hydra multirun, each job a pipeline directory that
    `segexp.report` reads; a wrong step name is one line."""
    import json
    import subprocess
    import sys

    args = [sys.executable, "-m", "segexp.pipeline", "-m", "+experiment=cam_shapes", *TINY,
            f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}", "stop_after=train",
            "seed=0,1"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (sweep,) = (tmp_path / "logs" / "pipeline" / "multiruns").iterdir()
    reports = [json.loads((sweep / str(n) / "pipeline_report.json").read_text()) for n in (0, 1)]
    assert [r["overrides"][-1] for r in reports] == ["seed=0", "seed=1"]
    assert all("val/cam_best_mIoU" in r["train"] and "cam" not in r for r in reports)
    bad_args = [*args[:3], "+experiment=cam_shapes", "stop_after=nope", f"paths.log_dir={tmp_path}"]
    bad = subprocess.run(bad_args, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "stop_after='nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_cam_stage_needs_the_methods_inference_settings_and_names_the_missing_key():
    """No hidden fallback: scales/flip/bg_threshold come from the method config (their one home)."""
    from segexp.stages.cam import CAMStage
    from segexp.utils.errors import UserError

    with pytest.raises(UserError, match=r"method\.inference\.scales"):
        CAMStage(method={"inference": {"flip": True}, "bg_threshold": 0.2}, ckpt_path=None)
    with pytest.raises(UserError, match=r"method\.bg_threshold"):
        CAMStage(method={"inference": {"scales": [1.0], "flip": False}}, ckpt_path=None)
    stage = CAMStage(method={"inference": {"scales": [1.0], "flip": False}}, ckpt_path=None, bg_threshold=0.3)
    assert stage.scales == (1.0,) and stage.flip is False and stage.bg_threshold == 0.3

"""Mechanism diagnostics: hand-computed values, and `segexp.testbed diagnose` on a real run directory."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_ok, run_cli

from segexp.metrics.testbed import CoocDiagnostics, PartDiagnostics, purity


def test_cooc_cam_shares_and_rates_by_hand():
    diag = CoocDiagnostics(threshold=0.5)
    cam = np.array([[0.9, 0.8, 0.1], [0.6, 0.2, 0.7]])
    stuff = np.array([[1, 0, 0], [1, 1, 1]], bool)
    cls = np.array([[0, 1, 1], [0, 0, 0]], bool)
    diag.update_cam(cam, stuff, cls)  # high: 4 pixels; on stuff: (0,0) (1,0) (1,2) = 3; on class: (0,1) = 1
    for p in (0.9, 0.2, 0.7, 0.4):
        diag.update_score("stuff_without_class", p)
    for p in (0.1, 0.6):
        diag.update_score("class_without_stuff", p)
    report = diag.report()
    assert report["cam_share_on_stuff"] == pytest.approx(0.75)
    assert report["cam_share_on_class"] == pytest.approx(0.25)
    assert report["fp_rate/stuff_without_class"] == pytest.approx(0.5)
    assert report["miss_rate/class_without_stuff"] == pytest.approx(0.5)
    assert report["n/stuff_without_class"] == 4
    assert math.isnan(CoocDiagnostics().report()["cam_share_on_stuff"])


def test_part_coverage_by_hand():
    diag = PartDiagnostics(threshold=0.5)
    obj = np.zeros((4, 4), bool)
    obj[:, :3] = True  # 12 px object
    badge = np.zeros((4, 4), bool)
    badge[1:3, 1] = True  # 2 px badge, 10 px body
    cam = np.zeros((4, 4))
    cam[1:3, 1] = 1.0  # the whole badge
    cam[0, 0] = 0.6  # one body pixel
    diag.update(cam, badge, obj)
    report = diag.report()
    assert report["badge_recall"] == 1.0 and report["body_recall"] == pytest.approx(0.1)
    assert report["badge_share_of_object_cam"] == pytest.approx(2 / 3)
    assert report["badge_share_of_object_area"] == pytest.approx(2 / 12)


def test_purity():
    assert purity([0, 0, 1, 1, 1], ["a", "a", "b", "b", "a"]) == pytest.approx(0.8)
    assert purity([0, 0, 0], ["a", "b", "c"]) == pytest.approx(1 / 3)
    assert purity([0, 1, 2], ["a", "b", "c"]) == 1.0


def test_subtype_purity_pools_classes_and_skips_absent():
    from segexp.metrics.testbed import subtype_purity

    clusters = np.array([[0, -1], [0, 1], [1, 1], [1, 0]])  # class 0: 4 images; class 1: 3
    subtypes = [["disc", ""], ["disc", "bar"], ["ring", "bar"], ["disc", "ring"]]
    out = subtype_purity(clusters, subtypes)
    # class 0: clusters {0: disc, disc}, {1: ring, disc} -> 3 of 4
    # class 1: {1: bar, bar}, {0: ring} -> 3 of 3
    assert out["subtype_purity"] == pytest.approx(6 / 7)
    # one cluster per class: class 0 disc 3 of 4, class 1 bar 2 of 3
    assert out["subtype_purity_one_cluster"] == pytest.approx(5 / 7)


def test_body_subtypes_read_back_from_a_generated_part_set(tmp_path):
    """The writer's sub-types come back from the root's COCO JSON, per class, largest object first."""
    from segexp.data.synth import body_subtypes, ensure_synthetic
    from segexp.data.testbed import Testbed

    testbed = Testbed.from_dict({"parts": {}})
    root = ensure_synthetic(tmp_path / "parts", num_images=12, size=64, seed=0, testbed=testbed, workers=1)
    bodies = body_subtypes(root, "train")
    assert len(bodies) >= 5 and all(len(row) == 5 for row in bodies.values())
    seen = {b for row in bodies.values() for b in row if b}
    assert seen and seen <= set(testbed.parts.bodies)
    plain = ensure_synthetic(tmp_path / "plain", num_images=12, size=64, seed=0, workers=1)
    with pytest.raises(ValueError, match="not a part set"):
        body_subtypes(plain, "train")


CLASS_BODIES = [
    "data.prepare.testbed.parts.bodies=[disc,bar,ring,plate,half]",
    "data.prepare.testbed.parts.class_bodies=2",
]


@pytest.mark.parametrize(
    ("testbed", "extra", "k"), [("cooc", [], None), ("parts", [], 3), ("parts", CLASS_BODIES, 2)]
)
def test_diagnose_a_trained_run(tmp_path, testbed, extra, k):
    """A few CAM steps on a tiny mechanism set, then the diagnostics read its run directory. Purity is
    taken with k = the sub-types one class has (3 class-neutral bodies; 2 of 5 with class_bodies 2)."""
    from segexp.testbed import main

    run_dir = tmp_path / "run"
    args = ["+experiment=cam_shapes", f"testbed={testbed}", f"paths.data_dir={tmp_path}",
            f"hydra.run.dir={run_dir}", "data.prepare.num_images=20", "trainer.max_steps=2",
            "trainer.limit_val_batches=1", "test=false", "data.num_workers=0", *extra]  # fmt: skip
    assert_ok(run_cli("segexp.train", args, cwd=tmp_path))
    assert main(["diagnose", str(run_dir), "--max-images", "6"]) == 0
    report = json.loads((run_dir / "testbed_diagnostics.json").read_text())
    if testbed == "cooc":
        rates = report["cooc"]["circle/water"]
        assert 0 <= rates["cam_share_on_stuff"] + rates["cam_share_on_class"] <= 1 or math.isnan(
            rates["cam_share_on_stuff"]
        )
        counted = sum(v for k, v in rates.items() if k.startswith("n/"))
        assert counted == 4 + 4  # val and the counterfactual test split: 4 images each of 20
        assert {"n/stuff_without_class", "n/class_without_stuff"} <= set(rates)
    else:
        parts = report["parts"]
        assert 0.05 < parts["badge_share_of_object_area"] < 0.35
        assert parts["k"] == k and parts["subtype_purity"] >= parts["subtype_purity_one_cluster"]
        # --ckpt init: the network the run started from (its seed's random init), reproducibly
        from segexp.testbed import _load_run

        start, again, trained = (_load_run(run_dir, w)[0].state_dict() for w in ("init", "init", "last"))
        key = next(k for k in start if k.endswith("weight") and start[k].dim() == 4)
        assert torch.equal(start[key], again[key]) and not torch.equal(start[key], trained[key])
        assert main(["diagnose", str(run_dir), "--ckpt", "init", "--max-images", "6"]) == 0
        assert json.loads((run_dir / "testbed_diagnostics.json").read_text())["ckpt"] == "init"
    assert main(["diagnose", str(tmp_path / "nowhere")]) == 2


@pytest.mark.parametrize(
    ("variant", "exact"), [("oracle", True), ("shuffled", False)]
)
def test_purity_of_the_sub_categories_a_run_trains_on(data_dir, tmp_path, variant, exact):
    """The probe's true sub-types score purity 1 (the wrapper's clusters line up with the reader's ids);
    the shuffled control, the same counts dealt at random, scores below 1 and no lower than one cluster."""
    import hydra

    from segexp.testbed import trained_subcategory_purity
    from tests.conftest import SMALL_SYNTH, compose

    cfg = compose(["+experiment=study_sccam_oracle", "hydra.mode=RUN", f"variant={variant}", *SMALL_SYNTH,
                   f"paths.data_dir={data_dir}", "data.num_workers=0"], out_dir=tmp_path)  # fmt: skip
    dm = hydra.utils.instantiate(cfg.data, train_keys=list(cfg.method.train_keys), eval_keys=["image"])
    dm.prepare_data()
    out = trained_subcategory_purity(dm.build_dataset("train"), cfg.data.prepare.root, cfg.data.splits.train)
    assert out["k"] == 3
    if exact:
        assert out["subtype_purity"] == 1.0
    else:
        assert out["subtype_purity_one_cluster"] <= out["subtype_purity"] < 1.0
    plain = compose(["+experiment=cam_shapes", "testbed=parts", *SMALL_SYNTH, f"paths.data_dir={data_dir}"])
    plain_dm = hydra.utils.instantiate(plain.data, train_keys=["image", "labels"], eval_keys=["image"])
    plain_dm.prepare_data()
    assert trained_subcategory_purity(plain_dm.build_dataset("train"), plain.data.prepare.root) is None


def test_a_standalone_sccam_run_reports_the_purity_of_its_clusters(tmp_path):
    """End of fit: testbed_diagnostics.json holds the purity of the k-means sub-categories the run trained
    on (a report column); `diagnose` rebuilds the same from the run's config and the stage cache."""
    from segexp.testbed import main

    run_dir = tmp_path / "run"
    args = ["+experiment=sccam_shapes", f"paths.data_dir={tmp_path}", f"hydra.run.dir={run_dir}",
            "data.prepare.num_images=20", "trainer.max_steps=2", "trainer.limit_val_batches=1", "test=false",
            "data.num_workers=0", "method.num_subcategories=2"]  # fmt: skip
    assert_ok(run_cli("segexp.train", args, cwd=tmp_path))
    written = json.loads((run_dir / "testbed_diagnostics.json").read_text())["parts"]["trained_subcategories"]
    assert written["k"] == 2
    assert written["subtype_purity_one_cluster"] <= written["subtype_purity"] <= 1.0
    assert main(["diagnose", str(run_dir), "--max-images", "4"]) == 0
    again = json.loads((run_dir / "testbed_diagnostics.json").read_text())["parts"]["trained_subcategories"]
    assert again == written

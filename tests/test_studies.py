"""Each study end to end in small (slow): its multirun, then `segexp.report`, and every row present.

The study's own sweep runs with 2 seeds, a few training steps and a small synthetic set; what is
checked is the route (experiment file -> multirun -> report), not the numbers (those are the study's
``results.md``).
"""

from __future__ import annotations

import csv
import itertools

import pytest
import yaml
from omegaconf import OmegaConf

from segexp import report
from tests.conftest import CONF_DIR, REPO, assert_ok, compose, run_cli

SHORT = [
    "data.prepare.num_images=48",
    "data.num_workers=0",
    "schedule.epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "seed=0,1",
]

#: LDF Table 5 (the study and its two harder views): the report's metrics and the four supervisions
LDF_TABLE5 = (
    ["test/MAE", "test/meanF", "test/meanE"],
    {"method.supervision": ["[body,detail]", "[body,edge]", "[sal,detail]", "[sal,edge]"]},
)

#: study -> (metrics for the report, the swept values whose product must be the rows)
STUDIES = {
    "study_bottomup": (
        ["test/intra_sim", "test/inter_sim", "test/recall@0.5", "test/mIoU", "test/mBIoU"],
        {"ablation": ["discriminative", "plus_mse", "full"]},
    ),
    "study_cas_lfd": (
        ["test/S", "test/MAE", "test/maxF"],
        {"loss": ["ce", "cas"], "data.prepare.testbed.sod_noise.rate": ["0.0", "0.25", "0.5"]},
    ),
    "study_ldf_supervision": LDF_TABLE5,
    "study_ldf_textured": LDF_TABLE5,
    "study_ldf_hard": LDF_TABLE5,
    "study_box2seg": (
        ["test/mIoU"],
        {"variant": ["box_rect", "gc_only", "full", "no_att", "no_aff", "no_pretrain"]},
    ),
    "study_box2seg_fullsup": (
        ["test/mIoU"],
        {"missing_rate": ["0.0", "0.05", "0.3"], "variant": ["ce", "att_no_bg"]},
    ),
    "study_seam": (
        ["val/cam_best_mIoU", "val/cls_F1"],
        {"variant": ["cam", "er", "er_pcm", "er_pcm_ohem"]},
    ),
    "study_seam_px128": (
        ["val/cam_best_mIoU", "val/cls_F1"],
        {"variant": ["cam", "er", "er_pcm", "er_pcm_ohem"]},
    ),
    "study_fbr": (
        ["val/cam_best_mIoU", "testbed/cooc/circle/water/fp_rate/stuff_without_class"],
        {"variant": ["base", "fbr", "quirks"]},
    ),
    "study_fbr_seam": (
        ["val/cam_best_mIoU", "testbed/cooc/circle/water/fp_rate/stuff_without_class"],
        {"variant": ["base", "fbr", "quirks"]},
    ),
    "study_seam_pipeline": (
        ["train/val/cam_best_mIoU", "crf/pseudo_mIoU", "rw/pseudo_mIoU", "retrain/val/mIoU"],
        {"variant": ["cam", "er_pcm_ohem"]},
    ),
    "study_sccam": (
        ["rounds/0/cam/best_mIoU", "rounds/1/cam/best_mIoU", "rounds/1/clusters/subtype_purity"],
        {"variant": ["rounds", "k2", "k5"]},
    ),
    "study_sccam_oracle": (
        ["val/cam_best_mIoU", "val/cls_F1"],
        {"variant": ["plain", "oracle", "oracle_merged"]},
    ),
    "study_sccam_oracle_px128": (
        ["val/cam_best_mIoU", "val/cls_F1", "testbed/parts/trained_subcategories/subtype_purity"],
        {"variant": ["plain", "oracle", "shuffled"]},
    ),
    "study_sccam_classbodies": (
        ["val/cam_best_mIoU", "val/cls_F1", "testbed/parts/trained_subcategories/subtype_purity"],
        {"variant": ["plain", "oracle", "shuffled"]},
    ),
}

#: studies whose jobs are pipelines (`segexp.pipeline -m`), with the pipeline's own overrides
PIPELINE_STUDIES = {
    "study_sccam": ["stop_after=train"],
    "study_seam_pipeline": ["pipeline.retrain_epochs=1"],
}

#: studies whose rows start from the miniature ImageNet (a CAM network trained on the default set)
PRETRAINED = {"study_seam", "study_seam_px128", "study_seam_pipeline", "study_fbr_seam"}


def pretrained_backbone(study: str, data_dir, tmp_path) -> list[str]:
    """The miniature ImageNet of a PRETRAINED study; here a few steps of one, as the study's README
    makes it."""
    if study not in PRETRAINED:
        return []
    run = tmp_path / "pretrain"
    args = ["+experiment=cam_shapes", *SHORT[:-1], f"paths.data_dir={data_dir}", f"hydra.run.dir={run}"]
    assert_ok(run_cli("segexp.train", args, cwd=REPO))
    return [f"backbone.pretrained={run / 'checkpoints' / 'last.ckpt'}"]


def sweep_params(study: str) -> dict[str, list[str]]:
    """The study's sweep as Hydra's own override parser reads it: key -> the values, as strings."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    node = yaml.safe_load((CONF_DIR / "experiment" / f"{study}.yaml").read_text())
    while "hydra" not in node:  # a study that only changes its parent study's setting sweeps the parent's
        parent = next(d for d in node["defaults"] if isinstance(d, str) and d.startswith("study_"))
        node = yaml.safe_load((CONF_DIR / "experiment" / f"{parent}.yaml").read_text())
    params = node["hydra"]["sweeper"]["params"]
    parser = OverridesParser.create()
    out = {}
    for key, value in params.items():
        override = parser.parse_override(f"{key}={value}")
        sweep = override.is_sweep_override()  # a single value (one row) is an element, not a sweep
        out[key] = list(override.sweep_string_iterator()) if sweep else [override.get_value_element_as_str()]
    return out


def test_every_study_is_listed_here():
    assert sorted(p.stem for p in (CONF_DIR / "experiment").glob("study_*.yaml")) == sorted(STUDIES)


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_study_sweeps_what_its_table_lists_and_each_value_composes(study, tmp_path):
    """Each swept value composes and resolves (an interpolated variant that points nowhere fails here)."""
    _, swept = STUDIES[study]
    params = sweep_params(study)
    assert params.pop("seed") == ["0", "1", "2"]  # >= 3 seeds per row
    assert params == swept
    for key, values in swept.items():
        for value in values:
            weights = ["backbone.pretrained=/x.ckpt"] if study in PRETRAINED else []
            cfg = compose(
                [f"+experiment={study}", "hydra.mode=RUN", f"{key}={value}", *weights], out_dir=tmp_path
            )
            OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.slow
@pytest.mark.parametrize("study", sorted(STUDIES))
def test_study_multirun_and_report(study, data_dir, tmp_path):
    metrics, swept = STUDIES[study]
    sweep = tmp_path / "multirun"
    weights = pretrained_backbone(study, data_dir, tmp_path)
    entry = "segexp.pipeline" if study in PIPELINE_STUDIES else "segexp.train"
    extra = [*weights, *PIPELINE_STUDIES.get(study, [])]
    extra += [f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(
        entry,
        [f"+experiment={study}", *SHORT, *extra],
        cwd=REPO,
        timeout=1800,
    )
    assert_ok(proc)
    assert report.main([str(sweep), "--metrics", *metrics]) == 0
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [[r[k] for k in swept] for r in rows] == [list(p) for p in itertools.product(*swept.values())]
    for row in rows:
        assert row["n"] == "2" and row["failed"] == "0"
        for m in metrics:
            assert row[f"{m}_n"] == "2", (row, m)

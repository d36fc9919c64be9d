"""The bad-input matrix: each mistake a new user makes ends in a short message naming the key or
file, with exit status 2, before anything expensive runs; and the smaller first-hour fixes."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest
import torch

from segexp.utils.errors import UserError
from tests.conftest import REPO, compose, run_cli


def short_error(proc, *needles: str, max_lines: int = 3) -> str:
    """Exit status 2, at most ``max_lines`` lines on stderr, no traceback, every needle in them."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err and len(err.splitlines()) <= max_lines, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# -- command line: config names and values ------------------------------------------------------
def test_unknown_experiment_lists_close_matches_and_trains_nothing(tmp_path):
    proc = run_cli("segexp.train", ["+experiment=supervised_shape", f"hydra.run.dir={tmp_path}/r"], cwd=REPO)
    short_error(proc, "experiment=supervised_shape", "supervised_shapes")
    assert not (tmp_path / "r").exists()


def test_unknown_option_in_a_sweep_is_named():
    from segexp.utils.cli import check_config_choices

    with pytest.raises(UserError, match=r"loss=cass: .*close matches: cas"):
        check_config_choices(["-m", "+experiment=cas_shapes_sod", "loss=ce,cass", "seed=0,1"])
    check_config_choices(["loss=ce,cas", "schedule.optimizer.lr=0.1", "hydra/launcher=submitit_local"])


@pytest.mark.parametrize(
    "override, needle",
    [
        ("data.batch_size=abc", "data.batch_size='abc': expected an integer"),
        ("schedule.optimizer.lr=fast", "schedule.optimizer.lr='fast': expected a number"),
        ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
    ],
)
def test_wrong_value_names_its_key_before_anything_is_built(override, needle, tmp_path):
    t0 = time.perf_counter()
    proc = run_cli(
        "segexp.train", ["+experiment=supervised_shapes", override, f"hydra.run.dir={tmp_path}"], cwd=REPO
    )
    short_error(proc, needle)
    assert "CONFIG" not in proc.stdout  # failed before the config tree, let alone a model
    assert time.perf_counter() - t0 < 60


def test_type_check_keeps_numbers_numbers_and_allows_null():
    from omegaconf import OmegaConf

    from segexp.utils.validate import check_types

    ref = OmegaConf.create({"a": 1, "b": 0.1, "c": True, "d": "x", "e": 2})
    check_types(  # a flag may become a path (backbone.pretrained=/w.pth); a string may become anything
        OmegaConf.create({"a": 3, "b": 1, "c": "/w.pth", "d": 5, "e": None}), ref, ["a", "b", "c", "d", "e"]
    )
    with pytest.raises(UserError, match=r"b='x': expected a number"):
        check_types(OmegaConf.create({"b": "x"}), ref, ["b"])
    with pytest.raises(UserError, match=r"a=1.5: expected an integer"):
        check_types(OmegaConf.create({"a": 1.5}), ref, ["a"])


def test_test_weights_takes_best_or_last_and_picks_that_checkpoint():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from segexp.runner import checkpoint_to_test
    from segexp.utils.validate import check_choices

    with pytest.raises(UserError, match=r"test_weights='bset': must be one of best, last"):
        check_choices(OmegaConf.create({"test_weights": "bset"}))
    check_choices(OmegaConf.create({"test_weights": "last"}))
    trainer = SimpleNamespace(checkpoint_callback=SimpleNamespace(best_model_path="/r/epoch_003.ckpt"))
    assert checkpoint_to_test(trainer, "best") == "/r/epoch_003.ckpt"
    assert checkpoint_to_test(trainer, "last") is None  # the weights training ended with
    assert checkpoint_to_test(SimpleNamespace(checkpoint_callback=None), "best") is None


# -- data ---------------------------------------------------------------------------------------
def test_missing_dataset_is_reported_before_the_model_with_the_setting_to_change(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli(
        "segexp.train",
        [
            "+experiment=supervised_voc",
            f"paths.data_dir={tmp_path / 'empty'}",
            f"hydra.run.dir={tmp_path / 'r'}",
        ],
        cwd=REPO,
    )
    err = short_error(proc, str(tmp_path / "empty" / "VOCdevkit"), "paths.data_dir=", "SEGEXP_DATA")
    assert "not found" in err
    assert "huggingface" not in proc.stdout + err  # the (pretrained) model was never built


def test_data_error_from_a_loader_worker_keeps_its_file_and_problem():
    from torch.utils.data import DataLoader, Dataset

    from segexp.data.io import DatasetError

    class Broken(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise DatasetError("/d/x.jpg", "cannot decode image")

    with pytest.raises(DatasetError) as err:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert str(err.value) == "/d/x.jpg: cannot decode image" and err.value.path == "/d/x.jpg"


def test_unreachable_hub_is_one_line_naming_the_local_file_option(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from segexp.models import backbone

    monkeypatch.setattr(backbone, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"backbone.pretrained=/path/to/weights") as err:
        backbone.Backbone("resnet18", pretrained=True)
    assert "cannot be reached" in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - t0 < 30  # no minutes of retries


# -- checkpoints --------------------------------------------------------------------------------
def _checkpoint(tmp_path, made_by: dict | None, state_dict: dict):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": state_dict, **({"segexp": made_by} if made_by else {})}, path)
    return path


def test_checkpoint_of_another_method_is_refused_in_one_line(tmp_path):
    import hydra

    from segexp.runner import check_checkpoint

    cfg = compose(["+experiment=supervised_shapes"], out_dir=tmp_path)
    method = hydra.utils.instantiate(cfg.method)
    made_by = {"method": "cas", "method_target": "segexp.methods.cas.CAS", "experiment": "cas_shapes_sod"}
    with pytest.raises(UserError, match=r"trained by method 'cas' .*\+experiment=cas_shapes_sod"):
        check_checkpoint(_checkpoint(tmp_path, made_by, {}), cfg, method)
    with pytest.raises(UserError, match=r"weights do not fit method 'supervised' \(0 missing, 1 unexpected"):
        check_checkpoint(
            _checkpoint(tmp_path, None, {**method.state_dict(), "head.extra": torch.zeros(1)}), cfg, method
        )
    check_checkpoint(_checkpoint(tmp_path, None, method.state_dict()), cfg, method)  # a fitting one passes


# -- run directories ----------------------------------------------------------------------------
def test_two_runs_started_together_get_two_directories(tmp_path):
    """Hydra makes the run directory before the job starts: two launches in the same second (each
    stopped at once by a wrong value) must leave two directories, not one shared."""
    args = ["+experiment=supervised_shapes", "data.batch_size=abc", f"paths.log_dir={tmp_path}"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda _: run_cli("segexp.train", args, cwd=REPO), range(2)))
    assert [p.returncode for p in procs] == [2, 2]
    runs = sorted(p.name for p in (tmp_path / "train" / "runs").iterdir())
    assert len(runs) == 2 and all("_supervised_shapes_" in r for r in runs), runs


# -- presets ------------------------------------------------------------------------------------
def test_debug_preset_keeps_the_trainers_processes():
    cfg = compose(["+experiment=supervised_shapes", "trainer=ddp_cpu", "debug=fdr"])
    assert cfg.trainer.devices == 2 and cfg.trainer.strategy == "ddp" and cfg.trainer.fast_dev_run
    cfg = compose(["+experiment=supervised_shapes", "trainer.limit_train_batches=2"])  # no `+` needed
    assert cfg.trainer.limit_train_batches == 2


# -- smaller first-hour fixes -------------------------------------------------------------------
def test_panel_figure_has_column_titles_rows_and_a_legend_of_the_classes_shown():
    from segexp.data.io import voc_palette
    from segexp.reporting.panels import MIN_TILE, make_figure

    image = np.full((32, 32, 3), 128, np.uint8)
    gt, pred = np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8)
    gt[4:12, 4:12] = 3
    fig = make_figure([image, image], [gt, gt], [pred, pred], ["bg", "a", "b", "c"])
    scale = -(-MIN_TILE // 32)
    assert fig.shape[0] == 22 + 2 * (32 * scale + 2) + 22  # title band, two rows, legend band
    legend = fig[-22:].reshape(-1, 3)
    for c in (0, 3):  # the classes present have a swatch
        assert (legend == voc_palette()[c]).all(1).any()
    assert not (legend == voc_palette()[1]).all(1).any()  # class 1 is absent: no swatch


def test_cam_column_is_a_heat_map_titled_beside_the_prediction():
    from segexp.reporting.panels import make_figure

    image = np.zeros((16, 16, 3), np.uint8)
    label = np.zeros((16, 16), np.uint8)
    cam = np.zeros((16, 16), np.float32)
    cam[:, 8:] = 1.0
    fig = make_figure([image], [label], [label], ["bg"], extras={"CAM": [cam]})
    plain = make_figure([image], [label], [label], ["bg"])
    assert fig.shape[1] > plain.shape[1]  # one more column
    right = fig[30:-30, -20:-4].reshape(-1, 3).astype(int)  # the hot half of the CAM column
    assert (right[:, 0] > right[:, 2]).all()  # JET at 1.0 is red


def test_progress_lines_are_paced_by_time(caplog):
    import logging

    from segexp.utils.progress import Progress

    caplog.set_level(logging.INFO, logger="segexp.progress")
    slow = Progress("export", 50, every_s=3600)
    for _ in range(50):
        slow.advance()
    assert len(caplog.records) == 1 and "50/50" in caplog.text  # only the end, within the hour
    caplog.clear()
    eager = Progress("export", 3, every_s=0)
    for _ in range(3):
        eager.advance()
    assert [r.getMessage().split(":")[1].split()[0] for r in caplog.records] == ["1/3", "2/3", "3/3"]


def test_sod_eval_help_shows_the_folder_layout(capsys):
    from segexp import sod_eval

    with pytest.raises(SystemExit):
        sod_eval.main(["--help"])
    out = capsys.readouterr().out
    assert "pred_root/<method>/<dataset>/<stem>" in out and "--gt-dir" in out


def test_saliency_dump_writes_original_size_maps_where_sod_eval_reads_them(tmp_path):
    from segexp import sod_eval
    from segexp.data.io import write_gray_png
    from segexp.reporting.dump import SaliencyDump

    gt = np.zeros((30, 40), np.uint8)
    gt[5:20, 10:30] = 255
    write_gray_png(tmp_path / "gt" / "test" / "Mask" / "a.png", gt)
    dump = SaliencyDump(tmp_path / "run", "cas", ["shapes_sod"])
    sal = torch.zeros(1, 64, 64)
    valid = torch.zeros(1, 64, 64, dtype=torch.bool)
    valid[0, :60, :] = True  # the eval batch was padded at the bottom
    sal[0, 10:40, 16:48] = 1.0
    dump.add({"meta": [{"id": "a", "orig_size": (30, 40)}], "valid": valid}, sal)
    written = tmp_path / "run" / "saliency" / "cas" / "shapes_sod" / "a.png"
    assert written.is_file()
    results = sod_eval.main(
        ["--pred-root", str(tmp_path / "run" / "saliency"), "--gt-root", str(tmp_path / "gt"), "--gt-dir",
         "test/Mask", "--methods", "cas", "--datasets", "shapes_sod", "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert results["cas"]["shapes_sod"]["MAE"] < 0.05  # the map came back at the GT's size and place


@pytest.mark.slow
def test_sod_route_train_eval_dump_then_sod_eval(data_dir, tmp_path):
    """CAS trained briefly -> segexp.eval dumps its maps -> segexp.sod_eval scores them; the
    checkpoint says which method made it."""
    from segexp import sod_eval
    from tests.conftest import SMALL_SYNTH, assert_ok

    common = ["+experiment=cas_shapes_sod", *SMALL_SYNTH, f"paths.data_dir={data_dir}", "data.num_workers=0"]
    run = tmp_path / "run"
    assert_ok(
        run_cli(
            "segexp.train", [*common, "debug=limit", "trainer.max_epochs=1", f"hydra.run.dir={run}"], cwd=REPO
        )
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    made_by = saved["hyper_parameters"]  # SegMethod.record_provenance: Lightning's hparams
    assert made_by["method"] == "cas" and made_by["experiment"] == "cas_shapes_sod"
    assert made_by["method_config"]["_target_"].endswith("CAS")
    from segexp.utils.checkpoints import load_method

    method = load_method(ckpt)  # no experiment config: the checkpoint's own record
    assert type(method).__name__ == "CAS" and not method.training
    for k, v in method.state_dict().items():
        assert torch.equal(v, saved["state_dict"][k]), k
    ev = tmp_path / "eval"
    proc = run_cli(
        "segexp.eval",
        [*common, f"ckpt_path={ckpt}", "dump.predictions=true", f"hydra.run.dir={ev}"],
        cwd=REPO,
    )
    assert_ok(proc)
    assert "sod_eval" in proc.stdout and "dirpath has changed" not in proc.stdout + proc.stderr
    maps = sorted((ev / "saliency" / "cas" / "shapes_sod").glob("*.png"))
    gt_root = next(data_dir.glob("shapes-n48-*")) / "SOD"
    assert len(maps) == len(list((gt_root / "test" / "Mask").glob("*.png"))) > 0
    from PIL import Image

    for m in maps:  # at the original size of each image (= its GT mask)
        assert Image.open(m).size == Image.open(gt_root / "test" / "Mask" / m.name).size
    results = sod_eval.main(  # every GT finds its map (a missing one is an error)
        ["--pred-root", str(ev / "saliency"), "--gt-root", str(gt_root), "--gt-dir", "test/Mask",
         "--methods", "cas", "--datasets", "shapes_sod", "--out", str(tmp_path / "table")]
    )  # fmt: skip
    assert (tmp_path / "table" / "results.md").is_file() and "MAE" in results["cas"]["shapes_sod"]


def test_load_method_rebuilds_from_the_checkpoint_record_alone(tmp_path):
    import hydra
    from omegaconf import OmegaConf

    from segexp.runner import provenance
    from segexp.utils.checkpoints import load_method

    cfg = compose(["+experiment=cas_shapes_sod"], out_dir=tmp_path)
    method = hydra.utils.instantiate(cfg.method)
    checkpoint = {"state_dict": method.state_dict(), "segexp": provenance(cfg)}
    assert checkpoint["segexp"]["method_config"] == OmegaConf.to_container(cfg.method, resolve=True)
    torch.save(checkpoint, tmp_path / "cas.ckpt")
    rebuilt = load_method(tmp_path / "cas.ckpt")
    assert type(rebuilt) is type(method) and not rebuilt.training
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt.saliency(image), method.eval().saliency(image))


def test_load_method_needs_a_recorded_config_and_never_refetches_weights(tmp_path):
    from segexp.utils.checkpoints import load_method, without_pretrained

    cfg = {"a": {"backbone": {"pretrained": "/w.pth", "name": "x"}}, "b": [{"pretrained": 1}], "pretrain": 1}
    assert without_pretrained(cfg) == {"a": {"backbone": {"pretrained": False, "name": "x"}},
                                       "b": [{"pretrained": False}], "pretrain": 1}  # fmt: skip
    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}}, old)
    with pytest.raises(UserError, match="records no method config"):
        load_method(old)


def test_user_error_raised_inside_hydra_instantiate_still_prints_one_line(capsys):
    import hydra
    from hydra.errors import InstantiationException

    from segexp.utils.errors import user_errors

    with pytest.raises(SystemExit) as stop, user_errors():
        try:
            target = "segexp.utils.checkpoints.recorded_config"
            hydra.utils.instantiate({"_target_": target, "checkpoint": {}, "path": "x"})
        except InstantiationException as wrapped:  # what Hydra raises around the constructor's error
            assert not isinstance(wrapped, UserError)
            raise
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: x: the checkpoint records no method config (written before checkpoints carried one); "
        "pass the method's config, e.g. from the run's config.yaml"
    )


def test_a_checkpoint_naming_its_method_by_a_former_class_name_is_still_that_method():
    from segexp.runner import same_class

    assert same_class("segexp.methods.cas.CASSaliency", "segexp.methods.cas.CAS")  # renamed, aliased
    assert same_class("segexp.methods.cam.CAMMethod", "segexp.methods.cam.CAM")
    assert not same_class("segexp.methods.cas.CAS", "segexp.methods.ldf.LDF")
    assert not same_class("segexp.methods.cas.Gone", "segexp.methods.cas.CAS")

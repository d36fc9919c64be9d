"""sod_eval on a tiny folder tree: tables, figures, and numbers equal to the metric's."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from segexp import sod_eval
from segexp.metrics.sod import SODMetrics


def _tree(tmp_path):
    rng = np.random.default_rng(0)
    data = {}
    for d, shapes in {"DS1": [(40, 50), (40, 50), (30, 20)], "DS2": [(24, 24)]}.items():
        for i, shape in enumerate(shapes):
            gt = np.zeros(shape, np.uint8)
            gt[shape[0] // 4: 3 * shape[0] // 4, shape[1] // 3:] = 255
            (tmp_path / "gt" / d).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / "gt" / d / f"im{i}.png"), gt)
            for k, meth in enumerate(("M1", "M2")):
                pred = np.clip(gt * (0.5 + 0.2 * k) + rng.random(shape) * 90, 0, 255).astype(np.uint8)
                if i == 2:
                    pred = cv2.resize(pred, (10, 15))  # smaller than its GT: resized back by sod_eval
                ext = ".bmp" if i == 1 else ".png"
                (tmp_path / "pred" / meth / d).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(tmp_path / "pred" / meth / d / f"im{i}{ext}"), pred)
                data.setdefault((meth, d), []).append((pred, gt))
    return data


def test_sod_eval_writes_tables_and_figures_with_metric_numbers(tmp_path):
    data = _tree(tmp_path)
    out = tmp_path / "out"
    res = sod_eval.main(["--pred-root", str(tmp_path / "pred"), "--gt-root", str(tmp_path / "gt"),
                         "--methods", "M1", "M2", "--datasets", "DS1", "DS2", "--out", str(out)])
    names = ("results.md", "results.csv", "results.tex", "results.json", "curves_DS1.png", "curves_DS2.png")
    for name in names:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.reader(open(out / "results.csv")))
    assert rows[0][:3] == ["method", "DS1/MAE", "DS1/maxF"] and len(rows[0]) == 1 + 2 * 9
    saved = json.loads((out / "results.json").read_text())
    for (meth, d), pairs in data.items():
        m = SODMetrics()
        for pred, gt in pairs:
            if pred.shape != gt.shape:
                pred = cv2.resize(pred, gt.shape[::-1], interpolation=cv2.INTER_LINEAR)
            m.update(pred[None], gt[None])
        want = m.compute()
        row = rows[1 + ("M1", "M2").index(meth)]
        for j, k in enumerate(sod_eval.TABLE_METRICS):
            assert res[meth][d][k] == pytest.approx(want[k], abs=1e-12), (meth, d, k)
            assert saved[meth][d][k] == pytest.approx(want[k], abs=1e-12)
            assert float(row[1 + ("DS1", "DS2").index(d) * 9 + j]) == pytest.approx(want[k], abs=1e-12)
    md = (out / "results.md").read_text()
    assert "| M1 |" in md and "DS2 wF" in md and "**" in md
    assert r"\multicolumn{9}{c}{DS1}" in (out / "results.tex").read_text()


def test_missing_prediction_names_the_file(tmp_path):
    _tree(tmp_path)
    (tmp_path / "pred" / "M1" / "DS2" / "im0.png").unlink()
    with pytest.raises(FileNotFoundError, match="im0"):
        sod_eval.main(["--pred-root", str(tmp_path / "pred"), "--gt-root", str(tmp_path / "gt"),
                       "--methods", "M1", "--datasets", "DS2", "--out", str(tmp_path / "o")])


def test_16_bit_maps_are_read_at_full_precision(tmp_path):
    """A 16-bit PNG map is scored as ``v / 65535`` stretched per image (the uint8 path's min-max),
    not as its high byte; 8-bit maps in the same folder keep the uint8 path."""
    gt = np.zeros((30, 40), np.uint8)
    gt[8:22, 10:30] = 255
    rng = np.random.default_rng(3)
    # all values below 256: an 8-bit reader would see a constant 0 map
    pred16 = (gt.astype(np.float64) / 255 * 150 + rng.random(gt.shape) * 100 + 3).astype(np.uint16)
    pred8 = np.clip(gt * 0.6 + rng.random(gt.shape) * 90, 0, 255).astype(np.uint8)
    for d in ("gt/DS", "pred/M/DS"):
        (tmp_path / d).mkdir(parents=True)
    for stem in ("a", "b"):
        cv2.imwrite(str(tmp_path / "gt" / "DS" / f"{stem}.png"), gt)
    assert cv2.imwrite(str(tmp_path / "pred" / "M" / "DS" / "a.png"), pred16)
    cv2.imwrite(str(tmp_path / "pred" / "M" / "DS" / "b.png"), pred8)
    back = cv2.imread(str(tmp_path / "pred" / "M" / "DS" / "a.png"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back, pred16)
    res = sod_eval.evaluate(tmp_path / "pred" / "M" / "DS", tmp_path / "gt" / "DS")

    x = pred16 / 65535.0
    want = SODMetrics()
    want.update(((x - x.min()) / (x.max() - x.min()))[None], gt[None])
    want.update(pred8[None], gt[None])
    want = want.compute()
    for k in sod_eval.TABLE_METRICS:
        assert res[k] == pytest.approx(want[k], abs=1e-12), k
    high_byte = SODMetrics()
    high_byte.update((pred16 >> 8).astype(np.uint8)[None], gt[None])
    high_byte.update(pred8[None], gt[None])
    high_byte = high_byte.compute()
    assert res["maxF"] - high_byte["maxF"] > 0.3 and res["S"] - high_byte["S"] > 0.2
    # a 16-bit map of another size is resized to its GT and stays in [0, 1]
    cv2.imwrite(str(tmp_path / "pred" / "M" / "DS" / "a.png"), cv2.resize(pred16, (20, 15)))
    small = sod_eval.evaluate(tmp_path / "pred" / "M" / "DS", tmp_path / "gt" / "DS")
    assert 0 <= small["MAE"] <= 1 and small["maxF"] > 0.5

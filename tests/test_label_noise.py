"""LFD label noise: deterministic per image id, the configured fraction, train split only."""

from __future__ import annotations

import hydra
import numpy as np
import pytest
from torch.utils.data import Dataset

from segexp.data.label_noise import LabelNoise, id_uniform
from tests.conftest import SMALL_SYNTH, compose


class FakeSOD(Dataset):
    name = "fake"

    def __init__(self, n=40, with_stems=True):
        ids = [f"img_{i:03d}" for i in range(n)]
        if with_stems:
            self.stems = ids
        self._ids = ids

    def __len__(self):
        return len(self._ids)

    def __getitem__(self, i):
        sal = np.zeros((6, 6), np.float32)
        sal[1:4, 2:5] = 1.0
        sal[0, 0] = 0.25  # soft value: swapped to 0.75
        return {"image": np.zeros((6, 6, 3), np.uint8), "saliency": sal, "meta": {"id": self._ids[i]}}


def _swapped(ds):
    return sorted(str(ds[i]["meta"]["id"]) for i in range(len(ds)) if ds[i]["meta"].get("label_swapped"))


def test_fraction_seed_and_determinism():
    reader = FakeSOD(40)
    a = LabelNoise(reader, fraction=0.5, seed=0)
    assert len(a.swapped) == 20
    assert _swapped(a) == sorted(a.swapped)
    assert a.swapped == LabelNoise(FakeSOD(40), fraction=0.5, seed=0).swapped  # reproducible
    assert a.swapped == LabelNoise(FakeSOD(40, with_stems=False), fraction=0.5, seed=0).swapped
    assert a.swapped != LabelNoise(reader, fraction=0.5, seed=1).swapped  # the seed matters
    assert len(LabelNoise(reader, fraction=0.25, seed=0).swapped) == 10
    assert not LabelNoise(reader, fraction=0.0).swapped
    assert len(LabelNoise(reader, fraction=1.0).swapped) == 40
    # bernoulli selection depends on (seed, id) only: a subset of the ids keeps its decisions
    full = LabelNoise(reader, fraction=0.5, seed=3, selection="bernoulli").swapped
    part = LabelNoise(FakeSOD(25), fraction=0.5, seed=3, selection="bernoulli").swapped
    assert part == {i for i in full if int(i[-3:]) < 25}
    assert all((id_uniform(3, i) < 0.5) == (i in full) for i in reader.stems)
    with pytest.raises(ValueError):
        LabelNoise(reader, fraction=1.5)


def test_swap_inverts_the_map_and_keeps_the_rest():
    reader = FakeSOD(10)
    noisy = LabelNoise(reader, fraction=1.0)
    clean, flipped = reader[3], noisy[3]
    np.testing.assert_array_equal(flipped["saliency"], 1.0 - clean["saliency"])
    assert flipped["saliency"][0, 0] == pytest.approx(0.75)
    np.testing.assert_array_equal(flipped["image"], clean["image"])
    assert "label_swapped" not in reader[3]["meta"]  # the wrapped reader's sample is untouched
    assert len(noisy) == len(reader) and noisy.name == "fake"


def test_only_the_training_split_is_corrupted(data_dir, tmp_path):
    wrapper = "[{_target_: segexp.data.label_noise.LabelNoise, _partial_: true, fraction: 0.5}]"
    cfg = compose(["+experiment=cas_shapes_sod", *SMALL_SYNTH, f"paths.data_dir={data_dir}",
                   "data.num_workers=0", f"+data.train_wrappers={wrapper}"],  # the mask-swap option
                  out_dir=tmp_path)
    dm = hydra.utils.instantiate(cfg.data, train_keys=["image", "saliency"], eval_keys=["image", "saliency"])
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    train = dm.datasets["train"].reader
    assert isinstance(train, LabelNoise) and len(train.swapped) == round(0.5 * len(train))
    for role in ("val", "test"):
        reader = dm.datasets[role].reader
        assert not isinstance(reader, LabelNoise)
        assert not any(reader[i]["meta"].get("label_swapped") for i in range(len(reader)))
    raw = dm.reader(split=dm.splits["train"], keys=["image", "saliency"])
    for i in range(len(raw)):
        swapped = train.stems[i] in train.swapped
        expected = 1.0 - raw[i]["saliency"] if swapped else raw[i]["saliency"]
        np.testing.assert_array_equal(train[i]["saliency"], expected)

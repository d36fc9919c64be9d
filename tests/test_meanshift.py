"""Spherical mean-shift and the multi-resolution merge (segexp.inference.meanshift)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segexp.inference.meanshift import multires_merge, segment_features, spherical_meanshift


def planted(k: int, sizes: list[int], d: int = 32, noise: float = 0.08, seed: int = 0):
    """k orthogonal cluster lines, Gaussian noise, and a random sign per point (f == -f)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:, :k].T
    truth = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    x = F.normalize(centres[truth] + noise * torch.randn(len(truth), d, generator=g), dim=1)
    signs = torch.where(torch.rand(len(truth), generator=g) < 0.5, -1.0, 1.0)
    return x * signs[:, None], truth, centres


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to relabelling: the label pairs form a bijection."""
    pairs = torch.unique(torch.stack([a, b]), dim=1)
    return pairs.shape[1] == len(torch.unique(a)) == len(torch.unique(b))


@pytest.mark.parametrize("k", [2, 5, 9])
def test_recovers_planted_orthogonal_clusters_exactly(k):
    sizes = [400 - 30 * i for i in range(k)]
    x, truth, centres = planted(k, sizes, seed=k)
    labels, modes = spherical_meanshift(x, num_seeds=64, generator=torch.Generator().manual_seed(0))
    assert len(modes) == k
    assert same_partition(labels, truth)
    # modes are the cluster lines (up to sign), labels ordered by cluster size
    assert ((modes @ centres.T).abs().max(1).values > 0.99).all()
    assert torch.equal(labels[truth == 0].unique(), torch.tensor([0]))


def test_antipodal_flips_do_not_change_the_clustering():
    x, truth, _ = planted(4, [200, 200, 150, 100], seed=7)
    flips = torch.where(torch.rand(len(x), generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    a, _ = spherical_meanshift(x, generator=torch.Generator().manual_seed(0))
    b, _ = spherical_meanshift(x * flips[:, None], generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_a_small_cluster_missed_by_the_first_seeds_is_found_in_a_later_round():
    x, truth, _ = planted(3, [1500, 1500, 6], seed=3)
    labels, modes = spherical_meanshift(
        x, num_seeds=8, seed_rounds=3, generator=torch.Generator().manual_seed(0)
    )
    assert len(modes) == 3 and same_partition(labels, truth)
    merged, modes = spherical_meanshift(
        x, num_seeds=8, seed_rounds=3, min_cluster_pixels=10, generator=torch.Generator().manual_seed(0)
    )
    assert len(modes) == 2 and len(merged.unique()) == 2  # the 6-point cluster was absorbed


def test_one_line_within_the_bandwidth_is_one_cluster_and_two_at_60_degrees_are_two():
    e1, e2 = torch.eye(3)[0], torch.eye(3)[1]
    near = F.normalize(e1 + 0.5 * e2, dim=0)  # 26.6 degrees from e1
    far = F.normalize(e1 + 1.8 * e2, dim=0)  # 60.9 degrees from e1
    assert len(spherical_meanshift(torch.stack([e1] * 20 + [near] * 20))[1]) == 1
    assert len(spherical_meanshift(torch.stack([e1] * 20 + [far] * 20))[1]) == 2


def test_segment_features_assigns_every_pixel_of_every_image():
    x, truth, _ = planted(3, [64, 64, 128], d=16, seed=5)
    maps = torch.stack([x.T.reshape(16, 16, 16), x.flip(0).T.reshape(16, 16, 16)])
    seg = segment_features(maps, generator=torch.Generator().manual_seed(0))
    assert seg.shape == (2, 16, 16) and int(seg.min()) == 1
    assert same_partition(seg[0].reshape(-1), truth + 1)
    assert same_partition(seg[1].reshape(-1), truth.flip(0) + 1)


def test_multires_merge_refines_subdivides_and_ignores_straddling_clusters():
    coarse = torch.ones(10, 10, dtype=torch.long)
    coarse[:, 5:] = 2
    fine = torch.full((10, 10), 7, dtype=torch.long)
    fine[:, 6:] = 8  # refines segment 2 (boundary moved right by one column)
    fine[0:3, 7:10] = 9  # a small object inside segment 2
    fine[8:, 3:7] = 5  # straddles 1 and 2: ignored (coarse labels stay)
    out = multires_merge([coarse, fine], contain=0.8, refine_iou=0.5, min_pixels=4)
    # IoUs: cluster 7 vs segment 1 = 46/58, cluster 8 vs 2 = 29/50 (both refine), 9 vs 2 = 9/50
    # column 5 moved from segment 2 to 1 (cluster 7 refines 1), except where cluster 5 straddles
    assert (out[:8, 5] == out[0, 0]).all() and (out[8:, 5] == out[9, 9]).all()
    assert len(out.unique()) == 3
    small = out[0:3, 7:10]
    assert (small == small[0, 0]).all() and small[0, 0] not in (out[0, 0], out[9, 9])
    # a one-level merge is the map itself (relabelled)
    assert same_partition(multires_merge([fine]).reshape(-1), fine.reshape(-1))

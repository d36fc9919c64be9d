"""Batched torch k-means (segexp/utils/kmeans.py): shared by SC-CAM's sub-category stage and FBR's NROIs."""

import pytest
import torch

from segexp.utils.kmeans import kmeans


def planted(n_per: int, centers: torch.Tensor, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pts = [c + spread * torch.randn(n_per, centers.shape[1], generator=g) for c in centers]
    truth = torch.arange(len(centers)).repeat_interleave(n_per)
    return torch.cat(pts), truth


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to relabelling: the pairs (a, b) form a bijection."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_recovers_planted_clusters():
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x, truth = planted(50, centers, 0.5, seed=1)
    res = kmeans(x, 4, n_init=3, seed=0)
    assert same_partition(res.labels, truth)
    found = res.centers[res.centers[:, 0].argsort()]
    assert torch.cdist(found, centers).min(1).values.max() < 0.3
    # inertia is the sum of squared distances to the assigned centres
    expect = ((x - res.centers[res.labels]) ** 2).sum()
    assert torch.isclose(res.inertia, expect, rtol=1e-4)


def test_deterministic_for_a_seed_and_seed_matters_only_through_init():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    a = kmeans(x, 5, n_init=2, seed=3)
    b = kmeans(x, 5, n_init=2, seed=3)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centers, b.centers)


def test_batched_with_padding_equals_problem_by_problem():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, 4, generator=g)
    valid = torch.ones(3, 40, dtype=torch.bool)
    valid[1, 25:] = False
    valid[2, 10:] = False
    res = kmeans(x, 3, n_init=1, seed=7, valid=valid)
    assert (res.labels[~valid] == -1).all()
    for b in range(3):
        pts = x[b, valid[b]]
        # every valid point sits in its nearest centre, and every centre is its members' mean
        d = torch.cdist(pts, res.centers[b])
        assert torch.equal(d.argmin(1), res.labels[b, valid[b]])
        for c in range(3):
            members = pts[res.labels[b, valid[b]] == c]
            assert len(members) > 0
            assert torch.allclose(members.mean(0), res.centers[b, c], atol=1e-5)


def test_best_of_restarts_is_no_worse_than_one():
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(5))
    one = kmeans(x, 6, n_init=1, seed=0)
    ten = kmeans(x, 6, n_init=10, seed=0)
    assert ten.inertia <= one.inertia + 1e-5


def test_matches_sklearn_inertia_on_separated_data():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    centers = torch.randn(6, 16, generator=torch.Generator().manual_seed(3)) * 8
    x, _ = planted(40, centers, 1.0, seed=4)
    ours = kmeans(x.double(), 6, n_init=10, seed=0)
    ref = sklearn_cluster.KMeans(n_clusters=6, n_init=10, random_state=0).fit(x.double().numpy())
    assert same_partition(ours.labels, torch.from_numpy(ref.labels_))
    assert abs(float(ours.inertia) - ref.inertia_) < 1e-6 * ref.inertia_


def test_too_few_points_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer valid points"):
        kmeans(torch.randn(3, 2), 4)

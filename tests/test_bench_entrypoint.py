"""``python -m segexp.bench``: a benchmark's own options reach it; misuse is refused with the reason."""

from __future__ import annotations

from tests.conftest import REPO, assert_ok, run_cli


def test_options_of_one_named_benchmark_reach_it():
    proc = run_cli("segexp.bench", ["metrics", "--num", "6", "--size", "24", "--batch", "3"], cwd=REPO)
    assert_ok(proc)
    assert "6 label maps" in proc.stdout  # --num 6 reached segexp.bench.metrics (its default is 1000)
    assert "24x24" in proc.stdout


def test_options_with_several_benchmarks_are_refused():
    proc = run_cli("segexp.bench", ["metrics", "wsss", "--size", "24"], cwd=REPO)
    assert proc.returncode == 2
    assert "belong to one benchmark" in proc.stderr


def test_unknown_benchmark_is_named():
    proc = run_cli("segexp.bench", ["no_such_bench"], cwd=REPO)
    assert proc.returncode == 2
    assert "no_such_bench" in proc.stderr

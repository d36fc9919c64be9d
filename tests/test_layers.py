"""The package layers of docs/architecture.md: no module imports a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "segexp"

#: lower number = lower layer; a module may import its own layer and any below it
LAYERS = {
    "utils": 0,
    "data": 1,
    "resolvers": 1,  # the config resolvers read the synthetic set's spec (data.testbed)
    "models": 2,
    "losses": 2,
    "stages": 2,
    "metrics": 2,
    "inference": 2,
    "reporting": 2,
    "methods": 3,
    "runner": 3,
    "pipeline": 4,
    "train": 5,
    "eval": 5,
    "pseudo": 5,
    "report": 5,
    "sod_eval": 5,
    "testbed": 5,
    "bench": 5,
}


def _layer(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if parts[0] != "segexp" or len(parts) < 2 or parts[1] == "__init__":
        return None
    return parts[1], LAYERS[parts[1]]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("segexp.")}


def test_every_package_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.suffix == ".py" or p.is_dir()}
    assert names - {"__init__", "__pycache__"} <= set(LAYERS), sorted(names - set(LAYERS))


def test_imports_run_downwards_only():
    upward = []
    for path in ROOT.rglob("*.py"):
        me = _layer("segexp." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
        if me is None:
            continue
        for module in _imports(path):
            other = _layer(module)
            if other is not None and other[1] > me[1]:
                upward.append(f"{path.relative_to(ROOT.parent)} imports {module}")
    assert not upward, "\n".join(sorted(upward))

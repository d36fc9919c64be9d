"""Shared fixtures: a small synthetic dataset and config composition as the entry points do it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

# Small synthetic set used by the end-to-end tests (the generator writes the real formats).
SMALL_SYNTH = ["data.prepare.num_images=48", "data.prepare.size=64", "data.image_size=64"]


# The default experiment on the small set, as the end-to-end tests run it.
CLI_BASE = ["+experiment=supervised_shapes", *SMALL_SYNTH, "data.batch_size=8", "data.num_workers=0"]


def assert_ok(proc) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def compose(overrides: list[str], config_name: str = "train", out_dir: Path | None = None):
    """Compose a config exactly as ``python -m segexp.train`` would (argv normalisation included)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import segexp.resolvers  # noqa: F401
    from segexp.utils.cli import normalize_overrides

    overrides = normalize_overrides(list(overrides))
    if out_dir is not None:
        overrides += [f"paths.output_dir={out_dir}", f"paths.log_dir={out_dir}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def run_cli(module: str, args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None):
    """Run an entry point in a subprocess, as a user would; returns CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def config_inference(choice: str = "method=cam") -> dict:
    """The CAM export settings (``inference``) of ``method=<name>`` as its YAML gives them: what tests
    building a CAM-family method by hand pass as ``inference``."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose([choice]).method.inference, resolve=True)


def config_weights(choice: str, **changes: float) -> dict[str, float]:
    """The loss-term weights of ``group=option`` (e.g. ``method=seam``) as its YAML gives them - their
    one home - with ``changes``: what tests building a method by hand pass as ``weights``."""
    from omegaconf import OmegaConf

    group = choice.split("=", 1)[0]
    weights = OmegaConf.to_container(compose([choice])[group].weights, resolve=True)
    return {**weights, **changes}

"""``python -m segexp.pipeline +experiment=NAME [pipeline.refine=[crf,rw]] [stop_after=cam] [-m sweeps]``.

A Hydra main like ``segexp.train``: its directory is the run directory (``logs/pipeline/runs/...``, a
multirun's job directories under ``logs/pipeline/multiruns/...``); ``hydra.run.dir=<an earlier
pipeline directory>`` resumes that pipeline. The former flags still work: ``--dir D`` is
``hydra.run.dir=D``, ``--stop-after S`` is ``stop_after=S``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import segexp.resolvers  # noqa: F401  (registers ${segexp.*} resolvers)
from segexp.utils.cli import check_config_choices, normalize_overrides
from segexp.utils.errors import user_errors

LEGACY_FLAGS = {"--dir": "hydra.run.dir", "--stop-after": "stop_after"}


def translate_flags(argv: list[str]) -> list[str]:
    """``--dir D`` / ``--stop-after S`` (either ``--flag value`` or ``--flag=value``) as overrides."""
    out, i = [], 0
    while i < len(argv):
        flag, _, value = argv[i].partition("=")
        if flag in LEGACY_FLAGS:
            if not value:
                i += 1
                value = argv[i] if i < len(argv) else ""
            out.append(f"{LEGACY_FLAGS[flag]}={value}")
        else:
            out.append(argv[i])
        i += 1
    return out


@hydra.main(version_base="1.3", config_path="../../conf", config_name="pipeline")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from segexp.pipeline.wsss import run_pipeline
    from segexp.utils.config import print_config_tree
    from segexp.utils.validate import validate

    with user_errors():
        validate(cfg)
        print_config_tree(cfg, order=("pipeline", "method", "data", "paths"))
        overrides = [a for a in HydraConfig.get().overrides.task if not a.startswith("stop_after=")]
        report = run_pipeline(
            cfg, overrides, Path(HydraConfig.get().runtime.output_dir), cfg.get("stop_after")
        )
    final = report.get("retrain") or {}
    return final.get("val/mIoU")  # what Optuna sweeps over pipelines optimise


if __name__ == "__main__":
    argv = translate_flags(sys.argv[1:])
    with user_errors():
        check_config_choices(argv)
    sys.argv[1:] = normalize_overrides(argv)
    main()

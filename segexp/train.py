"""Train (then test) one configured run: ``python -m segexp.train +experiment=NAME [overrides]``."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import segexp.utils.resolvers  # noqa: F401  (registers ${segexp.*} resolvers)
from segexp.utils.cli import normalize_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from segexp.runner import train
    from segexp.utils.config import print_config_tree

    print_config_tree(cfg)
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))  # the value Optuna sweeps optimise


if __name__ == "__main__":
    sys.argv[1:] = normalize_overrides(sys.argv[1:], resume_in_place=True)
    main()

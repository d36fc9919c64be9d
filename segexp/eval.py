"""Evaluate a checkpoint: ``python -m segexp.eval +experiment=NAME ckpt_path=PATH [data=...]``."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import segexp.utils.resolvers  # noqa: F401  (registers ${segexp.*} resolvers)
from segexp.utils.cli import normalize_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from segexp.runner import evaluate
    from segexp.utils.config import print_config_tree

    print_config_tree(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    sys.argv[1:] = normalize_overrides(sys.argv[1:])
    main()

"""Evaluate a checkpoint: ``python -m segexp.eval +experiment=NAME ckpt_path=PATH [data=...]``."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import segexp.resolvers  # noqa: F401  (registers ${segexp.*} resolvers)
from segexp.utils.cli import check_config_choices, normalize_overrides
from segexp.utils.errors import user_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from segexp.utils.config import print_config_tree
    from segexp.utils.validate import validate

    with user_errors():
        validate(cfg)  # before anything is printed or built: a wrong value fails in one line
        print_config_tree(cfg)
        from segexp.runner import evaluate  # torch & Lightning: imported after the config is known good

        evaluate(cfg)


if __name__ == "__main__":
    with user_errors():
        check_config_choices(sys.argv[1:])
    sys.argv[1:] = normalize_overrides(sys.argv[1:])
    main()

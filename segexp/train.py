"""Train (then test) one configured run: ``python -m segexp.train +experiment=NAME [overrides]``."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import segexp.resolvers  # noqa: F401  (registers ${segexp.*} resolvers)
from segexp.utils.cli import check_config_choices, normalize_overrides
from segexp.utils.errors import user_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from segexp.utils.config import print_config_tree
    from segexp.utils.validate import validate

    with user_errors():
        validate(cfg)  # before anything is printed or built: a wrong value fails in one line
        print_config_tree(cfg)
        from segexp.runner import train  # torch & Lightning: imported after the config is known good

        metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))  # the value Optuna sweeps optimise


if __name__ == "__main__":
    with user_errors():
        check_config_choices(sys.argv[1:])
    sys.argv[1:] = normalize_overrides(sys.argv[1:], resume_in_place=True)
    main()

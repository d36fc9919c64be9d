"""Config values checked at composition, each error naming its key.

Why: ``data.batch_size=abc`` used to surface 34 s later as ``TypeError: '>' not supported between
'int' and 'str'`` deep in a DataLoader. Two checks, both before anything is built:

* a value set on the command line where the config has a number must be a number (an integer where
  it has an integer): the config without the user's plain-value overrides is the reference. Flags
  are not checked: some take a flag or a path (``backbone.pretrained``);
* a few keys have ranges (``RANGES``): batch sizes and epochs are positive, learning rates too;
* a few keys take one of a few words (``CHOICES``), e.g. ``test_weights``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from segexp.utils.cli import CONF_DIR, is_group_choice
from segexp.utils.errors import UserError

#: key -> (lowest allowed, whether the lowest itself is allowed)
RANGES: dict[str, tuple[float, bool]] = {
    "data.batch_size": (1, True),
    "data.eval_batch_size": (1, True),
    "data.num_workers": (0, True),
    "data.image_size": (1, True),
    "schedule.epochs": (1, True),
    "schedule.optimizer.lr": (0, False),
    "schedule.optimizer.weight_decay": (0, True),
}

#: key -> the values it may take
CHOICES: dict[str, tuple[str, ...]] = {
    "test_weights": ("best", "last"),
}


def _expected(old, new) -> str | None:
    """What ``new`` should have been where the config has ``old``, or None when it fits. Only
    numbers are checked: a flag may take a path (``pretrained``), a string anything."""
    if isinstance(old, bool) or new is None or not isinstance(old, numbers.Real):
        return None
    is_number = isinstance(new, numbers.Real) and not isinstance(new, bool)
    if isinstance(old, numbers.Integral):
        return None if is_number and isinstance(new, numbers.Integral) else "an integer"
    return None if is_number else "a number"


def check_types(cfg: DictConfig, reference: DictConfig, keys: Sequence[str]) -> None:
    """Each overridden ``key`` keeps the kind of value ``reference`` has there (null allowed)."""
    for key in keys:
        old = OmegaConf.select(reference, key, throw_on_missing=False)
        new = OmegaConf.select(cfg, key, throw_on_missing=False)
        kind = _expected(old, new)
        if kind is not None:
            raise UserError(f"{key}={new!r}: expected {kind} (the config's value is {old!r})")


def check_ranges(cfg: DictConfig) -> None:
    for key, (low, inclusive) in RANGES.items():
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if value is None or not isinstance(value, numbers.Real) or isinstance(value, bool):
            continue
        bad = not math.isfinite(value) or (value < low if inclusive else value <= low)
        if bad:
            bound = f">= {low}" if inclusive else f"> {low}"
            raise UserError(f"{key}={value!r}: must be {bound}")


def check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if value is not None and value not in allowed:
            raise UserError(f"{key}={value!r}: must be one of {', '.join(allowed)}")


def value_overrides(overrides: Sequence[str], conf_dir: Path) -> tuple[list[str], list[str]]:
    """Split task overrides into (config-group choices and the like, plain-value keys)."""
    groups, keys = [], []
    for arg in overrides:
        key = arg.lstrip("+~").split("=", 1)[0]
        if "=" in arg and not is_group_choice(key, conf_dir):
            keys.append(key)
        else:
            groups.append(arg)
    return groups, keys


def validate(cfg: DictConfig) -> None:
    """Check ``cfg`` (composed by a Hydra entry point) before anything is built."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        from hydra import compose

        hc = HydraConfig.get()
        groups, keys = value_overrides(list(hc.overrides.task), CONF_DIR)
        if keys:
            reference = compose(config_name=hc.job.config_name, overrides=groups)
            check_types(cfg, reference, keys)
    check_ranges(cfg)
    check_choices(cfg)

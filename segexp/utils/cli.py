"""Command-line conveniences applied before Hydra parses ``sys.argv``.

* ``+experiment=NAME`` and ``experiment=NAME`` both work. The configs list ``experiment``,
  ``hparams_search`` and ``debug`` in the defaults (so debug presets and the command line win
  over an experiment); Hydra then rejects the ``+`` form users are used to, so it is rewritten.
* Resuming (``ckpt_path=<run>/checkpoints/last.ckpt``) continues in the run's own directory,
  so its loggers (CSV file, TensorBoard, W&B run id) carry on, unless ``hydra.run.dir`` is given.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from segexp.utils.errors import UserError

DEFAULTS_GROUPS = ("experiment", "hparams_search", "debug")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def normalize_overrides(argv: list[str], resume_in_place: bool = False) -> list[str]:
    out = []
    for arg in argv:
        stripped = arg.lstrip("+")
        key = stripped.split("=", 1)[0]
        out.append(stripped if "=" in stripped and key in DEFAULTS_GROUPS else arg)
    keys = {a.split("=", 1)[0] for a in out if "=" in a}
    ckpt = next((a.split("=", 1)[1] for a in out if a.startswith("ckpt_path=")), None)
    multirun = "-m" in out or "--multirun" in out
    if resume_in_place and ckpt and not multirun and "hydra.run.dir" not in keys:
        run_dir = resume_run_dir(ckpt)
        if run_dir is not None:
            out.append(f"hydra.run.dir={run_dir}")
    return out


def resume_run_dir(ckpt_path: str) -> Path | None:
    """``<run>/checkpoints/x.ckpt`` -> ``<run>`` when that looks like a segexp run directory."""
    ckpt = Path(ckpt_path).expanduser()
    run_dir = ckpt.resolve().parent.parent if ckpt.parent.name == "checkpoints" else None
    if run_dir is not None and (run_dir / ".hydra").is_dir():
        return run_dir
    return None


def _sweep_values(value: str) -> list[str]:
    """``a,b`` -> ``[a, b]``; values Hydra computes (``choice(...)``, ``${...}``) are not checked."""
    if any(c in value for c in "()[]{}$*?"):
        return []
    return [v.strip() for v in value.split(",") if v.strip() and v.strip() != "null"]


def is_group_choice(key: str, conf_dir: Path = CONF_DIR) -> bool:
    """``data``, ``loss``, ``hydra/launcher``...: a key that picks a config file, not a value."""
    return "/" in key or "@" in key or key.startswith("hydra") or (conf_dir / key).is_dir()


def check_config_choices(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """An option of a config group that does not exist fails before Hydra runs, naming close
    matches (``experiment=supervised_shape`` -> ``supervised_shapes``), never falls back silently."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or "." in key or not (conf_dir / key).is_dir():  # only groups of segexp's conf/
            continue
        options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
        for name in _sweep_values(value):
            if name not in options:
                close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
                hint = f"close matches: {', '.join(close)}" if close else f"options: {', '.join(options)}"
                raise UserError(f"{key}={name}: no such config (conf/{key}/{name}.yaml); {hint}")

"""Command-line conveniences applied before Hydra parses ``sys.argv``.

* ``+experiment=NAME`` and ``experiment=NAME`` both work. The configs list ``experiment``,
  ``hparams_search`` and ``debug`` in the defaults (so debug presets and the command line win
  over an experiment); Hydra then rejects the ``+`` form users are used to, so it is rewritten.
* Resuming (``ckpt_path=<run>/checkpoints/last.ckpt``) continues in the run's own directory,
  so its loggers (CSV file, TensorBoard, W&B run id) carry on, unless ``hydra.run.dir`` is given.
"""

from __future__ import annotations

from pathlib import Path

DEFAULTS_GROUPS = ("experiment", "hparams_search", "debug")


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

"""OmegaConf resolvers used by the configs (registered once, on import of the entry points)."""

from __future__ import annotations

import hashlib
import netrc
import os
from pathlib import Path

from omegaconf import OmegaConf


def wandb_logged_in() -> bool:
    """True when W&B credentials exist (API key in the environment or ~/.netrc), so runs can sync."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return rc.authenticators(host) is not None


def wandb_offline() -> bool:
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    return not wandb_logged_in()


def run_id() -> str:
    """A stable id for the current run directory (W&B run id): resuming in place continues the run."""
    from hydra.core.hydra_config import HydraConfig

    out_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.getcwd()
    return hashlib.sha1(str(Path(out_dir).resolve()).encode()).hexdigest()[:16]


def synth_suffix(style: str) -> str:
    """Directory-name suffix of a synthetic set's style (none for the default, so existing roots stay)."""
    return "" if style in (None, "textured") else f"-{style}"


def register() -> None:
    OmegaConf.register_new_resolver("segexp.synth_suffix", synth_suffix, replace=True)
    OmegaConf.register_new_resolver("segexp.wandb_offline", wandb_offline, replace=True)
    OmegaConf.register_new_resolver("segexp.run_id", run_id, replace=True)


register()

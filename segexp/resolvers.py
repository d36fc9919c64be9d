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


_RUN_TOKEN: list[str] = []


def run_token() -> str:
    """6 random hex digits, drawn once per process: two runs started in the same second (same
    name, same machine or another one on a shared disk) still get their own directories, while
    every place one process resolves its run directory sees the same value. DDP ranks do not
    re-resolve it: Lightning hands them rank 0's ``hydra.run.dir``."""
    if not _RUN_TOKEN:
        _RUN_TOKEN.append(os.urandom(3).hex())
    return _RUN_TOKEN[0]


def testbed_key(testbed) -> str:
    """Directory-name key of a synthetic set's testbed settings (a hash of the whole, defaults filled in)."""
    from segexp.data.testbed import Testbed  # the spec owns its defaults; imported only when resolved

    values = OmegaConf.to_container(testbed, resolve=True) if OmegaConf.is_config(testbed) else testbed
    return Testbed.from_dict(values).key()


def register() -> None:
    OmegaConf.register_new_resolver("segexp.testbed_key", testbed_key, replace=True)
    OmegaConf.register_new_resolver("segexp.wandb_offline", wandb_offline, replace=True)
    OmegaConf.register_new_resolver("segexp.run_id", run_id, replace=True)
    OmegaConf.register_new_resolver("segexp.run_token", run_token, replace=True)


register()

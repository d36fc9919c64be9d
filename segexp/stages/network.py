"""A stage that runs a network a pipeline step trained (AffinityNet, IRN), given its checkpoint.

Why a mixin: such stages share everything about the network - where its checkpoint is, that it is the
right method, rebuilding it from the config the checkpoint records, and putting both in the cache key -
and differ only in what they do with it per image. The stage sets ``ckpt_key`` (its config key),
``network_name`` and ``accepts(target)``, and keeps the checkpoint path in ``self.<ckpt_key>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segexp.utils.checkpoints import load_method, method_config_of
from segexp.utils.errors import UserError
from segexp.utils.hashing import file_key


class TrainedNetwork:
    """Checkpoint, recorded config and rebuilt method of the stage's network (module docstring)."""

    ckpt_key: str  # e.g. "affinity_ckpt": the stage's config key holding the checkpoint path
    network_name: str  # e.g. "AffinityNet", in messages
    network_method: str  # e.g. "method=affinitynet": what trains it
    pipeline_step: str  # e.g. "affinity": the pipeline step that trains it for this stage

    @staticmethod
    def accepts(target: str) -> bool:  # pragma: no cover - each stage says which methods fit
        raise NotImplementedError

    def checkpoint(self) -> str:
        path = getattr(self, self.ckpt_key)
        if path is None or not Path(path).is_file():
            missing = "no checkpoint" if path is None else f"checkpoint {path!r} not found"
            raise UserError(
                f"{self.name} stage: {self.network_name} {missing}: set stage.{self.ckpt_key}=<a "
                f"{self.network_method} checkpoint>, or run the pipeline with this stage (its "
                f"{self.pipeline_step} step trains one)"
            )
        return str(path)

    def method_config(self) -> dict[str, Any]:
        """The network's config, as its checkpoint records it."""
        if getattr(self, "_method_cfg", None) is None:
            config = method_config_of(self.checkpoint())
            if not self.accepts(str(config.get("_target_", ""))):
                raise UserError(
                    f"{self.checkpoint()}: method is {config.get('_target_')}, not {self.network_name} "
                    f"({self.network_method})"
                )
            self._method_cfg = config
        return self._method_cfg

    @property
    def method(self):
        if getattr(self, "_method", None) is None:
            self._method = load_method(self.checkpoint(), self.method_config(), self.device)
        return self._method

    def network_settings(self) -> dict[str, Any]:
        """What of the network changes the stage's output: the checkpoint file and its method config
        (not its schedule or panels)."""
        method = {k: v for k, v in self.method_config().items() if k not in ("schedule", "panels")}
        return {"ckpt": file_key(self.checkpoint()), "method": method}

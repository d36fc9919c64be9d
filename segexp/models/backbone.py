"""A feature-pyramid backbone over any timm model.

Every method in segexp (DeepLab, SEAM CAMs, LDF decoders, projection heads) needs the same thing
from an ImageNet network: a list of feature maps with known channels and strides, optionally
dilated to a finer output stride, optionally partly frozen, and initialised from weights that
usually sit in a local file (training nodes have no internet). `Backbone` does exactly that and
nothing else, so heads stay separate modules that read ``out_channels`` and ``reductions``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["Backbone", "WeightsReport", "load_backbone_weights"]

_logger = logging.getLogger(__name__)

OUTPUT_STRIDES = (2, 4, 8, 16, 32)


class WeightsReport(NamedTuple):
    """What a local weights file did to a backbone (kept on ``Backbone.weights_report``)."""

    path: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]


def _prefix_that_matches(state_dict: dict[str, Any], target: dict[str, Any]) -> str | None:
    """The key prefix under which most of a file's keys name this model's parameters (matched as the
    loader matches them; a Lightning checkpoint of another segexp run keeps the backbone under
    ``model.backbone.body.``), so the error can say which ``weights_prefix`` to set; None when no
    prefix makes half of the model's keys match."""
    counts: dict[str, int] = {}
    for key in state_dict:
        parts = key.split(".")
        for cut in range(1, len(parts)):
            if any(c in target for c in _checkpoint_key_candidates(".".join(parts[cut:]))):
                prefix = ".".join(parts[:cut]) + "."
                counts[prefix] = counts.get(prefix, 0) + 1
                break
    best = max(counts, key=counts.get, default=None)
    return best if best is not None and counts[best] >= len(target) / 2 else None


def _checkpoint_key_candidates(key: str) -> tuple[str, ...]:
    # timm's feature wrappers rename a few modules: FeatureListNet flattens the first level of
    # nn.Sequential children ('stages.0' -> 'stages_0', 'stem.0' -> 'stem_0') and FeatureGetterNet
    # keeps the whole classifier network under 'model.'. A checkpoint of the plain classifier
    # therefore matches the features model under one of these names.
    return key, key.replace(".", "_", 1), "model." + key


def _resolve_module_name(model: nn.Module, name: str) -> str:
    modules = dict(model.named_modules())
    for candidate in _checkpoint_key_candidates(name):
        if candidate in modules:
            return candidate
    raise RuntimeError(f"feature module {name!r} not found in {type(model).__name__}")


def load_backbone_weights(
    model: nn.Module,
    path: str | os.PathLike,
    prefix: str = "",
    strict: bool = True,
) -> WeightsReport:
    """Load a local classifier/backbone checkpoint into a timm features model.

    Reads ``.pth/.pt/.bin/.safetensors`` through ``timm.models.load_state_dict``, which unwraps a
    ``state_dict``/``model`` entry (preferring EMA weights when the file has them) and strips
    ``module.``/``_orig_mod.`` prefixes. Keys are matched to the features model's names; keys it
    does not have (the classifier head that ``features_only`` drops) are reported as unexpected and
    ignored. ``prefix`` selects and strips a sub-tree, e.g. ``"backbone."`` to reuse the backbone of
    an earlier segexp stage. Missing backbone weights raise when ``strict``: a silently random
    stage is the costliest mistake to find later. A 3-channel stem conv is adapted to another
    ``in_chans`` with timm's ``adapt_input_conv``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {str(path)!r}")
    state_dict = timm.models.load_state_dict(str(path))
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{path} holds a {type(state_dict).__name__}, expected a state_dict")
    if prefix:
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise RuntimeError(f"no key in {path} starts with weights prefix {prefix!r}")

    target = model.state_dict()
    stem_conv = next((k for k, v in target.items() if k.endswith("weight") and v.ndim == 4), None)
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, value in state_dict.items():
        name = next((c for c in _checkpoint_key_candidates(key) if c in target), None)
        if name is None:
            unexpected.append(key)
            continue
        want = target[name].shape
        if value.shape != want:
            other_in_chans = value.ndim == 4 and value.shape[0] == want[0] and value.shape[2:] == want[2:]
            if name == stem_conv and other_in_chans:
                value = timm.models.adapt_input_conv(want[1], value, base_chans=value.shape[1])
            else:
                mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(want)}")
                continue
        mapped[name] = value
    if mismatched:
        raise RuntimeError(f"shape mismatch loading {path}:\n  " + "\n  ".join(mismatched))
    if not mapped:
        prefix_hint = _prefix_that_matches(state_dict, target)
        hint = (
            f"its keys match under the prefix {prefix_hint!r}: set backbone.weights_prefix={prefix_hint}"
            if prefix_hint
            else "is it a checkpoint of this architecture, or does it need weights_prefix?"
        )
        raise RuntimeError(
            f"none of the {len(state_dict)} keys in {path} match the model (first: {list(state_dict)[:3]}); "
            + hint
        )
    # BatchNorm step counters are absent from older checkpoints and carry no learned state.
    missing = [k for k in target if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing and strict:
        raise RuntimeError(
            f"{len(missing)} backbone tensors missing from {path}: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} (pass strict_weights=False to keep them random)"
        )
    model.load_state_dict(mapped, strict=False)
    report = WeightsReport(str(path), sorted(mapped), missing, unexpected)
    _logger.info(
        "loaded %d tensors from %s; ignored %d unexpected keys%s",
        len(mapped),
        path,
        len(unexpected),
        f" {unexpected[:10]}" if unexpected else "",
    )
    if missing:
        _logger.warning("%d backbone tensors left at random init: %s", len(missing), missing[:10])
    return report


class Backbone(nn.Module):
    """``timm.create_model(name, features_only=True)`` with dilation, freezing and local weights.

    Args:
        name: any timm model name that supports ``features_only``.
        pretrained: ``False`` (random init), ``True`` (timm's hub weights; needs internet) or a path
            to a local weights file (see :func:`load_backbone_weights`).
        output_stride: 8/16/32 (2/4 where the model allows them: ``small_cnn_*``, not timm's
            ResNet) turn the last stages into dilated ones through timm's ``output_stride``
            argument; ``None`` keeps the model's native stride. A model without dilation support
            (ViT, ...) raises unless the request equals its native stride.
        out_indices: feature levels to return, indices into timm's ``feature_info``; ``None`` is
            timm's default (every stage of a hierarchical CNN: 5 for ResNet, 4 for ConvNeXt).
        frozen_stages: freeze the first k feature levels of ``feature_info`` (all levels, not only
            ``out_indices``) together with everything the network runs before them, in module
            registration order. For ResNet level 0 is the stem (stride 2), so 1 = stem, 2 = stem +
            layer1, ..., 5 = everything; for ConvNeXt level 0 is stem + stages.0. Frozen parameters
            get ``requires_grad=False`` and the frozen modules stay in eval mode after ``.train()``
            (their BatchNorm statistics and dropout are fixed as well) - the mmdet convention.
        freeze_bn: keep every BatchNorm of the backbone in eval mode even after ``.train()`` and
            freeze its affine parameters (the ResNet-38/SEAM convention for small batches). Modules
            stay ``BatchNorm2d`` so checkpoints load with or without it.
        in_chans: input channels; a 3-channel stem in local weights is adapted.
        drop_path_rate: stochastic depth, passed to timm only when set.
        weights_prefix: key prefix to select and strip when loading a local file.
        strict_weights: raise when the local file lacks backbone tensors.
        model_kwargs: any further ``timm.create_model`` keyword arguments.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool | str | os.PathLike = False,
        output_stride: int | None = None,
        out_indices: Sequence[int] | int | None = None,
        frozen_stages: int = 0,
        freeze_bn: bool = False,
        in_chans: int = 3,
        drop_path_rate: float | None = None,
        weights_prefix: str = "",
        strict_weights: bool = True,
        model_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if output_stride is not None and output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES} or None, got {output_stride}")
        weights_path = None if isinstance(pretrained, bool) else pretrained
        if weights_path is not None and not Path(weights_path).expanduser().is_file():
            raise FileNotFoundError(f"pretrained weights file not found: {str(weights_path)!r}")

        kwargs = dict(model_kwargs or {})
        kwargs.update(features_only=True, pretrained=pretrained is True, in_chans=in_chans)
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = drop_path_rate
        if out_indices is not None:
            kwargs["out_indices"] = out_indices if isinstance(out_indices, int) else tuple(out_indices)
        create = _create_with_hub_weights if pretrained is True else _create_features
        self.body = create(name, output_stride, kwargs)

        self.name = name
        self.feature_info = self.body.feature_info
        self.out_channels: list[int] = list(self.feature_info.channels())
        self.reductions: list[int] = list(self.feature_info.reduction())
        self.output_stride: int = self.feature_info[len(self.feature_info) - 1]["reduction"]
        self._nhwc = getattr(self.body, "output_fmt", "NCHW") == "NHWC"

        self.weights_report: WeightsReport | None = None
        if weights_path is not None:
            self.weights_report = load_backbone_weights(
                self.body, weights_path, prefix=weights_prefix, strict=strict_weights
            )

        if not 0 <= frozen_stages <= len(self.feature_info):
            raise ValueError(
                f"frozen_stages must be in [0, {len(self.feature_info)}] for {name}, got {frozen_stages}"
            )
        self.frozen_stages = frozen_stages
        self.freeze_bn = freeze_bn
        self._frozen_modules: list[str] = self._freeze_stages(frozen_stages) if frozen_stages else []
        if freeze_bn:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(False)
        self.train()

    def _freeze_stages(self, k: int) -> list[str]:
        """Freeze feature level ``k - 1`` and every module registered before it; return the names
        of modules that must stay in eval mode."""
        target = _resolve_module_name(self.body, self.feature_info[k - 1]["module"])
        eval_names = []
        reached = False
        for name, module in self.body.named_modules():
            inside = name == target or name.startswith(target + ".")
            if reached and not inside:
                break
            reached = reached or inside
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
            # Containers of the target (the root, FeatureGetterNet's 'model') also hold unfrozen
            # parts; only their own parameters are frozen, their train flag is left alone.
            if not (name == "" or target.startswith(name + ".")):
                eval_names.append(name)
        return eval_names

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if mode:
            for name in self._frozen_modules:
                self.body.get_submodule(name).training = False
            if self.freeze_bn:
                for m in self.modules():
                    if isinstance(m, _BatchNorm):
                        m.training = False
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = list(self.body(x))
        if self._nhwc:  # swin & co. return channels-last maps; heads expect NCHW
            features = [f.permute(0, 3, 1, 2) for f in features]
        return features

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, output_stride={self.output_stride}, reductions={self.reductions}, "
            f"frozen_stages={self.frozen_stages}, freeze_bn={self.freeze_bn}"
        )


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """One quick connection attempt: without it an offline machine spends minutes in the hub
    client's retries (5 per file, backing off) before the same failure."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _create_with_hub_weights(name: str, output_stride: int | None, kwargs: dict[str, Any]) -> nn.Module:
    """``pretrained=True``: timm's hub weights, from the local cache when the hub is unreachable;
    failing that, one line saying how to pass a local weights file."""
    from huggingface_hub import constants

    offline = not hub_reachable()
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline  # cache only: no retries against an unreachable hub
    try:
        return _create_features(name, output_stride, kwargs)
    except Exception as err:
        if not (isinstance(err, OSError) or type(err).__module__.startswith("huggingface_hub")):
            raise  # not a fetch failure (offline, not cached, HTTP): e.g. a model error
        from segexp.utils.errors import UserError

        why = "the model hub (huggingface.co) cannot be reached" if offline else f"fetching failed ({err})"
        raise UserError(
            f"backbone.pretrained=true: timm weights for '{name}' are not in the local cache and {why}; "
            "download them where there is a network and pass backbone.pretrained=/path/to/weights "
            "(.pth/.safetensors), or backbone.pretrained=false"
        ) from err
    finally:
        constants.HF_HUB_OFFLINE = saved


def _create_features(name: str, output_stride: int | None, kwargs: dict[str, Any]) -> nn.Module:
    if output_stride is None:
        return timm.create_model(name, **kwargs)
    try:
        model = timm.create_model(name, output_stride=output_stride, **kwargs)
    except TypeError as e:
        if "output_stride" not in str(e):
            raise
        # No dilation support: still fine when the request is the model's native stride.
        model = timm.create_model(name, **kwargs)
        native = model.feature_info[len(model.feature_info) - 1]["reduction"]
        if native != output_stride:
            raise ValueError(
                f"timm model {name!r} does not support output_stride (no dilation); its native stride is "
                f"{native}, requested {output_stride}. Use output_stride={native} or null."
            ) from e
        return model
    except AssertionError as e:
        # timm's ResNet, ConvNeXt & co. assert output_stride in (8, 16, 32) instead of raising.
        raise ValueError(
            f"timm model {name!r} rejected output_stride={output_stride} (assertion in its constructor"
            f"{': ' + str(e) if str(e) else ''}); most timm CNNs allow only 8, 16, 32"
        ) from e
    deepest = model.feature_info[len(model.feature_info) - 1]["reduction"]
    if deepest != output_stride:
        raise ValueError(
            f"timm model {name!r} accepted output_stride={output_stride} but its deepest stride is {deepest}"
        )
    return model

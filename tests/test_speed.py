"""GPU speed options (segexp/utils/speed.py): what they change on the model and the batch, and what
they must not change (checkpoint parameter names), on CPU."""

from __future__ import annotations

import torch

from segexp.utils.speed import SpeedOptions, to_channels_last


class _Method(torch.nn.Module):  # a method holds its network as `model`
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))


def test_off_by_default_changes_nothing():
    method, options = _Method(), SpeedOptions()
    options.setup(None, method, "fit")
    assert not options.active
    assert method.model[0].weight.is_contiguous()  # NCHW, as built
    batch = {"image": torch.randn(2, 3, 8, 8)}
    options.on_train_batch_start(None, method, batch, 0)
    assert batch["image"].is_contiguous()


def test_channels_last_reaches_weights_and_images_only():
    method, options = _Method(), SpeedOptions(channels_last=True)
    options.setup(None, method, "fit")
    weight = method.model[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    batch = {"image": torch.randn(2, 3, 8, 8), "mask": torch.zeros(2, 8, 8, dtype=torch.long), "id": ["a"]}
    options.on_validation_batch_start(None, method, batch, 0)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert batch["mask"].is_contiguous() and batch["id"] == ["a"]
    assert to_channels_last(["not", "a", "dict"]) == ["not", "a", "dict"]


def test_compile_keeps_the_checkpoint_parameter_names():
    method = _Method()
    names = list(method.state_dict())
    options = SpeedOptions(compile={"dynamic": False})
    options.setup(None, method, "fit")
    options.setup(None, method, "validate")  # a second stage does not compile twice
    assert list(method.state_dict()) == names  # no `_orig_mod.` prefix: load_method reads it as ever
    assert method.model._compiled_call_impl is not None

"""Test-time augmentation returns the same answer as plain inference where it must."""

from __future__ import annotations

import torch
from torch import nn

from segexp.inference.tta import predict_tta, sliding_window


def _pointwise_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(3, 4, kernel_size=1)  # no spatial context: every view agrees pixel by pixel


def test_flip_and_sliding_window_agree_with_plain_inference_for_a_pointwise_model():
    model = _pointwise_model()
    x = torch.randn(2, 3, 37, 53)
    plain = model(x).softmax(1)
    with torch.no_grad():
        assert torch.allclose(predict_tta(model, x, flip=True), plain, atol=1e-6)
        assert torch.allclose(sliding_window(model, x, window=16, stride=10), plain, atol=1e-6)
        assert torch.allclose(predict_tta(model, x, flip=True, window=20, stride=7), plain, atol=1e-6)


def test_window_larger_than_image_is_padded_and_cropped_back():
    model = _pointwise_model()
    x = torch.randn(1, 3, 10, 12)
    with torch.no_grad():
        out = sliding_window(model, x, window=32, stride=16)
    assert out.shape == (1, 4, 10, 12)
    assert torch.allclose(out, model(x).softmax(1), atol=1e-6)


def test_multiscale_average_is_a_probability_map_at_input_size():
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.AvgPool2d(2))  # output at half size
    x = torch.randn(2, 3, 24, 30)
    with torch.no_grad():
        out = predict_tta(model, x, scales=(0.5, 1.0, 1.5), flip=True)
    assert out.shape == (2, 5, 24, 30)
    assert torch.allclose(out.sum(1), torch.ones(2, 24, 30), atol=1e-5)

"""small_cnn_*: the timm-registered CPU testbed CNN, through timm and segexp's Backbone and heads."""

from pathlib import Path

import hydra
import pytest
import timm
import torch
from omegaconf import OmegaConf
from torch import nn

from segexp.models.backbone import Backbone
from segexp.models.cam_head import CAMNet
from segexp.models.deeplab import DeepLabV3Plus

CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone" / "small_cnn.yaml"
NATIVE_REDUCTIONS = (2, 4, 8, 16, 32)


@pytest.fixture
def image():
    torch.manual_seed(0)
    return torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("output_stride", [2, 4, 8, 16, 32, None])
def test_feature_shapes_match_feature_info(image, output_stride):
    backbone = Backbone("small_cnn_w16", output_stride=output_stride)
    stride = output_stride or 32
    assert backbone.out_channels == [16, 16, 32, 64, 128]
    assert backbone.reductions == [min(r, stride) for r in NATIVE_REDUCTIONS]
    assert backbone.output_stride == stride
    features = backbone(image)
    assert [tuple(f.shape) for f in features] == [
        (2, c, 64 // r, 64 // r) for c, r in zip(backbone.out_channels, backbone.reductions)
    ]


def test_dilation_replaces_stride_with_the_same_parameters():
    native = timm.create_model("small_cnn_w16", num_classes=0)
    shapes = {k: v.shape for k, v in native.state_dict().items()}
    for output_stride, last_dilation in [(2, 16), (4, 8), (8, 4), (16, 2), (32, 1)]:
        model = timm.create_model("small_cnn_w16", num_classes=0, output_stride=output_stride)
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes
        convs = [m for m in model.stages[3].modules() if isinstance(m, nn.Conv2d)]
        # the first conv of a stage sees the previous dilation, as the strided conv it replaces did
        assert [c.dilation[0] for c in convs] == [max(1, last_dilation // 2), last_dilation]
        assert max(c.stride[0] for c in convs) == (2 if output_stride == 32 else 1)


def test_widths_and_classifier_api(image):
    for name, width in [("small_cnn_w16", 16), ("small_cnn_w32", 32), ("small_cnn_w64", 64)]:
        info = timm.create_model(name).feature_info
        assert [f["num_chs"] for f in info] == [width, width, 2 * width, 4 * width, 8 * width]
        assert [f["module"] for f in info] == ["stem", "stages.0", "stages.1", "stages.2", "stages.3"]
    model = timm.create_model("small_cnn_w16", num_classes=7).eval()
    assert model(image).shape == (2, 7)
    assert model.forward_head(model.forward_features(image), pre_logits=True).shape == (2, 128)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(3)
    assert model(image).shape == (2, 3)
    assert model.pretrained_cfg["url"] == "" and not model.pretrained_cfg.get("hf_hub_id")
    with pytest.raises(ValueError, match="no hub weights"):
        timm.create_model("small_cnn_w16", pretrained=True)


def test_local_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("small_cnn_w16")
    with torch.no_grad():  # non-default BN statistics, so a fresh init cannot pass by accident
        source.stages[3][1].bn.running_var.uniform_(2.0, 3.0)
    saved = source.state_dict()
    path = tmp_path / "small_cnn_w16.pth"
    torch.save(saved, path)

    backbone = Backbone("small_cnn_w16", pretrained=path, output_stride=8)
    loaded = backbone.body.state_dict()
    for key, value in saved.items():
        if key.startswith("head."):
            continue
        assert torch.equal(loaded[key.replace(".", "_", 1) if key.startswith("stages.") else key], value)
    report = backbone.weights_report
    assert sorted(report.unexpected) == ["head.fc.bias", "head.fc.weight"]
    assert report.missing == []
    assert len(report.loaded) == len(saved) - 2


def test_unsupported_output_stride_raises():
    with pytest.raises(ValueError, match="output_stride"):
        Backbone("small_cnn_w16", output_stride=64)
    with pytest.raises(ValueError, match="output_stride"):
        timm.create_model("small_cnn_w16", output_stride=1)
    with pytest.raises(ValueError, match="resnet18"):  # timm's ResNet asserts 8/16/32
        Backbone("resnet18", output_stride=4)


def test_frozen_stages_resolve_flattened_names():
    backbone = Backbone("small_cnn_w16", frozen_stages=2).train()  # stem + stages.0
    frozen = {n.split(".")[0] for n, p in backbone.body.named_parameters() if not p.requires_grad}
    assert frozen == {"stem", "stages_0"}
    assert not backbone.body.stages_0.training and backbone.body.stages_1.training


def test_heads_run_on_it(image):
    deeplab = DeepLabV3Plus(
        backbone=Backbone("small_cnn_w32", output_stride=8),
        num_classes=6,
        aspp_channels=64,
        decoder_channels=64,
    )
    assert deeplab(image).shape == (2, 6, 64, 64)
    for output_stride in (4, 8):
        out = CAMNet(Backbone("small_cnn_w32", output_stride=output_stride), num_classes=6)(image)
        size = 64 // output_stride
        assert out["cam"].shape == (2, 5, size, size) and out["features"].shape == (2, 256, size, size)


def test_config_instantiates():
    cfg = OmegaConf.load(CONF)
    assert cfg.pretrained is False
    backbone = hydra.utils.instantiate(cfg)
    assert isinstance(backbone, Backbone) and backbone.name == cfg.name
    assert backbone.output_stride == cfg.output_stride
    assert len(backbone.out_channels) == len(cfg.out_indices)


def test_registered_with_timm():
    # Importing segexp.models.backbone (above) runs segexp/models/__init__.py, which registers them;
    # no fresh-interpreter check here (it costs ~6 s of imports): test_models does one for the package.
    assert timm.list_models("small_cnn*") == ["small_cnn_w16", "small_cnn_w32", "small_cnn_w64"]
    assert timm.is_model("small_cnn_w32") and not timm.is_model_pretrained("small_cnn_w32")

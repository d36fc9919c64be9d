"""Backbone, DeepLabV3+ and parameter groups: shapes, dilation, weights, freezing, optimizer split."""

from pathlib import Path

import hydra
import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from segexp.models.backbone import Backbone
from segexp.models.deeplab import ASPP, DeepLabV3Plus, default_aspp_rates
from segexp.models.param_groups import GROUP_NAMES, optimizer_groups, param_groups

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "backbone"


@pytest.fixture
def image():
    torch.manual_seed(0)
    return torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_feature_shapes_and_strides(image, output_stride):
    backbone = Backbone("resnet18", output_stride=output_stride)
    expected_reductions = [min(r, output_stride) for r in (2, 4, 8, 16, 32)]
    assert backbone.reductions == expected_reductions
    assert backbone.out_channels == [64, 64, 128, 256, 512]
    assert backbone.output_stride == output_stride

    features = backbone(image)
    assert [tuple(f.shape) for f in features] == [
        (2, c, 64 // r, 64 // r) for c, r in zip(backbone.out_channels, expected_reductions)
    ]
    # The stride comes from dilating the last stages (receptive field kept), not from skipping them.
    dilations = [m.dilation[0] for m in backbone.body.layer4.modules() if isinstance(m, nn.Conv2d)]
    assert max(dilations) == {8: 4, 16: 2, 32: 1}[output_stride]


def test_out_indices_select_levels(image):
    backbone = Backbone("resnet18", output_stride=16, out_indices=[1, 4])
    assert backbone.reductions == [4, 16] and backbone.out_channels == [64, 512]
    assert [f.shape[1] for f in backbone(image)] == [64, 512]


TINY_VIT = dict(out_indices=2, model_kwargs={"depth": 2})  # a 2-block ViT keeps the test fast


def test_output_stride_unsupported_names_model():
    with pytest.raises(ValueError, match="vit_tiny_patch16_224"):
        Backbone("vit_tiny_patch16_224", output_stride=8, **TINY_VIT)
    # Its native stride is not an error.
    assert Backbone("vit_tiny_patch16_224", output_stride=16, **TINY_VIT).output_stride == 16
    with pytest.raises(ValueError, match="output_stride"):
        Backbone("resnet18", output_stride=4)


@pytest.fixture(scope="module")
def classifier_state():
    """A full timm resnet18 (with its fc head), as a user would have saved it. Treat as read-only."""
    torch.manual_seed(1)
    return timm.create_model("resnet18", pretrained=False).state_dict()


@pytest.mark.parametrize("fmt", ["module_prefix.pth", "wrapped_model.pt", "plain.safetensors"])
def test_local_weights_file(tmp_path, fmt, classifier_state):
    saved = classifier_state
    path = tmp_path / fmt
    if fmt == "module_prefix.pth":
        torch.save({f"module.{k}": v for k, v in saved.items()}, path)
    elif fmt == "wrapped_model.pt":
        torch.save({"model": saved, "epoch": 3}, path)
    else:
        save_file({k: v.contiguous() for k, v in saved.items()}, str(path))

    backbone = Backbone("resnet18", pretrained=str(path), output_stride=16)
    body = backbone.body
    assert torch.equal(body.conv1.weight, saved["conv1.weight"])
    assert torch.equal(body.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])
    assert torch.equal(body.bn1.running_var, saved["bn1.running_var"])
    report = backbone.weights_report
    assert report.missing == []
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]  # the head features_only drops


def test_local_weights_flattened_names(tmp_path):
    # ConvNeXt's features model renames 'stem.0' -> 'stem_0' and 'stages.0' -> 'stages_0'.
    torch.manual_seed(2)
    saved = timm.create_model("convnext_atto", pretrained=False).state_dict()
    torch.save(saved, tmp_path / "convnext.pth")
    backbone = Backbone("convnext_atto", pretrained=tmp_path / "convnext.pth")
    assert torch.equal(backbone.body.stem_0.weight, saved["stem.0.weight"])
    assert torch.equal(
        backbone.body.stages_3.blocks[1].mlp.fc2.weight, saved["stages.3.blocks.1.mlp.fc2.weight"]
    )
    assert backbone.weights_report.missing == []


def test_local_weights_errors(tmp_path, classifier_state):
    missing_path = tmp_path / "nope" / "resnet18.pth"
    with pytest.raises(FileNotFoundError, match="resnet18.pth"):
        Backbone("resnet18", pretrained=str(missing_path))

    partial = {k: v for k, v in classifier_state.items() if not k.startswith("layer4.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match="layer4"):
        Backbone("resnet18", pretrained=tmp_path / "partial.pth")
    relaxed = Backbone("resnet18", pretrained=tmp_path / "partial.pth", strict_weights=False)
    missing = relaxed.weights_report.missing
    assert missing and all(k.startswith("layer4.") for k in missing)

    wrong = dict(classifier_state)
    wrong["layer2.0.conv1.weight"] = wrong["layer2.0.conv1.weight"][:, :32]
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(RuntimeError, match=r"(?s)shape mismatch.*layer2\.0\.conv1\.weight: file \(128, 32"):
        Backbone("resnet18", pretrained=tmp_path / "wrong.pth")


def test_weights_prefix_and_in_chans(tmp_path, classifier_state):
    saved = classifier_state
    path = tmp_path / "stage1.ckpt"  # e.g. a DeepLab stage's Lightning-style checkpoint
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in saved.items()}}, path)
    backbone = Backbone("resnet18", pretrained=path, weights_prefix="backbone.", in_chans=1)
    assert backbone.body.conv1.weight.shape[1] == 1
    torch.testing.assert_close(backbone.body.conv1.weight[:, 0], saved["conv1.weight"].sum(1))
    assert torch.equal(backbone.body.layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])


def test_frozen_stages_get_no_grad(image):
    backbone = Backbone("resnet18", frozen_stages=2)  # stem + layer1
    body = backbone.body
    frozen = [*body.conv1.parameters(), *body.bn1.parameters(), *body.layer1.parameters()]
    trainable = [*body.layer2.parameters(), *body.layer3.parameters(), *body.layer4.parameters()]
    assert frozen and all(not p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in trainable)

    backbone.train()
    assert not body.layer1[0].bn1.training and not body.bn1.training  # frozen stages stay in eval
    assert body.layer2[0].bn1.training and backbone.training
    running_mean = body.layer1[0].bn1.running_mean.clone()
    sum(f.mean() for f in backbone(image)).backward()
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in trainable)
    assert torch.equal(body.layer1[0].bn1.running_mean, running_mean)


def test_frozen_stages_rule_follows_feature_info():
    backbone = Backbone("convnext_atto", output_stride=16, frozen_stages=1)  # stem + stages.0
    body = backbone.body
    assert not any(p.requires_grad for p in [*body.stem_0.parameters(), *body.stages_0.parameters()])
    assert all(p.requires_grad for p in body.stages_1.parameters())
    with pytest.raises(ValueError, match="frozen_stages"):
        Backbone("resnet18", frozen_stages=6)


def test_freeze_bn_keeps_statistics(image):
    backbone = Backbone("resnet18", freeze_bn=True).train()
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    assert backbone.body.conv1.weight.requires_grad
    before = [m.running_mean.clone() for m in bns]
    backbone(image)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bns, before))

    # Without freeze_bn the same forward does move the statistics (the check above can fail).
    plain = Backbone("resnet18").train()
    mean = plain.body.bn1.running_mean.clone()
    plain(image)
    assert not torch.equal(plain.body.bn1.running_mean, mean)


def test_aspp_rates_follow_output_stride():
    assert default_aspp_rates(16) == (6, 12, 18)
    assert default_aspp_rates(8) == (12, 24, 36)
    model = DeepLabV3Plus(Backbone("resnet18", output_stride=8), num_classes=3)
    dilations = [branch.conv.dilation[0] for branch in model.head.aspp.convs]
    assert dilations == [1, 12, 24, 36]


def test_aspp_pooling_branch_batch_one_train():
    aspp = ASPP(32, 16, rates=(1, 2)).train()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in aspp.pool.modules())
    assert aspp(torch.randn(1, 32, 5, 5)).shape == (1, 16, 5, 5)


def test_deeplab_forward_and_gradients(image):
    backbone = Backbone("resnet18", output_stride=16, frozen_stages=1)
    model = DeepLabV3Plus(backbone, num_classes=5, aspp_channels=64, decoder_channels=64).train()
    logits = model(image)
    assert logits.shape == (2, 5, 64, 64)
    with torch.no_grad():  # the head alone predicts at the stride of the low-level features
        features = model.backbone(image)
        assert model.head(features[-1], features[model.low_index]).shape == (2, 5, 16, 16)

    target = torch.randint(0, 5, (2, 64, 64))
    nn.functional.cross_entropy(logits, target).backward()
    body = model.backbone.body
    assert model.head.classifier.weight.grad.abs().sum() > 0
    assert model.head.aspp.pool[1].weight.grad.abs().sum() > 0
    assert model.head.low_proj.conv.weight.grad.abs().sum() > 0
    # timm zero-inits each block's last BN gamma, so a block's inner convs see no gradient at step 0;
    # every unfrozen stage must still receive some through its norms and shortcut convs.
    for stage in (body.layer1, body.layer2, body.layer3, body.layer4):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.parameters())
    assert body.conv1.weight.grad is None  # stem frozen


def test_deeplab_batch_one_train_mode():
    model = DeepLabV3Plus(Backbone("resnet18", output_stride=16), num_classes=4).train()
    out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 4, 64, 64) and torch.isfinite(out).all()


def test_deeplab_needs_low_level_feature():
    with pytest.raises(ValueError, match="stride 4"):
        DeepLabV3Plus(Backbone("resnet18", out_indices=[2, 3, 4]), num_classes=2)


def test_param_groups_partition():
    model = DeepLabV3Plus(Backbone("resnet18", output_stride=16, frozen_stages=2), num_classes=3)
    groups = param_groups(model)
    assert set(groups) == set(GROUP_NAMES) and all(groups.values())

    ids = [id(p) for ps in groups.values() for p in ps]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) == len(trainable) and set(ids) == trainable

    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert all(id(p) in backbone_ids for p in groups["backbone"] + groups["backbone_no_decay"])
    assert not any(id(p) in backbone_ids for p in groups["new"] + groups["new_no_decay"])
    assert all(p.ndim > 1 for p in groups["backbone"] + groups["new"])
    assert all(p.ndim == 1 for p in groups["backbone_no_decay"] + groups["new_no_decay"])
    assert id(model.head.classifier.bias) in {id(p) for p in groups["new_no_decay"]}
    assert id(model.backbone.body.conv1.weight) not in set(ids)  # frozen

    opt_groups = optimizer_groups(groups, lr=0.01, weight_decay=1e-4, lr_mult={"new": 10, "new_no_decay": 20})
    by_name = {g["name"]: g for g in opt_groups}
    assert by_name["new"]["lr"] == pytest.approx(0.1) and by_name["new_no_decay"]["lr"] == pytest.approx(0.2)
    assert by_name["backbone_no_decay"]["weight_decay"] == 0.0 and by_name["backbone"]["weight_decay"] == 1e-4
    torch.optim.SGD(opt_groups, lr=0.01, momentum=0.9)
    with pytest.raises(KeyError):
        optimizer_groups(groups, lr=0.01, weight_decay=0.0, lr_mult={"head": 10})


def test_param_groups_honours_timm_no_weight_decay():
    # pos_embed is 3-D but timm lists it in no_weight_decay().
    vit = Backbone("vit_tiny_patch16_224", **TINY_VIT)
    assert len(vit.body.model.blocks) == 2
    groups = param_groups(vit, backbone_attr="body")
    no_decay = {id(p) for p in groups["backbone_no_decay"]}
    assert id(vit.body.model.pos_embed) in no_decay
    with pytest.raises(AttributeError, match="backbone"):
        param_groups(vit)


@pytest.mark.parametrize("config", ["resnet18", "resnet50", "resnet101", "convnext_tiny", "convnext_base"])
def test_backbone_configs_instantiate(config):
    cfg = OmegaConf.load(CONF_DIR / f"{config}.yaml")
    assert cfg.pretrained is False
    with torch.device("meta"):  # structure only: no memory, no init cost for the big ones
        backbone = hydra.utils.instantiate(cfg)
    assert isinstance(backbone, Backbone) and backbone.name == config
    assert backbone.output_stride == cfg.output_stride
    assert len(backbone.out_channels) == len(cfg.out_indices)


def test_resnet38d_is_a_timm_model_once_segexp_models_is_imported():
    """A fresh interpreter: `import segexp.models` alone registers it (no config factory needed)."""
    import subprocess
    import sys

    code = "import timm, segexp.models; assert 'resnet38d' in timm.list_models('resnet38*')"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_segexp_checkpoint_initialises_another_experiments_backbone(tmp_path):
    """A CAM run's Lightning checkpoint becomes the backbone of another method (weights_prefix)."""
    import hydra

    from tests.conftest import compose

    source = hydra.utils.instantiate(compose(["+experiment=cam_shapes"]).method)
    body = source.model.backbone.body
    with torch.no_grad():  # "trained": every tensor differs from any fresh initialisation
        body.stem.conv.weight.add_(1.0)
        body.stages_2[1].bn.running_var.uniform_(2.0, 3.0)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)  # the layout Lightning writes
    cfg = compose(
        [
            "+experiment=sccam_rounds_shapes",
            f"backbone.pretrained={path}",
            "backbone.weights_prefix=model.backbone.body.",
        ]
    )
    target = hydra.utils.instantiate(cfg.method)
    loaded = target.model.backbone.body
    assert torch.equal(loaded.stem.conv.weight, body.stem.conv.weight)
    assert torch.equal(loaded.stages_2[1].bn.running_var, body.stages_2[1].bn.running_var)


def test_a_segexp_checkpoint_without_its_prefix_names_the_prefix_to_set(tmp_path):
    """Without ``weights_prefix`` no key of a Lightning checkpoint matches: the error says which to set."""
    import hydra

    from tests.conftest import compose

    source = hydra.utils.instantiate(compose(["+experiment=cam_shapes"]).method)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    with pytest.raises(Exception, match=r"set backbone\.weights_prefix=model\.backbone\.body\."):
        hydra.utils.instantiate(compose(["+experiment=cam_shapes", f"backbone.pretrained={path}"]).method)

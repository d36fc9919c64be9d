"""IRN (Ahn, Cho & Kwak, CVPR 2019): path index, loss terms, IRNet heads, boundary map, random walk and IR
labels against the release, the stages' caches, the pipeline step's settings and a shapes smoke run.

Expected numbers come from running the release's own functions on the seeded CPU inputs built below
(``jiwoon-ahn/irn@a2ece0034d0a5a9635e4e131cd4fa6e2a779d316``, ``.cuda()`` made a no-op):

* ``misc/indexing.py:PathIndex`` (radius 3, 7 x 9 grid);
* ``net/resnet50_irn.py:AffinityDisplacementLoss.to_affinity / to_pair_displacement /
  to_displacement_loss / forward`` with ``voc12/dataloader.py:GetAffinityLabelFromIndices`` and the loss
  aggregation of ``step/train_irn.py:run`` (radius 5, 12 x 14 grid);
* ``misc/indexing.py:propagate_to_edge`` (beta 10, exp_times 8, radius 5) and the label lines of
  ``step/make_sem_seg_labels.py:_work`` (x4 bilinear, / max, background 0.25);
* ``step/cam_to_ir_label.py:_work`` (0.30 / 0.05, ``misc/imutils.py:crf_inference_label``);
* ``net/resnet50_irn.py:Net.forward`` (train mode, gradients) and ``EdgeDisplacement.forward`` (crop 80)
  with the release's stages replaced by seeded 1x1/3x3 convs of the same channels and strides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from segexp.inference.irn_random_walk import boundary_map, irn_random_walk, walk_labels
from segexp.losses.affinity import affinity_labels
from segexp.losses.irn import IRN_TERMS, boundary_affinity, irn_terms, path_cells, path_index
from segexp.methods.irn import RELEASE_SCALE
from segexp.models.irn import IRNet
from segexp.stages.ir_labels import IRLabelStage, combine_ir_labels
from tests.conftest import config_weights
from tests.test_affinitynet import rw_setup  # noqa: F401  (a fixture: TinyReader + blob CAMs)

CONF = Path(__file__).resolve().parents[1] / "conf"

# fmt: off
RELEASE = {
    "pi_search_dst": [[0, 1], [1, 0], [0, 2], [2, 0], [1, -1], [1, 1], [1, -2], [1, 2], [2, -1],
                      [2, 1], [2, -2], [2, 2]],
    "pi_src": [2, 3, 4, 5, 6, 11, 12, 13, 14, 15, 20, 21, 22, 23, 24, 29, 30, 31, 32, 33, 38, 39,
               40, 41, 42],
    "pi_dst_col0": [3, 11, 4, 20, 10, 12, 9, 13, 19, 21, 18, 22],
    "pi_group_shapes": [[2, 2, 25], [2, 3, 25], [2, 4, 25], [4, 6, 25], [2, 7, 25]],
    "pi_paths_sum": [2450, 4050, 5300, 17250, 10850],
    "loss_terms": {"bg_pos": 2.1293914318084717,
                   "dp_bg": 2.9511818885803223,
                   "dp_fg": 4.046897888183594,
                   "fg_pos": 3.168269157409668,
                   "neg": 0.10829391330480576,
                   "total": 4.8776021003723145},
    "loss_pair_counts": [928, 647, 1079],
    "aff_first": [0.154802, 0.154802, 0.154802, 0.154802, 0.154802, 0.154802, 0.154802, 0.154802,
                  0.154802, 0.154802, 0.154802, 0.154802, 0.154802, 0.154802, 0.130949, 0.154802,
                  0.154802, 0.154802, 0.040207, 0.154802, 0.009908, 0.009908, 0.154802, 0.154802,
                  0.096777, 0.154802, 0.040207, 0.148595, 0.001089, 0.154802, 0.040207, 0.154802,
                  0.001089, 0.025595],
    "grad_edge": [3.888435094268061e-05, 0.00898695271462202, 0.0016019758768379688, 0.0],
    "grad_disp": [-0.006568778771907091, -0.0034775887615978718, 0.0030911900103092194,
                  -0.00026939655072055757],
    "rw_sum": 25.07355308532715,
    "rw_entries": [0.3054705, 0.30547044, 0.09933255, 0.09933256, 0.01365871, 0.0138436, 0.09933255,
                   0.09933255, 0.0756868, 0.07568679, 0.09933253, 0.09933255, 0.09691159,
                   0.09691159, 0.20048361, 0.20048365, 0.01420034, 0.01022872, 0.20048361,
                   0.20048359, 0.09254543, 0.09254543, 0.20048356, 0.20048361],
    "rw_label_counts": [189, 356, 883],
    "rw_label_rows": [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 2, 2, 2,
                       2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2],
                      [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2,
                       2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]],
    "ir_counts": {0: 660, 1: 288, 3: 324, 255: 648},
    "ir_rows": [[255, 255, 255, 255, 255, 255, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 255,
                 255, 255, 0, 255, 255, 0, 255, 0, 0, 0, 0, 0, 0, 255, 255, 255, 0, 255, 0, 0, 0, 0,
                 0, 0, 0],
                [255, 255, 255, 0, 255, 255, 255, 0, 255, 255, 0, 255, 0, 0, 255, 255, 0, 255, 0, 0,
                 255, 255, 0, 255, 0, 255, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0,
                 0, 0, 255]],
    "ed_edge": [0.5706825, 0.5597585, 0.5663379, 0.5817447, 0.5593241, 0.5619569, 0.5632119,
                0.5740504, 0.5724085, 0.5627192, 0.5585458, 0.5632213, 0.5551148, 0.5630599,
                0.5693125, 0.5440264, 0.5457579, 0.563657, 0.5544447, 0.5632177, 0.5523383,
                0.5655963, 0.5769802, 0.5759127],
    "net_edge_sum": 125.13207244873047,
    "net_dp_sum": 17.073564529418945,
    "net_edge_vals": [0.230024, 0.222575, 0.177893, 0.14634, 0.210881, 0.290005, 0.264732, 0.32234,
                      0.294099, 0.237113, 0.195069, 0.253415, 0.2018, 0.225713, 0.286102, 0.237346],
    "net_dp_vals": [-0.092785, -0.075131, -0.12894, -0.128231, -0.119085, -0.039742, -0.196377,
                    -0.112148, -0.127442, 0.168513, 0.098472, 0.152097, 0.206873, 0.113174, 0.08108,
                    0.16865, 0.193979, 0.10378],
    "grad_edge6_w": [0.08321719, 0.00710848, 0.00712132, 0.0],
    "grad_dp7_w": [-0.00359824, -0.08209362, 0.0, 0.00374602, 0.08261813, 0.0],
    "grad_dp1_gn": [0.00429621, -0.01338874, -0.00301942, 0.00998093],
}
# fmt: on


def _max_diff(a, b) -> float:
    return float(
        np.max(np.abs(np.asarray(a, np.float64).reshape(-1) - np.asarray(b, np.float64).reshape(-1)))
    )


# -- path index -------------------------------------------------------------------------------------
def test_path_index_matches_the_release():
    index = path_index(3, 7, 9)
    assert index.directions.tolist() == RELEASE["pi_search_dst"]
    assert index.src.tolist() == RELEASE["pi_src"]
    assert index.dst[:, 0].tolist() == RELEASE["pi_dst_col0"]
    assert [list(p.shape) for p in index.paths] == RELEASE["pi_group_shapes"]
    assert [int(p.sum()) for p in index.paths] == RELEASE["pi_paths_sum"]


def test_paths_are_the_cells_next_to_the_segment_destination_first():
    assert path_cells(0, 3).tolist() == [[0, 3], [0, 2], [0, 1], [0, 0]]
    # (2, 1): |2x - y| / sqrt(5) < 1 keeps all six cells of the box; ties keep the row-major order
    assert path_cells(2, 1).tolist() == [[2, 1], [1, 1], [2, 0], [0, 1], [1, 0], [0, 0]]
    # (1, -1): the two off-diagonal cells lie sqrt(2) / 2 from the line
    assert path_cells(1, -1).tolist() == [[1, -1], [0, -1], [1, 0], [0, 0]]
    with pytest.raises(ValueError, match="too small"):
        path_index(10, 16, 16)


# -- loss -------------------------------------------------------------------------------------------
def _loss_inputs():
    g = torch.Generator().manual_seed(0)
    edge = torch.randn(2, 1, 12, 14, generator=g) * 2
    disp = torch.randn(2, 2, 12, 14, generator=g) * 3
    lab = np.zeros((2, 12, 14), np.int64)
    lab[0, 2:8, 3:9] = 1
    lab[0, 5:11, 8:13] = 2
    lab[0, 0:2, :] = 255
    lab[1, 4:12, 0:6] = 3
    lab[1, 1:4, 9:14] = 255
    return edge.requires_grad_(True), disp.requires_grad_(True), torch.from_numpy(lab)


def test_loss_terms_and_gradients_match_the_release():
    edge, disp, labels = _loss_inputs()
    index = path_index(5, 12, 14)
    weights = config_weights("method=irn")  # the paper's; the release halves them (official_quirks)
    terms = irn_terms(edge, disp, labels, index)
    assert tuple(terms) == IRN_TERMS
    total = sum(RELEASE_SCALE * weights[k] * v for k, v in terms.items())
    total.backward()
    for k, v in terms.items():
        assert float(v.detach()) == pytest.approx(RELEASE["loss_terms"][k], rel=1e-5, abs=1e-6), k
    assert float(total.detach()) == pytest.approx(RELEASE["loss_terms"]["total"], rel=1e-6)
    aff = boundary_affinity(torch.sigmoid(edge), index)
    assert _max_diff(aff[0, :, 0].detach(), RELEASE["aff_first"]) < 1e-6  # release numbers rounded to 1e-6
    edge_at = [(0, 0, 3, 4), (1, 0, 6, 2), (0, 0, 7, 9), (1, 0, 2, 11)]
    disp_at = [(0, 0, 3, 4), (0, 1, 6, 8), (1, 0, 8, 3), (1, 1, 10, 12)]
    assert _max_diff([edge.grad[i] for i in edge_at], RELEASE["grad_edge"]) < 1e-8
    assert _max_diff([disp.grad[i] for i in disp_at], RELEASE["grad_disp"]) < 1e-8


def test_each_term_reads_its_own_pairs():
    """A map without boundaries: positives cost ~0 and negatives ~-log(eps); displacements that follow
    the pair offsets cost nothing on foreground pairs."""
    labels = torch.zeros(1, 12, 14, dtype=torch.long)
    labels[0, :, 7:] = 1
    index = path_index(5, 12, 14)
    no_edge = torch.full((1, 1, 12, 14), -30.0)
    yy, xx = torch.meshgrid(torch.arange(12.0), torch.arange(14.0), indexing="ij")
    towards_origin = -torch.stack([yy, xx])[None]  # d(p) = c - p with one centre c for every pixel
    terms = irn_terms(no_edge, towards_origin, labels, index)
    assert float(terms["bg_pos"]) < 1e-4 and float(terms["fg_pos"]) < 1e-4
    assert float(terms["neg"]) == pytest.approx(-np.log(1e-5), rel=1e-3)
    assert float(terms["dp_fg"]) < 1e-6 and float(terms["dp_bg"]) > 1.0


# -- IRNet and its boundary map --------------------------------------------------------------------
def _fill(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


class StandInBackbone(nn.Module):
    """The release's stage1..5 channels and strides (ResNet-50 at strides 2, 2, 2, 1 after the max pool)."""

    out_channels = [64, 256, 512, 1024, 2048]
    reductions = [4, 4, 8, 16, 16]

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList(
            [
                nn.Conv2d(3, 64, 3, 4, 1),
                nn.Conv2d(64, 256, 1),
                nn.Conv2d(256, 512, 1, 2),
                nn.Conv2d(512, 1024, 1, 2),
                nn.Conv2d(1024, 2048, 1),
            ]
        )
        _fill(self.parameters(), 5)

    def forward(self, x):
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


def _release_like_irnet() -> IRNet:
    net = IRNet(StandInBackbone())
    _fill(list(net.edge_layers.parameters()) + list(net.dp_layers.parameters()), 6)
    return net


def test_irnet_heads_and_gradients_match_the_release():
    net = _release_like_irnet().train()
    g = torch.Generator().manual_seed(4)
    torch.randn(1, 3, 70, 62, generator=g)  # the boundary-map input, drawn first in the release run
    boundary, disp = net(torch.randn(2, 3, 64, 64, generator=g))
    (boundary.square().mean() + disp.abs().mean()).backward()
    assert float(boundary.detach().sum()) == pytest.approx(RELEASE["net_edge_sum"], rel=1e-5)
    assert float(disp.detach().sum()) == pytest.approx(RELEASE["net_dp_sum"], rel=1e-5)
    assert _max_diff(boundary[1, 0, ::5, ::5].detach(), RELEASE["net_edge_vals"]) < 1e-5
    assert _max_diff(disp[0, :, ::6, ::6].detach(), RELEASE["net_dp_vals"]) < 1e-5
    assert _max_diff(net.edge_layers[5].weight.grad[0, ::40, 0, 0], RELEASE["grad_edge6_w"]) < 1e-7
    assert _max_diff(net.dp_layers[6][3].weight.grad[:, ::100, 0, 0], RELEASE["grad_dp7_w"]) < 1e-7
    assert _max_diff(net.dp_layers[0][1].weight.grad[::16], RELEASE["grad_dp1_gn"]) < 1e-7
    assert all(p.grad is None for p in net.backbone.parameters())  # frozen, as released


def test_boundary_map_pads_mirrors_and_crops_as_the_release():
    net = _release_like_irnet().eval()
    x = torch.randn(1, 3, 70, 62, generator=torch.Generator().manual_seed(4))
    boundary = boundary_map(net, x, pad_size=80)
    assert boundary.shape == (18, 16)
    assert _max_diff(boundary[::3, ::4], RELEASE["ed_edge"]) < 1e-6


# -- random walk ------------------------------------------------------------------------------------
def test_random_walk_and_labels_match_the_release():
    g = torch.Generator().manual_seed(1)
    edge = torch.rand(1, 9, 11, generator=g) * 0.1
    edge[0, :, 5] = 0.95
    edge[0, 4, :5] = 0.9
    cams = torch.rand(2, 9, 11, generator=g) * 0.2
    cams[0, 1:3, 1:3] = 1.0
    cams[1, 6:8, 7:10] = 0.8
    walked = irn_random_walk(cams, edge[0], beta=10, exp_times=8, radius=5)
    assert float(walked.sum()) == pytest.approx(RELEASE["rw_sum"], rel=1e-5)
    # 256 float32 mat-vec steps: summation order differs between CPUs (1.8e-6 seen on values ~0.3)
    assert _max_diff(walked[:, ::4, ::3], RELEASE["rw_entries"]) < 1e-5
    labels = walk_labels(walked, (34, 42), stride=4, bg_threshold=0.25).numpy()
    assert np.bincount(labels.reshape(-1), minlength=3).tolist() == RELEASE["rw_label_counts"]
    assert [labels[5].tolist(), labels[20].tolist()] == RELEASE["rw_label_rows"]


# -- IR labels --------------------------------------------------------------------------------------
def _ir_inputs():
    rs = np.random.RandomState(2)
    img = (rs.rand(40, 48, 3) * 60 + 60).astype(np.uint8)
    img[8:26, 6:22] = [200, 40, 40]
    img[18:36, 26:44] = [40, 60, 210]
    yy, xx = np.mgrid[0:40, 0:48]
    c1 = np.exp(-((yy - 16) ** 2 + (xx - 13) ** 2) / (2 * 7.0**2))
    c2 = np.exp(-((yy - 28) ** 2 + (xx - 36) ** 2) / (2 * 6.0**2)) * 0.9
    return img, {"cams": np.stack([c1, c2]).astype(np.float16), "classes": np.array([1, 3])}


def test_ir_labels_match_the_release():
    node = OmegaConf.load(CONF / "stage" / "ir_labels.yaml")  # the stage's values as configured
    settings = {k: OmegaConf.to_container(node)[k] for k in ("conf_fg", "conf_bg", "gt_prob", "crf")}
    img, cams = _ir_inputs()
    cams["cams"] = cams["cams"].astype(np.float32)
    label = IRLabelStage(cam_stage=None, **settings).compute({"image": img}, cams=cams)["pseudo"]
    values, counts = np.unique(label, return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist())) == RELEASE["ir_counts"]
    assert [label[10].tolist(), label[30].tolist()] == RELEASE["ir_rows"]


def test_ir_rule_keeps_a_class_the_high_threshold_crf_drops():
    fg = np.array([[0, 1, 1], [0, 0, 2]])
    bg = np.array([[0, 0, 1], [1, 0, 2]])
    assert combine_ir_labels(fg, bg).tolist() == [[0, 1, 1], [255, 0, 2]]
    # AffinityNet's rule sets 0 wherever the second map is background, here the class-1 pixel (0, 1)
    assert affinity_labels(fg, bg).tolist() == [[0, 0, 1], [255, 0, 2]]


# -- the stages on synthetic images, and a few training steps ------------------------------------------
@pytest.fixture()
def irn_setup(rw_setup):  # noqa: F811  (the fixture imported above)
    """TinyReader's three squares with a blob CAM each (tests/test_affinitynet.py) and their IR labels."""
    reader, cams, _, _, cache = rw_setup
    node = OmegaConf.to_container(OmegaConf.load(CONF / "stage" / "ir_labels.yaml"))
    settings = {k: node[k] for k in ("conf_fg", "conf_bg", "gt_prob", "crf")}
    labels = IRLabelStage(cams, cache_dir=cache, progress=False, **settings)
    return reader, cams, labels, cache


def test_ir_label_stage_caches_its_labels_and_keys_them_by_its_thresholds(irn_setup):
    reader, cams, labels, cache = irn_setup
    first = labels.run(reader, evaluate=True)
    # a clean square on grey: both CRFs snap to it, (nearly) every pixel is confident and right
    assert first["computed"] == 3 and first["confident_fraction"] > 0.9
    assert first["pseudo"]["mIoU"] > 0.9
    maps = [labels.get(reader, i) for i in range(3)]
    assert all({0, 2} <= set(np.unique(m)) <= {0, 2, 255} for m in maps)
    again = IRLabelStage(cams, cache_dir=cache, progress=False, crf=labels.crf)
    second = again.run(reader, evaluate=True)
    assert second["computed"] == 0 and second["reused"] == 3
    assert all(np.array_equal(again.get(reader, i), m) for i, m in enumerate(maps))
    other = IRLabelStage(cams, cache_dir=cache, progress=False, conf_fg=0.45, conf_bg=0.15)
    assert other.cache_for(reader).dir != labels.cache_for(reader).dir and other.missing(reader) == reader.ids


def _irn_method_config() -> dict:
    from segexp.pipeline.compose import compose

    cfg = compose(
        ["method=irn", "backbone=small_cnn", "method.num_classes=3", "method.class_names=[background,a,b]"]
    )
    return OmegaConf.to_container(cfg.method, resolve=True)


def test_irn_trains_a_few_steps_and_its_stage_walks_the_cams(irn_setup, tmp_path):
    import hydra

    from segexp.data.transforms import image_tensor
    from segexp.stages.irn_labels import IRNLabelStage

    reader, cams, labels, cache = irn_setup
    labels.run(reader)
    config = _irn_method_config()
    torch.manual_seed(0)
    method = hydra.utils.instantiate(config).train()
    batch = {
        "image": torch.cat([image_tensor(reader[i]["image"]) for i in range(3)]),
        "pseudo": torch.stack([torch.from_numpy(labels.get(reader, i).astype(np.int64)) for i in range(3)]),
    }
    groups = method.parameter_groups()
    assert (
        not groups["backbone"] and groups["edge"] and groups["displacement"]
    )  # frozen backbone, as released
    optimizer = torch.optim.SGD(
        [{"params": groups["edge"], "lr": 0.1}, {"params": groups["displacement"], "lr": 1.0}], lr=0.1
    )
    totals = []
    for _ in range(20):
        total = sum(method.compute_losses(batch).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(float(total.detach()))
    assert np.mean(totals[-5:]) < 0.8 * totals[0]  # lr x10 on the displacement branch (as released): noisy

    ckpt = tmp_path / "irn.ckpt"
    torch.save({"state_dict": method.state_dict(), "hyper_parameters": {"method_config": config}}, ckpt)
    stage = IRNLabelStage(cams, irn_ckpt=ckpt, pad_size=None, cache_dir=cache, device="cpu", progress=False)
    first = stage.run(reader, evaluate=True)
    assert first["computed"] == 3 and first["pseudo"]["mIoU"] > 0.6
    assert all(set(np.unique(stage.get(reader, i))) == {0, 2} for i in range(3))  # bg + the image's class
    assert stage.run(reader)["computed"] == 0


def test_irn_stage_without_a_checkpoint_says_how_to_get_one(irn_setup):
    from segexp.stages.irn_labels import IRNLabelStage
    from segexp.utils.errors import UserError

    reader, cams, _, cache = irn_setup
    with pytest.raises(UserError, match="stage.irn_ckpt"):
        IRNLabelStage(cams, cache_dir=cache, device="cpu", progress=False).run(reader)


# -- the pipeline step's settings ---------------------------------------------------------------------
def test_irn_step_settings_compose_and_add_the_cam_backbone_when_asked():
    from segexp.pipeline.compose import compose
    from segexp.pipeline.irn import irn_settings
    from segexp.pipeline.runs import PipelineContext
    from segexp.utils.errors import UserError

    cfg = compose(
        ["+experiment=cam_shapes", "pipeline.irn.backbone_init=cam"]  # conf/pipeline/wsss.yaml composes irn
    )
    settings = irn_settings(
        PipelineContext(cfg=cfg, overrides=[], root=Path(".")), {"ckpt_path": "/x/last.ckpt"}
    )
    assert settings["method"] == "irn" and settings["labels"]["conf_fg"] == 0.30
    assert "schedule.epochs=3" in settings["overrides"]
    assert settings["overrides"][-2:] == [
        "backbone.pretrained=/x/last.ckpt",
        "backbone.weights_prefix=model.backbone.body.",
    ]
    node = compose(["method=irn"]).method
    assert node._target_ == "segexp.methods.irn.IRN" and node.radius == 10
    without = compose(["+experiment=cam_shapes", "~pipeline.irn"])
    with pytest.raises(UserError, match="pipeline.irn"):
        irn_settings(
            PipelineContext(cfg=without, overrides=[], root=Path(".")),
            {},
        )


def test_irn_weights_are_config_and_unknown_terms_are_rejected():
    from segexp.losses.weights import WeightsError
    from segexp.methods.irn import IRN

    net = _release_like_irnet()
    with pytest.raises(WeightsError, match="dp_fg"):
        IRN(
            net,
            weights={**config_weights("method=irn"), "dp_fg2": 1.0},
            num_classes=3,
            class_names=["a", "b", "c"],
            schedule={},
        )
    common = {"weights": config_weights("method=irn"), "num_classes": 3, "class_names": ["a", "b", "c"],
              "schedule": {}}  # fmt: skip
    paper = IRN(net, **common)  # Sec. 3.3: L_B (positive sets halved) + L_D^fg + L_D^bg
    assert paper.weights == {"bg_pos": 0.5, "fg_pos": 0.5, "neg": 1.0, "dp_fg": 1.0, "dp_bg": 1.0}
    released = IRN(net, official_quirks=True, **common)  # train_irn.py halves every term
    assert released.weights == {"bg_pos": 0.25, "fg_pos": 0.25, "neg": 0.5, "dp_fg": 0.5, "dp_bg": 0.5}


@pytest.mark.slow
def test_irn_pipeline_step_trains_irn_on_ir_labels_and_its_stage_scores_the_walk(tmp_path):
    """CAM network (1 epoch) -> CAM export -> IR labels -> method=irn (3 epochs, as released) -> irn stage."""
    import hydra

    from segexp.pipeline.compose import compose, is_stage_setting, train_reader
    from segexp.pipeline.export_cams import export_cams
    from segexp.pipeline.irn import train_irn
    from segexp.pipeline.runs import PipelineContext
    from segexp.stages.irn_labels import IRNLabelStage
    from tests.test_cam_pipeline import TINY

    overrides = [
        "+experiment=cam_shapes",
        f"paths.data_dir={tmp_path / 'data'}",
        "+pipeline/irn@pipeline.irn=default",
        "pipeline.irn.backbone_init=cam",  # small_cnn has no ImageNet weights: start from the CAM network's
        *TINY,
    ]
    cfg = compose(overrides)
    context = PipelineContext(cfg=cfg, overrides=[a for a in overrides if not is_stage_setting(a)],
                              root=tmp_path / "pipe")
    network = hydra.utils.instantiate(cfg.pipeline.cam_network)(context)
    context.reader = train_reader(cfg)
    cam_cfg, _ = export_cams(context, network)
    ckpt = train_irn(context, cam_cfg, "irn")
    assert 0.0 < context.report["ir_labels"]["confident_fraction"] <= 1.0
    assert "val/aff_balanced_acc" in context.report["irn_affinity"]
    cams = hydra.utils.instantiate(cam_cfg)
    stage = IRNLabelStage(cams, irn_ckpt=ckpt, pad_size=None, cache_dir=cfg.paths.cache_dir, device="cpu",
                          progress=False)
    report = stage.run(context.reader, evaluate=True)
    assert report["computed"] == report["images"] == report["scored_images"] > 0
    assert report["pseudo"]["mIoU"] > 0.05
    assert train_irn(context, cam_cfg, "irn") == ckpt  # current: not retrained

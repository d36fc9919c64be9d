"""Bottom-up class-agnostic entity segmentation (Dille et al., arXiv 2409.13687).

Training batch: ``image`` and the entity map (``instances``: 0 = unlabeled background, 1..K
entities). The network (:class:`segexp.models.bottomup.BottomUpNet`) gives raw D-dimensional
features; :class:`segexp.losses.bottomup.BottomUpLoss` turns them into the weighted terms (its
docstring lists every equation and every choice made where the paper's text is lost).

Inference (``inference`` config): unit features -> spherical mean-shift (45 degree bandwidth,
:mod:`segexp.inference.meanshift`) per image and per scale of ``multires.scales``; the label
maps, upsampled (nearest) to the input size, are merged coarse to fine. Padding of evaluation
batches (``valid`` false) is cropped before clustering and gets id 0 in the output.

Evaluation (val and test): :class:`segexp.metrics.entity.EntityMetrics` against the GT entities
(recall at the IoU thresholds, ``mIoU`` over GT segments, ``mBIoU``), the same metrics for the
trivial prediction "the whole image is one segment" (``trivial_*``, the floor any result must
beat), and the paper's representation diagnostics with target lines (``intra_sim`` = mean
``|mu_k . f_p|``, ``inter_sim`` = mean ``|mu_k . mu_l|`` over entity pairs, and as degrees),
beside the mean-vector version of :class:`~segexp.metrics.entity.EntitySimilarity`
(``meanvec_*``). ``val/mIoU`` is the entity mIoU, so checkpoints keep the best of it.
Test predictions are dumped (``dump.predictions=true``) as COCO-panoptic PNG + JSON
(:class:`segexp.reporting.entity_dump.EntityDump`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segexp.data.collate import unpadded_sizes
from segexp.inference.meanshift import multires_merge, spherical_meanshift
from segexp.losses.bottomup import BottomUpLoss, entity_groups, group_mean, target_lines
from segexp.methods.base import SegMethod, _plain
from segexp.metrics.entity import EntityMetrics, EntitySimilarity
from segexp.metrics.instance_ap import InstanceAP
from segexp.reporting.entity_dump import EntityDump

__all__ = ["BottomUp", "LineSimilarity"]


class LineSimilarity(EntitySimilarity):
    """The paper's diagnostics with target lines (principal eigenvectors) instead of mean vectors,
    so that antipodal features of one entity (the same line) do not cancel. Background (0) and
    ``ignore_index`` pixels are left out."""

    def update(self, features: torch.Tensor, entities: torch.Tensor) -> None:
        d = features.shape[1]
        for fmap, ent in zip(features.detach(), entities):
            keep = (ent != 0) & (ent != self.ignore_index)
            groups = entity_groups(ent, keep)
            if groups.num_entities == 0:
                continue
            f = fmap.reshape(d, -1).T[groups.index].float()
            lines = target_lines(f, groups.labels, groups.num_entities + 1)
            self.intra += float((f * lines[groups.labels]).sum(1).abs().double().sum())
            self.n_pix += f.shape[0]
            k = groups.num_entities
            if k > 1:
                gram = (lines[1:] @ lines[1:].T).abs().double()
                self.inter += float((gram.sum() - gram.diagonal().sum()) / 2)
                self.n_pairs += k * (k - 1) // 2


def segment_scores(features: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Confidence of each segment of an (H,W) id map (ids in increasing order, 0 = none): the
    mean line alignment ``|mu_k . f_p|`` of its pixels to its own target line, from (D,H,W)."""
    keep = segments != 0
    groups = entity_groups(segments, keep)
    f = features.reshape(features.shape[0], -1).T[groups.index].float()
    lines = target_lines(f, groups.labels, groups.num_entities + 1)
    own = (f * lines[groups.labels]).sum(1).abs()
    return group_mean(own, groups.labels, groups.num_entities + 1)[1:]



class BottomUp(SegMethod):
    def __init__(
        self,
        model: nn.Module,
        loss: BottomUpLoss,
        inference: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        target_key: str = "instances",
        name: str = "bottomup",
        **base: Any,
    ):
        super().__init__(**base)
        self.model = model
        self.loss = loss
        self.target_key = target_key
        inference = _plain(inference)
        self.meanshift = dict(inference["meanshift"])
        self.multires = dict(inference["multires"])
        self.cluster_seed = int(inference.get("seed", 0))
        if not self.multires.get("scales"):
            raise ValueError(
                "method.inference.multires.scales must list at least one scale (1.0 = input size)"
            )
        m = dict(_plain(metrics) or {})
        entity_args = dict(
            iou_thresholds=tuple(m.get("iou_thresholds", (0.5,))),
            ignore_index=self.ignore_index,
            gt_background=0,  # unlabeled: never an entity (paper protocol)
            pred_background=0,  # outside the valid area (segment() gives ids 1..K inside)
            dilation_ratio=float(m.get("dilation_ratio", 0.02)),
            boundary=bool(m.get("boundary", True)),
        )
        self.entity_metrics = nn.ModuleDict(
            {
                f"{split}_{kind}": EntityMetrics(**entity_args)
                for split in ("val", "test")
                for kind in ("pred", "trivial")
            }
        )
        self.similarity = nn.ModuleDict(
            {
                f"{split}_{kind}": cls(ignore_index=self.ignore_index)
                for split in ("val", "test")
                for kind, cls in (("line", LineSimilarity), ("meanvec", EntitySimilarity))
            }
        )
        # COCO mask AP (the cell experiment): every predicted segment is a detection scored by
        # its alignment, mean |mu . f| over its pixels (tight clusters rank first)
        self.ap_metrics = nn.ModuleDict(
            {split: InstanceAP(background=0) for split in ("val", "test")} if m.get("ap", False) else {}
        )

    # -- training ------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw features (B,D,H,W) (``tanh`` output, not unit length)."""
        return self.model(images)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit features on the projective sphere (B,D,H,W)."""
        return F.normalize(self(images).float(), dim=1)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raw = self(batch["image"])
        losses, diagnostics = self.loss(raw, batch[self.target_key], batch.get("valid"))
        if self._trainer is not None:  # also called outside a Trainer (tests, benchmarks)
            for name, value in diagnostics.items():
                self.log(f"train/{name}", value, batch_size=raw.shape[0])
        return losses

    # -- inference -----------------------------------------------------------------------------
    def _cluster(self, features: torch.Tensor, h: int, w: int) -> torch.Tensor:
        d = features.shape[0]
        flat = features[:, :h, :w].reshape(d, -1).T
        gen = torch.Generator(device=flat.device).manual_seed(self.cluster_seed)
        labels, _ = spherical_meanshift(flat, generator=gen, **self.meanshift)
        return (labels + 1).view(h, w)

    @torch.no_grad()
    def segment(
        self, images: torch.Tensor, sizes: list[tuple[int, int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(entity maps (B,H,W) with ids 1..K inside each image's valid area and 0 outside, unit
        features at the input scale). ``sizes``: the unpadded (h, w) of each image."""
        b, _, full_h, full_w = images.shape
        sizes = sizes or [(full_h, full_w)] * b
        scales = sorted(float(s) for s in self.multires["scales"])
        levels: list[list[torch.Tensor]] = [[] for _ in range(b)]
        base_features = None
        for s in scales:
            size = (max(1, round(full_h * s)), max(1, round(full_w * s)))
            scaled = (
                images if s == 1.0 else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            )
            feats = self.embed(scaled)
            if s == 1.0:
                base_features = feats
            for i, (h, w) in enumerate(sizes):
                hs, ws = max(1, round(h * s)), max(1, round(w * s))
                lab = self._cluster(feats[i], hs, ws)
                levels[i].append(
                    F.interpolate(lab[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
                )
        if base_features is None:
            base_features = self.embed(images)
        out = torch.zeros(b, full_h, full_w, dtype=torch.long, device=images.device)
        for i, (h, w) in enumerate(sizes):
            out[i, :h, :w] = multires_merge(
                levels[i],
                float(self.multires["contain"]),
                float(self.multires["refine_iou"]),
                int(self.multires["min_pixels"]),
            )
        return out, base_features

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Entity id maps (B,H,W) -- not class scores: test-time averaging does not apply."""
        return self.segment(images)[0]

    # -- evaluation ----------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any], split: str) -> torch.Tensor:
        sizes = unpadded_sizes(batch)
        pred, feats = self.segment(batch["image"], sizes)
        gt = batch[self.target_key].clone()
        if "valid" in batch:
            gt[~batch["valid"].bool()] = self.ignore_index
        self.entity_metrics[f"{split}_pred"].update(pred, gt)
        self.entity_metrics[f"{split}_trivial"].update(torch.ones_like(pred), gt)
        entities = torch.where(gt == 0, torch.full_like(gt, self.ignore_index), gt)
        self.similarity[f"{split}_line"].update(feats, gt)
        self.similarity[f"{split}_meanvec"].update(feats, entities)
        if split in self.ap_metrics:
            for i, (h, w) in enumerate(sizes):
                seg = pred[i, :h, :w]
                self.ap_metrics[split].update(
                    seg,
                    segment_scores(feats[i, :, :h, :w], seg),
                    torch.where(gt[i, :h, :w] == self.ignore_index, 0, gt[i, :h, :w]),
                )
        return pred

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        pred = self._eval_step(batch, "val")
        if batch_idx == 0:
            self._panel_batch = {"batch": {**batch, "mask": batch[self.target_key]}, "pred": pred}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        pred = self._eval_step(batch, "test")
        if self.dump is not None:
            if not isinstance(self.dump, EntityDump):
                self.dump = EntityDump.like(self.dump, self.ignore_index)
            self.dump.add(batch, pred, batch.get(self.target_key))

    def _log_entity_metrics(self, split: str) -> None:
        for kind, prefix in (("pred", ""), ("trivial", "trivial_")):
            metric = self.entity_metrics[f"{split}_{kind}"]
            for key, value in metric.compute().items():
                self.log(f"{split}/{prefix}{key}", float(value), sync_dist=False)
            metric.reset()
        for kind, prefix in (("line", ""), ("meanvec", "meanvec_")):
            metric = self.similarity[f"{split}_{kind}"]
            for key, value in metric.compute().items():
                if value == value:  # NaN when no entity pair was seen
                    self.log(f"{split}/{prefix}{key}", float(value), sync_dist=False)
            metric.reset()
        if split in self.ap_metrics:
            for key, value in self.ap_metrics[split].compute().items():
                self.log(f"{split}/{key}", float(value), sync_dist=False)
            self.ap_metrics[split].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_entity_metrics("val")
        self._send_panels()

    def on_test_epoch_end(self) -> None:
        self._log_entity_metrics("test")
        if self.dump is not None:
            self.dump.finish(self.global_rank)


BottomUpSegmentation = BottomUp  # the name before 2026-12-02, which older checkpoints record

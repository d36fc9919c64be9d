"""Class-agnostic (entity) segmentation: segment matching, recall, mIoU, Boundary IoU, and the
feature diagnostics of bottom-up entity learning.

Matching (class-agnostic, no scores): every GT segment is paired with the predicted segment of
highest mask IoU (the IoU matrix comes from one ``bincount`` of ``gt * P + pred`` over the valid
pixels). Reported over all GT segments of all images:

* ``recall@t``: fraction of GT segments whose best IoU is ``>= t`` (default t = 0.5; for
  t > 0.5 best-match equals one-to-one matching, since disjoint segments cannot share a match);
* ``mIoU``: mean of the best IoU per GT segment (0 for a missed segment);
* ``mBIoU``: mean Boundary IoU (:mod:`segexp.metrics.boundary`, dilation ratio 0.02) between
  each GT segment and its best mask-IoU match.

Pixels whose GT is ``ignore_index`` are dropped from all counts (and act as a separate region
for the GT boundary band). ``gt_background`` / ``pred_background`` name an id that is not a
segment: such pixels still count in the other map's areas. :class:`EntityMetrics` defaults both
to 0, the protocol of the bottom-up paper (``shared/methods/bottomup.md`` s.2 and s.7: every
annotated segment is an entity, the unlabeled "background" is not, and recall / mIoU / Boundary
IoU run over the GT entities) and segexp's map convention (instance maps: 0 = unlabeled; predicted
entity maps: ids 1..K, 0 = no segment). Pass ``None`` to count id 0 as a segment. The low-level
:func:`iou_matrix` keeps ``None`` (every id a segment) unless told.

Representation diagnostics (unit feature maps (B,D,H,W), an entity map (B,H,W)): with ``mu_e``
the normalised mean feature of entity ``e``,

* ``intra``: mean over pixels of ``|cos(f_p, mu_e(p))|`` -- how tight entities are;
* ``inter``: mean over pairs of distinct entities of the same image of ``|cos(mu_e, mu_e')|``
  -- how separated they are; both also as an angle, ``degrees(arccos(mean |cos|))``.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

from segexp.metrics.boundary import dilation_pixels, label_boundaries

__all__ = ["iou_matrix", "best_matches", "boundary_iou_matrix", "EntityMetrics", "entity_similarity",
           "EntitySimilarity"]


def _dense(x: torch.Tensor, background: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels): contiguous labels 0..n-1 for the segments, -1 for ``background``."""
    ids, inv = torch.unique(x, return_inverse=True)
    if background is not None and bool((ids == background).any()):
        bg = int((ids == background).nonzero()[0])
        inv = torch.where(inv == bg, -1, inv - (inv > bg).long())
        ids = ids[ids != background]
    return ids, inv


def iou_matrix(gt: torch.Tensor, pred: torch.Tensor, ignore_index: int | None = None,
               gt_background: int | None = None, pred_background: int | None = None) -> dict:
    """IoU between every GT and predicted segment of one image (H,W maps of ids).

    Returns ``iou`` (G,P) float64, ``inter`` (G,P), ``gt_area`` (G,), ``pred_area`` (P,), the
    original ``gt_ids`` / ``pred_ids`` in order, and for reuse the per-valid-pixel dense labels
    ``gt_lab`` / ``pred_lab`` (-1 = background) and the flattened ``valid`` mask.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"gt {tuple(gt.shape)} and pred {tuple(pred.shape)} differ in shape")
    gt, pred = gt.reshape(-1), pred.reshape(-1)
    valid = gt != ignore_index if ignore_index is not None else torch.ones_like(gt, dtype=torch.bool)
    gt_ids, g = _dense(gt[valid], gt_background)
    pred_ids, p = _dense(pred[valid], pred_background)
    n_g, n_p = len(gt_ids), len(pred_ids)
    # background (-1) goes to an extra row/column that is dropped afterwards
    joint = torch.bincount((g + 1) * (n_p + 1) + (p + 1), minlength=(n_g + 1) * (n_p + 1))
    joint = joint.view(n_g + 1, n_p + 1)
    gt_area, pred_area = joint.sum(1)[1:], joint.sum(0)[1:]
    inter = joint[1:, 1:]
    union = gt_area[:, None] + pred_area[None, :] - inter
    iou = inter.double() / union.clamp(min=1).double()
    return {"iou": iou, "inter": inter, "gt_area": gt_area, "pred_area": pred_area,
            "gt_ids": gt_ids, "pred_ids": pred_ids, "gt_lab": g, "pred_lab": p, "valid": valid}


def best_matches(iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(best IoU, index of the best predicted segment) per GT segment; (0, -1) without preds."""
    if iou.shape[1] == 0:
        return torch.zeros(iou.shape[0], dtype=torch.float64), torch.full((iou.shape[0],), -1)
    return iou.max(dim=1)


def boundary_iou_matrix(gt: torch.Tensor, pred: torch.Tensor, m: dict,
                        dilation_ratio: float = 0.02) -> torch.Tensor:
    """Boundary IoU (G,P) between all segments of ``m = iou_matrix(gt, pred, ...)``: one bincount."""
    h, w = gt.shape
    d = dilation_pixels(h, w, dilation_ratio)
    valid = m["valid"].cpu()
    g, p = m["gt_lab"].cpu(), m["pred_lab"].cpu()
    gb = torch.from_numpy(label_boundaries(gt.cpu().numpy(), d)).reshape(-1)[valid] & (g >= 0)
    pb = torch.from_numpy(label_boundaries(pred.cpu().numpy(), d)).reshape(-1)[valid] & (p >= 0)
    n_g, n_p = len(m["gt_ids"]), len(m["pred_ids"])
    both = gb & pb
    inter = torch.bincount(g[both] * n_p + p[both], minlength=n_g * n_p).view(n_g, n_p)
    g_len, p_len = torch.bincount(g[gb], minlength=n_g), torch.bincount(p[pb], minlength=n_p)
    union = g_len[:, None] + p_len[None, :] - inter
    return torch.where(union > 0, inter.double() / union.clamp(min=1).double(), 1.0)


class EntityMetrics(Metric):
    """Recall at IoU thresholds, mIoU and mBIoU over GT segments (sum states, DDP-safe).

    ``update(preds, target)``: batches (B,H,W) of predicted and GT segment-id maps; id 0 is not a
    segment in either unless ``gt_background`` / ``pred_background`` say otherwise (module doc).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, iou_thresholds=(0.5,), ignore_index: int | None = 255,
                 gt_background: int | None = 0, pred_background: int | None = 0,
                 dilation_ratio: float = 0.02, boundary: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self.ignore_index, self.dilation_ratio, self.boundary = ignore_index, dilation_ratio, boundary
        self.gt_background, self.pred_background = gt_background, pred_background
        self.add_state("num_gt", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("matched", default=torch.zeros(len(self.iou_thresholds), dtype=torch.long),
                       dist_reduce_fx="sum")
        self.add_state("sum_iou", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_biou", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.dim() == 2:
            preds, target = preds[None], target[None]
        for p, g in zip(preds.detach().cpu(), target.detach().cpu()):
            m = iou_matrix(g, p, self.ignore_index, self.gt_background, self.pred_background)
            best, idx = best_matches(m["iou"])
            self.num_gt += best.numel()
            self.sum_iou += best.sum().to(self.sum_iou.device)
            thr = torch.tensor(self.iou_thresholds, dtype=torch.float64)
            self.matched += (best[None, :] >= thr[:, None]).sum(1).to(self.matched.device)
            if self.boundary and best.numel() and m["iou"].shape[1]:
                b = boundary_iou_matrix(g, p, m, self.dilation_ratio)
                self.sum_biou += b[torch.arange(best.numel()), idx].sum().to(self.sum_biou.device)

    def compute(self) -> dict:
        n = self.num_gt.clamp(min=1).double()
        out = {f"recall@{t:g}": float(self.matched[i] / n) for i, t in enumerate(self.iou_thresholds)}
        out["mIoU"] = float(self.sum_iou / n)
        if self.boundary:
            out["mBIoU"] = float(self.sum_biou / n)
        out["num_gt_segments"] = int(self.num_gt)
        return out


# ----------------------------------------------------------------------------- representation diagnostics

def _similarity_sums(features: torch.Tensor, entities: torch.Tensor, ignore_index: int | None):
    """(sum |cos| pixel-to-mean, #pixels, sum |cos| between means, #pairs) for a batch."""
    b, d, h, w = features.shape
    f = features.permute(0, 2, 3, 1).reshape(b, h * w, d)
    ent = entities.reshape(b, h * w)
    intra, n_pix, inter, n_pairs = 0.0, 0, 0.0, 0
    for fi, ei in zip(f, ent):
        if ignore_index is not None:
            keep = ei != ignore_index
            fi, ei = fi[keep], ei[keep]
        if ei.numel() == 0:
            continue
        _, lab = torch.unique(ei, return_inverse=True)
        k = int(lab.max()) + 1
        mu = torch.zeros(k, d, dtype=fi.dtype, device=fi.device).index_add_(0, lab, fi)
        mu = torch.nn.functional.normalize(mu, dim=1)
        intra += float((fi * mu[lab]).sum(1).abs().double().sum())
        n_pix += ei.numel()
        if k > 1:
            gram = (mu @ mu.T).abs().double()
            inter += float((gram.sum() - gram.diagonal().sum()) / 2)
            n_pairs += k * (k - 1) // 2
    return intra, n_pix, inter, n_pairs


def _degrees(c: float) -> float:
    return math.degrees(math.acos(min(1.0, max(-1.0, c))))


def _summary(intra, n_pix, inter, n_pairs) -> dict:
    i = intra / n_pix if n_pix else float("nan")
    e = inter / n_pairs if n_pairs else float("nan")
    return {"intra_sim": i, "inter_sim": e, "intra_deg": _degrees(i) if n_pix else float("nan"),
            "inter_deg": _degrees(e) if n_pairs else float("nan")}


@torch.no_grad()
def entity_similarity(features: torch.Tensor, entities: torch.Tensor,
                      ignore_index: int | None = None) -> dict:
    """Intra-entity and inter-mean |cos| (and angles) of unit features (B,D,H,W)."""
    return _summary(*_similarity_sums(features, entities, ignore_index))


class EntitySimilarity(Metric):
    """Accumulating version of :func:`entity_similarity` (sum states)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, ignore_index: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        for k in ("intra", "inter"):
            self.add_state(k, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for k in ("n_pix", "n_pairs"):
            self.add_state(k, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor, entities: torch.Tensor) -> None:
        s = _similarity_sums(features.detach(), entities, self.ignore_index)
        self.intra += s[0]
        self.n_pix += s[1]
        self.inter += s[2]
        self.n_pairs += s[3]

    def compute(self) -> dict:
        return _summary(float(self.intra), int(self.n_pix), float(self.inter), int(self.n_pairs))


"""SEAM's Pixel Correlation Module (``YudeWang/SEAM : network/resnet38_SEAM.py:34-63``).

The PCM refines a CAM by propagating it with a feature affinity:

    a_ij = ReLU(cos(theta(x_i), theta(x_j)))          (eps 1e-5 on each norm, as released)
    y_j  = sum_i yhat_i a_ij / (sum_i a_ij + 1e-5)

with ``x = [image resized to the CAM grid (3), ReLU(theta_3(conv4)) (64), ReLU(theta_4(conv5)) (128)]``
and ``theta = f9`` (1x1, no bias, Xavier gain 4). The input CAM ``yhat`` is normalised under
``no_grad`` (:func:`pcm_input`) and the backbone taps are detached by the caller, so the PCM only
trains its own projections.

Memory. The affinity is (hw)^2 per image. At a 448 px crop and stride 8, hw = 56^2 = 3,136:
3,136^2 fp32 = 39 MB (x ~3 for the ReLU / normalised copies autograd keeps) - fine for training.
At the 2.0 inference scale of a 500x375 VOC image (1000x750 input, 125x94 grid) hw = 11,750 and
the dense matrix is 11,750^2 x 4 B = 552 MB, ~1.7 GB with its temporaries. :func:`pcm_propagate`
with ``chunk_size`` computes the output in column blocks: each block holds hw x chunk floats
(chunk 2,048: 96 MB, ~0.3 GB with temporaries), so the 2.0 scale fits comfortably in 4 GiB together
with the ResNet-38 activations (the 4096-ch conv6 map at 125x94 is 193 MB). Chunking gives the
same result as the dense product (tested); use it at inference (``chunk_size`` in the method config).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PCM", "pcm_input", "pcm_propagate", "pcm_affinity"]


@torch.no_grad()
def pcm_input(cam: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The released PCM input normalisation (``resnet38_SEAM.py:35-40``), without in-place writes.

    ``cam`` (N, C, h, w) has the background in channel 0. Per channel ``ReLU(ReLU(cam) - eps) /
    (max ReLU(cam) + eps)``; then background = 1 - max over foreground; then every foreground channel
    that is not the per-pixel foreground maximum is set to 0 (the bg channel is computed before that).
    """
    cam = F.relu(cam.detach())
    cmax = cam.flatten(2).amax(-1)[..., None, None] + eps
    norm = F.relu(cam - eps) / cmax
    fg = norm[:, 1:]
    fg_max = fg.amax(1, keepdim=True)
    bg = 1.0 - fg_max
    fg = torch.where(fg < fg_max, torch.zeros_like(fg), fg)
    return torch.cat([bg, fg], 1)


def pcm_affinity(feats: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Dense column-normalised affinity (N, hw, hw) of embedded features (N, D, h, w): column j holds
    the weights ``a_ij / (sum_i a_ij + eps)`` that pixel j collects from every pixel i."""
    f = feats.flatten(2)
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    aff = F.relu(f.transpose(1, 2) @ f)
    return aff / (aff.sum(1, keepdim=True) + eps)


def pcm_propagate(
    cam: torch.Tensor, feats: torch.Tensor, chunk_size: int | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """``y = cam @ A`` with the normalised affinity of ``feats`` (:func:`pcm_affinity`).

    ``cam`` (N, C, h, w) and ``feats`` (N, D, h, w) on the same grid. ``chunk_size``: number of
    output pixels per block (None = one dense block); peak extra memory is N x hw x chunk floats.
    """
    n, c, h, w = cam.shape
    if feats.shape[-2:] != (h, w):
        raise ValueError(f"cam grid {(h, w)} and feature grid {tuple(feats.shape[-2:])} differ")
    f = feats.flatten(2)
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    y = cam.flatten(2)
    hw = h * w
    step = hw if not chunk_size else int(chunk_size)
    outs = []
    for j in range(0, hw, step):
        aff = F.relu(f.transpose(1, 2) @ f[:, :, j : j + step])  # (N, hw, chunk)
        outs.append((y @ aff) / (aff.sum(1, keepdim=True) + eps))
    return torch.cat(outs, 2).view(n, c, h, w)


class PCM(nn.Module):
    """theta_3/theta_4 on two detached backbone taps (+ the resized image), f9, then propagation.

    Args:
        tap_channels: channels of the two backbone taps (ResNet-38: conv4 512, conv5 1024).
        tap_dims: their projections (released: 64, 128; ``f8_3``/``f8_4``, 1x1, no bias, Kaiming).
        out_dim: output of ``f9`` (released: 192; input 3 + sum(tap_dims)).
        use_image: concatenate the image resized to the CAM grid (released: yes).
        chunk_size: column block of the propagation at inference (None = dense); training is dense.
    """

    def __init__(
        self,
        tap_channels: Sequence[int] = (512, 1024),
        tap_dims: Sequence[int] = (64, 128),
        out_dim: int = 192,
        use_image: bool = True,
        chunk_size: int | None = 2048,
    ):
        super().__init__()
        if len(tap_channels) != len(tap_dims):
            raise ValueError("tap_channels and tap_dims must have the same length")
        self.proj = nn.ModuleList(nn.Conv2d(c, d, 1, bias=False) for c, d in zip(tap_channels, tap_dims))
        in_dim = sum(tap_dims) + (3 if use_image else 0)
        self.f9 = nn.Conv2d(in_dim, out_dim, 1, bias=False)
        self.use_image = use_image
        self.chunk_size = chunk_size
        for p in self.proj:
            nn.init.kaiming_normal_(p.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

    def embed(self, image: torch.Tensor, taps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        parts = []
        if self.use_image:
            parts.append(F.interpolate(image, size, mode="bilinear", align_corners=True))
        for proj, tap in zip(self.proj, taps):
            tap = tap.detach()  # resnet38_SEAM.py:42-43: the PCM never trains the backbone
            if tap.shape[-2:] != tuple(size):
                tap = F.interpolate(tap, size, mode="bilinear", align_corners=True)
            parts.append(F.relu(proj(tap)))
        return self.f9(torch.cat(parts, 1))

    def forward(
        self, cam_hat: torch.Tensor, image: torch.Tensor, taps: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Propagated CAM on the grid of ``cam_hat`` (the already normalised, detached PCM input)."""
        size = tuple(cam_hat.shape[-2:])
        feats = self.embed(image, taps, size)
        chunk = None if torch.is_grad_enabled() else self.chunk_size
        return pcm_propagate(cam_hat, feats, chunk_size=chunk)

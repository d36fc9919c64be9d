"""FBR modules: the FG/BG projection heads, the NROI memory bank and the CAM network carrying them.

* :class:`FBRHeads` - ``proj_fg`` (1x1 -> 128, ReLU) and ``proj_bg`` (1x1 -> 128), whose ReLU'd
  output is the NROI feature and whose BN (w=1, b=1e-4) + ReLU + Dropout(0.5) output feeds the 1x1
  background classifier (``XuYin94/FBR : network/resnet38_contrast.py:12-19,45-56``); the three
  1x1 convs have no bias and Xavier-uniform weights, the dropout is element-wise, as released. With
  ``background=False`` only ``proj_fg``: the PPC base (``method=ppc``) contrasts its features
  without FBR's background branch.
* :class:`NROIBank` - the FIFO bank of NROI centroids as *buffers*, so it lives on the model's device
  (the released bank is a CPU tensor copied to the GPU every step) and is saved in checkpoints; it is
  bounded (a ring of ``size`` rows) and samples uniformly with replacement.
* :class:`FBRNet` - a :class:`~segexp.models.cam_head.CAMNet` that also returns the FBR head outputs
  computed on the backbone's deepest map.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from segexp.models.cam_head import CAMNet

__all__ = ["FBRHeads", "NROIBank", "FBRNet"]


def _xavier(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.xavier_uniform_(conv.weight)
    return conv


class FBRHeads(nn.Module):
    """Foreground/background projections and the auxiliary background classifier.

    ``forward(x)`` returns ``f_proj`` (ReLU(proj_fg x)), ``b_proj`` (ReLU(proj_bg x): the NROI
    features, taken before the BN as released), ``b_feat`` (ReLU(BN(proj_bg x)): the decorrelation
    partner of ``f_proj``) and ``bg_logit`` (1 channel, from Dropout(b_feat)).
    """

    def __init__(self, in_channels: int, dim: int = 128, dropout: float = 0.5, background: bool = True):
        super().__init__()
        # as released: 1x1 convs without bias, Xavier-initialised; element-wise dropout (nn.Dropout)
        self.proj_fg = _xavier(nn.Conv2d(in_channels, dim, 1, bias=False))
        self.background = bool(background)
        if not self.background:
            return
        self.proj_bg = _xavier(nn.Conv2d(in_channels, dim, 1, bias=False))
        self.bg_bn = nn.BatchNorm2d(dim)
        nn.init.constant_(self.bg_bn.weight, 1.0)
        nn.init.constant_(self.bg_bn.bias, 1e-4)
        self.bg_dropout = nn.Dropout(dropout)
        self.bg_classifier = _xavier(nn.Conv2d(dim, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f_proj = torch.relu(self.proj_fg(x))
        if not self.background:
            return {"f_proj": f_proj}
        bg = self.proj_bg(x)
        b_feat = torch.relu(self.bg_bn(bg))
        return {
            "f_proj": f_proj,
            "b_proj": torch.relu(bg),
            "b_feat": b_feat,
            "bg_logit": self.bg_classifier(self.bg_dropout(b_feat)),
        }


class NROIBank(nn.Module):
    """Bounded FIFO memory of NROI centroids (``size`` x ``dim`` ring buffer, no gradient).

    ``push`` overwrites the oldest rows once full; ``entries()`` returns the stored rows oldest
    first; ``sample_index`` draws uniformly with replacement (the released ``np.random.randint`` per
    query). Under DDP the buffers are broadcast from rank 0 before each forward (DDP's
    ``broadcast_buffers``), so every rank contrasts against rank 0's bank (released: one
    unsynchronised CPU bank per process).
    """

    def __init__(self, size: int = 50_000, dim: int = 128):
        super().__init__()
        if size <= 0:
            raise ValueError(f"NROI bank size must be positive, got {size}")
        self.size = int(size)
        self.register_buffer("bank", torch.zeros(self.size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next row to write
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # rows filled

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        if keys.dim() != 2 or keys.shape[1] != self.bank.shape[1]:
            raise ValueError(f"NROI keys must be (n, {self.bank.shape[1]}), got {tuple(keys.shape)}")
        keys = keys.detach().to(self.bank)[-self.size :]
        n = keys.shape[0]
        if n == 0:
            return
        idx = (int(self.ptr) + torch.arange(n, device=self.bank.device)) % self.size
        self.bank[idx] = keys
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.count.fill_(min(self.size, int(self.count) + n))

    def entries(self) -> torch.Tensor:
        """Stored rows, oldest first."""
        n = int(self.count)
        if n < self.size:
            return self.bank[:n]
        return torch.roll(self.bank, -int(self.ptr), 0)

    def filled(self) -> torch.Tensor:
        """The stored rows in storage order (what :meth:`sample_index` indexes)."""
        return self.bank[: int(self.count)]

    def sample_index(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Indices into :meth:`filled`, uniform with replacement, of the given shape."""
        n = int(self.count)
        if n == 0:
            raise RuntimeError("NROI bank is empty")
        return torch.randint(0, n, shape, device=self.bank.device, generator=generator)


class FBRNet(CAMNet):
    """A CAMNet (with PCM for the SEAM/PPC bases) + :class:`FBRHeads` on the deepest backbone map.

    ``forward`` returns CAMNet's outputs plus those of the heads on its deepest ``features``.
    """

    def __init__(self, *args: Any, fbr: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fbr_heads = FBRHeads(self.backbone.out_channels[-1], **dict(fbr or {}))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(x)
        out.update(self.fbr_heads(out["features"]))
        return out

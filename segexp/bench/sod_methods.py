"""Benchmark: per-step training throughput of CAS and LDF on CPU, vs their bare backbones.

For each method one training step is forward + loss + backward + optimizer step on a random batch
of ``--size`` px images (default 256) with the method's own network and loss:

* CAS: FCN head on a dilated (stride 8) ResNet, 2 channels, paper CAS loss, Adam;
* LDF: feature interaction network (two iterations, six outputs), BCE+IoU loss, SGD nesterov.

The reference is the bare backbone (the same ``Backbone``, same stride) forward + backward of the
sum of its features + optimizer step at the same size: the method's overhead over its backbone
is the ratio of the two. ``--quick``: ResNet-18 for both, batch 2, 2 timed steps.

``main(argv)`` prints a table and returns ``{name: images_per_s}``. Sizes other than the defaults
(``--batch``, ``--steps``, ``--threads``): ``python -m segexp.bench.sod_methods ...``; the generic
``python -m segexp.bench sod_methods`` passes ``--quick`` only. Measured numbers:
``experiments/cas_lfd_shapes/results.md`` and ``experiments/ldf_shapes/results.md``.
"""

from __future__ import annotations

import argparse
import time

import torch

from segexp.losses.cas import CASLoss
from segexp.losses.ldf import LDFLoss
from segexp.models.backbone import Backbone
from segexp.models.fcn import SegNet
from segexp.models.ldf import LDFNet


def _time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def _bare(backbone: Backbone, x: torch.Tensor):
    opt = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        sum(f.float().mean() for f in backbone(x)).backward()
        opt.step()

    return step


def _cas(backbone: Backbone, x: torch.Tensor):
    model = SegNet(backbone, num_classes=2, head="fcn")
    loss = CASLoss("paper")
    target = (torch.rand(x.shape[0], *x.shape[-2:]) > 0.5).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss(model(x), target).backward()
        opt.step()

    return step


def _ldf(backbone: Backbone, x: torch.Tensor):
    model = LDFNet(backbone)
    loss = LDFLoss()
    b = x.shape[0]
    targets = {k: torch.rand(b, 1, *x.shape[-2:]) for k in ("branch1", "branch2")}
    targets["saliency"] = (torch.rand(b, 1, *x.shape[-2:]) > 0.5).float()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9,
                          nesterov=True, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        sum(loss(model(x), targets).values()).backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(prog="python -m segexp.bench sod_methods",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cas-backbone", default=None, help="default resnet101 (paper), resnet18 with --quick")
    ap.add_argument("--ldf-backbone", default=None, help="default resnet50 (paper), resnet18 with --quick")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    batch = args.batch or (2 if args.quick else 4)
    steps = args.steps or (2 if args.quick else 5)
    cas_bb = args.cas_backbone or ("resnet18" if args.quick else "resnet101")
    ldf_bb = args.ldf_backbone or ("resnet18" if args.quick else "resnet50")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, args.size, args.size)
    print(f"CPU, {torch.get_num_threads()} threads, batch {batch}, {args.size} px, {steps} timed steps")
    runs = {
        f"backbone {cas_bb} (stride 8)": lambda: _bare(Backbone(cas_bb, output_stride=8), x),
        f"CAS ({cas_bb} FCN)": lambda: _cas(Backbone(cas_bb, output_stride=8), x),
        f"backbone {ldf_bb} (stride 32)": lambda: _bare(Backbone(ldf_bb, out_indices=[1, 2, 3, 4]), x),
        f"LDF ({ldf_bb})": lambda: _ldf(Backbone(ldf_bb, out_indices=[1, 2, 3, 4]), x),
    }
    result: dict[str, float] = {}
    for name, build in runs.items():
        sec = _time_steps(build(), warmup=1, steps=steps)
        result[name] = batch / sec
        print(f"  {name:32s} {sec:7.3f} s/step  {batch / sec:7.2f} images/s", flush=True)
    names = list(result)
    print(f"  CAS overhead over its backbone: {result[names[0]] / result[names[1]]:.2f}x step time")
    print(f"  LDF overhead over its backbone: {result[names[2]] / result[names[3]]:.2f}x step time")
    return result


if __name__ == "__main__":
    main()

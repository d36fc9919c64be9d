"""Is the data loader ever the bottleneck? Loader throughput vs a ResNet-50 training step.

Measures, at 320 px crops with the training transforms of ``conf/data/transforms/semantic.yaml``:
  * the DataLoader's images/s with 0 and 2 worker processes (VOC-format synthetic images written
    at 400 px, so decoding and augmentation do real work);
  * one DeepLabV3+ ResNet-50 training step (forward + backward + SGD) on this machine's CPU.
The loader keeps up when its images/s exceeds the step's images/s; the loader's figure is also the
fastest GPU step (images/s) that 2 loader cores can feed.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import albumentations as A
import torch

from segexp.data.datamodule import SegDataModule
from segexp.data.readers.voc import VOCSegmentation
from segexp.data.synth import CLASS_NAMES, ensure_synthetic

CROP = 320


def _train_ops(size: int) -> list:
    return [
        A.RandomScale(scale_limit=(-0.3, 0.3), mask_interpolation=0, p=1.0),
        A.PadIfNeeded(min_height=size, min_width=size, border_mode=0, fill=0, fill_mask=0),
        A.RandomCrop(height=size, width=size),
        A.HorizontalFlip(p=0.5),
    ]


def loader_images_per_s(root: Path, workers: int, batch_size: int, batches: int) -> float:
    dm = SegDataModule(
        name="shapes",
        class_names=CLASS_NAMES,
        num_classes=len(CLASS_NAMES),
        reader=functools.partial(
            VOCSegmentation, root=root / "VOCdevkit" / "VOC2012", class_names=CLASS_NAMES
        ),
        splits={"train": "train"},
        transforms={"train": _train_ops(CROP), "eval": []},
        batch_size=batch_size,
        num_workers=workers,
    )
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(dm.train_dataloader())
            batch = next(it)
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - t0)


def step_images_per_s(batch_size: int, steps: int) -> float:
    from segexp.models.backbone import Backbone
    from segexp.models.deeplab import DeepLabV3Plus

    model = DeepLabV3Plus(Backbone("resnet50", output_stride=16), num_classes=21)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, CROP, CROP)
    y = torch.randint(0, 21, (batch_size, CROP, CROP))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step pays for allocator warm-up
            times.append(time.perf_counter() - t0)
    return batch_size / (sum(times) / len(times))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m segexp.bench loader", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer images and batches")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    n_images, batches, steps = (40, 6, 1) if args.quick else (120, 30, 3)
    with tempfile.TemporaryDirectory() as tmp:
        root = ensure_synthetic(Path(tmp) / "shapes", num_images=n_images, size=400, seed=0)
        results = {
            f"loader_w{w}_img_s": loader_images_per_s(root, w, args.batch_size, batches) for w in (0, 2)
        }
    results["resnet50_step_cpu_img_s"] = step_images_per_s(args.batch_size, steps)
    print(f"{'what':<42}{'images/s':>10}")
    print(f"{'loader, 0 workers (main process)':<42}{results['loader_w0_img_s']:>10.1f}")
    print(f"{'loader, 2 workers':<42}{results['loader_w2_img_s']:>10.1f}")
    print(f"{'DeepLabV3+ R50 train step, this CPU':<42}{results['resnet50_step_cpu_img_s']:>10.2f}")
    ratio = results["loader_w2_img_s"] / results["resnet50_step_cpu_img_s"]
    print(f"loader (2 workers) / CPU step: {ratio:.0f}x -> the loader is "
          f"{'not ' if ratio > 1 else ''}the bottleneck here. On a GPU, the loader keeps up with any "
          f"step slower than {results['loader_w2_img_s']:.0f} images/s (per 2 loader cores).")
    return results


if __name__ == "__main__":
    main()

"""Each method's training step against an honest reference: ``python -m segexp.bench methods``.

The reference is the *same network* (the paper's backbone and head, built by the method itself) trained
with a plain loss on the same batch, so the ratio is what the method's own machinery costs (extra views,
modules like the PCM, the paper's loss terms), not what its network costs:

* CAM family (SEAM, SC-CAM, PPC, FBR, AMN): one forward of the method's network and the plain CAM loss
  (:meth:`segexp.methods.cam.CAM.compute_losses`: multi-label soft margin on the GAP of the CAM) - the
  ``cam`` method itself, on the method's network;
* everything else: cross-entropy of ``predict(images)`` (the method's class scores at input size: the
  network's main output) against the class map the method trains on (``mask``; ``pseudo`` for Box2Seg's
  GrabCut masks; ``saliency`` cut at 0.5 for SOD methods). The bottom-up method has no class map: its
  per-term costs are ``python -m segexp.bench bottomup``.

Per method: median seconds per step of both, timed in alternation, the median of the rounds'
ratios with its quartiles (target <= 1.15x, issue #19 item 3) and each loss term's share, measured
by dropping one term at a time (``weights.<term>=0``) where the method reads weights.
Network and batch: the paper experiment at ``--size`` px and batch ``--batch`` (CPU-sized defaults) on a
testbed batch (``segexp.bench.gpu``'s setting). Report the machine's load with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from segexp.bench.gpu import METHODS, build_method, make_step, paper_setting, testbed_batch, total_loss

CLASS_TARGETS = ("mask", "pseudo", "saliency")  # the batch key a plain loss compares ``predict`` with


def reference_loss(method):
    """The plain loss of ``method``'s own network (module docstring)."""
    from segexp.methods.cam import CAM

    if isinstance(method, CAM):
        return lambda batch: CAM.compute_losses(method, batch)["cls"]

    key = next((k for k in CLASS_TARGETS if k in method.train_keys), None)
    if key is None:
        raise ValueError(
            f"{type(method).__name__} trains on {list(method.train_keys)}: no class map to compare against "
            "(the bottom-up losses have their own benchmark: python -m segexp.bench bottomup)"
        )

    def plain(batch: dict[str, Any]) -> torch.Tensor:
        scores = method.predict(batch["image"])
        target = batch[key]
        if key == "saliency":
            target = (target > 0.5).reshape(scores.shape[0], *scores.shape[-2:])
        return F.cross_entropy(scores, target.long(), ignore_index=255)

    return plain


def paired_times(steps: dict[str, Any], warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of each of ``steps`` per round, taken in alternation (A, B, A, B, ...), so a change of
    the machine's load during the measurement falls on all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio_summary(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Median and quartiles of the per-round ratios: each round's pair ran back to back, so a slow
    spell of the machine cancels within a pair; the quartiles say how far one more run may move."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"ratio": round(statistics.median(ratios), 2), "ratio_q1": round(q1, 2), "ratio_q3": round(q3, 2)}


def measure(name: str, args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg, _, _ = paper_setting(name, quick=True, size=args.size)
    batch = testbed_batch(cfg, name, args.size, args.batch, data_dir)
    device = torch.device("cpu")
    torch.manual_seed(0)
    method = build_method(cfg, device, False, False)
    row: dict[str, Any] = {"method": name, "backbone": str(cfg.backbone.name), "size": args.size,
                           "batch": args.batch}  # fmt: skip
    times = paired_times(
        {
            "method": make_step(method, total_loss(method), batch, device, "32"),
            "reference": make_step(method, reference_loss(method), batch, device, "32"),
        },
        warmup=1,
        rounds=args.steps,
    )
    row.update(method_s=round(statistics.median(times["method"]), 4),
               reference_s=round(statistics.median(times["reference"]), 4),
               **ratio_summary(times["method"], times["reference"]))  # fmt: skip
    weights = cfg.method.get("weights")
    if args.terms and weights:
        for term in OmegaConf.to_container(weights, resolve=True):
            if float(weights[term]) == 0:
                continue
            OmegaConf.update(cfg, f"method.weights.{term}", 0.0)
            try:
                torch.manual_seed(0)
                without = build_method(cfg, device, False, False)
                step = make_step(without, total_loss(without), batch, device, "32")
                pair = paired_times({"full": make_step(method, total_loss(method), batch, device, "32"),
                                     "without": step}, warmup=1, rounds=args.steps)  # fmt: skip
                row[f"share/{term}"] = round(1 - ratio_summary(pair["without"], pair["full"])["ratio"], 2)
            except Exception as exc:  # a term another one needs cannot be dropped alone
                row[f"share/{term}"] = f"n/a ({type(exc).__name__})"
            OmegaConf.update(cfg, f"method.weights.{term}", float(weights[term]))
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m segexp.bench methods",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="two methods, 64 px, 1 step")
    parser.add_argument("--methods", nargs="*", default=None, help=f"default: all of {list(METHODS)}")
    parser.add_argument("--size", type=int, default=None, help="px (default 128; 64 with --quick)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed rounds, medians taken (default 5; 1 with --quick)")  # fmt: skip
    parser.add_argument("--terms", action="store_true",
                        help="also each loss term's share: one paired run per term, so the bench takes "
                             "(terms + 1)x as long (SEAM + FBR-PPC, --steps 15: ~20 min)")  # fmt: skip
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.quick else 128)
    args.steps = args.steps or (1 if args.quick else 5)
    names = args.methods or (["cam", "seam"] if args.quick else list(METHODS))
    print(f"CPU, {torch.get_num_threads()} threads, {args.size} px, batch {args.batch}, "
          f"{args.steps} timed steps")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="segexp-bench-methods-") as tmp:
        for name in names:
            try:
                rows.append(measure(name, args, Path(tmp) / "data"))
            except Exception as exc:
                traceback.print_exc()
                rows.append({"method": name, "error": f"{type(exc).__name__}: {exc}"})
            r = rows[-1]
            shown = r.get("error") or (f"{r['method_s']:.3f} s vs reference {r['reference_s']:.3f} s = "
                                       f"{r['ratio']:.2f}x (pairs' quartiles {r['ratio_q1']:.2f}-"
                                       f"{r['ratio_q3']:.2f})")  # fmt: skip
            shares = {k[6:]: v for k, v in r.items() if k.startswith("share/")}
            print(f"{name:10s} {r.get('backbone', ''):14s} {shown}" + (f"  terms {shares}" if shares else ""),
                  flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()

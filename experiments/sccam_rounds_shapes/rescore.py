"""Re-score the cached CAMs of recorded rounds (no network is run): mIoU and F-score over t = 0.00-0.99.

    python experiments/sccam_rounds_shapes/rescore.py --data-dir /tmp/sccam/data --out rescore.json \
        RUN/rounds_report.json [...]

Every round's checkpoint is matched with the CAM-stage settings cached under ``<data-dir>/stage_cache/cam``;
a round whose entries are gone (or whose checkpoint changed since) is reported as not cached.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

THRESHOLDS = [round(0.01 * i, 2) for i in range(100)]


def cached_stage(settings: list[dict], ckpt: str, cache_root: Path, reader):
    """The CAMStage of ``ckpt`` whose cache holds every image of ``reader``, else None."""
    from segexp.stages.cam import CAMStage

    if not Path(ckpt).is_file():
        return None
    for s in settings:
        stage = CAMStage(method=s["method"], ckpt_path=ckpt, scales=s["scales"], flip=s["flip"],
                         bg_threshold=0.15, thresholds=THRESHOLDS, cache_dir=cache_root, progress=False)
        if not stage.missing(reader):
            return stage
    return None


def main() -> None:
    from segexp.pipeline.compose import compose, train_reader

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("reports", nargs="+", help="rounds_report.json files")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    reader = train_reader(compose(["+experiment=sccam_rounds_shapes", f"paths.data_dir={args.data_dir}"]))
    cache_root = Path(args.data_dir) / "stage_cache"
    settings = [json.loads(f.read_text())["settings"] for f in sorted(cache_root.glob("cam/*/settings.json"))]
    out = {}
    for report in args.reports:
        for r in json.loads(Path(report).read_text()):
            stage = cached_stage(settings, r["ckpt"], cache_root, reader)
            if stage is None:
                out[f"{report}:{r['dir']}"] = "not cached"
                continue
            rep = stage.run(reader, evaluate=True)
            assert rep["computed"] == 0
            out[f"{report}:{r['dir']}"] = {
                k: rep[k]
                for k in ("best_mIoU", "best_threshold", "fscore_at_best_threshold", "mIoU_at_threshold",
                          "fscore_at_threshold", "scored_images")
            }
            print(r["dir"], out[f"{report}:{r['dir']}"], flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""The image-level WSSS pipeline: ``python -m segexp.pipeline +experiment=seam_shapes [-m ...]``.

One module per step (``train_cam``, ``export_cams``, ``refine`` with ``affinity``, ``retrain``; SC-CAM's
rounds in ``sccam``), run in order by :mod:`segexp.pipeline.wsss`; the training runs' bookkeeping
(keys, skip, resume) is :mod:`segexp.pipeline.runs`; everything the steps compose is in
``conf/pipeline/`` and ``conf/stage/``.
"""

from segexp.pipeline.wsss import STEPS, run, run_pipeline

__all__ = ["run", "run_pipeline", "STEPS"]

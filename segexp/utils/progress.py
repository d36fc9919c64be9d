"""Progress of a long per-image phase: a bar on a terminal, otherwise a log line every few seconds.

Why: a phase that runs for minutes (CAM export at 0.3 images/s, GrabCut over a data set) must
never look hung in a log file, and must not flood it either: lines are paced by time, not count.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("segexp.progress")


class Progress:
    def __init__(self, desc: str, total: int, enabled: bool = True, every_s: float = 5.0):
        self.desc, self.total, self.done = desc, total, 0
        self.every_s = every_s
        self.bar = None
        self.t0 = self.last = time.perf_counter()
        self.enabled = enabled and total > 0
        if self.enabled and sys.stderr.isatty():
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(transient=False)
            self.bar.start()
            self.task = self.bar.add_task(desc, total=total)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.advance(self.task, n)
            return
        now = time.perf_counter()
        if self.done >= self.total or now - self.last >= self.every_s:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            log.info("%s: %d/%d (%.2f images/s, %.0f s left)", self.desc, self.done, self.total, rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

"""Phase timings of a long job: where a retrain's minutes went (features, CV, calibration, export, INT8).

Why: a nightly retrain that slows down as the manifest grows must say which phase grew; `train` returns
these seconds (`TrainResult.phases`) and logs them, and `bench/train_scale.py` prints their shares.
"""

from __future__ import annotations

import time


class PhaseClock:
    """Wall seconds per named phase; `lap(name)` charges the time since the previous lap to `name`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    def summary(self) -> str:
        """One line, e.g. `features 12.0 s, cv 30.1 s`."""
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items())

"""Optional per-stage timing of stage one, for `benchmarks/extract.py`'s breakdown.

    with recording() as times:          # off unless a recording is active: `stage` then costs ~1 µs
        run_extract(...)
    times.seconds["read + decode tiles"], times.calls[...]

Stages run in several threads at once, so their seconds are thread-seconds: they may add up to
more than the wall time. On CUDA a stage's seconds are the host's time in it (kernels run
asynchronously; waiting for them is timed where the host waits).
"""

import threading
import time
from collections import defaultdict
from contextlib import contextmanager


class StageTimes:
    """Thread-seconds and call counts per stage name."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds
            self.calls[name] += 1


_active: StageTimes | None = None


@contextmanager
def stage(name: str):
    """Time the block under `name` if a recording is active."""
    times = _active
    if times is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times.add(name, time.perf_counter() - t0)


@contextmanager
def recording():
    """Record every `stage` entered (in any thread) while the block runs; yields the StageTimes."""
    global _active
    previous, _active = _active, StageTimes()
    try:
        yield _active
    finally:
        _active = previous

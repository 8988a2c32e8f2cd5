"""Optional per-stage timing of stage one, for `benchmarks/extract.py`'s breakdown.

    with recording() as times:          # off unless a recording is active: `stage` then costs ~1 µs
        run_extract(...)
    times.seconds["read + decode tiles"], times.cpu_seconds[...], times.calls[...]

Stages run in several threads at once, so their seconds are thread-seconds: they may add up to
more than the wall time. On CUDA a stage's seconds are the host's time in it (kernels run
asynchronously; waiting for them is timed where the host waits).
"""

import threading
import time
from collections import defaultdict
from contextlib import contextmanager


class StageTimes:
    """Per stage name: wall thread-seconds, CPU seconds of the thread in it, and calls.

    CPU seconds say what a stage costs even on a loaded machine (a descheduled thread's wall time
    grows, its CPU time does not); wall seconds say how long the pipeline waited.
    """

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float, cpu_seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds
            self.cpu_seconds[name] += cpu_seconds
            self.calls[name] += 1


_active: StageTimes | None = None


@contextmanager
def stage(name: str):
    """Time the block under `name` if a recording is active."""
    times = _active
    if times is None:
        yield
        return
    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        times.add(name, time.perf_counter() - t0, time.thread_time() - c0)


@contextmanager
def recording():
    """Record every `stage` entered (in any thread) while the block runs; yields the StageTimes."""
    global _active
    previous, _active = _active, StageTimes()
    try:
        yield _active
    finally:
        _active = previous

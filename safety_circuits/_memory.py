"""Peak resident memory of a block of code (Linux ``/proc``), for tuning records and benchmarks."""

from __future__ import annotations

import os
import threading
import time


class PeakMemory:
    """Peak resident memory above the starting level while the block runs, sampled every
    ``interval`` seconds by a background thread.

    >>> with PeakMemory() as memory:
    ...     block = bytearray(64 * 2**20)
    >>> memory.extra_mb >= 0
    True
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval

    def __enter__(self) -> PeakMemory:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20

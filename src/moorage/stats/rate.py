"""``usage_nano_cores``: CPU use averaged between two samples of the cumulative counter.

The previous sample of each container and pod is kept in memory (never persisted: after a
restart the first answer falls back to the average since the object started). Two callers
asking within ``min_window`` of each other (kubelet's summary API and its cAdvisor
endpoint often do) get the rate of the last full window instead of a rate over a few
microseconds, which would be mostly noise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

NS_PER_S = 1_000_000_000
#: Shortest window a new rate is computed over.
MIN_WINDOW_NS = NS_PER_S


@dataclass(frozen=True)
class _Sample:
    timestamp_ns: int
    usage_ns: int
    rate: int | None


def nano_cores(usage_delta_ns: int, window_ns: int) -> int:
    """Cores in use, in billionths, over a window (1 busy core = 1_000_000_000)."""
    if window_ns <= 0 or usage_delta_ns < 0:
        return 0
    return usage_delta_ns * NS_PER_S // window_ns


class RateTracker:
    def __init__(self, min_window_ns: int = MIN_WINDOW_NS) -> None:
        self.min_window_ns = min_window_ns
        self._samples: dict[str, _Sample] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def update(self, key: str, timestamp_ns: int, usage_ns: int,
               started_ns: int | None = None) -> int | None:
        """Record a sample of ``key``'s cumulative CPU usage; return its nano cores.

        Without a previous sample, the rate is the average since ``started_ns`` (when the
        container started or the pod was created, where usage was zero), or None if that is
        not known. A counter that went backwards (the cgroup was made anew) starts over.
        """
        prev = self._samples.get(key)
        if prev is not None and usage_ns < prev.usage_ns:
            prev = None
        if prev is None:
            rate = None
            if started_ns and timestamp_ns > started_ns:
                rate = nano_cores(usage_ns, timestamp_ns - started_ns)
            self._samples[key] = _Sample(timestamp_ns, usage_ns, rate)
            return rate
        window = timestamp_ns - prev.timestamp_ns
        if window < self.min_window_ns and prev.rate is not None:
            return prev.rate
        if window <= 0:
            return prev.rate
        rate = nano_cores(usage_ns - prev.usage_ns, window)
        self._samples[key] = _Sample(timestamp_ns, usage_ns, rate)
        return rate

    def forget(self, key: str) -> None:
        self._samples.pop(key, None)

    def retain(self, keys: Iterable[str]) -> None:
        """Drop the samples of everything not in ``keys`` (objects that are gone)."""
        live = set(keys)
        for key in [k for k in self._samples if k not in live]:
            del self._samples[key]

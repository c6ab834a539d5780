"""usage_nano_cores from two samples of the cumulative CPU counter."""

from __future__ import annotations

from moorage.stats.rate import NS_PER_S, RateTracker, nano_cores

T0 = 1_700_000_000 * NS_PER_S


def test_nano_cores_formula() -> None:
    assert nano_cores(NS_PER_S, NS_PER_S) == NS_PER_S  # one core busy for the whole window
    assert nano_cores(NS_PER_S // 2, 2 * NS_PER_S) == NS_PER_S // 4
    assert nano_cores(5, 0) == 0 and nano_cores(-1, NS_PER_S) == 0


def test_two_samples() -> None:
    r = RateTracker()
    # First sample: nothing to compare with and no start time known.
    assert r.update("c:a", T0, 10 * NS_PER_S) is None
    # 1.5 cores over the next 2 s.
    assert r.update("c:a", T0 + 2 * NS_PER_S, 13 * NS_PER_S) == 1_500_000_000
    # Idle: the counter does not move.
    assert r.update("c:a", T0 + 4 * NS_PER_S, 13 * NS_PER_S) == 0


def test_first_sample_averages_since_start() -> None:
    r = RateTracker()
    started = T0 - 10 * NS_PER_S
    assert r.update("c:a", T0, 5 * NS_PER_S, started_ns=started) == 500_000_000
    assert r.update("c:a", T0 + NS_PER_S, 6 * NS_PER_S, started_ns=started) == NS_PER_S


def test_calls_inside_the_window_reuse_the_last_rate() -> None:
    r = RateTracker(min_window_ns=NS_PER_S)
    r.update("c:a", T0, 0, started_ns=T0 - NS_PER_S)
    assert r.update("c:a", T0 + 2 * NS_PER_S, NS_PER_S) == 500_000_000
    # 1 ms later: not a new window; the sample is kept, the last rate answered.
    assert r.update("c:a", T0 + 2 * NS_PER_S + 1_000_000, NS_PER_S + 900_000) == 500_000_000
    # The next full window is measured from the kept sample.
    assert r.update("c:a", T0 + 4 * NS_PER_S, 3 * NS_PER_S) == NS_PER_S


def test_counter_reset_and_forgetting() -> None:
    r = RateTracker()
    r.update("c:a", T0, 50 * NS_PER_S)
    # The cgroup was made anew (a counter cannot go back): start over, as a first sample.
    assert r.update("c:a", T0 + NS_PER_S, NS_PER_S, started_ns=T0) == NS_PER_S
    r.update("p:b", T0, 0)
    r.retain(["p:b"])
    assert len(r) == 1
    assert r.update("c:a", T0 + 3 * NS_PER_S, 2 * NS_PER_S) is None
    r.forget("c:a")
    r.forget("missing")
    assert len(r) == 1


def test_same_timestamp_twice() -> None:
    r = RateTracker(min_window_ns=0)
    r.update("k", T0, 0)
    assert r.update("k", T0, 5) is None  # no window, no previous rate

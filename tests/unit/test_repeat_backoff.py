"""sidusd.observability.RepeatBackoff: a repeating failure is logged first, then ever more rarely."""

from __future__ import annotations

import itertools

from sidusd.observability import RepeatBackoff


def logged_times(b: RepeatBackoff, times: list[float], text: str = "tgtd down") -> list[float]:
    return [t for t in times if b.failed(text, t)]


def test_first_failure_then_doubling_intervals_up_to_the_cap() -> None:
    b = RepeatBackoff(first_s=30.0, max_s=120.0)
    ticks = [5.0 * i for i in range(200)]            # a check every 5 s for 1000 s
    got = logged_times(b, ticks)
    assert got[:5] == [0.0, 30.0, 90.0, 210.0, 330.0]   # +30, +60, +120 (cap), +120
    assert all(b2 - a == 120.0 for a, b2 in itertools.pairwise(got[3:]))
    assert b.streak == 200 and b.take_suppressed() == 200 - len(got)
    assert b.take_suppressed() == 0


def test_a_changed_reason_is_logged_at_once_and_restarts_the_backoff() -> None:
    b = RepeatBackoff(first_s=30.0)
    assert b.failed("tgtd down", 0.0)
    assert not b.failed("tgtd down", 5.0)
    assert b.failed("tgtadm: permission denied", 10.0)
    assert not b.failed("tgtadm: permission denied", 35.0)
    assert b.failed("tgtadm: permission denied", 40.0)


def test_recovery_reports_the_streak_and_resets() -> None:
    b = RepeatBackoff(first_s=30.0)
    assert b.recovered() == 0                        # no streak: nothing to say
    for t in range(0, 100, 5):
        b.failed("tgtd down", float(t))
    assert b.recovered() == 20
    assert b.streak == 0 and b.suppressed == 0
    assert b.failed("tgtd down", 101.0)              # a new streak logs at once


def test_a_fixed_interval_limit_logs_the_first_then_one_per_interval_with_the_count() -> None:
    """first_s == max_s: the DHCP malformed / privsep refused limit (one line per 10 s)."""
    b = RepeatBackoff(first_s=10.0, max_s=10.0)
    logged = []
    for t in [0.0, 0.1, 0.2, 9.9, 10.0, 10.5, 25.0, 26.0, 27.0, 35.0]:
        if b.failed("", t):
            logged.append((t, b.take_suppressed()))
    assert logged == [(0.0, 0), (10.0, 3), (25.0, 1), (35.0, 2)]


def test_suppressed_is_counted_since_the_last_logged_line_only() -> None:
    b = RepeatBackoff(first_s=10.0, max_s=10.0)
    assert b.failed("", 0.0) and b.take_suppressed() == 0
    assert not b.failed("", 1.0) and not b.failed("", 2.0)
    assert b.failed("", 12.0) and b.take_suppressed() == 2
    assert b.failed("", 22.0) and b.take_suppressed() == 0

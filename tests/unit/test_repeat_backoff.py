"""sidusd.observability.RepeatBackoff: a repeating failure is logged first, then ever more rarely."""

from __future__ import annotations

from sidusd.observability import RepeatBackoff


def logged_times(b: RepeatBackoff, times: list[float], text: str = "tgtd down") -> list[float]:
    return [t for t in times if b.failed(text, t)]


def test_first_failure_then_doubling_intervals_up_to_the_cap() -> None:
    b = RepeatBackoff(first_s=30.0, max_s=120.0)
    ticks = [5.0 * i for i in range(200)]            # a check every 5 s for 1000 s
    got = logged_times(b, ticks)
    assert got[:5] == [0.0, 30.0, 90.0, 210.0, 330.0]   # +30, +60, +120 (cap), +120
    assert all(b2 - a == 120.0 for a, b2 in zip(got[3:], got[4:]))
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

"""sidusd.observability.LogLimiter: per-packet log lines have a budget, and what is dropped is counted."""

from __future__ import annotations

from typing import Any

from sidusd.observability import LogLimiter


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Log:
    """Records (level, event, fields) of every line written."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str):
        return lambda event, **kw: self.lines.append((level, event, kw))


def make(**kw: Any) -> tuple[LogLimiter, Log, Clock]:
    log, clock = Log(), Clock()
    return LogLimiter(log, clock=clock, **kw), log, clock


def test_a_burst_is_written_then_lines_are_counted_and_reported_with_the_next_one() -> None:
    rlog, log, clock = make(burst=5, per_s=1.0)
    written = [rlog.info("http.refused", peer=f"10.0.0.{i}") for i in range(1000)]
    assert written[:5] == [True] * 5 and not any(written[5:])
    assert len(log.lines) == 5 and all("suppressed" not in f for _, _, f in log.lines)
    assert rlog.suppressed() == 995
    clock.t += 1.0                                   # one token back
    assert rlog.warning("http.refused", peer="10.0.0.9")
    assert log.lines[-1] == ("warning", "http.refused", {"peer": "10.0.0.9", "suppressed": 995})
    assert rlog.suppressed() == 0


def test_a_sustained_flood_writes_burst_plus_rate_times_duration() -> None:
    rlog, log, clock = make(burst=20, per_s=1.0)
    for _ in range(600 * 1000):                      # 1000 lines a second for 10 minutes
        rlog.info("tftp.refused", peer="x")
        clock.t += 0.001
    written = [f for _, e, f in log.lines if e == "tftp.refused"]
    assert 20 + 590 <= len(written) <= 20 + 601
    reported = sum(f.get("suppressed", 0) for _, _, f in log.lines) + rlog.suppressed()
    assert reported + len(written) == 600 * 1000     # every line is written or counted, none lost


def test_events_have_their_own_budget_and_keys_are_bounded() -> None:
    rlog, log, clock = make(burst=2, per_s=0.0, max_keys=3)
    for _ in range(5):
        rlog.info("a")
        rlog.info("b")
    assert [e for _, e, _ in log.lines] == ["a", "b", "a", "b"]
    log.lines.clear()
    for i in range(100):                             # 100 spoofed sources: 2 keyed buckets, then shared
        rlog.info("c", key=f"10.0.0.{i}")
    assert len(log.lines) <= 3 * 2 and len(rlog._buckets) <= 3 + 3


def test_a_stopped_flood_is_reported_by_the_next_call_of_any_event() -> None:
    rlog, log, clock = make(burst=1, per_s=1.0, flush_s=10.0)
    rlog.error("http.internal_error")
    for _ in range(42):
        rlog.error("http.internal_error")
    clock.t += 11.0
    rlog.info("http.transfer", status=200)
    assert ("warning", "log.suppressed", {"of": "http.internal_error", "key": None, "suppressed": 42}) \
        in log.lines
    assert rlog.suppressed() == 0


def test_levels_pass_through_and_exception_keeps_its_traceback_call() -> None:
    rlog, log, _ = make()
    for level in ("debug", "info", "warning", "error", "exception"):
        assert getattr(rlog, level)("ev." + level, x=1)
    assert [(lv, e) for lv, e, _ in log.lines] == [(lv, "ev." + lv) for lv in
                                                  ("debug", "info", "warning", "error", "exception")]


def test_keyed_by_tcp_source_a_boot_storm_is_written_whole_and_one_flooder_is_limited() -> None:
    rlog, log, clock = make(burst=20, per_s=1.0, max_keys=512)
    for i in range(200):                             # 200 machines, 3 transfers each, within a second
        for f in ("boot.ipxe", "vmlinuz", "initrd.img"):
            rlog.info("http.transfer", key=f"10.0.{i // 250}.{i % 250}", file=f)
    assert len(log.lines) == 600
    log.lines.clear()
    for _ in range(10000):
        rlog.info("http.transfer", key="10.9.9.9", file="x")
    assert len(log.lines) == 20 and rlog.suppressed() == 10000 - 20

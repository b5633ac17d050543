"""The wire to the TFTP pushers (pure): commands, hostile reports, reports cut to fit, the choice."""

from __future__ import annotations

import json

import pytest

from sidusd.errors import RemoteProtocolError
from sidusd.net import tftp_push_ipc as wire
from sidusd.net.tftp_pushers import auto_count, choose


def begin(**kw):
    base = dict(id=7, ip="10.0.0.5", port=2000, local="10.0.0.1", file="images/demo/vmlinuz",
                mac="52:54:00:00:00:01", size=5 << 20, blksize=1468, windowsize=1, timeout_s=1.0,
                retries=5, max_silence_s=30.0, oack=(("blksize", "1468"), ("tsize", "5242880")))
    base.update(kw)
    return wire.Begin(**base)


def test_a_begin_goes_through_the_wire_unchanged():
    msg = begin()
    assert wire.decode_command(wire.encode(msg)) == msg
    assert wire.decode_command(wire.encode(wire.Stop(grace_s=10.0))) == wire.Stop(grace_s=10.0)
    assert wire.decode_command(wire.encode(wire.Evict(id=3))) == wire.Evict(id=3)


@pytest.mark.parametrize("bad", [dict(blksize=7), dict(blksize=65465), dict(port=0),
                                 dict(ip="10.0.0"), dict(mac="52-54-00-00-00-01"),
                                 dict(timeout_s=0.0), dict(retries=101)])
def test_a_begin_out_of_bounds_is_refused(bad):
    with pytest.raises(RemoteProtocolError) as e:
        wire.decode_command(wire.encode(begin(**bad)))
    assert e.value.code == "bad_field"


def report(**kw) -> bytes:
    base = {"t": "report", "progress": [[1, 100, True]], "ended": [2],
            "timeline": [{"mac": "52:54:00:00:00:01", "file": "k", "bytes": 5, "duration_s": 0.1,
                          "outcome": "ok"}],
            "counts": {"tftp.bytes": 5}}
    base.update(kw)
    return json.dumps(base).encode()


def test_a_report_decodes():
    r = wire.decode_report(report())
    assert r.progress == [wire.Progress(1, 100, True)] and r.ended == [2]
    assert r.counts == {"tftp.bytes": 5} and r.timeline[0].outcome == "ok"


@pytest.mark.parametrize("data, code", [
    (report(counts={"privsep.worker_starts": 1}), "bad_field"),      # only tftp. counters
    (report(counts={"tftp.bytes": -1}), "bad_field"),
    (report(extra=1), "bad_field"),                                 # unknown field
    (report(t="begin"), "bad_field"),                               # not a report
    (report(ended=list(range(wire.MAX_ITEMS + 1))), "bad_field"),
    (report(timeline=[{"mac": "52:54:00:00:00:01", "file": "k", "bytes": 5, "duration_s": 0.1,
                       "outcome": "fine"}]), "bad_field"),
    (report(timeline=[{"mac": "../etc", "file": "k", "bytes": 5, "duration_s": 0.1,
                       "outcome": "ok"}]), "bad_field"),
    (b'{"t": "report", "ended": [1', "bad_json"),
    (b'{"t":"report","ended":[' + b"1," * 40000 + b"1]}", "oversized"),
])
def test_a_hostile_report_is_refused_with_its_reason(data, code):
    with pytest.raises(RemoteProtocolError) as e:
        wire.decode_report(data)
    assert e.value.code == code


def entry(i: int) -> wire.Entry:
    return wire.Entry(mac="52:54:00:00:00:01", file="f" * 500, bytes=i, duration_s=1.0, outcome="ok")


def test_what_fits_one_datagram_is_one_report():
    out = wire.reports([wire.Progress(1, 2, False)], [3], [entry(1)], {"tftp.bytes": 1})
    assert len(out) == 1 and out[0].ended == [3]
    assert wire.reports([], [], [], {}) == []


def test_a_big_report_is_cut_into_datagrams_with_nothing_lost_and_the_ends_last():
    progress = [wire.Progress(i, i, True) for i in range(600)]
    ended = list(range(1000, 1300))
    timeline = [entry(i) for i in range(100)]
    counts = {f"tftp.c{i}": i + 1 for i in range(200)}
    out = wire.reports(progress, ended, timeline, counts)
    for r in out:                       # each one fits a datagram and decodes
        data = wire.encode(r)
        assert len(data) <= wire.MAX_MSG
        assert wire.decode_report(data) == r
    assert [p for r in out for p in r.progress] == progress
    assert [e for r in out for e in r.timeline] == timeline
    assert {k: v for r in out for k, v in r.counts.items()} == counts
    assert [i for r in out for i in r.ended] == ended
    first_end = min(i for i, r in enumerate(out) if r.ended)
    assert all(not (r.timeline or r.counts) for r in out[first_end:])


def test_the_least_loaded_process_takes_a_transfer_this_one_on_a_tie():
    assert choose(0, [0, 0]) is None            # N = 1: no hop
    assert choose(1, [0, 0]) == 0
    assert choose(1, [1, 0]) == 1
    assert choose(2, [1, 1]) == 0
    assert choose(1, [1, 1]) is None
    assert choose(5, [None, 3]) == 1            # a lost pusher takes nothing
    assert choose(5, [None, None]) is None
    assert choose(3, []) is None


def test_auto_is_one_pusher_per_cpu_beyond_the_first_at_most_four():
    assert [auto_count(n) for n in (1, 2, 3, 5, 64)] == [0, 1, 2, 4, 4]

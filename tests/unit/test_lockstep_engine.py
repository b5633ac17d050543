"""sidusd.net._lockstep (C): runs of lockstep steps taken on real loopback sockets.

The reference is pure Python: what a run sends is ``LockstepRun.datagram(i)``
(itself property-tested against ``ReadSession.ack_lockstep``), and which
datagrams take a step follows :func:`reference_pump` below.  The C engine is
driven with the same datagrams and must send and return exactly the same.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidusd.net import mmsg, udpport
from sidusd.proto.tftp_session import LockstepRun

if not udpport.ACCEL_BUILT:
    pytest.skip("needs the C extension sidusd.net._lockstep, built by scripts/setup "
                "(gcc, libc6-dev, python3-dev)", allow_module_level=True)

from sidusd.net import _lockstep  # noqa: E402


def udp(blocking: bool = False) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(blocking)
    return s


def key_of(sock: socket.socket) -> bytes:
    return mmsg.peer_key(sock.getsockname())


def ack(block: int) -> bytes:
    return bytes([0, 4, (block >> 8) & 0xFF, block & 0xFF])


def wait_readable(sock: socket.socket) -> None:
    import select
    select.select([sock], [], [], 2.0)


def pump_all(engine, server: socket.socket, runs: dict, now: float, want_rx: int,
             sending: bool = True) -> tuple[list, list, int]:
    """Pump until ``want_rx`` datagrams were read (they are on loopback: at once)."""
    rest, unsent, rx = [], [], 0
    for _ in range(200):
        res = engine.pump(server.fileno(), runs, now, 8, sending)
        assert (res.send_errors, res.blocked, res.rx_errno, res.dropped) == (0, 0, 0, 0)
        rest += res.rest
        unsent += res.unsent
        rx += res.rx
        if rx >= want_rx:
            break
        wait_readable(server)
    assert rx == want_rx
    return rest, unsent, rx


def recv_all(sock: socket.socket, n: int) -> list[bytes]:
    sock.settimeout(2.0)
    return [sock.recv(70000) for _ in range(n)]


def assert_silent(sock: socket.socket) -> None:
    sock.settimeout(0.05)
    with pytest.raises(socket.timeout):
        sock.recv(70000)


def make_run(ack_abs: int, blksize: int, count: int, size_last: int | None = None,
             seed: int = 1) -> LockstepRun:
    last = blksize if size_last is None else size_last
    n = (count - 1) * blksize + last
    data = bytes((i * 31 + seed) & 0xFF for i in range(n))
    return LockstepRun(ack_abs, data, blksize, count)


def test_a_run_sends_what_the_reference_sends_and_stops_at_its_end() -> None:
    server, client = udp(), udp(blocking=True)
    plan = make_run(7, 512, 5, size_last=100)
    run = _lockstep.Run(plan.ack, plan.data, plan.blksize, plan.count, "peer-object")
    runs = {key_of(client): run}
    engine = _lockstep.Engine()
    for i in range(plan.count):                      # lockstep: one ACK, one DATA
        client.sendto(ack(plan.ack + i), server.getsockname())
        rest, unsent, _ = pump_all(engine, server, runs, 100.0 + i, 1)
        assert rest == [] and unsent == []
        assert recv_all(client, 1) == [plan.datagram(i)]
        assert (run.used, run.ack, run.stopped) == (i + 1, plan.ack + i + 1, 0)
        assert 100.0 + i <= run.at < 100.0 + i + 0.5     # `now`, plus the time into the call
    client.sendto(ack(plan.ack + plan.count), server.getsockname())     # the run is spent
    rest, unsent, _ = pump_all(engine, server, runs, 200.0, 1)
    assert rest == [(ack(plan.ack + plan.count), key_of(client), False)]
    assert run.stopped == 1 and run.used == plan.count and 104.0 <= run.at < 104.5
    assert_silent(client)
    server.close()
    client.close()


def test_anything_else_goes_back_in_order_and_stops_the_run() -> None:
    server, client, stranger = udp(), udp(blocking=True), udp(blocking=True)
    plan = make_run(1, 8, 10)
    run = _lockstep.Run(plan.ack, plan.data, plan.blksize, plan.count, None)
    runs = {key_of(client): run}
    engine = _lockstep.Engine(capacity=4, bufsize=32)
    srv = server.getsockname()
    sent = [ack(1), ack(1), ack(2), b"\x00\x05\x00\x00x\x00", ack(3)]   # dup of 1: stops the run
    for d in sent:
        client.sendto(d, srv)
    stranger.sendto(ack(1), srv)                      # no run for this peer
    stranger.sendto(b"z" * 100, srv)                  # bigger than bufsize: truncated
    rest, unsent, _ = pump_all(engine, server, runs, 5.0, 7)
    assert unsent == []
    assert recv_all(client, 1) == [plan.datagram(0)]  # only the first ACK took a step
    assert_silent(client)
    assert rest == [(ack(1), key_of(client), False), (ack(2), key_of(client), False),
                    (b"\x00\x05\x00\x00x\x00", key_of(client), False), (ack(3), key_of(client), False),
                    (ack(1), key_of(stranger), False), (b"z" * 32, key_of(stranger), True)]
    assert run.stopped == 1 and run.used == 1
    for s in (server, client, stranger):
        s.close()


def test_block_numbers_roll_over_and_used_skips_steps_taken_elsewhere() -> None:
    server, client = udp(), udp(blocking=True)
    plan = make_run(65534, 16, 4)                     # DATA 65535, 0, 1, 2 (16-bit)
    run = _lockstep.Run(plan.ack, plan.data, plan.blksize, plan.count, None, 1)
    assert (run.used, run.ack) == (1, 65535)          # step 0 was taken by the caller
    runs = {key_of(client): run}
    engine = _lockstep.Engine()
    for i in range(1, 4):
        client.sendto(ack((plan.ack + i) & 0xFFFF), server.getsockname())
        pump_all(engine, server, runs, 1.0, 1)
        got = recv_all(client, 1)[0]
        assert got == plan.datagram(i) and got[2:4] == ((65535 + i) & 0xFFFF).to_bytes(2, "big")
    assert run.used == 4
    server.close()
    client.close()


def test_not_sending_hands_the_data_back_with_the_peer() -> None:
    server, a, b = udp(), udp(blocking=True), udp(blocking=True)
    pa, pb = make_run(3, 100, 3, seed=1), make_run(9, 100, 2, size_last=0, seed=2)
    ra = _lockstep.Run(pa.ack, pa.data, pa.blksize, pa.count, "A")
    rb = _lockstep.Run(pb.ack, pb.data, pb.blksize, pb.count, "B")
    runs = {key_of(a): ra, key_of(b): rb}
    a.sendto(ack(3), server.getsockname())
    b.sendto(ack(9), server.getsockname())
    b.sendto(ack(10), server.getsockname())
    rest, unsent, _ = pump_all(engine := _lockstep.Engine(), server, runs, 1.0, 3, sending=False)
    assert rest == []
    assert unsent == [(pa.datagram(0), "A"), (pb.datagram(0), "B"), (pb.datagram(1), "B")]
    assert len(pb.datagram(1)) == 4                  # the empty last block
    assert_silent(a)
    assert_silent(b)
    del engine
    for s in (server, a, b):
        s.close()



def test_not_sending_holds_back_a_full_batch_too() -> None:
    """With `sending` false (an outbox waits: order), a batch that fills up mid-read is not sent
    either: every step's DATA comes back in `unsent`, in arrival order."""
    server, a, b = udp(), udp(blocking=True), udp(blocking=True)
    pa, pb = make_run(3, 100, 3, seed=1), make_run(9, 100, 2, seed=2)
    runs = {key_of(a): _lockstep.Run(pa.ack, pa.data, pa.blksize, pa.count, "A"),
            key_of(b): _lockstep.Run(pb.ack, pb.data, pb.blksize, pb.count, "B")}
    a.sendto(ack(3), server.getsockname())
    b.sendto(ack(9), server.getsockname())
    rest, unsent, _ = pump_all(_lockstep.Engine(tx_capacity=1), server, runs, 1.0, 2, sending=False)
    assert rest == [] and unsent == [(pa.datagram(0), "A"), (pb.datagram(0), "B")]
    assert_silent(a)
    assert_silent(b)
    for s in (server, a, b):
        s.close()

def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        _lockstep.Run(1, b"x" * 10, 4, 2, None)      # 2 blocks of 4 hold at most 8 bytes
    with pytest.raises(ValueError):
        _lockstep.Run(1, b"x" * 3, 4, 2, None)       # and at least 4
    with pytest.raises(ValueError):
        _lockstep.Run(1, b"", 4, 0, None)
    with pytest.raises(ValueError):
        _lockstep.Run(1, b"xxxx", 4, 1, None, 2)     # used beyond count
    with pytest.raises(TypeError):
        _lockstep.Run(1, "text", 4, 1, None)
    with pytest.raises(ValueError):
        _lockstep.Engine(capacity=0)
    with pytest.raises(ValueError):
        _lockstep.Engine(bufsize=8)
    engine = _lockstep.Engine()
    with pytest.raises(TypeError):
        engine.pump(0, [], 0.0, 1, True)             # runs must be a dict
    with pytest.raises(AttributeError):
        _lockstep.Run(1, b"xxxx", 4, 1, None).used = 5   # read-only outside C


def reference_pump(datagrams: list[tuple[int, bytes]], runs: dict[int, list]) -> tuple[list, list]:
    """What the engine must do, in Python: per peer, an expected ACK takes the next step; any
    other datagram goes back and stops that peer's run.  runs: peer -> [plan, used, stopped]."""
    sent, rest = [], []
    for peer, d in datagrams:
        r = runs.get(peer)
        if r is not None and not r[2]:
            plan, used = r[0], r[1]
            if (len(d) == 4 and d[:2] == b"\x00\x04" and used < plan.count
                    and int.from_bytes(d[2:], "big") == (plan.ack + used) & 0xFFFF):
                sent.append((peer, plan.datagram(used)))
                r[1] += 1
                continue
            r[2] = True
        rest.append((peer, d))
    return sent, rest


@settings(max_examples=60, deadline=None)
@given(script=st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["next", "next", "next", "dup",
                                                                   "skip", "junk"])),
                       min_size=1, max_size=40),
       blksize=st.sampled_from([8, 512, 1468]), counts=st.tuples(st.integers(1, 12), st.integers(1, 12)),
       start=st.integers(0, 65535))
def test_engine_matches_the_reference_on_random_traffic(script, blksize, counts, start) -> None:
    """Three peers (two with runs, one without) send a random mix of the expected ACK,
    duplicates, skips and junk; the engine's DATA per peer and returned datagrams equal
    the reference's."""
    server = udp()
    peers = [udp(blocking=True) for _ in range(3)]
    try:
        plans = {0: make_run(start, blksize, counts[0], seed=3),
                 1: make_run(start ^ 0x00FF, blksize, counts[1], size_last=blksize // 2, seed=5)}
        runs = {key_of(peers[i]): _lockstep.Run(p.ack, p.data, p.blksize, p.count, i)
                for i, p in plans.items()}
        model = {i: [p, 0, False] for i, p in plans.items()}
        expect_next = {i: p.ack for i, p in plans.items()}
        expect_next[2] = 0
        datagrams = []
        for peer, kind in script:
            n = expect_next[peer]
            d = {"next": ack(n & 0xFFFF), "dup": ack((n - 1) & 0xFFFF), "skip": ack((n + 1) & 0xFFFF),
                 "junk": b"\x00\x03junk"}[kind]
            if kind == "next":
                expect_next[peer] = n + 1
            datagrams.append((peer, d))
        for peer, d in datagrams:
            peers[peer].sendto(d, server.getsockname())
        rest, unsent, _ = pump_all(_lockstep.Engine(capacity=8), server, runs, 3.0, len(datagrams))
        want_sent, want_rest = reference_pump(datagrams, model)
        keys = {key_of(p): i for i, p in enumerate(peers)}
        assert unsent == []
        assert [(keys[k], d) for d, k, trunc in rest] == want_rest
        for i, p in enumerate(peers):
            want = [d for peer, d in want_sent if peer == i]
            assert recv_all(p, len(want)) == want
            assert_silent(p)
        for i in plans:
            run = runs[key_of(peers[i])]
            assert (run.used, bool(run.stopped)) == (model[i][1], model[i][2])
    finally:
        server.close()
        for p in peers:
            p.close()


def test_pump_result_is_a_struct_sequence_with_named_fields() -> None:
    server, client = udp(), udp(blocking=True)
    plan = make_run(4, 64, 2)
    runs = {key_of(client): _lockstep.Run(plan.ack, plan.data, plan.blksize, plan.count, "P")}
    engine = _lockstep.Engine()
    client.sendto(ack(4), server.getsockname())
    client.sendto(b"\x00\x05stray", server.getsockname())
    wait_readable(server)
    res = engine.pump(server.fileno(), runs, 1.0, 8, False)
    while res.rx < 2:                                 # loopback: at once, but poll with a bound
        wait_readable(server)
        more = engine.pump(server.fileno(), runs, 1.0, 8, False)
        assert more.rx, "the second datagram did not arrive"
        res = _lockstep.PumpResult((res.rest + more.rest, res.unsent + more.unsent, res.rx + more.rx,
                                    res.calls + more.calls, 0, 0, 0, 0))
    assert type(res) is _lockstep.PumpResult and isinstance(res, tuple)
    assert res.rest == [(b"\x00\x05stray", key_of(client), False)]
    assert res.unsent == [(plan.datagram(0), "P")]
    assert (res.rx, res.send_errors, res.blocked, res.rx_errno, res.dropped) == (2, 0, 0, 0, 0)
    assert 1 <= res.calls <= 2
    assert len(res) == 7 and tuple(res) == (res.rest, res.unsent, res.rx, res.calls,
                                            res.send_errors, res.blocked, res.rx_errno)
    server.close()
    client.close()


def test_a_sender_that_is_not_ipv4_is_dropped_and_counted() -> None:
    """The engine reads the peer key out of a sockaddr_in: a datagram whose name is anything
    else (here an unnamed AF_UNIX peer) is dropped and counted, never read as a key."""
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    here.setblocking(False)
    plan = make_run(1, 8, 2)
    runs = {b"\x00" * 6: _lockstep.Run(plan.ack, plan.data, plan.blksize, plan.count, None)}
    there.send(ack(1))
    there.send(b"\x00\x05junk")
    wait_readable(here)
    dropped = rx = 0
    for _ in range(200):
        res = _lockstep.Engine(capacity=4).pump(here.fileno(), runs, 1.0, 4, True)
        assert (res.rest, res.unsent, res.send_errors, res.rx_errno) == ([], [], 0, 0)
        dropped, rx = dropped + res.dropped, rx + res.rx
        if rx >= 2:
            break
        wait_readable(here)
    assert (rx, dropped) == (2, 2)
    assert runs[b"\x00" * 6].used == 0
    here.close()
    there.close()


class _KeyThatDropsAnother(bytes):
    """A dict key for one peer whose comparison (in the engine's lookup), once, removes another
    peer's run from the dict: Python code that runs in the middle of pump()."""

    __hash__ = bytes.__hash__

    def __eq__(self, other):
        victim, self.victim = self.victim, None
        if victim is not None:
            self.runs.pop(victim, None)
        return bytes.__eq__(self, other)


class _ClearsRunsWhenFreed:
    def __init__(self, runs: dict):
        self.runs = runs

    def __del__(self):
        self.runs.clear()


def dropped_during_pump() -> None:
    """Runs taken out of the dict from Python while pump() holds them: with tx_capacity 1, B's
    ACK finds B, sending the full batch before B's step frees A, whose peer's finalizer clears
    the dict: B is then held by the engine alone, and its step must still be right."""
    for _attempt in range(20):
        server, a, b = udp(), udp(blocking=True), udp(blocking=True)
        pa, pb = make_run(3, 100, 3, seed=1), make_run(9, 100, 2, seed=2)
        runs: dict = {}
        kb = _KeyThatDropsAnother(key_of(b))
        kb.runs, kb.victim = runs, key_of(a)
        runs[key_of(a)] = _lockstep.Run(pa.ack, pa.data, pa.blksize, pa.count, _ClearsRunsWhenFreed(runs))
        runs[kb] = _lockstep.Run(pb.ack, pb.data, pb.blksize, pb.count, "B")
        del kb
        a.sendto(ack(3), server.getsockname())
        b.sendto(ack(9), server.getsockname())
        wait_readable(server)
        res = _lockstep.Engine(capacity=8, tx_capacity=1).pump(server.fileno(), runs, 1.0, 1, True)
        if res.rx == 2:                               # both in one recvmmsg: the case under test
            assert (res.rest, res.unsent, res.send_errors, res.blocked) == ([], [], 0, 0)
            assert runs == {}
            assert recv_all(a, 1) == [pa.datagram(0)]
            assert recv_all(b, 1) == [pb.datagram(0)]
            for s in (server, a, b):
                s.close()
            return
        for s in (server, a, b):
            s.close()
    raise AssertionError("the two ACKs never came in one recvmmsg")


def test_runs_dropped_from_python_during_pump_are_kept_alive() -> None:
    dropped_during_pump()


def test_runs_dropped_during_pump_under_the_debug_allocator() -> None:
    """The same in `python -X dev` (freed memory is overwritten): a borrowed reference to a run
    freed during pump() would send garbage or crash there."""
    code = textwrap.dedent(f"""
        import runpy
        runpy.run_path({__file__!r})["dropped_during_pump"]()
    """)
    proc = subprocess.run([sys.executable, "-X", "dev", "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_wait_us_takes_the_steps_of_a_peer_that_answers_during_one_pump() -> None:
    """With ``wait_us`` C waits (GIL released) for the ACK of the DATA it just sent: a lockstep
    peer answering from a thread has many steps taken per pump call; with wait_us=0 (the
    GIL held throughout, the peer cannot answer during the call) one call takes one step."""
    import threading
    server, client = udp(), udp(blocking=True)
    plan = make_run(1, 1024, 20, size_last=10)
    got: list[bytes] = []

    def peer() -> None:                             # ACK every DATA at once, like atftp
        client.settimeout(5.0)
        for _ in range(plan.count):
            d = client.recv(70000)
            got.append(d)
            client.sendto(ack((d[2] << 8) | d[3]), server.getsockname())

    final = (ack(plan.ack + plan.count), key_of(client), False)    # not a step: comes back
    for wait_us in (0, 100_000):
        got.clear()
        run = _lockstep.Run(plan.ack, plan.data, plan.blksize, plan.count, "p")
        runs = {key_of(client): run}
        engine = _lockstep.Engine()
        th = threading.Thread(target=peer)
        th.start()
        client.sendto(ack(plan.ack), server.getsockname())
        calls, rest = 0, []
        while not rest:
            wait_readable(server)
            res = engine.pump(server.fileno(), runs, 5.0, 64, True, wait_us)
            assert (res.send_errors, res.blocked, res.rx_errno, res.unsent) == (0, 0, 0, [])
            rest += res.rest
            calls += 1
        th.join()
        assert got == [plan.datagram(i) for i in range(plan.count)] and rest == [final]
        assert run.used == plan.count
        if wait_us:
            assert calls <= plan.count // 2, calls
        else:
            assert calls == plan.count + 1
    server.close()
    client.close()


def test_wait_us_bounds() -> None:
    server = udp()
    engine = _lockstep.Engine()
    for bad in (-1, 100_001):
        with pytest.raises(ValueError):
            engine.pump(server.fileno(), {}, 0.0, 1, True, bad)
    res = engine.pump(server.fileno(), {}, 0.0, 1, True, 100_000)   # nothing sent: no wait
    assert res.rx == 0
    server.close()

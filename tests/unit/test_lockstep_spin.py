"""Engine.pump's ``spin_us``: before sleeping for the ACK of what it just sent, C polls the
socket without sleeping (yielding the CPU to a peer that shares it) for up to that long.

The figures it is for are bench.tftpbig's (docs/performance.md): one lockstep client at
blksize 1468 went from ~25 MB/s (a cross-CPU wake-up per block) to ~70.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from sidusd.net import udpport

if not udpport.ACCEL_BUILT:
    pytest.skip("needs the C extension sidusd.net._lockstep, built by scripts/setup "
                "(gcc, libc6-dev, python3-dev)", allow_module_level=True)

from test_lockstep_engine import ack, key_of, make_run, udp, wait_readable  # noqa: E402

from sidusd.net import _lockstep  # noqa: E402


def serve_with(wait_us: int, spin_us: int, count: int, delay_s: float = 0.0,
               engine=None, runs_made: list | None = None) -> tuple[int, int, bool]:
    """A peer thread ACKs every DATA (after ``delay_s``); returns (pump calls, steps, data ok)
    (the run, appended to ``runs_made``)."""
    server, client = udp(), udp(blocking=True)
    plan = make_run(1, 1024, count, size_last=10)
    got: list[bytes] = []
    stop = threading.Event()

    def peer() -> None:
        client.settimeout(5.0)
        for _ in range(plan.count):
            d = client.recv(70000)
            got.append(d)
            if delay_s:
                stop.wait(delay_s)
            client.sendto(ack((d[2] << 8) | d[3]), server.getsockname())

    run = _lockstep.Run(plan.ack, plan.data, plan.blksize, plan.count, "p")
    peer_key = key_of(client)
    runs = {peer_key: run}
    engine = engine if engine is not None else _lockstep.Engine()
    th = threading.Thread(target=peer)
    th.start()
    client.sendto(ack(plan.ack), server.getsockname())
    calls, rest = 0, []
    try:
        while not rest:
            wait_readable(server)
            res = engine.pump(server.fileno(), runs, 5.0, 1024, True, wait_us, spin_us)
            assert (res.send_errors, res.blocked, res.rx_errno, res.unsent) == (0, 0, 0, [])
            rest += res.rest
            calls += 1
    finally:
        th.join()
        server.close()
        client.close()
    ok = got == [plan.datagram(i) for i in range(plan.count)]
    assert rest == [(ack(plan.ack + plan.count), peer_key, False)]
    if runs_made is not None:
        runs_made.append(run)
    return calls, run.used, ok


def spins_when_every_wait_misses(waits: int) -> int:
    """The first 32 waits spin; then one in 8, and one in twice as many after each probe
    that misses too, down to one in 256: waits 32, 48, 64, 128, 256, 512, 768..."""
    spun, probe = 0, 8
    for i in range(waits):
        if i < 32:
            spun += 1
        elif i % probe == 0:
            spun += 1
            probe = min(2 * probe, 256)
    return spun


def spun_as_if_every_wait_missed(engine, calls: int) -> bool:
    """``engine.spun`` is what :func:`spins_when_every_wait_misses` says, give or take the
    last wait of each call but one: a call's 100 ms can run out on a loaded CPU, and a wait cut
    short by it counts neither way (one more spin, at most, each)."""
    model = spins_when_every_wait_misses(engine.waits)
    return model <= engine.spun <= model + calls - 1


@pytest.mark.parametrize("spin_us", [1, 30, 1000])
def test_spinning_takes_every_step_of_a_prompt_peer_in_few_calls(spin_us: int) -> None:
    """The ACK comes during the spin (or after it, in the sleep): the same DATA, in order,
    every step taken, nearly all in one call."""
    calls, used, ok = serve_with(100_000, spin_us, 40)
    assert ok and used == 40
    assert calls <= 40 // 2, calls


def test_a_peer_slower_than_the_spin_is_still_waited_for() -> None:
    """The ACK comes 3 ms after the DATA, long after a 50 us spin: the sleep that follows
    the spin still takes it (the wait is not cut short by the spin)."""
    calls, used, ok = serve_with(100_000, 50, 10, delay_s=0.003)
    assert ok and used == 10
    assert calls <= 10 // 2, calls


def test_spin_us_bounds() -> None:
    server = udp()
    engine = _lockstep.Engine()
    for bad in (-1, 1001):
        with pytest.raises(ValueError):
            engine.pump(server.fileno(), {}, 0.0, 1, True, 100, bad)
    res = engine.pump(server.fileno(), {}, 0.0, 1, True, 100, 1000)   # nothing sent: no wait
    assert res.rx == 0
    server.close()


def test_after_a_wait_longer_than_the_spin_the_waits_sleep_at_once() -> None:
    """A peer that answers 1 ms after each DATA (a LAN's round trip is 0.1-0.3 ms, far beyond a
    30 us spin): the first 32 waits spin, then one in 8, 16, 32...  A wait readable within 4x the spin
    counts as a hit (on loopback many ACKs come just after 30 us: they must not stop it).
    bench.tftpbig --link tun at 0.24 ms: the spin on every wait made 45-51 s of server CPU
    per GB, 21.5 without it."""
    engine = _lockstep.Engine()
    calls, used, ok = serve_with(100_000, 50, 300, delay_s=0.001, engine=engine)
    assert ok and used == 300
    assert 256 < engine.waits <= 300, engine.waits
    assert spins_when_every_wait_misses(engine.waits) == 32 + 5
    assert spun_as_if_every_wait_missed(engine, calls), (engine.waits, engine.spun, calls)


def test_a_wait_cut_short_by_the_calls_budget_does_not_restart_the_spin() -> None:
    """The peer answers 1 ms after each DATA.  Once the spin has stopped, calls whose wait
    budget (60 us, and a timer's slack of up to 50 us) runs out before 4x the spin (200 us)
    say nothing of the peer.  They used to count as hits, and each one spun the next 32
    waits: a pump call's last wait ends that way at a share of the ~20 calls a second at N = 1
    over a LAN (bench.tftpbig --link tun)."""
    engine = _lockstep.Engine()
    serve_with(100_000, 50, 300, delay_s=0.001, engine=engine)
    waits, spun = engine.waits, engine.spun
    assert spun == spins_when_every_wait_misses(waits)             # the spin has stopped
    calls, used, ok = serve_with(60, 50, 260, delay_s=0.001, engine=engine)    # past wait 512
    assert ok and used == 260 and calls >= 130
    assert engine.waits - waits >= 220                              # a probe's wait among them
    assert engine.spun - spun <= 2, (engine.waits - waits, engine.spun - spun)    # probes only


@pytest.fixture
def cpu_shared_with_a_hog():
    """This thread (and the threads it starts) and a busy process on one CPU: a sched_yield
    there lasts up to a timeslice (CI's loaded machine: every ACK came "during the spin")."""
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                           preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    os.sched_setaffinity(0, {cpu})
    try:
        yield hog
    finally:
        os.sched_setaffinity(0, before)
        hog.kill()
        hog.wait()


def test_a_spin_stretched_by_a_busy_cpu_is_a_miss(cpu_shared_with_a_hog) -> None:
    """The ACK comes 1 ms after each DATA and the CPU is shared with a busy process, so a
    sched_yield in the spin lasts a timeslice and the ACK is already there when it returns:
    that is still a miss (it came long after the spin, by the clock), and the spin stops."""
    engine = _lockstep.Engine()
    calls, used, ok = serve_with(100_000, 50, 70, delay_s=0.001, engine=engine)
    assert ok and used == 70
    assert cpu_shared_with_a_hog.poll() is None      # the hog ran throughout
    assert engine.waits >= 60, engine.waits
    assert spun_as_if_every_wait_missed(engine, calls), (engine.waits, engine.spun, calls)


def test_waits_are_counted_and_a_first_wait_spins() -> None:
    engine = _lockstep.Engine()
    assert (engine.waits, engine.spun) == (0, 0)
    calls, used, ok = serve_with(100_000, 1000, 20, engine=engine)
    assert ok and used == 20
    assert engine.waits >= 10 and 1 <= engine.spun <= engine.waits
    with pytest.raises(AttributeError):
        engine.spun = 0


def test_a_readable_wake_fd_ends_the_wait_and_every_later_one() -> None:
    """The peer takes the first DATA, makes the wake descriptor readable (the event loop has
    other work) and ACKs only once the pump has returned: with a wait of 100 ms allowed, the
    pump returns at the wake-up (one step taken, nothing else), not at the end of the wait."""
    server, client = udp(), udp(blocking=True)
    wake_r, wake_w = socket.socketpair()
    plan = make_run(1, 512, 3, size_last=10)
    run = _lockstep.Run(plan.ack, plan.data, plan.blksize, plan.count, "p")
    runs = {key_of(client): run}
    engine = _lockstep.Engine()
    returned = threading.Event()

    def peer() -> None:
        client.settimeout(5.0)
        d = client.recv(70000)
        wake_w.send(b"x")
        returned.wait(5.0)
        client.sendto(ack((d[2] << 8) | d[3]), server.getsockname())

    th = threading.Thread(target=peer)
    th.start()
    try:
        client.sendto(ack(plan.ack), server.getsockname())
        wait_readable(server)
        res = engine.pump(server.fileno(), runs, 5.0, 1024, True, 100_000, 0, wake_r.fileno())
        returned.set()
        assert (res.rest, res.unsent, run.used) == ([], [], 1)
        assert (engine.waits, engine.woken) == (1, 1)
        # the next call takes the step the peer ACKed after the return, and waits again
        wait_readable(server)
        wake_r.recv(1)
        res = engine.pump(server.fileno(), runs, 5.0, 1, True, 1000, 0, wake_r.fileno())
        assert run.used == 2 and engine.woken == 1
    finally:
        returned.set()
        th.join()
        for s in (server, client, wake_r, wake_w):
            s.close()


def test_a_step_taken_late_in_a_call_has_its_own_time() -> None:
    """One pump call takes the steps of a peer answering 2 ms after each DATA: the last step's
    time is the call's ``now`` plus the time into the call, not ``now`` (the session's
    deadline and the transfer's duration come from it: a whole file can be one call)."""
    made: list = []
    calls, used, ok = serve_with(100_000, 0, 40, delay_s=0.002, runs_made=made)
    (run,) = made
    assert ok and used == 40 and calls < 40
    assert run.at >= 5.0 + 39 * 0.002 / calls, (run.at, calls)


def test_a_lone_lockstep_peer_costs_one_recvmmsg_per_step() -> None:
    """After a round that read one ACK and took its step, the engine waits for the next ACK at
    once: no recvmmsg that finds nothing (strace of 2000 steps: 2002 recvmmsg; 4002 before)."""
    engine = _lockstep.Engine()
    calls, used, ok = serve_with(100_000, 0, 300, delay_s=0.0002, engine=engine)
    assert ok and used == 300
    assert engine.recv_calls <= used + 2 * calls, (engine.recv_calls, used, calls)

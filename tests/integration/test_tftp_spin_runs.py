"""The engine's spin is for a port with few lockstep runs (tftp_dispatch.ACCEL_SPIN_MAX_RUNS).

With many runs some peer's ACK is nearly always on its way, and spinning only burns CPU that
the peers (or a relay, or the NIC's softirq) need: over the tun link at 1468, N = 32, the
CPU per GB was 1.20-1.26x dnsmasq's with the spin and 0.81-0.86x without, at the same MB/s
(docs/performance.md, sessions 13 and 14).  A real TftpService on loopback, scripted
lockstep clients, the C engine's own counters.
"""

from __future__ import annotations

import os

import pytest
from test_tftp_clients import Raw, Server, use_engine

from sidusd.net import tftp_dispatch
from sidusd.proto import tftp

BLOCKS = 120


@pytest.fixture
def server(tmp_path, monkeypatch):
    use_engine("accel", monkeypatch)
    s = Server(tmp_path)
    yield s
    s.close()


@pytest.mark.parametrize("n, spins", [(tftp_dispatch.ACCEL_SPIN_MAX_RUNS, True),
                                      (tftp_dispatch.ACCEL_SPIN_MAX_RUNS + 4, False)])
def test_the_pump_spins_only_while_a_port_carries_few_lockstep_runs(server, n, spins) -> None:
    data = os.urandom(512 * BLOCKS + 100)
    (server.root / "f").write_bytes(data)
    raws = [Raw(server.port) for _ in range(n)]
    for r in raws:
        r.rrq(b"f")                             # no options: 512-byte lockstep
    live = {}
    for i, r in enumerate(raws):                # every transfer has its first DATA (and run)
        pkt, addr = r.recv()
        live[i] = (pkt, addr, bytearray(pkt.data))
    engine = server.on_loop(lambda: server.svc.ports.ports["127.0.0.1"]._engine)
    assert server.on_loop(lambda: len(server.svc.ports.ports["127.0.0.1"].runs)) == n
    spun0, waits0 = engine.spun, engine.waits
    got = {}
    while live:                                 # all of them in lockstep, in turn
        for i, (pkt, addr, buf) in list(live.items()):
            raws[i].send(tftp.ACK(pkt.block), addr)
            if len(pkt.data) < 512:
                got[i] = bytes(buf)
                del live[i]
                continue
            pkt, _ = raws[i].recv()
            buf += pkt.data
            live[i] = (pkt, addr, buf)
    assert all(got[i] == data for i in range(n))
    server.wait_idle()
    waits, spun = engine.waits - waits0, engine.spun - spun0
    assert waits >= BLOCKS                      # the engine did wait for ACKs...
    if spins:
        assert spun > 0, (spun, waits)
    else:
        assert spun == 0, (spun, waits)         # ... and, with that many runs, never spun
    for r in raws:
        r.close()

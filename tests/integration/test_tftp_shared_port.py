"""The shared transfer socket (one per local address) with scripted raw clients and atftp.

What changed with it and must hold: transfers from one address share one server
port and stay apart by the client's port; a late duplicate ACK after the end of
a transfer gets no ERROR (counted ``tftp.late``) while a stranger still gets
ERROR 5; the socket is closed when no transfer uses it; windows sent as UDP GSO
messages arrive as the RFC 7440 datagrams, each block once, in order.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
from conftest import require_tool
from test_tftp_clients import ENGINES, WAIT_S, Raw, Server, sha, use_engine

from sidusd.proto import tftp


@pytest.fixture(params=ENGINES)
def server(tmp_path, request, monkeypatch):
    use_engine(request.param, monkeypatch)
    s = Server(tmp_path)
    yield s
    s.close()


def test_concurrent_transfers_share_one_port_and_stay_apart(server) -> None:
    a, b = os.urandom(7000), os.urandom(9000)
    (server.root / "a").write_bytes(a)
    (server.root / "b").write_bytes(b)
    ra, rb = Raw(server.port), Raw(server.port)
    ra.rrq(b"a")
    rb.rrq(b"b")
    pa, from_a = ra.recv()
    pb, from_b = rb.recv()
    assert from_a == from_b and from_a[1] != server.port         # one transfer port for both
    got = {"a": bytearray(pa.data), "b": bytearray(pb.data)}
    live = {"a": (ra, pa), "b": (rb, pb)}
    while live:                                                  # interleaved lockstep
        for name, (raw, pkt) in list(live.items()):
            raw.send(tftp.ACK(pkt.block), from_a)
            if len(pkt.data) < 512:
                del live[name]
                continue
            pkt, _ = raw.recv()
            got[name] += pkt.data
            live[name] = (raw, pkt)
    assert bytes(got["a"]) == a and bytes(got["b"]) == b
    server.wait_idle()
    assert sorted(e["outcome"] for e in server.transfers()) == ["ok", "ok"]
    ra.close()
    rb.close()


def test_late_ack_is_dropped_stranger_gets_error_5_idle_socket_closed(server) -> None:
    data = os.urandom(600)
    (server.root / "f").write_bytes(data)
    keep, raw = Raw(server.port), Raw(server.port)
    keep.rrq(b"f")                              # holds the transfer socket open meanwhile
    first_keep, port_addr = keep.recv()
    raw.rrq(b"f")
    d1, addr = raw.recv()
    assert addr == port_addr
    raw.send(tftp.ACK(1), addr)
    d2, _ = raw.recv()
    raw.send(tftp.ACK(2), addr)                 # the last ACK: that transfer is over
    deadline = time.monotonic() + WAIT_S
    while server.on_loop(server.svc.active_transfers) != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    raw.send(tftp.ACK(2), addr)                 # duplicated last ACK, arriving late
    stranger = Raw(server.port)
    stranger.send(tftp.ACK(1), addr)
    err, err_from = stranger.recv()
    assert err == tftp.ERROR(5, "unknown transfer ID") and err_from == addr
    with pytest.raises(TimeoutError):
        raw.recv(timeout=0.5)                   # nothing for the peer that finished
    assert bytes(d1.data + d2.data) == data
    c = server.counters()
    assert c["tftp.late"] == 1 and c["tftp.wrong_tid"] == 1
    keep.send(tftp.ACK(1), addr)                # finish the other transfer
    last, _ = keep.recv()
    while last.block == 1:                      # its DATA 1 may have been resent meanwhile
        last, _ = keep.recv()
    assert (first_keep.block, last.block, len(last.data)) == (1, 2, 88)
    keep.send(tftp.ACK(2), addr)
    server.wait_idle()
    # no transfer left: the transfer socket is closed (the kernel answers port unreachable)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.connect(addr)
    deadline = time.monotonic() + WAIT_S
    while True:
        probe.send(b"\0\x04\0\x01")
        probe.settimeout(0.5)
        try:
            probe.recv(100)
        except ConnectionRefusedError:
            break
        except TimeoutError:
            pass
        assert time.monotonic() < deadline, "the idle transfer socket was never closed"
    probe.close()
    for r in (keep, raw, stranger):
        r.close()


def test_window_sent_as_gso_arrives_block_by_block(server) -> None:
    """A raw RFC 7440 client: 16 DATA datagrams per window, each exactly once, in order."""
    data = os.urandom(16 * 1468 * 3 + 5)
    (server.root / "w").write_bytes(data)
    raw = Raw(server.port)
    raw.rrq(b"w", options={"blksize": 1468, "windowsize": 16})
    oack, addr = raw.recv()
    assert oack == tftp.OACK((("blksize", "1468"), ("windowsize", "16")))
    raw.send(tftp.ACK(0), addr)
    blocks = []
    while True:
        window = [raw.recv()[0] for _ in range(16 if len(blocks) < 48 else 1)]
        blocks += window
        raw.send(tftp.ACK(window[-1].block), addr)
        if len(window[-1].data) < 1468:
            break
    assert [p.block for p in blocks] == list(range(1, 50))
    assert b"".join(p.data for p in blocks) == data
    with pytest.raises(TimeoutError):
        raw.recv(timeout=0.3)                   # no block twice
    server.wait_idle()
    (ev,) = server.transfers()
    assert (ev["outcome"], ev["retransmits"]) == ("ok", 0)
    raw.close()


def test_many_atftp_clients_at_once(server, tmp_path) -> None:
    """16 real clients (windowsize 16 and lockstep mixed) on the one transfer socket."""
    atftp = require_tool("atftp")
    data = os.urandom(2 * 1024 * 1024 + 3)
    (server.root / "k").write_bytes(data)
    procs = []
    for i in range(16):
        opts = ["--option", "blksize 1468"] + (["--option", "windowsize 16"] if i % 2 else [])
        procs.append(subprocess.Popen([atftp, *opts, "-g", "-r", "k", "-l", str(tmp_path / f"o{i}"),
                                       "127.0.0.1", str(server.port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-300:]
    assert all(sha((tmp_path / f"o{i}").read_bytes()) == sha(data) for i in range(16))
    server.wait_idle()
    evs = server.transfers()
    assert len(evs) == 16 and {e["outcome"] for e in evs} == {"ok"}
    assert sorted(e["windowsize"] for e in evs) == [1] * 8 + [16] * 8

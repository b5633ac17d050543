"""The TFTP quirk table against the real daemon on loopback, from a raw client.

Each quirk is what a firmware or a broken/hostile client really does (UEFI's
tsize probe then abort, timeout 0, unknown options, an oversized blksize, a
resent RRQ, a resent ACK of the OACK, a stranger's port, an ERROR in the
middle).  After each one: the file is exact where a transfer was meant to
finish, ``sidusctl --json status`` shows 0 active transfers, and the daemon
holds no more descriptors than before (/proc/<pid>/fd).
"""

from __future__ import annotations

import os

import pytest
from daemon_fixture import SidusDaemon, base_config, free_udp_port
from hardening_util import (
    OP_DATA,
    OP_ERROR,
    OP_OACK,
    RawClient,
    ack,
    error,
    fd_count,
    rrq,
    sha256,
    tracebacks,
    wait_until,
)

FILE = "images/demo/vmlinuz"
SIZE = 200_000 + 123          # not a multiple of any block size used


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quirks")
    port = free_udp_port()
    cfg = base_config(tmp, port)
    cfg["tftp"]["timeout_s"] = 3.0          # generous: retransmissions only if the host stalls
    cfg["tftp"]["retries"] = 3
    d = SidusDaemon(tmp, config=cfg)
    d.tftp_port = port
    data = os.urandom(SIZE)
    (tmp / "tftp" / FILE).write_bytes(data)
    d.payload = data
    with d:
        d.tftp_get(FILE)                    # warm up: lazy imports, caches
        wait_until(lambda: d.ctl_json("status")["active_transfers"] == 0, what="warm-up end")
        d.fd_base = fd_count(d.proc.pid)
        yield d
    assert not tracebacks(d.events()), tracebacks(d.events())


def settled(d: SidusDaemon) -> None:
    """No session left and no descriptor leaked."""
    wait_until(lambda: d.ctl_json("status")["active_transfers"] == 0, what="0 active transfers")
    wait_until(lambda: fd_count(d.proc.pid) <= d.fd_base, timeout_s=10,
               what=f"fd count back to {d.fd_base} (now {fd_count(d.proc.pid)})")
    assert d.proc.poll() is None


def counters(d: SidusDaemon) -> dict:
    return d.ctl_json("status")["counters"]


def test_uefi_tsize_probe_then_abort(daemon):
    c = RawClient(daemon.tftp_port)
    c.send_request(rrq(FILE, tsize=0, blksize=1468))
    op, val = c.recv()
    assert op == OP_OACK and val["tsize"] == str(SIZE) and val["blksize"] == "1468"
    c.send(error(8, "tsize probe done"))          # RFC 2347: the client refuses the OACK
    settled(daemon)
    c.close()
    assert any(e.get("event") == "tftp.transfer" and e.get("outcome") in ("probe", "peer-error")
               for e in daemon.events()), daemon.log_tail()


def test_timeout_zero_is_not_acknowledged_and_transfer_completes(daemon):
    c = RawClient(daemon.tftp_port)
    c.send_request(rrq(FILE, timeout=0, blksize=1024))
    first = c.recv()
    assert first[0] == OP_OACK and "timeout" not in first[1] and first[1]["blksize"] == "1024"
    assert sha256(c.finish_lockstep(first, 1024)) == sha256(daemon.payload)
    c.close()
    settled(daemon)


def test_unknown_options_are_ignored(daemon):
    c = RawClient(daemon.tftp_port)
    c.send_request(rrq(FILE, **{"x-vendor": "1", "rollover": "0", "multicast": "", "blksize": "1400"}))
    first = c.recv()
    assert first[0] == OP_OACK and set(first[1]) == {"blksize"}
    assert sha256(c.finish_lockstep(first, 1400)) == sha256(daemon.payload)
    c.close()
    settled(daemon)


def test_oversized_blksize_is_clamped(daemon):
    c = RawClient(daemon.tftp_port)
    c.send_request(rrq(FILE, blksize=99999999))
    first = c.recv()
    assert first[0] == OP_OACK
    blk = int(first[1]["blksize"])
    assert 8 <= blk <= 65464
    assert sha256(c.finish_lockstep(first, blk)) == sha256(daemon.payload)
    c.close()
    settled(daemon)


def test_blksize_below_minimum_gets_default_blocks(daemon):
    c = RawClient(daemon.tftp_port)
    c.send_request(rrq(FILE, blksize=7, tsize=0))
    first = c.recv()
    assert first[0] == OP_OACK and "blksize" not in first[1]
    assert sha256(c.finish_lockstep(first, 512)) == sha256(daemon.payload)
    c.close()
    settled(daemon)


def test_duplicate_rrq_makes_one_transfer(daemon):
    before = counters(daemon)
    c = RawClient(daemon.tftp_port)
    c.send_request(rrq(FILE, blksize=1468))
    c.send_request(rrq(FILE, blksize=1468))      # the client resent its request
    first = c.recv()
    assert sha256(c.finish_lockstep(first, 1468)) == sha256(daemon.payload)
    c.close()
    settled(daemon)
    after = counters(daemon)
    assert after.get("tftp.transfers.started", 0) - before.get("tftp.transfers.started", 0) == 1
    assert after.get("tftp.duplicate_rrq", 0) - before.get("tftp.duplicate_rrq", 0) == 1


def test_duplicate_ack_of_oack_does_not_double_the_data(daemon):
    """Sorcerer's apprentice (RFC 1123 §4.2.3.1): a resent ACK must not resend DATA."""
    c = RawClient(daemon.tftp_port)
    c.send_request(rrq(FILE, blksize=1468))
    first = c.recv()
    assert first[0] == OP_OACK
    c.send(ack(0))                               # finish_lockstep sends the second ACK 0
    got = c.finish_lockstep(first, 1468)
    assert sha256(got) == sha256(daemon.payload)
    data_1 = [p for p in c.received if p[:4] == bytes([0, OP_DATA, 0, 1])]
    assert len(data_1) == 1, f"DATA 1 received {len(data_1)} times"
    c.close()
    settled(daemon)


def test_wrong_tid_gets_error_5_and_transfer_continues(daemon):
    c = RawClient(daemon.tftp_port)
    c.send_request(rrq(FILE, blksize=1468))
    first = c.recv()
    stranger = RawClient(daemon.tftp_port)
    stranger.sock.sendto(ack(1), c.tid)
    data, addr = stranger.sock.recvfrom(1500)
    assert addr == c.tid and data[:4] == bytes([0, OP_ERROR, 0, 5])
    stranger.close()
    assert sha256(c.finish_lockstep(first, 1468)) == sha256(daemon.payload)
    c.close()
    settled(daemon)


def test_error_in_the_middle_ends_the_session(daemon):
    c = RawClient(daemon.tftp_port)
    c.send_request(rrq(FILE))                    # no options: DATA 1 straight away
    op, val = c.recv()
    assert op == OP_DATA and val[0] == 1
    for block in (1, 2, 3):
        c.send(ack(block))
        op, val = c.recv()
        assert op == OP_DATA and val[0] == block + 1
    c.send(error(0, "user abort"))
    settled(daemon)
    c.close()


def test_short_error_and_junk_on_a_transfer_port(daemon):
    """A 3-byte ERROR and junk on the transfer port: counted, the transfer goes on."""
    before = counters(daemon)
    c = RawClient(daemon.tftp_port)
    c.send_request(rrq(FILE, blksize=1468))
    first = c.recv()
    for junk in (b"\x00\x05\x00", b"\x00", b"\xff" * 40, b"\x00\x09abc"):
        c.send(junk)
    assert sha256(c.finish_lockstep(first, 1468)) == sha256(daemon.payload)
    c.close()
    settled(daemon)
    assert counters(daemon).get("tftp.malformed", 0) - before.get("tftp.malformed", 0) >= 3

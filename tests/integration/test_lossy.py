"""TFTP through a lossy link: real clients (busybox and curl lockstep, atftp with an RFC 7440
window) talk to the real daemon through tests/integration/lossy_relay.py.

* sha256-exact files at up to 10% loss (plus duplication and reordering),
  1 MB in each mode, and one > 96 MB transfer (block numbers wrap past 65535);
* every ACK duplicated: the server sends at most 1.01 x the blocks in DATA
  packets (no Sorcerer's Apprentice, RFC 1123 §4.2.3.1), counted at the relay;
* no window amplification: with 1% / 10% duplicated or reordered datagrams
  (no drop), atftp window 16, the DATA packets stay within a bound of the
  blocks (the old go-back-on-every-partial-ACK rule sent 7.6x at 1% dup);
* a silent peer (ACKs the OACK, then nothing) costs at most
  (1 + retries) x window x blksize bytes before the server gives up.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import zlib
from pathlib import Path

import pytest
from conftest import require_tool
from daemon_fixture import SidusDaemon, base_config, free_udp_port
from hardening_util import OP_OACK, RawClient, ack, rrq, tracebacks, wait_until
from lossy_relay import LossyRelay

MB = 1 << 20
BLK = 1468


def make_daemon(tmp: Path, timeout_s: float, retries: int) -> SidusDaemon:
    port = free_udp_port()
    cfg = base_config(tmp, port)
    cfg["tftp"].update(timeout_s=timeout_s, retries=retries)
    d = SidusDaemon(tmp, config=cfg)
    d.tftp_port = port
    return d


@pytest.fixture(scope="module")
def lossy_daemon(tmp_path_factory):
    """Short retransmission timer (the relay loses a lot), many retries (10% loss both
    ways makes ~19% of round trips fail; 13 in a row is ~1e-9)."""
    d = make_daemon(tmp_path_factory.mktemp("lossy"), timeout_s=0.2, retries=12)
    small = os.urandom(MB + 333)
    (d.tmp / "tftp" / "small.img").write_bytes(small)
    d.small_sha = hashlib.sha256(small).hexdigest()
    with d:
        yield d
    assert not tracebacks(d.events()), tracebacks(d.events())


def fetch(client: str, port: int, name: str, out: Path, window: int = 16) -> bytes:
    if client == "busybox":
        # busybox tftp: lockstep, blksize option, its own retransmission timer
        argv = [require_tool("busybox"), "tftp", "-g", "-b", str(BLK), "-r", name, "-l", str(out),
                "127.0.0.1", str(port)]
    elif client == "curl":
        # curl asks for the RFC 2349 timeout option = its own retry interval, derived from
        # --connect-timeout (300 s default -> 6 s per retransmission; 3 s -> 1 s)
        argv = [require_tool("curl"), "-sS", "--tftp-blksize", str(BLK), "--connect-timeout", "3",
                "-o", str(out), f"tftp://127.0.0.1:{port}/{name}"]
    else:
        argv = [require_tool("atftp"), "--tftp-timeout", "1", "--option", f"windowsize {window}",
                "--option", f"blksize {BLK}", "-g", "-r", name, "-l", str(out), "127.0.0.1", str(port)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{client}: rc={r.returncode} {r.stderr[-800:]}"
    return out.read_bytes()


def idle(d: SidusDaemon) -> None:
    # the client may exit before its last ACK arrives; the server then retries and gives up
    wait_until(lambda: d.ctl_json("status")["active_transfers"] == 0, timeout_s=60, what="0 transfers")


# The lockstep client through loss is busybox tftp, not curl: curl 7.88's TFTP client can stop
# for good after some loss/reorder patterns (it polls its socket, reads nothing and never re-ACKs;
# seen with this relay seed on a quiet machine, against the server of d6e06ac too), so a curl
# case here failed on the client's bug, not the server's. curl stays in the tests below.
@pytest.mark.parametrize("client,loss", [("busybox", 0.10), ("atftp", 0.05), ("atftp", 0.10)])
def test_exact_file_through_loss_dup_reorder(lossy_daemon, tmp_path, client, loss):
    with LossyRelay(lossy_daemon.tftp_port, drop=loss, dup=0.02, reorder=0.02,
                    seed=zlib.crc32(f"{client}/{loss}".encode())) as relay:
        got = fetch(client, relay.port, "small.img", tmp_path / "out")
        stats = relay.stats
    print(f"\nlossy {client} loss={loss}: data_packets={stats.data_packets} "
          f"dropped={stats.dropped} dup={stats.duplicated} reordered={stats.reordered}")
    assert hashlib.sha256(got).hexdigest() == lossy_daemon.small_sha
    assert stats.dropped > 0 and stats.duplicated > 0 and stats.reordered > 0   # the link was lossy
    idle(lossy_daemon)


# impairment -> bound on DATA packets / blocks.  The rule (proto/tftp_session.py,
# ReadSession._on_ack) goes back at most once per flight, so duplication alone costs
# at most 15 resent blocks per 16 new ones (< 2x) even in the worst case; the
# virtual-time model in tests/unit/test_tftp_session.py measures 1.1x (1%) and 1.65x
# (10%).  atftp drops an out-of-order block, so a reorder is a loss to it plus a
# go-back: 1.14x (1%) and 2.5x (10%) in the model.  The bounds leave room for a few
# spurious timeouts (0.2 s timer on a loaded machine: one window each).
AMPLIFICATION_CASES = {
    "dup 1%": (dict(dup=0.01), 1.3),
    "dup 10%": (dict(dup=0.10), 2.0),
    "reorder 1%": (dict(reorder=0.01), 1.3),
    "reorder 10%": (dict(reorder=0.10), 3.0),
}


@pytest.mark.parametrize("case", list(AMPLIFICATION_CASES))
def test_no_window_amplification_under_dup_and_reorder(lossy_daemon, tmp_path, case):
    impair, bound = AMPLIFICATION_CASES[case]
    name = "amp.img"
    path = lossy_daemon.tmp / "tftp" / name
    if not path.exists():
        path.write_bytes(os.urandom(4 * MB + 99))
    data = path.read_bytes()
    blocks = len(data) // BLK + 1
    with LossyRelay(lossy_daemon.tftp_port, seed=zlib.crc32(case.encode()), **impair) as relay:
        got = fetch("atftp", relay.port, name, tmp_path / "out")
        stats = relay.stats
    ratio = stats.data_packets / blocks
    print(f"\namplification {case}: blocks={blocks} data_packets={stats.data_packets} ratio={ratio:.3f} "
          f"dup={stats.duplicated} reordered={stats.reordered}")
    assert got == data
    assert stats.duplicated + stats.reordered > 0              # the link was impaired
    assert blocks <= stats.data_packets <= bound * blocks, ratio
    idle(lossy_daemon)


def test_silent_peer_costs_at_most_retries_windows(lossy_daemon):
    retries, window = lossy_daemon.config["tftp"]["retries"], 8
    c = RawClient(lossy_daemon.tftp_port)
    c.send_request(rrq("small.img", blksize=BLK, windowsize=window))
    op, val = c.recv()
    assert op == OP_OACK and val["windowsize"] == str(window)
    c.send(ack(0))                                 # then silence
    idle(lossy_daemon)
    c.sock.settimeout(0.5)
    try:
        while True:
            c.recv()
    except OSError:
        pass
    c.close()
    sent = sum(len(p) - 4 for p in c.received if p[:2] == b"\x00\x03")
    bound = (1 + retries) * window * BLK
    print(f"\nsilent peer: {sent} bytes of DATA, bound {bound}")
    assert window * BLK <= sent <= bound
    ev = [e for e in lossy_daemon.events() if e.get("event") == "tftp.transfer"][-1]
    assert ev["outcome"] == "timeout", ev


@pytest.mark.parametrize("client", ["curl", "atftp"])
def test_duplicated_acks_do_not_duplicate_data(tmp_path, client):
    d = make_daemon(tmp_path, timeout_s=3.0, retries=3)      # no spurious timeouts
    data = os.urandom(MB + 77)
    (d.tmp / "tftp" / "f.img").write_bytes(data)
    blocks = len(data) // BLK + 1
    with d, LossyRelay(d.tftp_port, dup_acks=True) as relay:
        got = fetch(client, relay.port, "f.img", tmp_path / "out")
        idle(d)
        stats = relay.stats
    print(f"\ndup-acks {client}: blocks={blocks} data_packets={stats.data_packets} acks={stats.acks}")
    assert got == data
    assert stats.acks > 0 and stats.data_packets >= blocks
    assert stats.data_packets <= 1.01 * blocks


def test_big_file_block_wrap_through_lossy_link(lossy_daemon, tmp_path):
    """97 MiB at blksize 1468 is ~69 300 blocks: the 16-bit block number wraps.
    One run, windowed (atftp, window 16), 1% drop + 1% dup + 1% reorder."""
    big = lossy_daemon.tmp / "tftp" / "big.img"
    digest = hashlib.sha256()
    with open(big, "wb") as f:
        for _ in range(97):
            chunk = os.urandom(MB)
            digest.update(chunk)
            f.write(chunk)
    assert big.stat().st_size // BLK > 65535
    try:
        with LossyRelay(lossy_daemon.tftp_port, drop=0.01, dup=0.01, reorder=0.01, seed=97) as relay:
            got = fetch("atftp", relay.port, "big.img", tmp_path / "out")
            stats = relay.stats
        blocks = big.stat().st_size // BLK + 1
        print(f"\nbig: blocks={blocks} data_packets={stats.data_packets} "
              f"ratio={stats.data_packets / blocks:.3f} "
              f"dropped={stats.dropped} dup={stats.duplicated} reordered={stats.reordered}")
        assert len(got) == big.stat().st_size and hashlib.sha256(got).hexdigest() == digest.hexdigest()
        assert stats.dropped > 0
        # 1% drop + 1% dup + 1% reorder: 6.2x with the old rule; the model says ~1.4x
        assert stats.data_packets <= 2.0 * blocks
        idle(lossy_daemon)
    finally:
        big.unlink()
        (tmp_path / "out").unlink(missing_ok=True)

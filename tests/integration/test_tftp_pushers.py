"""TFTP pushers (tftp.pushers): file transfers carried out by processes forked by the worker.

The real sidusd (root supervisor, unprivileged worker) on loopback, real clients (tftpy), real
processes killed with real signals.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time

import pytest

from tests.conftest import poll_until, require_root
from tests.integration.daemon_fixture import SidusDaemon, base_config, free_udp_port

SIZE = 3 << 20          # over PUSH_MIN_BYTES: may go to a pusher


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def status_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def udp_ports(pid: int) -> set[int]:
    """Local UDP ports of the sockets ``pid`` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    with open(f"/proc/{pid}/net/udp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[9] in inodes:
                ports.add(int(cols[1].split(":")[1], 16))
    return ports


@pytest.fixture
def lab(tmp_path):
    require_root()
    pytest.importorskip("tftpy", reason="missing tool: tftpy (pip, pyproject test extra)")
    port = free_udp_port()
    cfg = base_config(tmp_path, port)
    cfg["tftp"].update({"pushers": 2, "max_transfers_per_client": 64, "timeout_s": 0.5, "retries": 3})
    payload = os.urandom(SIZE)
    (tmp_path / "tftp" / "images" / "demo" / "vmlinuz").write_bytes(payload)
    d = SidusDaemon(tmp_path, config=cfg)
    d.tftp_port = port
    d.payload = payload
    d.start()
    try:
        yield d
    finally:
        d.stop()


def worker_and_pushers(d: SidusDaemon) -> tuple[int, list[int]]:
    st = d.ctl_json("status")
    wpid = {p["role"]: p for p in st["processes"]}["worker"]["pid"]
    return wpid, children(wpid)


def counters(d: SidusDaemon) -> dict[str, int]:
    return d.ctl_json("status")["counters"]


def fetch_all(d: SidusDaemon, n: int) -> list[bytes]:
    got: list[bytes] = [b""] * n

    def one(i: int) -> None:
        got[i] = d.tftp_get("images/demo/vmlinuz")
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return got


def raw_rrq(port: int, src: str = "127.0.0.1") -> tuple[socket.socket, tuple[str, int]]:
    """An RRQ for the big file whose DATA is never acknowledged: its transfer holds a slot
    (unconfirmed) for retries x timeout.  Returns the client socket and the server's port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.settimeout(5)
    s.sendto(b"\x00\x01images/demo/vmlinuz\x00octet\x00", ("127.0.0.1", port))
    data, server = s.recvfrom(2048)
    assert data[:4] == b"\x00\x03\x00\x01"
    return s, server


def test_pushers_are_unprivileged_children_of_the_worker_and_carry_transfers(lab):
    wpid, pushers = worker_and_pushers(lab)
    assert len(pushers) == 2
    for pid in pushers:
        st = status_of(pid)
        assert st["Uid"].split()[1] == status_of(wpid)["Uid"].split()[1] != "0"
        assert int(st["CapEff"], 16) == 0 and st["NoNewPrivs"] == "1"
        assert lab.tftp_port not in udp_ports(pid)      # no listening socket: the worker's alone
    # four at once: the worker, pusher A, pusher B, then the worker again (least loaded, tie: here)
    got = fetch_all(lab, 4)
    want = hashlib.sha256(lab.payload).digest()
    assert [hashlib.sha256(g).digest() == want for g in got] == [True] * 4
    ends = [e for e in lab.events() if e.get("event") == "tftp.transfer"]
    assert len(ends) == 4 and all(e["outcome"] == "ok" and e["bytes"] == SIZE for e in ends)
    by = [e.get("pusher") for e in ends]
    assert by.count(None) == 2 and sorted(p for p in by if p) == sorted(pushers), by
    # counted once each, in the supervisor's counters (through the worker)
    assert poll_until(lambda: counters(lab).get("tftp.transfers.done") == 4, 5)
    c = counters(lab)
    assert c["tftp.transfers.started"] == 4 and c["tftp.bytes"] == 4 * SIZE
    assert "tftp.pusher_lost" not in c
    assert lab.ctl_json("status")["active_transfers"] == 0
    # a pusher imports nothing after the privilege drop (forked from the worker, it has it all)
    late = [e.get("module") for e in lab.events() if e.get("event") == "worker.late_import"]
    assert late == [], late
    # a stop ends them with the worker
    assert lab.stop() == 0
    assert poll_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pushers), 5)


def test_a_duplicate_rrq_of_a_pushed_transfer_starts_nothing_and_its_slot_comes_back(lab):
    here, _ = raw_rrq(lab.tftp_port)        # served by the worker
    pushed, src = raw_rrq(lab.tftp_port)    # by a pusher: its transfer port is the pusher's
    _, pushers = worker_and_pushers(lab)
    assert any(src[1] in udp_ports(p) for p in pushers), (src, pushers)
    pushed.sendto(b"\x00\x01images/demo/vmlinuz\x00octet\x00", ("127.0.0.1", lab.tftp_port))
    assert poll_until(lambda: counters(lab).get("tftp.duplicate_rrq") == 1, 5)
    assert counters(lab)["tftp.transfers.started"] == 2
    assert lab.ctl_json("status")["active_transfers"] == 2
    # never acknowledged: both time out (retries x timeout), the slots come back
    assert poll_until(lambda: lab.ctl_json("status")["active_transfers"] == 0, 15)
    assert counters(lab)["tftp.transfers.failed"] == 2
    here.close()
    pushed.close()


def test_a_killed_pusher_fails_its_transfer_and_the_next_request_is_served(lab):
    _here, _ = raw_rrq(lab.tftp_port)
    victim_sock, src = raw_rrq(lab.tftp_port)
    _, pushers = worker_and_pushers(lab)
    victim = next(p for p in pushers if src[1] in udp_ports(p))
    os.kill(victim, signal.SIGKILL)
    assert poll_until(lambda: counters(lab).get("tftp.pusher_lost") == 1, 5)
    lost = [e for e in lab.events() if e.get("event") == "tftp.pusher_lost"]
    assert len(lost) == 1 and lost[0]["pusher"] == victim and lost[0]["transfers"] == 1
    assert counters(lab)["tftp.transfers.failed"] >= 1
    # what follows is served, by the worker and the pusher left
    got = fetch_all(lab, 3)
    assert all(hashlib.sha256(g).digest() == hashlib.sha256(lab.payload).digest() for g in got)
    ends = [e for e in lab.events() if e.get("event") == "tftp.transfer" and e["outcome"] == "ok"]
    assert len(ends) == 3 and victim not in {e.get("pusher") for e in ends}
    assert not os.path.exists(f"/proc/{victim}/status") or status_of(victim)["State"][0] != "Z"
    victim_sock.close()


def test_an_unconfirmed_pushed_transfer_gives_way_at_the_cap_and_is_counted_once(tmp_path):
    """max_transfers 2: a confirmed transfer here, an unconfirmed one in a pusher; a third
    request evicts the pushed one (silently), counted once, and is served."""
    require_root()
    port = free_udp_port()
    cfg = base_config(tmp_path, port)
    cfg["tftp"].update({"pushers": 1, "max_transfers": 2, "max_transfers_per_client": 2,
                        "timeout_s": 2.0, "retries": 3})
    (tmp_path / "tftp" / "images" / "demo" / "vmlinuz").write_bytes(os.urandom(SIZE))
    d = SidusDaemon(tmp_path, config=cfg)
    d.tftp_port = port
    d.start()
    try:
        a, a_src = raw_rrq(port)                        # the worker's: confirmed by its ACK
        a.sendto(b"\x00\x04\x00\x01", a_src)
        assert a.recvfrom(2048)[0][:4] == b"\x00\x03\x00\x02"
        b, b_src = raw_rrq(port)                        # the pusher's: never acknowledged
        _, pushers = worker_and_pushers(d)
        assert b_src[1] in udp_ports(pushers[0])
        time.sleep(0.3)                                 # older than the admission's grace
        c, _ = raw_rrq(port, "127.0.0.2")               # another client, admitted in b's place
        # A pusher reports its counts every REPORT_S, an ended transfer at once: c's start may
        # reach the worker one report after b's eviction (seen once in a clean-clone CI run).
        assert poll_until(lambda: counters(d).get("tftp.transfers.evicted") == 1
                          and counters(d).get("tftp.transfers.started") == 3, 5), counters(d)
        assert counters(d)["tftp.evictions"] == 1
        time.sleep(0.5)                                 # counted once, not by both processes
        assert counters(d)["tftp.transfers.evicted"] == 1
        assert d.ctl_json("status")["active_transfers"] == 2
        b.settimeout(2.5)                               # silent: no retransmission to b
        with pytest.raises(TimeoutError):
            b.recvfrom(2048)
        for s in (a, b, c):
            s.close()
    finally:
        assert d.stop() == 0


def slow_get(port: int, out: list, first: threading.Event, src_port: list) -> None:
    """A lockstep client (blksize 65464) that waits 50 ms before each ACK: about 2.5 s."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(b"\x00\x01images/demo/vmlinuz\x00octet\x00blksize\x0065464\x00", ("127.0.0.1", port))
    data, src = s.recvfrom(70000)
    assert data[:2] == b"\x00\x06"                 # OACK
    src_port.append(src[1])
    first.set()
    s.sendto(b"\x00\x04\x00\x00", src)
    buf, want = bytearray(), 1
    while True:
        data, _ = s.recvfrom(70000)
        if int.from_bytes(data[2:4], "big") != want:
            continue
        buf += data[4:]
        time.sleep(0.05)
        s.sendto(b"\x00\x04" + data[2:4], src)
        want = (want + 1) & 0xFFFF
        if len(data) - 4 < 65464:
            break
    s.close()
    out.append(bytes(buf))


def test_a_stop_with_a_grace_lets_a_pushed_transfer_finish(lab):
    done: list[bytes] = []
    first, src_port = threading.Event(), []
    _here, _ = raw_rrq(lab.tftp_port)              # the worker's share: the next one is pushed
    th = threading.Thread(target=slow_get, args=(lab.tftp_port, done, first, src_port))
    th.start()
    assert first.wait(5)
    _, pushers = worker_and_pushers(lab)
    assert any(src_port[0] in udp_ports(p) for p in pushers)
    t0 = time.monotonic()
    lab.signal(signal.SIGTERM)                     # the stop's grace is 10 s
    th.join(60)
    assert done and hashlib.sha256(done[0]).digest() == hashlib.sha256(lab.payload).digest()
    assert lab.proc.wait(30) == 0
    assert 1.5 < time.monotonic() - t0 < 30        # it waited for the transfer, not for the grace
    assert not any(os.path.exists(f"/proc/{p}") for p in pushers)


def test_pushers_in_the_one_process_layout(tmp_path):
    """security.privsep: false: the daemon forks the pushers itself, before its event loop."""
    require_root()
    pytest.importorskip("tftpy", reason="missing tool: tftpy (pip, pyproject test extra)")
    port = free_udp_port()
    cfg = base_config(tmp_path, port)
    cfg["tftp"].update({"pushers": 1, "max_transfers_per_client": 64})
    cfg["security"] = {"privsep": False}
    payload = os.urandom(SIZE)
    (tmp_path / "tftp" / "images" / "demo" / "vmlinuz").write_bytes(payload)
    d = SidusDaemon(tmp_path, config=cfg)
    d.tftp_port, d.payload = port, payload
    d.start()
    try:
        pushers = children(d.proc.pid)
        assert len(pushers) == 1 and port not in udp_ports(pushers[0])
        got = fetch_all(d, 2)
        assert all(hashlib.sha256(g).digest() == hashlib.sha256(payload).digest() for g in got)
        ends = [e for e in d.events() if e.get("event") == "tftp.transfer"]
        assert sorted(str(e.get("pusher")) for e in ends) == sorted([str(pushers[0]), "None"])
        assert poll_until(lambda: counters(d).get("tftp.transfers.done") == 2, 5)
    finally:
        assert d.stop() == 0
    assert poll_until(lambda: not os.path.exists(f"/proc/{pushers[0]}"), 5)

"""boot.leases (pure allocation, journal replay) and net.leasestore (durable journal on disk)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidusd.boot.leases import Lease, LeaseDB, Reservations
from sidusd.net.leasestore import LeaseStore

run = asyncio.run   # LeaseStore.load / append are coroutines (net.io.LeaseJournal)

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network("10.0.0.0/24")


def db(start="10.0.0.10", end="10.0.0.13"):
    return LeaseDB(NET, IP(start), IP(end))


def bind(d, ip, mac, state="bound", expires=100.0):
    d.apply(Lease(IP(ip), mac, state, expires))


def test_allocation_order():
    d = db()
    assert d.choose("m1", 0) == IP("10.0.0.10")
    bind(d, "10.0.0.10", "m1")
    assert d.choose("m1", 0) == IP("10.0.0.10")                       # current binding
    assert d.choose("m2", 0, requested=IP("10.0.0.12")) == IP("10.0.0.12")   # option 50
    assert d.choose("m2", 0, requested=IP("10.0.0.10")) == IP("10.0.0.11")   # taken: next fresh
    assert d.choose("m2", 0, requested=IP("10.0.0.99")) == IP("10.0.0.11")   # outside range
    res = Reservations.from_pairs([("m3", IP("10.0.0.5")), ("m4", IP("10.0.0.13"))])
    assert d.choose("m3", 0, reservations=res) == IP("10.0.0.5")      # reserved, outside range
    assert d.choose("m5", 0, reservations=res) == IP("10.0.0.11")
    assert d.choose("m5", 0, reservations=res) == IP("10.0.0.11")    # choosing changes nothing
    bind(d, "10.0.0.11", "m5")
    bind(d, "10.0.0.12", "m6")
    assert d.choose("m7", 0, reservations=res) is None                # .13 is m4's
    assert d.choose("m4", 0, reservations=res) == IP("10.0.0.13")


def test_previous_address_after_expiry_and_oldest_reuse():
    d = db("10.0.0.10", "10.0.0.11")
    bind(d, "10.0.0.10", "a", expires=50.0)
    bind(d, "10.0.0.11", "b", expires=60.0)
    assert d.choose("c", 10.0) is None                      # both active: exhausted
    assert d.choose("a", 70.0) == IP("10.0.0.10")           # its own expired address
    assert d.choose("c", 70.0) == IP("10.0.0.10")           # expired longest ago
    bind(d, "10.0.0.10", "c", expires=200.0)
    assert d.by_mac("a") is None and d.by_mac("c").ip == IP("10.0.0.10")
    assert d.choose("a", 70.0) == IP("10.0.0.11")


def test_release_and_decline():
    d = db("10.0.0.10", "10.0.0.10")
    bind(d, "10.0.0.10", "a")
    d.apply(Lease(IP("10.0.0.10"), "a", "free", 5.0))
    assert len(d) == 0 and d.by_mac("a") is None
    assert d.choose("b", 6.0) == IP("10.0.0.10")            # released address reused
    d.apply(Lease(IP("10.0.0.10"), "b", "declined", 100.0))
    assert d.choose("b", 50.0) is None and d.choose("c", 50.0) is None
    assert d.choose("c", 150.0) == IP("10.0.0.10")


def test_one_address_per_client():
    d = db()
    bind(d, "10.0.0.10", "a")
    bind(d, "10.0.0.11", "a")
    assert [l.ip for l in d.leases()] == [IP("10.0.0.11")]


def test_replay_and_compaction_lines():
    d = db()
    lines = [Lease(IP("10.0.0.10"), "a", "bound", 100.0).to_json(),
             "not json", json.dumps({"ip": "10.9.9.9", "mac": "x", "state": "bound", "expires": 1}),
             json.dumps({"ip": "10.0.0.11", "mac": "x", "state": "offered", "expires": 1}),
             Lease(IP("10.0.0.11"), "b", "bound", 100.0).to_json(),
             Lease(IP("10.0.0.11"), "b", "free", 101.0).to_json(),
             Lease(IP("10.0.0.12"), "c", "declined", 50.0).to_json(), ""]
    assert d.replay(lines) == 3
    assert d.by_mac("a").ip == IP("10.0.0.10") and d.by_mac("b") is None
    assert d.journal_lines(10.0) == [lines[0], lines[6]]
    assert d.journal_lines(60.0) == [lines[0]]                # stale decline dropped


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.sampled_from(["offer", "bind", "free"]),
                          st.floats(0, 1000)), max_size=60))
def test_random_operations_keep_invariants(ops):
    d = db()
    now = 0.0
    for mac, op, dt in ops:
        now += dt
        if op == "free":
            cur = d.by_mac(mac)
            if cur:
                d.apply(Lease(cur.ip, mac, "free", now))
            continue
        ip = d.choose(mac, now)
        if ip is None:
            assert all(l.active(now) for l in d.leases()) and len(d) == 4
            continue
        assert d.in_range(ip)
        holder = d.by_ip(ip)
        assert holder is None or not holder.active(now) or holder.mac == mac
        d.apply(Lease(ip, mac, "offered" if op == "offer" else "bound", now + 100))
    macs = [l.mac for l in d.leases() if l.state != "declined"]
    assert len(macs) == len(set(macs)) and len(d) <= 4
    replayed = db()
    replayed.replay(d.journal_lines(now))
    assert [l for l in replayed.leases()] == [l for l in d.leases() if l.state == "bound"]


# -- the store on disk --------------------------------------------------------------

def test_store_append_replay_compact(tmp_path):
    path = tmp_path / "state" / "leases.jsonl"
    store = LeaseStore(path, compact_after=5)
    d = db()
    assert run(store.load(d)) == (0, 0)
    for i, mac in enumerate("abcd"):
        lease = Lease(IP(f"10.0.0.{10 + i}"), mac, "bound", 100.0 + i)
        run(store.append(lease))
        d.apply(lease)
    run(store.append(Lease(IP("10.0.0.13"), "d", "free", 1.0)))
    d.apply(Lease(IP("10.0.0.13"), "d", "free", 1.0))
    assert len(path.read_text().splitlines()) == 5
    assert store.maybe_compact(d, now=0.0) is True            # 5 lines >= compact_after
    assert len(path.read_text().splitlines()) == 3
    assert not list(path.parent.glob("*sidus-tmp*"))
    store.close()
    again = db()
    assert run(LeaseStore(path).load(again)) == (3, 0)
    assert [(l.mac, str(l.ip)) for l in again.leases()] == [("a", "10.0.0.10"), ("b", "10.0.0.11"),
                                                              ("c", "10.0.0.12")]


def test_store_survives_torn_last_line(tmp_path):
    path = tmp_path / "leases.jsonl"
    good = Lease(IP("10.0.0.10"), "a", "bound", 100.0).to_json()
    path.write_text(good + "\n" + good[:17])                  # crash in the middle of a write
    d = db()
    store = LeaseStore(path)
    assert run(store.load(d)) == (1, 1)
    run(store.append(Lease(IP("10.0.0.11"), "b", "bound", 100.0)))
    store.close()
    d2 = db()
    assert run(LeaseStore(path).load(d2)) == (2, 1)               # the torn line does not eat the next
    assert d2.by_mac("b").ip == IP("10.0.0.11")


def test_store_refuses_unwritable_place(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        run(LeaseStore(blocker / "leases.jsonl").load(db()))


def test_store_removes_temps_of_dead_compactions_only(tmp_path):
    """A compaction killed before its rename leaves .leases.jsonl.<pid>.<rand>.sidus-tmp: removed at
    the next load if that process is dead; a live writer's temp is left alone."""
    import subprocess
    import sys
    path = tmp_path / "leases.jsonl"
    path.write_text(Lease(IP("10.0.0.10"), "a", "bound", 100.0).to_json() + "\n")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f".leases.jsonl.{int(dead.stdout)}.0a1b.sidus-tmp"
    stale.write_text("half a compaction")
    alive = tmp_path / f".leases.jsonl.{os.getppid()}.0a1b.sidus-tmp"
    alive.write_text("someone else's")
    other = tmp_path / f".inventory.yaml.{int(dead.stdout)}.0a1b.sidus-tmp"                  # not ours
    other.write_text("x")
    store = LeaseStore(path)
    d = db()
    assert run(store.load(d)) == (1, 0) and store.stale_temps_removed == 1
    assert not stale.exists() and alive.exists() and other.exists()
    store.close()


def test_store_compaction_threshold_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDUSD_LEASE_COMPACT_AFTER", "7")
    assert LeaseStore(tmp_path / "l.jsonl").compact_after == 7
    monkeypatch.setenv("SIDUSD_LEASE_COMPACT_AFTER", "junk")
    assert LeaseStore(tmp_path / "l.jsonl").compact_after == 10_000
    assert LeaseStore(tmp_path / "l.jsonl", compact_after=3).compact_after == 3


def test_offer_to_the_holder_keeps_its_bound_lease(tmp_path):
    """A bound client that DISCOVERs again (PXE reboot) is offered its address; the
    offer (memory only) must not replace the binding, or the next compaction drops
    it and a restart hands the address to someone else."""
    d = db()
    bound = Lease(IP("10.0.0.10"), "a", "bound", 5000.0)
    d.apply(bound)
    d.apply(Lease(IP("10.0.0.10"), "a", "offered", 100.0 + 60))      # DISCOVER at t=100
    assert d.by_mac("a") == bound
    path = tmp_path / "leases.jsonl"
    store = LeaseStore(path, compact_after=1)
    run(store.load(db()))
    store.compact(d, now=100.0)
    store.close()
    again = db()
    run(LeaseStore(path).load(again))
    assert again.by_mac("a") == bound
    assert again.choose("b", now=200.0) != IP("10.0.0.10")
    # a binding that ends before the offer's hold is extended to it, still bound
    d.apply(Lease(IP("10.0.0.11"), "c", "bound", 150.0))
    d.apply(Lease(IP("10.0.0.11"), "c", "offered", 140.0 + 60))
    assert d.by_mac("c") == Lease(IP("10.0.0.11"), "c", "bound", 200.0)
    # an offer to someone else for a free address is still an offer
    d.apply(Lease(IP("10.0.0.12"), "e", "offered", 160.0))
    assert d.by_mac("e").state == "offered"


def test_store_does_not_rewrite_after_every_write_when_leases_outnumber_the_threshold(tmp_path):
    """With more live leases than compact_after, a rewrite leaves more lines than the
    threshold: the next rewrite waits until the journal has doubled."""
    big = LeaseDB(ipaddress.IPv4Network("10.1.0.0/20"), IP("10.1.0.10"), IP("10.1.15.200"))
    store = LeaseStore(tmp_path / "leases.jsonl", compact_after=5)
    run(store.load(big))
    for i in range(20):
        lease = Lease(IP(f"10.1.0.{10 + i}"), f"m{i}", "bound", 1e9)
        run(store.append(lease))
        big.apply(lease)
    assert store.maybe_compact(big, now=0.0) is True and store.lines == 20
    compactions = 0
    for i in range(19):                      # renewals: the live set stays at 20
        lease = Lease(IP(f"10.1.0.{10 + i}"), f"m{i}", "bound", 2e9)
        run(store.append(lease))
        big.apply(lease)
        compactions += store.maybe_compact(big, now=0.0)
    assert compactions == 0 and store.lines == 39
    lease = Lease(IP("10.1.0.29"), "m19", "bound", 2e9)
    run(store.append(lease))
    big.apply(lease)
    assert store.maybe_compact(big, now=0.0) is True and store.lines == 20
    store.close()
    again = LeaseDB(ipaddress.IPv4Network("10.1.0.0/20"), IP("10.1.0.10"), IP("10.1.15.200"))
    reopened = LeaseStore(tmp_path / "leases.jsonl", compact_after=5)
    run(reopened.load(again))
    assert again.leases() == big.leases()
    run(reopened.append(lease))
    assert reopened.maybe_compact(again, now=0.0) is False    # 21 lines < 2 x 20 leases
    reopened.close()


# -- issue 14: hostile clients and a full disk --------------------------------------

def test_an_empty_lease_db_is_true_and_reserved_addresses_stay_with_their_mac():
    """Item 1: ``if db`` skipped the reservations while the DB was empty (len 0)."""
    d = db()
    assert len(d) == 0 and bool(d) is True
    res = Reservations.from_pairs([("owner", IP("10.0.0.11"))])
    assert not d.available_to(IP("10.0.0.11"), "stranger", 0.0, res)
    assert d.available_to(IP("10.0.0.11"), "owner", 0.0, res)
    # a lease on the address that predates the reservation: the owner waits, no second holder
    bind(d, "10.0.0.11", "stranger", expires=100.0)
    assert not d.available_to(IP("10.0.0.11"), "owner", 50.0, res)
    assert d.choose("owner", 50.0, reservations=res) is None
    assert d.available_to(IP("10.0.0.11"), "owner", 150.0, res)        # expired: the owner's


def test_rollback_undoes_a_turn_of_changes():
    """Group commit: a failed journal write undoes the turn's leases (no ACK was sent)."""
    d = db()
    bind(d, "10.0.0.10", "a")
    before = (d.leases(), d.by_mac("a"), d.choose("z", 0.0))
    d.begin()
    bind(d, "10.0.0.11", "b")
    bind(d, "10.0.0.12", "a")                                # a moves: .10 dropped
    d.apply(Lease(IP("10.0.0.11"), "b", "free", 1.0))
    bind(d, "10.0.0.10", "c", state="declined")
    d.rollback()
    assert (d.leases(), d.by_mac("a"), d.choose("z", 0.0)) == before
    assert d.by_mac("b") is None and d.by_mac("c") is None
    d.begin()
    bind(d, "10.0.0.11", "b")
    d.commit()
    d.rollback()                                             # nothing open: no-op
    assert d.by_mac("b").ip == IP("10.0.0.11")


def test_replay_salvages_a_record_glued_to_a_torn_one():
    """Item 4: a torn line then the next record on the same line: the record is kept."""
    good = Lease(IP("10.0.0.11"), "b", "bound", 100.0).to_json()
    torn = Lease(IP("10.0.0.10"), "a", "bound", 100.0).to_json()[:23]
    d = db()
    refused: list = []
    assert d.replay([torn + good], refused) == 1
    assert d.by_mac("b").ip == IP("10.0.0.11") and d.by_mac("a") is None
    assert refused[0][0] == 1 and "not a lease line" in refused[0][1]


class FaultyDisk:
    """os.write that fills the disk after ``room`` bytes (a short write, then ENOSPC)."""

    def __init__(self, room: int):
        self.room = room
        self.fsyncs = 0

    def write(self, fd, view):
        import errno
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = os.write(fd, view[:self.room])
        self.room -= n
        return n

    def fsync(self, fd):
        self.fsyncs += 1
        os.fsync(fd)


def test_append_is_all_or_nothing_on_a_full_disk(tmp_path):
    """Item 4 (pure part, injected faults): the short write is truncated away, so the next
    acknowledged lease is a line of its own and survives the restart."""
    path = tmp_path / "leases.jsonl"
    disk = FaultyDisk(room=10_000)
    store = LeaseStore(path, write=disk.write, fsync=disk.fsync)
    run(store.load(db()))
    first = Lease(IP("10.0.0.10"), "a", "bound", 100.0)
    run(store.append(first))
    size = path.stat().st_size
    disk.room = 30                                            # the next line does not fit
    with pytest.raises(OSError):
        run(store.append(Lease(IP("10.0.0.11"), "b", "bound", 100.0)))
    assert path.stat().st_size == size                        # no torn tail left
    disk.room = 10_000                                        # space freed
    acked = Lease(IP("10.0.0.12"), "c", "bound", 100.0)
    run(store.append(acked))
    store.close()
    again = LeaseStore(path)
    d = db()
    assert run(again.load(d)) == (2, 0) and again.refused == []
    assert d.by_mac("c") == acked and d.by_mac("a") == first and d.by_mac("b") is None
    again.close()


def test_group_append_one_fsync_and_unsynced_declines(tmp_path):
    """Item 5 / item 2: one write + one fsync for a turn's ACKs; a turn of DECLINEs: none."""
    disk = FaultyDisk(room=1 << 20)
    store = LeaseStore(tmp_path / "leases.jsonl", write=disk.write, fsync=disk.fsync)
    run(store.load(db()))
    run(store.append_many([Lease(IP(f"10.0.0.{10 + i}"), f"m{i}", "bound", 100.0) for i in range(4)]))
    assert disk.fsyncs == 1 and store.lines == 4
    run(store.append_many([Lease(IP("10.0.0.10"), "m0", "declined", 700.0)], sync=False))
    assert disk.fsyncs == 1 and store.lines == 5
    store.close()


def test_a_failed_fsync_also_truncates(tmp_path):
    import errno
    path = tmp_path / "leases.jsonl"

    def bad_fsync(fd):
        raise OSError(errno.EIO, "I/O error")
    store = LeaseStore(path, fsync=bad_fsync)
    run(store.load(db()))
    with pytest.raises(OSError):
        run(store.append(Lease(IP("10.0.0.10"), "a", "bound", 100.0)))
    assert path.read_bytes() == b""
    store.close()


def test_real_enospc_on_a_tiny_tmpfs_leaves_no_torn_line(tmp_path):
    """Item 4 with a real full file system: a 64 KiB tmpfs mounted by the test."""
    import subprocess

    from conftest import require_root, require_tool
    require_root()
    require_tool("mount")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "sidus-test-tmpfs", str(mnt)],
                   check=True)
    try:
        path = mnt / "leases.jsonl"
        store = LeaseStore(path)
        run(store.load(db()))
        n = 0
        line = len(Lease(IP("10.0.0.10"), "m00000", "bound", 100.0).to_json()) + 1
        while (path.stat().st_size % 4096) <= 4096 - line // 2 or path.stat().st_size == 0:
            run(store.append(Lease(IP("10.0.0.10"), f"m{n:05d}", "bound", 100.0)))  # the page's end
            n += 1
        fill = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)    # every free page
        try:
            while True:
                os.write(fill, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fill)
        size = path.stat().st_size
        with pytest.raises(OSError) as err:
            run(store.append(Lease(IP("10.0.0.11"), "lost", "bound", 100.0)))
        assert err.value.errno == 28                          # ENOSPC, after a short write
        assert path.stat().st_size == size and path.read_bytes().endswith(b"\n")
        (mnt / "filler").unlink()
        acked = Lease(IP("10.0.0.12"), "acked", "bound", 100.0)
        run(store.append(acked))
        store.close()
        d = db()
        assert run(LeaseStore(path).load(d)) == (n + 1, 0)
        assert d.by_mac("acked") == acked and d.by_mac("lost") is None
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_decline_limiter_per_mac_and_per_interface():
    from sidusd.boot.ratelimit import DeclineLimiter, TokenBuckets
    lim = DeclineLimiter(TokenBuckets(2, 60.0), TokenBuckets(3, 1.0))
    assert lim.allow("a", "eth0", 0.0) and lim.allow("a", "eth0", 0.0)
    assert not lim.allow("a", "eth0", 0.0)                   # the MAC's burst is spent
    assert lim.allow("b", "eth0", 0.0)
    assert not lim.allow("c", "eth0", 0.0)                   # the interface's burst is spent
    assert lim.allow("c", "eth1", 0.0)
    assert lim.allow("c", "eth0", 1.0)                       # one more a second
    assert not lim.allow("a", "eth0", 30.0) and lim.allow("a", "eth0", 61.0)
    small = TokenBuckets(1, 10.0, max_keys=2)
    for k in "xyz":
        small.take(k, 0.0)
    assert len(small) == 2                                    # bounded


def test_decline_only_from_the_holder():
    """Item 2 (policy): another MAC's DECLINE does not touch the lease (RFC 2131 §4.3.3)."""
    from sidusd.boot.dhcp_full import decide_full
    d = db()
    bind(d, "10.0.0.10", "52:54:00:00:00:01")

    class Req:
        def __init__(self, mac):
            from sidusd.proto import dhcp
            self.mac = mac
            self.server_ip = IP("10.0.0.1")
            self.packet = dhcp.DhcpPacket(op=1, xid=1, chaddr=bytes(16), options=(
                (dhcp.OPT_REQUESTED_IP, IP("10.0.0.10").packed), (dhcp.OPT_SERVER_ID, IP("10.0.0.1").packed)))

    class Cfg:
        class dhcp:
            class pool:
                lease_time_s = 600
    from sidusd.proto import dhcp as p
    other = decide_full(Req("52:54:00:00:00:02"), p.DHCPDECLINE, Cfg, None, None, d, Reservations({}, {}), 5.0)
    assert other.code == "decline_not_holder"
    mine = decide_full(Req("52:54:00:00:00:01"), p.DHCPDECLINE, Cfg, None, None, d, Reservations({}, {}), 5.0)
    assert mine.event == "decline" and mine.lease.ip == IP("10.0.0.10")


def test_privsep_lease_append_carries_a_group_and_its_sync_flag():
    """Group commit across the privsep channel: one lease.append with ``more`` and ``sync``."""
    from sidusd.errors import RemoteProtocolError
    from sidusd.privsep import ipc
    one = {"ip": "10.0.0.5", "mac": "52:54:00:00:00:01", "state": "bound", "expires": 100.0}
    two = {**one, "ip": "10.0.0.6", "state": "declined"}
    r = ipc.decode_rpc(json.dumps({"t": "lease.append", "id": 1, "lease": one, "more": [two],
                                   "sync": False}).encode())
    assert r.body == {**one, "more": [two], "sync": False}
    assert ipc.decode_rpc(json.dumps({"t": "lease.append", "id": 2, "lease": one}).encode()).body == one
    with pytest.raises(RemoteProtocolError):
        ipc.decode_rpc(json.dumps({"t": "lease.append", "id": 3, "lease": one,
                                   "more": [one] * (ipc.MAX_MORE_LEASES + 1)}).encode())

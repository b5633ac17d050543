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

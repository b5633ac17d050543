"""Issue 14 item 14, the rest: who claims a MAC survives floods, the lease table is the authority
in full mode, and an admin can clear a conflict (docs/security.md "Per-MAC secrets")."""

from __future__ import annotations

import ipaddress

from test_provider import M1, M2, PXE, UNKNOWN, Clock, _runtime, _served_secret

from sidusd.boot import claims, provider
from sidusd.boot.leases import Lease
from sidusd.observability import MAX_CLIENTS, Observer


def _flood(obs: Observer, n: int) -> None:
    for i in range(n):
        mac = f"02:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:01"
        obs.client_seen(mac, f"10.1.{i >> 8 & 255}.{i & 255}")


def test_a_flood_of_made_up_macs_does_not_evict_an_inventory_hosts_claims(tmp_path):
    """Before: M1's record (its claim from 10.0.0.5) was the least recently seen of 1024 and
    evicted, so the lone spoofed claim from 10.0.0.66 was no conflict and got M1's secret."""
    clock = Clock()
    rt, obs = _runtime(tmp_path, clock=clock)
    obs.client_seen(M1, "10.0.0.5")
    obs.timeline(M1, "tftp.transfer", file="pxelinux.0")
    _flood(obs, MAX_CLIENTS + 500)                           # dhcp.unknown_hosts: default
    assert M1 in obs.clients and obs.clients[M1].timeline[0]["event"] == "tftp.transfer"
    assert len(obs.clients) == MAX_CLIENTS + 1               # still bounded: unknown evict unknown
    obs.client_seen(M1, "10.0.0.66")                         # the lone spoofed claim
    assert obs.clients[M1].as_dict()["conflict"] is True
    out = rt.provide(PXE[M1], "10.0.0.1", "10.0.0.66")
    assert isinstance(out, provider.Refusal) and out.cause == provider.SECRET


def test_unknown_macs_stay_bounded_and_a_removed_host_becomes_evictable():
    obs = Observer(clock=Clock(), max_clients=3)
    obs.set_known([M1, M2])
    for mac in (M1, M2, UNKNOWN):
        obs.client_seen(mac, None)
    _flood(obs, 10)
    assert list(obs.clients)[:2] == [M1, M2] and len(obs.clients) == 5 and UNKNOWN not in obs.clients
    obs.set_known([M2])                                      # M1 left the inventory: evictable again
    assert M1 not in obs.clients and M2 in obs.clients and len(obs.clients) == 4
    obs.restore([])
    assert M2 in obs.clients and len(obs.clients) == 4


def test_in_full_mode_only_the_leased_address_is_a_claim():
    lease = Lease(ipaddress.IPv4Address("10.0.0.101"), M1, "bound", 2000.0)
    assert claims.pxe_claim("10.0.0.101", lease, 1000.0)
    assert not claims.pxe_claim("10.0.0.66", lease, 1000.0)
    assert not claims.pxe_claim("10.0.0.101", lease, 2000.0)          # expired
    assert not claims.pxe_claim("10.0.0.101", None, 1000.0)


def test_a_refused_claim_is_shown_and_counted_but_moves_nothing(tmp_path):
    clock = Clock()
    rt, obs = _runtime(tmp_path, clock=clock)
    obs.client_seen(M1, "10.0.0.101")
    obs.claim_attempt(M1, "10.0.0.66")                       # as net/dhcp_server.py does in full mode
    rec = obs.clients[M1].as_dict()
    assert rec["ip"] == "10.0.0.101" and rec["conflict"] is False
    assert rec["claim_attempts"] == ["10.0.0.66"] and rec["claimed_from"] == ["10.0.0.101"]
    assert obs.counters["dhcp.claims_refused"] == 1
    assert obs.clients[M1].timeline[-1] == {"t": 1000.0, "event": "dhcp.claim_refused", "ip": "10.0.0.66"}
    assert _served_secret(rt.provide(PXE[M1], "10.0.0.1", "10.0.0.101"))
    assert rt.provide(PXE[M1], "10.0.0.1", "10.0.0.66").cause == provider.SECRET
    # the supervisor hears it as a forwarded timeline entry (privsep/reports.py): same record
    other = Observer(clock=clock)
    other.record(M1, 1000.0, "dhcp.claim_refused", {"ip": "10.0.0.66"})
    assert other.clients[M1].as_dict()["claim_attempts"] == ["10.0.0.66"]


def test_clear_claims_ends_a_conflict(tmp_path):
    clock = Clock()
    rt, obs = _runtime(tmp_path, clock=clock)
    obs.client_seen(M1, "10.0.0.5")
    obs.client_seen(M1, "10.0.0.66")
    assert rt.provide(PXE[M1], "10.0.0.1", "10.0.0.66").cause == provider.SECRET
    assert obs.clear_claims(M1) and not obs.clear_claims(UNKNOWN)
    assert obs.clients[M1].as_dict()["conflict"] is False
    obs.client_seen(M1, "10.0.0.5")                          # the real host boots again
    assert _served_secret(rt.provide(PXE[M1], "10.0.0.1", "10.0.0.5"))


def test_the_worker_forgets_the_claims_when_the_supervisor_says_so(tmp_path):
    """privsep: the worker's table is the one the secret guard reads (Runtime._asker)."""
    import socket
    from types import SimpleNamespace

    from sidusd.privsep import ipc
    from sidusd.privsep.worker import Worker

    obs = Observer(clock=Clock())
    obs.client_seen(M1, "10.0.0.5")
    obs.client_seen(M1, "10.0.0.66")
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        w = Worker(child, SimpleNamespace(), obs, SimpleNamespace(error=lambda *a, **k: None), None)
        for dgram in ipc.encode_parent(("clear_claims", M1)):
            parent.send(dgram)
        w._on_ctl()
        assert obs.claimed_from(M1) == () and w.exit_code == 0
    finally:
        parent.close()
        child.close()


def test_rotate_secret_op_pushes_the_new_secret_and_is_audited():
    import asyncio
    from types import SimpleNamespace

    import pytest

    from sidusd.control.ops import InventoryOps
    from sidusd.errors import ControlError

    pushed, lines, rotated = [], [], []

    class Manager:
        def disk(self, mac):
            return object() if mac == M1 else None

        async def rotate(self, mac):
            rotated.append(mac)
            return SimpleNamespace(plan=SimpleNamespace(target_iqn="iqn.x:disk-1", user="sidus-1"))

    async def push():
        pushed.append(True)
    rt = SimpleNamespace(iscsi=Manager(), on_change=[push])
    log = SimpleNamespace(warning=lambda event, **kw: lines.append((event, kw)))

    async def nothing():
        pass
    ops = InventoryOps(rt, log, nothing)
    res = asyncio.run(ops.rotate_secret(M1))
    assert res == {"mac": M1, "target": "iqn.x:disk-1", "user": "sidus-1", "rotated": True}
    assert rotated == [M1] and pushed == [True]
    assert lines == [("control.secret_rotated", {"mac": M1, "target": "iqn.x:disk-1"})]
    with pytest.raises(ControlError, match="has no iSCSI disk"):
        asyncio.run(ops.rotate_secret(M2))

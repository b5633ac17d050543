"""sidusd.privsep.rpc: the worker's requests to the supervisor never block its event loop.

A fake supervisor on the other end of a real SOCK_SEQPACKET pair answers
slowly, out of order, late (after the timeout) or not at all; descriptors
passed with SCM_RIGHTS are closed when nobody takes them.
"""

from __future__ import annotations

import array
import asyncio
import inspect
import itertools
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from sidusd.net.files import NotServable
from sidusd.privsep import rpc, worker
from sidusd.privsep.rpc import InheritedListeners, RpcClient, worker_io


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.setblocking(False)
    return a, b


async def recv_request(sup: socket.socket) -> dict:
    loop = asyncio.get_running_loop()
    return json.loads(await loop.sock_recv(sup, 65536))


def answer(sup: socket.socket, rid: int, fd: int | None = None, **reply) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
    sup.sendmsg([json.dumps({"id": rid, **reply}).encode()], anc)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_a_slow_answer_does_not_stop_the_loop():
    """While the supervisor (a thread here) takes 0.5 s to answer, another coroutine keeps ticking."""
    w, sup = pair()
    sup.setblocking(True)

    def slow_supervisor():
        req = json.loads(sup.recv(65536))
        time.sleep(0.5)
        answer(sup, req["id"], ok=True, size=3)

    async def main():
        client = RpcClient(w, timeout_s=5.0)
        ticks: list[float] = []

        async def ticker():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        t0 = time.monotonic()
        reply, fd = await client.call({"t": "open", "parts": ["f"]})
        elapsed = time.monotonic() - t0
        t.cancel()
        client.close()
        return reply, fd, elapsed, ticks

    th = threading.Thread(target=slow_supervisor)
    th.start()
    try:
        reply, fd, elapsed, ticks = asyncio.run(main())
    finally:
        th.join()
        sup.close()
    assert reply["ok"] and fd is None and elapsed >= 0.5
    assert len(ticks) >= 20                                  # the loop ran all along
    assert max(b - a for a, b in itertools.pairwise(ticks)) < 0.2


def test_answers_out_of_order_reach_their_own_caller():
    async def main():
        w, sup = pair()
        client = RpcClient(w, timeout_s=5.0)
        calls = [asyncio.create_task(client.call({"t": "lease.append", "n": i})) for i in range(3)]
        reqs = [await recv_request(sup) for _ in range(3)]
        for r in reversed(reqs):
            answer(sup, r["id"], ok=True, n=r["n"])
        got = [(await c)[0]["n"] for c in calls]
        client.close()
        sup.close()
        return got

    assert asyncio.run(main()) == [0, 1, 2]


def test_a_timeout_is_per_request_and_a_late_answer_and_its_fd_are_dropped(tmp_path: Path):
    (tmp_path / "f").write_bytes(b"abc")

    async def main():
        w, sup = pair()
        client = RpcClient(w, timeout_s=0.2)
        before = open_fds()
        with pytest.raises(TimeoutError):
            await client.call({"t": "open", "parts": ["f"]}, want_fd=True)
        late = await recv_request(sup)
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        answer(sup, late["id"], fd=fd, ok=True, size=3)     # after the timeout, with a descriptor
        os.close(fd)
        # the next request still works and gets its own answer, not the late one
        nxt = asyncio.create_task(client.call({"t": "lease.load"}))
        req = await recv_request(sup)
        answer(sup, req["id"], ok=True, which="second")
        reply, _ = await nxt
        leaked = open_fds() - before
        client.close()
        sup.close()
        return reply, leaked

    reply, leaked = asyncio.run(main())
    assert reply["which"] == "second"
    assert leaked == set()                                    # the late descriptor was closed


def test_an_unwanted_fd_and_extra_fds_are_closed(tmp_path: Path):
    (tmp_path / "f").write_bytes(b"abc")

    async def main():
        w, sup = pair()
        client = RpcClient(w, timeout_s=5.0)
        before = open_fds()
        call = asyncio.create_task(client.call({"t": "lease.append"}, want_fd=False))
        req = await recv_request(sup)
        fds = [os.open(tmp_path / "f", os.O_RDONLY) for _ in range(2)]
        sup.sendmsg([json.dumps({"id": req["id"], "ok": True}).encode()],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        for fd in fds:
            os.close(fd)
        reply, fd = await call
        leaked = open_fds() - before
        client.close()
        sup.close()
        return reply, fd, leaked

    reply, fd, leaked = asyncio.run(main())
    assert reply["ok"] and fd is None and leaked == set()


def test_a_cancelled_caller_leaves_no_fd_and_a_closed_channel_fails_every_call(tmp_path: Path):
    (tmp_path / "f").write_bytes(b"abc")

    async def main():
        w, sup = pair()
        client = RpcClient(w, timeout_s=5.0)
        before = open_fds()
        call = asyncio.create_task(client.call({"t": "open", "parts": ["f"]}, want_fd=True))
        req = await recv_request(sup)
        call.cancel()
        await asyncio.sleep(0)
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        answer(sup, req["id"], fd=fd, ok=True, size=3)
        os.close(fd)
        with pytest.raises(asyncio.CancelledError):
            await call
        waiting = asyncio.create_task(client.call({"t": "lease.load"}))
        await recv_request(sup)
        await asyncio.sleep(0.05)                           # the late answer is read and dropped
        leaked = open_fds() - before
        sup.close()                                          # the supervisor is gone
        with pytest.raises(OSError):
            await waiting
        with pytest.raises(OSError):
            await client.call({"t": "lease.load"})
        client.close()
        return leaked

    assert asyncio.run(main()) == set()


def test_open_file_is_a_coroutine_with_the_descriptor_or_not_servable(tmp_path: Path):
    (tmp_path / "vmlinuz").write_bytes(b"kernel")

    async def main():
        w, sup = pair()
        io = worker_io(RpcClient(w, timeout_s=5.0), InheritedListeners([]))
        assert inspect.iscoroutinefunction(io.open_file)

        async def supervisor():
            for _ in range(2):
                req = await recv_request(sup)
                if req["parts"] == ["vmlinuz"]:
                    fd = os.open(tmp_path / "vmlinuz", os.O_RDONLY)
                    answer(sup, req["id"], fd=fd, ok=True, size=6)
                    os.close(fd)
                else:
                    answer(sup, req["id"], ok=False, reason="no such file", missing=True)

        s = asyncio.create_task(supervisor())
        fd, size = await io.open_file(Path("/ignored"), ("vmlinuz",))
        data = os.read(fd, 100)
        os.close(fd)
        with pytest.raises(NotServable) as exc:
            await io.open_file(Path("/ignored"), ("nothing",))
        await s
        sup.close()
        return data, size, exc.value.missing

    assert asyncio.run(main()) == (b"kernel", 6, True)


def test_the_worker_patches_no_module():
    """The worker passes a ServiceIO: no assignment into another module's globals, and
    socket.socket stays the real class once the worker's IO is built."""
    real = socket.socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    port = udp.getsockname()[1]
    try:
        io = worker_io(RpcClient(a), InheritedListeners(
            [{"fd": udp.fileno(), "service": "tftp", "kind": "udp", "address": "127.0.0.1",
              "port": port, "device": ""}]))
        assert socket.socket is real
        got = io.listener("tftp", "127.0.0.1", port, rcvbuf=1 << 16)
        assert type(got) is real and got.getsockname() == ("127.0.0.1", port)   # the inherited one
        assert got.fileno() != udp.fileno()
        got.close()
    finally:
        a.close()
        b.close()
        udp.close()
    for mod in (worker, rpc):
        src = inspect.getsource(mod)
        for needle in ("socket.socket = ", "global ", ".open_confined = ", ".LeaseStore = "):
            assert needle not in src, (mod.__name__, needle)


# -- the broker (supervisor side) answering the worker's journal, end to end -------------

class _Obs:
    def __init__(self) -> None:
        self.counters: dict[str, int] = {}

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


class _Log:
    def __getattr__(self, name):
        return lambda *a, **kw: None


def test_the_broker_journals_what_the_remote_journal_sends_in_order(tmp_path: Path):
    """RemoteLeaseJournal (worker) -> Broker (supervisor) -> LeaseStore on disk: load gives the
    journal, appends are answered once written, in the order sent; outside the pool is refused."""
    import dataclasses
    import ipaddress
    from types import SimpleNamespace

    from sidusd.boot.leases import Lease, LeaseDB
    from sidusd.config import DhcpConfig, PoolConfig
    from sidusd.privsep.broker import Broker
    from sidusd.privsep.channel import Refusals
    from sidusd.privsep.lifecycle import WorkerProc
    from sidusd.privsep.rpc import RemoteLeaseJournal

    IP = ipaddress.IPv4Address
    journal = tmp_path / "leases.jsonl"
    journal.write_text(Lease(IP("10.9.0.10"), "52:54:00:00:00:01", "bound", 1e10).to_json() + "\n")
    pool = PoolConfig(ipaddress.IPv4Network("10.9.0.0/24"), IP("10.9.0.10"), IP("10.9.0.20"),
                      lease_file=journal)
    obs = _Obs()
    runtime = SimpleNamespace(observer=obs, config=SimpleNamespace(
        dhcp=dataclasses.replace(DhcpConfig(), mode="full", pool=pool)))

    async def main():
        loop = asyncio.get_running_loop()
        w_sock, s_sock = pair()
        broker = Broker(runtime, Refusals(obs, _Log()), _Log())
        await broker.open_leases()
        proc = SimpleNamespace(pid=0)
        wp = WorkerProc(proc, socket.socket(), s_sock, 0.0, loop.create_future())
        loop.add_reader(s_sock.fileno(), broker.on_readable, wp)
        remote = RemoteLeaseJournal(RpcClient(w_sock, timeout_s=5.0), journal)
        db = LeaseDB.for_pool(pool)
        loaded = await remote.load(db)
        leases = [Lease(IP(f"10.9.0.{11 + i}"), f"52:54:00:00:01:{i:02x}", "bound", 1e10) for i in range(5)]
        await asyncio.gather(*(remote.append(l) for l in leases))
        with pytest.raises(OSError, match="outside the pool"):
            await remote.append(Lease(IP("192.0.2.1"), "52:54:00:00:02:01", "bound", 1e10))
        loop.remove_reader(s_sock.fileno())
        broker.close()
        wp.close()
        w_sock.close()
        return loaded, len(db)

    loaded, in_db = asyncio.run(main())
    assert loaded == (1, 0) and in_db == 1
    lines = [json.loads(l) for l in journal.read_text().splitlines()]
    assert [l["ip"] for l in lines] == ["10.9.0.10"] + [f"10.9.0.{11 + i}" for i in range(5)]
    assert obs.counters["privsep.rpc.lease_append"] == 5
    assert obs.counters["privsep.refused.bad_field"] == 1

"""The bench's DHCP link: a veth pair, the client process on its far end, and the latency probe.

Inside the storm's private namespace: ``sb0`` (10.77.0.1/24) is the server end,
where sidusd (``dhcp.mode: proxy``) or dnsmasq (``dhcp-range=...,proxy`` +
``pxe-service``) answer; ``sc0`` is moved into the namespace of a
:mod:`bench.dhcpclient` process (started with ``unshare --net``) and gets
10.77.0.2/24.  Why a veth and not loopback: a PXE ROM has no address yet and
broadcasts its DISCOVER from 0.0.0.0 out of an Ethernet link, and the proxy
OFFER comes back as a broadcast to port 68; a veth between two namespaces is
that path, and both servers honour it unchanged.  (Both would also answer a
DISCOVER sent unicast to 127.0.0.1:67 on ``lo``, given a 127.0.0.0 range for
dnsmasq: checked, but not what firmware does.)  The transfers (TFTP, HTTP)
stay on the storm side, to the address the DHCP answer named (local to the
storm's namespace).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

from .peers import REPO, BenchSetupError, DhcpSide

CLIENT_IFACE, CLIENT_ADDR = "sc0", "10.77.0.2/24"


class DhcpLink:
    """The veth pair and the client process; ``boot()`` and ``probe()`` talk to it."""

    def __init__(self, side: DhcpSide = DhcpSide()):  # noqa: B008  (frozen dataclass)
        self.side = side
        self.proc: asyncio.subprocess.Process | None = None
        self._waiters: dict[int, asyncio.Future] = {}
        self._probe: asyncio.Future | None = None
        self._next = 0
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        s = self.side
        for argv in (["ip", "link", "add", s.iface, "type", "veth", "peer", "name", CLIENT_IFACE],
                     ["ip", "addr", "add", f"{s.server_ip}/24", "dev", s.iface],
                     ["ip", "link", "set", s.iface, "up"]):
            subprocess.run(argv, check=True, capture_output=True, timeout=10)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = await asyncio.create_subprocess_exec(
            "unshare", "--net", sys.executable, "-m", "bench.dhcpclient", cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        # unshare execs python in the new namespace: its pid names that namespace once it said hello
        assert self.proc.stdout is not None
        try:
            hello = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 60) or b"{}")
        except (TimeoutError, ValueError):
            hello = {}
        if hello.get("hello") != self.proc.pid or hello.get("netns") == os.readlink("/proc/self/ns/net"):
            raise BenchSetupError(f"the DHCP client process did not start in its own namespace: {hello}")
        for _ in range(50):
            r = subprocess.run(["ip", "link", "set", CLIENT_IFACE, "netns", str(self.proc.pid)],
                               capture_output=True, text=True, timeout=10)
            if r.returncode == 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise BenchSetupError(f"cannot move {CLIENT_IFACE} to the DHCP client: {r.stderr.strip()}")
        self._reader = asyncio.create_task(self._read())
        ok = await self._call({"op": "up", "iface": CLIENT_IFACE, "address": CLIENT_ADDR})
        if not ok.get("ok"):
            raise BenchSetupError(f"DHCP client link: {ok}")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            msg = json.loads(line)
            if "probe" in msg:
                if self._probe is not None and not self._probe.done():
                    self._probe.set_result(msg["probe"])
                continue
            fut = self._waiters.pop(msg.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        for fut in [*self._waiters.values(), self._probe]:
            if fut is not None and not fut.done():
                fut.set_exception(BenchSetupError("the DHCP client process exited"))

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())

    async def _call(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._next += 1
        fut = asyncio.get_running_loop().create_future()
        self._waiters[self._next] = fut
        self._send({**obj, "id": self._next})
        return await fut

    async def boot(self, mac: str, ipxe: bool) -> dict[str, Any]:
        """One firmware exchange for ``mac`` (see :mod:`bench.dhcpclient`)."""
        return await self._call({"op": "boot", "mac": mac, "ipxe": ipxe})

    def start_probe(self, count: int, interval_s: float) -> asyncio.Future:
        """Start sequential probes; the future gets the lists of latencies (ms)."""
        self._probe = asyncio.get_running_loop().create_future()
        self._send({"op": "probe", "count": count, "interval_s": interval_s})
        return self._probe

    def stop_probe(self) -> None:
        self._send({"op": "stop"})

    async def close(self) -> None:
        if self.proc is not None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        subprocess.run(["ip", "link", "del", self.side.iface], capture_output=True, timeout=10)

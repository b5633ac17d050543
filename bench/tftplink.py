"""The link between bench.tftpbig's servers and clients: loopback, a veth pair, or two TUN devices
joined by ``wiredelay`` (bench/wiredelay.c), a fixed delay each way in user space.

* ``lo``:   every server and client on 127.0.0.1-4 in the bench's private namespace;
* ``veth``: the servers on 10.78.0.1-4 of ``sv0`` (MTU 9000) here, the clients on 10.78.0.100 of
  ``cl0`` in a second namespace: a jumbo-frame LAN's MTU, no delay;
* ``tun``:  the same addresses on two TUN devices (MTU 9000), every packet handed from one to the
  other by ``wiredelay`` ``rtt_us / 2`` later: a LAN's turnaround (``tc netem delay`` is not
  available: this kernel has no sch_netem).  The relay is one more process on the machine's CPUs,
  the same for every server; what it adds beyond ``rtt_us`` is measured by :meth:`Link.echo_rtt`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

from .peers import BENCH, SERVERS, BenchSetupError
from .rackwire import open_tun

LINKS = ("lo", "veth", "tun")
MTU = 9000
_SOURCE = Path(__file__).resolve().parent / "wiredelay.c"
_BINARY = BENCH / ".peers" / "wiredelay"
ECHO_PROBES = 50                # UDP echoes whose median round trip is reported


def addresses(link: str) -> list[str]:
    base = "127.0.0." if link == "lo" else "10.78.0."
    return [f"{base}{i + 1}" for i in range(len(SERVERS))]


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def build_wiredelay() -> Path:
    """bench/wiredelay.c compiled (again when the source is newer) into bench/.peers/."""
    if _BINARY.exists() and _BINARY.stat().st_mtime >= _SOURCE.stat().st_mtime:
        return _BINARY
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchSetupError("missing tool: cc (package gcc) to build bench/wiredelay.c")
    _BINARY.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([cc, "-O2", "-Wall", "-Werror", "-o", str(_BINARY), str(_SOURCE)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchSetupError(f"building bench/wiredelay.c failed: {r.stderr.strip()[-400:]}")
    return _BINARY


class Link:
    """The link of one run; :meth:`close` removes what it made (the relay stopped by its PID)."""

    def __init__(self, link: str, ns: str, rtt_us: int = 100):
        self.link, self.ns, self.rtt_us = link, ns, rtt_us
        self.relay: subprocess.Popen | None = None
        run("ip", "link", "set", "lo", "up")
        if link == "lo":
            # tftpd-hpa resolves its -a address with AI_ADDRCONFIG, which ignores loopback: an
            # IPv4 address on some other interface is needed (an unused veth end).
            run("ip", "link", "add", "ac0", "type", "veth", "peer", "name", "ac1")
            run("ip", "addr", "add", "10.79.0.1/32", "dev", "ac0")
            return
        run("ip", "netns", "add", ns)
        if link == "veth":
            run("ip", "link", "add", "sv0", "mtu", str(MTU), "type", "veth", "peer", "name", "cl0",
                "mtu", str(MTU))
            run("ip", "link", "set", "cl0", "netns", ns)
        else:
            self._tun_pair()
        for a in addresses(link):
            run("ip", "addr", "add", f"{a}/24", "dev", "sv0")
        run("ip", "link", "set", "sv0", "mtu", str(MTU), "up")
        run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        run("ip", "netns", "exec", ns, "ip", "addr", "add", "10.78.0.100/24", "dev", "cl0")
        run("ip", "netns", "exec", ns, "ip", "link", "set", "cl0", "mtu", str(MTU), "up")

    def _tun_pair(self) -> None:
        binary = build_wiredelay()
        here = open_tun(None, "sv0")
        try:
            there = open_tun(self.ns, "cl0")
        except OSError:
            os.close(here)
            raise
        try:
            self.relay = subprocess.Popen([str(binary), str(here), str(there), str(self.rtt_us // 2)],
                                          pass_fds=(here, there), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
            assert self.relay.stdout is not None
            if self.relay.stdout.readline().strip() != "ready":
                raise BenchSetupError(f"wiredelay did not start: {self.relay.communicate()[1][-400:]}")
        finally:
            os.close(here)              # the relay holds the devices now
            os.close(there)

    def echo_rtt(self, host: str, count: int = ECHO_PROBES) -> float | None:
        """The median round trip (ms) of a UDP echo from the clients' namespace to ``host`` (a
        thread here echoes; ``count`` probes from a Python client there)."""
        if self.link == "lo":
            return None
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        echo.bind((host, 0))
        echo.settimeout(5.0)

        def serve() -> None:
            for _ in range(count):
                try:
                    data, peer = echo.recvfrom(64)
                except OSError:
                    return
                echo.sendto(data, peer)
        th = threading.Thread(target=serve, daemon=True)
        th.start()
        probe = ("import socket,statistics,sys,time\n"
                 "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(2)\n"
                 "a=(sys.argv[1],int(sys.argv[2]));r=[]\n"
                 "for i in range(int(sys.argv[3])):\n"
                 " t=time.perf_counter();s.sendto(b'x',a);s.recv(64);r.append(time.perf_counter()-t)\n"
                 "print(statistics.median(r)*1000)\n")
        try:
            r = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", probe, host,
                                str(echo.getsockname()[1]), str(count)], capture_output=True, text=True,
                               timeout=60)
        finally:
            th.join(10)
            echo.close()
        try:
            return float(r.stdout.strip())
        except ValueError:
            return None

    def close(self) -> str:
        """Stop the relay (its counts are returned) and remove the clients' namespace."""
        counts = ""
        if self.relay is not None and self.relay.poll() is None:
            self.relay.terminate()
            try:
                counts = self.relay.communicate(timeout=10)[1].strip()
            except subprocess.TimeoutExpired:
                self.relay.kill()
                self.relay.wait()
        if self.link != "lo":
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        return counts

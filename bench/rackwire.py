"""A link between two network namespaces with delay and loss, in user space (``tc netem``'s job).

    python -m bench.rackwire --delay-ms 10 --loss-pct 0.5 NS_A:DEV_A:NS_B:DEV_B [...]

For each pair, a TUN device (layer 3, no packet information) is created in each namespace; every
packet read from one is written to the other ``delay_ms / 2`` later (so the round trip over the
link takes ``delay_ms`` more), or dropped with probability ``loss_pct`` %, each way.  Used by
:mod:`bench.rackslib` for the links between racks when the kernel has no ``sch_netem``
(``CONFIG_NET_SCH_NETEM`` is not set in this machine's kernel).  The caller addresses the
devices and brings them up once the process printed ``ready``; it ends on SIGTERM / SIGINT
or when its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import os
import random
import signal
import struct
import sys

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def _tun_here(dev: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def open_tun(ns: str | None, dev: str) -> int:
    """A TUN device named ``dev`` created in namespace ``ns`` (None: this process's); its fd
    (non-blocking)."""
    if ns is None:
        return _tun_here(dev)
    own = f"/proc/{os.getpid()}/ns/net"
    back = os.open(own, os.O_RDONLY)
    try:
        _setns(f"/run/netns/{ns}")
        return _tun_here(dev)
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns(back, CLONE_NEWNET)
        os.close(back)


class Wire:
    def __init__(self, a: int, b: int, delay_s: float, loss: float, rng: random.Random):
        self.fds, self.delay_s, self.loss, self.rng = (a, b), delay_s, loss, rng
        self.counts = {"forwarded": 0, "dropped": 0}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        a, b = self.fds
        loop.add_reader(a, self._pump, loop, a, b)
        loop.add_reader(b, self._pump, loop, b, a)

    def _pump(self, loop: asyncio.AbstractEventLoop, src: int, dst: int) -> None:
        for _ in range(64):
            try:
                pkt = os.read(src, 65536)
            except BlockingIOError:
                return
            if self.loss and self.rng.random() < self.loss:
                self.counts["dropped"] += 1
                continue
            self.counts["forwarded"] += 1
            if self.delay_s:
                loop.call_later(self.delay_s, self._write, dst, pkt)
            else:
                self._write(dst, pkt)

    @staticmethod
    def _write(fd: int, pkt: bytes) -> None:
        try:
            os.write(fd, pkt)
        except OSError:          # the device is down or full: the packet is lost, like on a wire
            pass


async def run(pairs: list[tuple[str, str, str, str]], delay_ms: float, loss_pct: float, seed: int) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    wires = [Wire(open_tun(na, da), open_tun(nb, db), delay_ms / 2000, loss_pct / 100, rng)
             for na, da, nb, db in pairs]
    for w in wires:
        w.start(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not os.read(sys.stdin.fileno(), 4096) else None)
    print("ready", flush=True)
    await stop.wait()
    total = {k: sum(w.counts[k] for w in wires) for k in ("forwarded", "dropped")}
    print(f"wire: {total['forwarded']} packets forwarded, {total['dropped']} dropped", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rackwire", description=__doc__.split("\n\n")[0])
    p.add_argument("--delay-ms", type=float, default=0.0, help="added round-trip time")
    p.add_argument("--loss-pct", type=float, default=0.0, help="each packet dropped with this chance, each way")
    p.add_argument("--seed", type=int, default=19)
    p.add_argument("pairs", nargs="+", help="NS_A:DEV_A:NS_B:DEV_B")
    a = p.parse_args(argv)
    pairs = []
    for s in a.pairs:
        parts = s.split(":")
        if len(parts) != 4:
            p.error(f"{s!r}: expected NS_A:DEV_A:NS_B:DEV_B")
        pairs.append((parts[0], parts[1], parts[2], parts[3]))
    asyncio.run(run(pairs, a.delay_ms, a.loss_pct, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

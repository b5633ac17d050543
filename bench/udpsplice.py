"""How much a block's user-space copy costs a lockstep UDP sender (loopback, no server).

    python3 -m bench.udpsplice                       # blksize 65464 and 8972, 3 rounds each
    python3 -m bench.udpsplice --blksizes 65464 --rounds 5

Two ways to send DATA block i of a file, one block in flight (the receiver, a forked
process, ACKs each datagram and hashes what it got; the hash is checked at the end):

* ``copy``: ``preadv`` into a buffer, then ``sendmsg([header, buffer])``. This is the C
  engine's way (``_runread.c`` then ``sendmmsg``): the page cache is copied to user memory,
  then into the skb.
* ``splice``: ``sendmsg([header], MSG_MORE)`` corks the datagram, and ``os.sendfile``
  appends the block from the page cache (no user copy); the send without MORE ends it.

Printed per round: MB/s and the sender's CPU seconds per GB (``getrusage``), copy then
splice in the same minute. A finding for docs/performance.md ("Session 16"), not a target:
sidusd does not splice. A file that shrinks after the header was corked would leave a
header-only datagram, which is an empty last block: a silently truncated file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import socket
import time

BLOCKS = 4000                         # per pass (262 MB at 65464)
SRC = f"/dev/shm/sidus-udpsplice-{os.getpid()}"   # tmpfs: the page cache, no disk


def _receiver(port_w: int) -> None:
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r.bind(("127.0.0.1", 0))
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    os.write(port_w, r.getsockname()[1].to_bytes(2, "big"))
    h = hashlib.sha256()
    while True:
        d, a = r.recvfrom(70000)
        if d == b"END":
            r.sendto(h.digest(), a)
            return
        h.update(d[4:])
        r.sendto(b"\x00\x04" + d[2:4], a)


def one_round(mode: str, bs: int, digest: bytes, blocks: int = BLOCKS) -> tuple[float, float]:
    """(MB/s, sender CPU s per GB) of one lockstep pass over the file with ``mode``."""
    rp, wp = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _receiver(wp)
        finally:
            os._exit(0)
    os.close(wp)
    fd = os.open(SRC, os.O_RDONLY)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        dest = ("127.0.0.1", int.from_bytes(os.read(rp, 2), "big"))
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        buf = bytearray(bs)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        for i in range(blocks):
            hdr = b"\x00\x03" + ((i + 1) & 0xFFFF).to_bytes(2, "big")
            if mode == "copy":
                n = os.preadv(fd, [buf], i * bs)
                s.sendmsg([hdr, memoryview(buf)[:n]], [], 0, dest)
            else:
                s.sendmsg([hdr], [], socket.MSG_MORE, dest)
                os.sendfile(s.fileno(), fd, i * bs, bs)
            s.recv(16)
        t1, r1 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
        s.sendto(b"END", dest)
        if s.recv(64) != digest:
            raise SystemExit(f"bench.udpsplice: {mode}: the receiver's sha256 differs")
    finally:
        s.close()
        os.close(fd)
        os.close(rp)
        os.waitpid(pid, 0)
    gb = blocks * bs / 1e9
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return gb / (t1 - t0) * 1000, cpu / gb


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 -m bench.udpsplice", description=__doc__.split("\n")[0])
    ap.add_argument("--blksizes", default="65464,8972")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=BLOCKS, help="blocks per pass")
    args = ap.parse_args()
    print(f"start: load {os.getloadavg()[0]:.2f}")
    try:
        for bs in (int(x) for x in args.blksizes.split(",")):
            data = os.urandom(bs * args.blocks)
            with open(SRC, "wb") as f:
                f.write(data)
            digest = hashlib.sha256(data).digest()
            for r in range(args.rounds):
                row = [f"blksize {bs:5d} round {r}"]
                for mode in ("copy", "splice"):
                    mbs, cpu = one_round(mode, bs, digest, args.blocks)
                    row.append(f"{mode} {mbs:6.0f} MB/s {cpu:.3f} s/GB")
                print("  ".join(row), flush=True)
    finally:
        if os.path.exists(SRC):
            os.unlink(SRC)
    print(f"end: load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

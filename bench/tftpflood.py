"""TFTP intake under a flood of forged requests: how long a real client takes to get a file.

    sudo python3 -m bench.tftpflood [--rates 0,2000,10000,max] [--fetches 10] [--code DIR]

The run happens in a private network namespace (``unshare --net``, as
``bench.storm``): sidusd (``python -m sidusd``, from this tree or ``--code``
DIR, e.g. an older checkout for a before/after figure) serves 127.0.0.1:69
with ``max_transfers`` 512 (the default); a raw socket (``IP_HDRINCL``) sends RRQs whose
source addresses are forged across 127.1.0.0/16 (``--sources`` addresses, a
random port each: 127.0.0.0/8 is all loopback, so what the server sends them
goes nowhere and nobody ever ACKs), at each offered rate in ``--rates``
(datagrams/s; ``max``: as fast as one Python thread sends).  Under each rate,
``--fetches`` atftp fetches of a 1 MiB file, one after another, each timed
(wall clock until atftp exits, sha256 checked; a failure is a fetch that did
not get the file within 20 s).  Printed: the rate actually sent, the
fetches' p50 / max seconds and failures, and the server's counters
(``tftp.evictions``, ``tftp.refused.busy``, ``tftp.rx``) read with sidusctl.

``spoofed_rrq`` and ``Flood`` are also used by the integration tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_INNER = "SIDUS_TFTPFLOOD_IN_NETNS"
REPO = Path(__file__).resolve().parent.parent


def ip_udp(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    """An IPv4 + UDP datagram (for a raw ``IP_HDRINCL`` socket: the kernel fills the IP
    checksum; the UDP checksum 0 means none, RFC 768)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr + udp


def rrq(name: bytes, mode: bytes = b"octet", **options: str) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in options.items())
    return b"\0\x01" + name + b"\0" + mode + b"\0" + body


def raw_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    return s


def spoofed_rrq(sock: socket.socket, src: str, sport: int, dst: tuple[str, int], payload: bytes) -> None:
    """Send ``payload`` to ``dst`` as if from ``(src, sport)``."""
    sock.sendto(ip_udp(src, sport, dst[0], dst[1], payload), (dst[0], 0))


def source(i: int, n: int) -> str:
    """The i-th of ``n`` forged source addresses in 127.1.0.0/16."""
    k = i % n
    return f"127.1.{k // 250}.{k % 250 + 1}"


class Flood(threading.Thread):
    """Forged RRQs to ``dst`` from ``sources`` addresses at ``rate`` per second (0: as fast as possible)."""

    def __init__(self, dst: tuple[str, int], rate: float, sources: int = 254,
                 payload: bytes = rrq(b"f", timeout="255")):
        super().__init__(daemon=True)
        self.dst, self.rate, self.sources, self.payload = dst, rate, sources, payload
        self.sent = 0
        self.elapsed = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        sock = raw_socket()
        rnd = random.Random(1)
        t0 = time.monotonic()
        try:
            while not self._halt.is_set():
                for _ in range(50):
                    try:
                        spoofed_rrq(sock, source(self.sent, self.sources), rnd.randrange(1024, 65536),
                                    self.dst, self.payload)
                    except OSError:
                        pass            # ENOBUFS under a flood: the offered rate is what was sent
                    self.sent += 1
                if self.rate:
                    ahead = self.sent / self.rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        finally:
            self.elapsed = time.monotonic() - t0
            sock.close()

    def stop(self) -> float:
        """Stop; the rate actually sent (datagrams/s)."""
        self._halt.set()
        self.join(10)
        return self.sent / self.elapsed if self.elapsed else 0.0


def fetch(port: int, name: str, out: Path, want: str, timeout_s: float = 20.0) -> float | None:
    """One atftp fetch; seconds it took, None if it failed (or the bytes were wrong)."""
    out.unlink(missing_ok=True)
    t0 = time.monotonic()
    try:
        r = subprocess.run(["atftp", "-g", "-r", name, "-l", str(out), "127.0.0.1", str(port)],
                           capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    dt = time.monotonic() - t0
    if r.returncode != 0 or not out.exists() or hashlib.sha256(out.read_bytes()).hexdigest() != want:
        return None
    return dt


def counters(sock_path: Path, code: Path) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "sidusd.ctl", "--socket", str(sock_path), "--json", "status"],
                       capture_output=True, text=True, cwd=code, timeout=30)
    try:
        c = json.loads(r.stdout).get("counters") or {}
    except ValueError:
        return {}
    return {k: v for k, v in c.items() if k in ("tftp.evictions", "tftp.refused.busy", "tftp.rx",
                                                "tftp.refused.flood", "tftp.transfers.done",
                                                "tftp.transfers.failed", "tftp.retransmits")}


def inner(a: argparse.Namespace) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    code = Path(a.code).resolve()
    sys.path.insert(0, str(REPO))
    from bench.peers import stop_server, write_sidusd_config
    with tempfile.TemporaryDirectory(prefix="tftpflood-") as tmp:
        work, root = Path(tmp), Path(tmp) / "root"
        root.mkdir()
        data = os.urandom(1 << 20)
        (root / "f").write_bytes(data)
        (work / "srv").mkdir()
        want = hashlib.sha256(data).hexdigest()
        cfg_path = write_sidusd_config(root, work / "srv", a.max_transfers, 69)
        text = cfg_path.read_text().replace(f"max_transfers_per_client: {a.max_transfers}",
                                            "max_transfers_per_client: 16")
        cfg_path.write_text(text)
        env = {**os.environ, "PYTHONPATH": str(code)}
        proc = subprocess.Popen([sys.executable, "-m", "sidusd", "--config", str(cfg_path)], cwd=code,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        rows = []
        try:
            for _ in range(100):
                if fetch(69, "f", work / "warm", want, 2.0) is not None:
                    break
                time.sleep(0.1)
            for rate_s in a.rates.split(","):
                rate = 0.0 if rate_s == "max" else float(rate_s)
                flood = Flood(("127.0.0.1", 69), rate, a.sources) if rate_s != "0" else None
                before = counters(work / "srv" / "control.sock", code)
                if flood:
                    flood.start()
                    time.sleep(1.0)             # the slots are full by now
                times = [fetch(69, "f", work / "out", want) for _ in range(a.fetches)]
                sent = flood.stop() if flood else 0.0
                after = counters(work / "srv" / "control.sock", code)
                ok = [t for t in times if t is not None]
                rows.append({"offered": rate_s, "sent_pps": round(sent), "fetches": len(times),
                             "failed": len(times) - len(ok),
                             "p50_s": round(statistics.median(ok), 3) if ok else None,
                             "max_s": round(max(ok), 3) if ok else None,
                             **{k: after.get(k, 0) - before.get(k, 0) for k in after}})
                print(json.dumps(rows[-1]), flush=True)
                time.sleep(a.settle_s)
        finally:
            stop_server(proc)
    print("\n| offered/s | sent/s | fetches | failed | p50 s | max s | evictions | busy refusals |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['offered']} | {r['sent_pps']} | {r['fetches']} | {r['failed']} | {r['p50_s']} | "
              f"{r['max_s']} | {r.get('tftp.evictions', 0)} | {r.get('tftp.refused.busy', 0)} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python3 -m bench.tftpflood", description=__doc__.split("\n")[0])
    p.add_argument("--rates", default="0,2000,10000,max", help="offered forged RRQs/s, comma-separated")
    p.add_argument("--fetches", type=int, default=10)
    p.add_argument("--sources", type=int, default=254, help="forged source addresses")
    p.add_argument("--max-transfers", type=int, default=512, help="the config default")
    p.add_argument("--settle-s", type=float, default=2.0, help="pause between rates")
    p.add_argument("--code", default=str(REPO), help="the sidusd tree to run (e.g. an older checkout)")
    a = p.parse_args(argv)
    if os.environ.get(_INNER) == "1":
        return inner(a)
    for tool in ("atftp", "unshare", "ip"):
        if not shutil.which(tool):
            print(f"bench.tftpflood: missing tool: {tool}", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("bench.tftpflood: needs root (a private network namespace, raw sockets)", file=sys.stderr)
        return 2
    env = {**os.environ, _INNER: "1"}
    return subprocess.run(["unshare", "--net", sys.executable, "-m", "bench.tftpflood", *argv],
                          cwd=REPO, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())

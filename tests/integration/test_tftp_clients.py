"""The real TftpService on 127.0.0.1 (high port) against real TFTP clients.

Clients: tftpy (library), curl, atftp, busybox tftp, iPXE + pxelinux in qemu
(e2e), and a scripted raw-socket client for what the others cannot do on
purpose (wrong TID, silence, hostile names byte for byte, the UEFI tsize probe).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import console_text, require_root, require_tool
from structlog.testing import capture_logs

from sidusd import config as config_mod
from sidusd.boot import content, provider
from sidusd.net import files, udpport
from sidusd.net.io import local_io
from sidusd.net.tftp_server import TftpService
from sidusd.observability import Observer
from sidusd.proto import tftp

MAC = "52:54:00:12:34:56"
PXE_DOC = b"DEFAULT sidus\nLABEL sidus\n  KERNEL images/demo/vmlinuz\n  APPEND initrd=images/demo/initrd.img\n"
WAIT_S = 60          # upper bound for anything to happen (never asserted as a duration)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """TftpService in its own event loop thread, with a small runtime."""

    def __init__(self, tmp: Path, io=None, **tftp_cfg):
        self.root = tmp / "root"
        self.root.mkdir()
        self.port = free_port()
        self.observer = Observer()
        self.renders: list[tuple] = []
        self.runtime = SimpleNamespace(config=self.make_config(**tftp_cfg), observer=self.observer,
                                       render=self.render, provide=self.provide)
        self._logs = capture_logs()
        self.events = self._logs.__enter__()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.svc = TftpService(self.runtime, io=io)
        self.call(self.svc.start())

    def make_config(self, root: Path | None = None, **tftp_cfg):
        items = {"root": str(root or self.root), "address": "127.0.0.1", "port": self.port,
                 "timeout_s": 0.5, "retries": 3, **tftp_cfg}
        body = ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in items.items())
        return config_mod.parse(f"dhcp: {{mode: 'off'}}\ntftp: {{{body}}}\n")

    def provide(self, name, server_ip, client_ip):
        """RuntimeView.provide over this stand-in's ``render`` (names resolved as the runtime does)."""
        res = content.resolve(name)
        if isinstance(res, content.Refused):
            return provider.Refusal(provider.NAME, res.reason)
        if isinstance(res, content.StaticPath):
            return provider.FileAt(Path(self.runtime.config.tftp.root), res.parts)
        doc = self.runtime.render(res.kind, res.mac, server_ip, client_ip)
        if doc is None:
            return provider.Refusal(provider.NOT_FOUND, "no document", res.mac)
        return provider.Document(doc, res.kind, res.mac)

    def render(self, kind, mac, server_ip, client_ip):
        self.renders.append((kind, mac, server_ip, client_ip))
        if kind == "pxelinux" and mac == MAC:
            return PXE_DOC
        return None

    def call(self, coro, timeout: float = WAIT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn):
        async def run():
            return fn()
        return self.call(run())

    def counters(self) -> dict:
        return self.on_loop(self.observer.snapshot)

    def wait_idle(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.on_loop(self.svc.active_transfers):
            assert time.monotonic() < deadline, "transfers never ended"
            time.sleep(0.02)

    def transfers(self) -> list[dict]:
        return [e for e in list(self.events) if e["event"] == "tftp.transfer"]

    def close(self) -> None:
        try:
            self.call(self.svc.stop(grace_s=1))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            self._logs.__exit__(None, None, None)


ENGINES = ["accel", "python"]


def use_engine(engine: str, monkeypatch) -> None:
    """Transfer sockets made from now on use the C lockstep engine or the pure-Python path."""
    if engine == "accel":
        if not udpport.ACCEL_BUILT:
            pytest.skip("needs the C extension sidusd.net._lockstep, built by scripts/setup "
                        "(gcc, libc6-dev, python3-dev)")
        monkeypatch.setenv("SIDUS_TFTP_ACCEL", "1")
    else:
        monkeypatch.setenv("SIDUS_TFTP_ACCEL", "0")


@pytest.fixture(params=ENGINES)
def server(tmp_path, request, monkeypatch):
    use_engine(request.param, monkeypatch)
    s = Server(tmp_path)
    s.engine = request.param
    yield s
    s.close()


class Raw:
    """A scripted TFTP client on a UDP socket (for what real clients will not do)."""

    def __init__(self, port: int):
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(10)

    def rrq(self, name: bytes, mode: bytes = b"octet", options: dict | None = None) -> None:
        opts = b"".join(k.encode() + b"\0" + str(v).encode() + b"\0" for k, v in (options or {}).items())
        self.sock.sendto(b"\0\x01" + name + b"\0" + mode + b"\0" + opts, ("127.0.0.1", self.port))

    def recv(self, timeout: float = 10) -> tuple[tftp.Packet, tuple]:
        self.sock.settimeout(timeout)
        data, addr = self.sock.recvfrom(70000)
        return tftp.decode(data), addr

    def send(self, pkt: tftp.Packet, addr) -> None:
        self.sock.sendto(tftp.encode(pkt), addr)

    def get(self, name: bytes, mode: bytes = b"octet", options: dict | None = None):
        """A whole lockstep read; returns (data, oack options)."""
        self.rrq(name, mode, options)
        out, oack, blksize = bytearray(), {}, 512
        pkt, addr = self.recv()
        if isinstance(pkt, tftp.OACK):
            oack = dict(pkt.options)
            blksize = int(oack.get("blksize", 512))
            self.send(tftp.ACK(0), addr)
            pkt, addr = self.recv()
        while True:
            assert isinstance(pkt, tftp.DATA), pkt
            out += pkt.data
            self.send(tftp.ACK(pkt.block), addr)
            if len(pkt.data) < blksize:
                return bytes(out), oack
            pkt, addr = self.recv()

    def close(self) -> None:
        self.sock.close()


# -- real clients -------------------------------------------------------------------

def fetch(client: str, port: int, name: str, out: Path) -> bytes:
    if client == "tftpy":
        import tftpy
        logging.getLogger("tftpy").setLevel(logging.CRITICAL)
        buf = io.BytesIO()
        tftpy.TftpClient("127.0.0.1", port, options={"blksize": 1468}).download(name, buf, timeout=5)
        return buf.getvalue()
    if client == "curl":
        argv = [require_tool("curl"), "-sS", "--tftp-blksize", "1468", "-o", str(out),
                f"tftp://127.0.0.1:{port}/{name}"]
    elif client == "atftp":
        argv = [require_tool("atftp"), "--option", "windowsize 16", "--option", "blksize 1468",
                "--option", "tsize 0", "-g", "-r", name, "-l", str(out), "127.0.0.1", str(port)]
    elif client == "busybox":
        argv = [require_tool("busybox"), "tftp", "-g", "-r", name, "-l", str(out), "-b", "1468",
                "127.0.0.1", str(port)]
    else:
        raise AssertionError(client)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{client}: rc={r.returncode} {r.stderr[-500:]}"
    return out.read_bytes()


CLIENTS = ["tftpy", "curl", "atftp", "busybox"]
EXPECT_WINDOW = {"tftpy": 1, "curl": 1, "atftp": 16, "busybox": 1}


@pytest.mark.parametrize("client", CLIENTS)
def test_client_gets_exact_bytes(server, tmp_path, client) -> None:
    data = os.urandom(3 * 1024 * 1024 + 77)
    (server.root / "images").mkdir()
    (server.root / "images" / "kernel").write_bytes(data)
    got = fetch(client, server.port, "images/kernel", tmp_path / "out")
    assert sha(got) == sha(data)
    server.wait_idle()
    (ev,) = server.transfers()
    assert (ev["file"], ev["bytes"], ev["outcome"], ev["error"]) == ("images/kernel", len(data), "ok", None)
    assert (ev["blksize"], ev["windowsize"]) == (1468, EXPECT_WINDOW[client])
    c = server.counters()
    assert c["tftp.transfers.started"] == c["tftp.transfers.done"] == 1
    assert c["tftp.bytes"] == len(data)
    steps, blocks = c.get("tftp.accel_steps", 0), len(data) // 1468 + 1
    if server.engine == "accel":    # windowed too: the C engine sends whole windows per ACK
        assert steps >= 0.9 * blocks, (steps, blocks)
    else:
        assert steps == 0


@pytest.mark.parametrize("client", ["atftp", "curl"])
def test_rollover_past_65535_blocks(server, tmp_path, client) -> None:
    """97 MiB at blksize 1468 is about 69 300 blocks: the block number wraps to 0."""
    big = server.root / "big.img"
    digest = hashlib.sha256()
    with open(big, "wb") as f:
        for _ in range(97):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            f.write(chunk)
    assert big.stat().st_size // 1468 > 65535
    got = fetch(client, server.port, "big.img", tmp_path / "out")
    assert len(got) == big.stat().st_size and sha(got) == digest.hexdigest()
    server.wait_idle()
    (ev,) = server.transfers()
    assert ev["outcome"] == "ok" and ev["bytes"] == big.stat().st_size


def test_big_blocks_and_big_window_recover_from_overflow(server, tmp_path) -> None:
    """64 x 65464-byte blocks per window (4 MB): more than a UDP socket buffer holds,
    so blocks are lost on the way (send or receive side); RFC 7440 go-back-N and
    the retransmission timer still deliver the exact file."""
    data = os.urandom(20 * 1024 * 1024 + 5)
    (server.root / "rootfs.squashfs").write_bytes(data)
    out = tmp_path / "out"
    r = subprocess.run([require_tool("atftp"), "--option", "windowsize 64", "--option", "blksize 65464",
                        "-g", "-r", "rootfs.squashfs", "-l", str(out), "127.0.0.1", str(server.port)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-500:]
    assert sha(out.read_bytes()) == sha(data)
    server.wait_idle()
    (ev,) = server.transfers()
    assert (ev["blksize"], ev["windowsize"], ev["outcome"]) == (65464, 64, "ok")
    assert server.counters().get("tftp.accel_steps", 0) == 0    # 4 MB a window: Python's path


def fetch_blksize(client: str, port: int, name: str, out: Path, blksize: int) -> bytes:
    """One lockstep read (windowsize 1) at ``blksize`` with a real client."""
    if client == "tftpy":
        import tftpy
        logging.getLogger("tftpy").setLevel(logging.CRITICAL)
        buf = io.BytesIO()
        tftpy.TftpClient("127.0.0.1", port, options={"blksize": blksize}).download(name, buf, timeout=5)
        return buf.getvalue()
    if client == "curl":
        argv = [require_tool("curl"), "-sS", "--tftp-blksize", str(blksize), "-o", str(out),
                f"tftp://127.0.0.1:{port}/{name}"]
    else:
        argv = [require_tool("atftp"), "--option", f"blksize {blksize}", "-g", "-r", name,
                "-l", str(out), "127.0.0.1", str(port)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{client}: rc={r.returncode} {r.stderr[-500:]}"
    return out.read_bytes()


@pytest.mark.parametrize("blksize", [1468, 8972, 65464])
@pytest.mark.parametrize("client", ["atftp", "curl", "tftpy"])
def test_big_lockstep_blocks_exact_bytes_and_taken_in_c(server, tmp_path, client, blksize) -> None:
    """Lockstep at Ethernet, jumbo-frame and the largest block size: the exact bytes with each
    real client, and with the C engine few trips through Python (``tftp.accel_runs``: a
    first run carries up to 32 blocks, each next one twice the last, 512 KiB at most; with a
    fixed 64 KiB a run of 65464-byte blocks was 2 blocks, every other ACK going through
    Python, of 8972-byte blocks 8; without the doubling, 5 MB at 1468 took 80 runs)."""
    data = os.urandom(5 * 1024 * 1024 + 333)
    (server.root / "initrd.img").write_bytes(data)
    got = fetch_blksize(client, server.port, "initrd.img", tmp_path / "out", blksize)
    assert sha(got) == sha(data)
    server.wait_idle()
    (ev,) = server.transfers()
    assert (ev["blksize"], ev["windowsize"], ev["outcome"], ev["bytes"]) == (blksize, 1, "ok", len(data))
    blocks = len(data) // blksize + 1
    c = server.counters()
    steps, runs = c.get("tftp.accel_steps", 0), c.get("tftp.accel_runs", 0)
    if server.engine == "accel":
        assert steps >= blocks - 1, (steps, blocks)
        assert 0 < runs <= blocks / {1468: 200, 8972: 40, 65464: 6}[blksize], (runs, blocks)
    else:
        assert steps == runs == 0


def test_run_bytes_by_block_size() -> None:
    """What a transfer's first lockstep run carries: 64 KiB for small blocks, 32 blocks up to
    512 KiB; each next run after one taken in full, twice the last, up to 512 KiB."""
    from sidusd.net import tftp_accel
    assert tftp_accel.run_bytes(512) == tftp_accel.run_bytes(1468) == 64 * 1024
    assert tftp_accel.run_bytes(8972) == 32 * 8972
    assert tftp_accel.run_bytes(65464) == 512 * 1024
    sizes = [tftp_accel.run_bytes(1468)]
    while len(sizes) < 5:
        sizes.append(tftp_accel.run_bytes(1468, sizes[-1]))
    assert sizes == [64 * 1024, 128 * 1024, 256 * 1024, 512 * 1024, 512 * 1024]
    assert tftp_accel.run_bytes(8972, 32 * 8972) == 512 * 1024
    assert tftp_accel.run_bytes(1468, 1000) == 64 * 1024      # a short last run: never below the first


def test_rendered_per_mac_config_and_tsize(server, tmp_path) -> None:
    name = "pxelinux.cfg/01-" + MAC.replace(":", "-").upper()
    got = fetch("curl", server.port, name, tmp_path / "out")
    assert got == PXE_DOC
    raw = Raw(server.port)
    data, oack = raw.get(name.encode(), options={"tsize": 0, "blksize": 1432})
    raw.close()
    assert data == PXE_DOC and oack == {"tsize": str(len(PXE_DOC)), "blksize": "1432"}
    assert server.renders[0] == ("pxelinux", MAC, "127.0.0.1", "127.0.0.1")
    server.wait_idle()
    assert [e["mac"] for e in server.transfers()] == [MAC, MAC]
    assert [e["event"] for e in server.observer.clients[MAC].timeline] == ["tftp", "tftp"]
    # an unknown MAC renders to None: file not found
    raw = Raw(server.port)
    raw.rrq(b"pxelinux.cfg/01-52-54-00-00-00-99")
    pkt, _ = raw.recv()
    raw.close()
    assert pkt == tftp.ERROR(1, "file not found")


def test_netascii_tsize_is_the_converted_size(server) -> None:
    (server.root / "notes.txt").write_bytes(b"line one\nline\rtwo\n")
    raw = Raw(server.port)
    data, oack = raw.get(b"notes.txt", mode=b"NetASCII", options={"tsize": 0})
    raw.close()
    assert data == b"line one\r\nline\r\x00two\r\n" and oack == {"tsize": str(len(data))}


def test_uefi_tsize_probe_ends_cleanly(server) -> None:
    """UEFI asks tsize, gets the OACK, answers ERROR 8: no failure, no warning."""
    (server.root / "syslinux.efi").write_bytes(b"e" * 4000)
    raw = Raw(server.port)
    raw.rrq(b"syslinux.efi", options={"tsize": 0, "blksize": 1468})
    pkt, addr = raw.recv()
    assert pkt == tftp.OACK((("blksize", "1468"), ("tsize", "4000")))
    raw.send(tftp.ERROR(8, "User aborted the transfer"), addr)
    raw.close()
    server.wait_idle()
    (ev,) = server.transfers()
    assert ev["outcome"] == "probe" and ev["error"] is None and ev["log_level"] == "info"
    c = server.counters()
    assert c.get("tftp.transfers.probe") == 1 and "tftp.transfers.failed" not in c
    assert not [e for e in server.events if e["log_level"] in ("warning", "error")]


def test_wrong_tid_gets_error5_and_transfer_goes_on(server) -> None:
    data = os.urandom(2000)
    (server.root / "f").write_bytes(data)
    raw, stranger = Raw(server.port), Raw(server.port)
    raw.rrq(b"f")
    pkt, addr = raw.recv()
    assert pkt.block == 1
    stranger.send(tftp.ACK(1), addr)                    # a packet from a wrong TID
    err, err_from = stranger.recv()
    assert err.code == 5 and err_from == addr
    got = bytearray(pkt.data)
    while True:
        raw.send(tftp.ACK(pkt.block), addr)
        if len(pkt.data) < 512:
            break
        pkt, _ = raw.recv()
        got += pkt.data
    raw.close()
    stranger.close()
    assert bytes(got) == data
    server.wait_idle()
    assert server.transfers()[0]["outcome"] == "ok" and server.counters()["tftp.wrong_tid"] == 1


def test_file_shrinking_mid_transfer_ends_it_with_an_error(server) -> None:
    """The lockstep fast path reads ahead: a file cut under it is an ERROR to that client
    (not a crash, not garbage), counted as a failed transfer, and the server goes on serving."""
    data = os.urandom(1468 * 200)
    path = server.root / "shrinks.img"
    path.write_bytes(data)
    raw = Raw(server.port)
    raw.rrq(b"shrinks.img", options={"blksize": "1468"})
    pkt, addr = raw.recv()
    assert isinstance(pkt, tftp.OACK)
    raw.send(tftp.ACK(0), addr)
    got = bytearray()
    err = None
    for _ in range(400):
        pkt, _ = raw.recv()
        if isinstance(pkt, tftp.ERROR):
            err = pkt
            break
        got += pkt.data
        if pkt.block == 10:
            with open(path, "r+b") as f:
                f.truncate(60_000)              # the next read-ahead (at 64 KiB) comes up short
        raw.send(tftp.ACK(pkt.block), addr)
    raw.close()
    assert err is not None and err.code == tftp.ERR_UNDEFINED and "read error" in err.message
    assert bytes(got) == data[:len(got)] and len(got) < len(data)
    server.wait_idle()
    (ev,) = [e for e in server.transfers() if e["file"] == "shrinks.img"]
    assert ev["outcome"] == "stopped" and ev["error"] == "read error"
    c = server.counters()
    assert c.get("tftp.transfers.failed") == 1 and "tftp.internal_errors" not in c
    (server.root / "after").write_bytes(b"z" * 5000)
    after = Raw(server.port)
    assert after.get(b"after")[0] == b"z" * 5000
    after.close()


def test_silent_peer_is_dropped_after_retries(server) -> None:
    (server.root / "f").write_bytes(b"x" * 3000)
    raw = Raw(server.port)
    raw.rrq(b"f")
    copies = []
    try:
        while True:
            pkt, _ = raw.recv(timeout=5)
            copies.append(pkt)
    except TimeoutError:
        pass
    raw.close()
    server.wait_idle()
    retries = server.runtime.config.tftp.retries
    assert copies == [tftp.DATA(1, b"x" * 512)] * (retries + 1)
    (ev,) = server.transfers()
    assert ev["outcome"] == "timeout" and ev["retransmits"] == retries and ev["log_level"] == "warning"
    assert server.counters()["tftp.transfers.failed"] == 1


def test_duplicate_acks_cause_no_sends(server) -> None:
    (server.root / "f").write_bytes(b"y" * 1500)
    raw = Raw(server.port)
    raw.rrq(b"f")
    pkt, addr = raw.recv()
    raw.send(tftp.ACK(1), addr)
    pkt2, _ = raw.recv()
    assert pkt2.block == 2
    for _ in range(5):
        raw.send(tftp.ACK(1), addr)                      # duplicates of an old ACK
    raw.send(tftp.ACK(2), addr)
    pkt3, _ = raw.recv()
    assert pkt3 == tftp.DATA(3, b"y" * 476)              # next is block 3, no stray block 2
    raw.send(tftp.ACK(3), addr)
    raw.close()
    server.wait_idle()
    assert server.transfers()[0]["retransmits"] == 0


def test_lockstep_with_a_stall_and_stale_acks_in_both_engines(server) -> None:
    """A long lockstep read with a stall (the timer resends) and stale ACKs (ignored), through
    the C runs or the Python path: the same bytes, one retransmission, no stray DATA; with the
    C engine most steps are taken in C (counted ``tftp.accel_steps``), without it none."""
    data = os.urandom(300_000)                            # 586 blocks of 512 + a short one
    (server.root / "big").write_bytes(data)
    raw = Raw(server.port)
    raw.rrq(b"big")
    got, want_block, stalled, stale = bytearray(), 1, False, False
    pkt, addr = raw.recv()
    while True:
        assert isinstance(pkt, tftp.DATA) and pkt.block == want_block, (pkt, want_block)
        if pkt.block == 100 and not stalled:              # no ACK: the timer resends block 100
            stalled = True
            pkt, _ = raw.recv(timeout=5)
            continue
        if pkt.block == 200 and not stale:                # stale ACKs must not send anything
            stale = True
            for _ in range(3):
                raw.send(tftp.ACK(150), addr)
        got += pkt.data
        raw.send(tftp.ACK(pkt.block), addr)
        if len(pkt.data) < 512:
            break
        want_block += 1
        pkt, _ = raw.recv()
    raw.close()
    assert bytes(got) == data
    server.wait_idle()
    [rec] = server.transfers()
    assert (rec["outcome"], rec["bytes"], rec["retransmits"]) == ("ok", len(data), 1)
    steps = server.counters().get("tftp.accel_steps", 0)
    if server.engine == "accel":
        assert steps >= 500, steps
    else:
        assert steps == 0


# -- hostile names ---------------------------------------------------------------------

def build_hostile_tree(tmp: Path, root: Path) -> list[bytes]:
    secret = tmp / "secret.txt"
    secret.write_bytes(b"SECRET-OUTSIDE-ROOT")
    (tmp / "outdir").mkdir()
    (tmp / "outdir" / "x").write_bytes(b"SECRET-OUTSIDE-ROOT")
    (root / "inside.txt").write_bytes(b"inside")
    (root / "sub").mkdir()
    (root / "link-out").symlink_to(secret)
    (root / "link-in").symlink_to(root / "inside.txt")
    (root / "link-rel").symlink_to("../secret.txt")
    (root / "dirlink").symlink_to(tmp / "outdir")
    os.mkfifo(root / "fifo")
    names = [
        b"../secret.txt", b"/../secret.txt", b"/../../etc/passwd", b"../../../../../../etc/passwd",
        b"sub/../../secret.txt", b"a/../../x", b"..\\secret.txt", b"sub\\..\\..\\secret.txt",
        b"%2e%2e/secret.txt", b"link-out", b"link-in", b"link-rel",
        b"dirlink/x", b"sub", b"sub/", b".", b"./inside.txt", b"fifo", b"a" * 300,
        b"x/" * 120 + b"secret.txt", b"pxelinux.cfg/01-zz-54-00-12-34-56", b"pxelinux.cfg/01-52-54-00",
        b"inside.txt/..", b"inside\ntxt", b"\x1b[2J", b"/etc/passwd", b"//etc/shadow", b"nonexistent",
    ]
    if os.geteuid() == 0:
        os.mknod(root / "devnull", 0o020666, os.makedev(1, 3))
        os.mknod(root / "devzero", 0o020666, os.makedev(1, 5))
        names += [b"devnull", b"devzero"]
    return names


def test_hostile_names_get_errors_and_nothing_from_outside(server, tmp_path) -> None:
    names = build_hostile_tree(tmp_path, server.root)
    assert len(names) >= 20
    raw = Raw(server.port)
    for name in names:
        for mode in (b"octet", b"netascii"):
            raw.rrq(name, mode, {"tsize": 0, "blksize": 1432})
            try:
                pkt, _ = raw.recv()
            except tftp.RemoteProtocolError:
                pytest.fail(f"{name!r}: undecodable reply")
            assert isinstance(pkt, tftp.ERROR), f"{name!r} {mode!r} -> {pkt!r}"
            assert pkt.code in (1, 2, 4), (name, pkt)
            assert b"SECRET" not in pkt.message.encode()
    # Names that make the request itself malformed (a NUL shifts the fields, bad
    # UTF-8): dropped and counted, never answered, never served.
    for name in (b"inside.txt\0../secret.txt", b"\0../secret.txt", b"\xff\xfe/secret.txt"):
        raw.rrq(name)
        with pytest.raises(TimeoutError):
            raw.recv(timeout=0.3)
    raw.close()
    assert server.on_loop(server.svc.active_transfers) == 0
    assert not server.transfers()
    c = server.counters()
    assert c["tftp.malformed"] == 3
    assert "tftp.transfers.started" not in c and c.get("tftp.internal_errors", 0) == 0
    # the server is still fine, and the same tree serves its real file
    raw = Raw(server.port)
    assert raw.get(b"/inside.txt")[0] == b"inside"
    raw.close()


def test_junk_datagrams_are_counted_not_fatal(server) -> None:
    (server.root / "ok").write_bytes(b"fine")
    junk = [b"", b"\x00", b"\x00\x05\x00", b"\x00\x01abc", b"\xff" * 600, b"\x00\x07xx",
            b"\x00\x01f\x00octet\x00blksize\x00", b"\x00\x04\x00\x01", b"\x00\x03\x00\x01data"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for j in junk:
            s.sendto(j, ("127.0.0.1", server.port))
        s.sendto(b"\x00\x02upload\x00octet\x00", ("127.0.0.1", server.port))
        s.settimeout(10)
        err = tftp.decode(s.recvfrom(1000)[0])
        assert isinstance(err, tftp.ERROR) and err.code == 2      # WRQ refused
    raw = Raw(server.port)
    assert raw.get(b"ok")[0] == b"fine"
    raw.close()
    c = server.counters()
    assert c["tftp.malformed"] == 7 and c["tftp.unexpected"] == 2 and c["tftp.refused.write"] == 1
    assert c.get("tftp.internal_errors", 0) == 0


# -- limits, reload, stop ------------------------------------------------------------------

def test_per_client_and_global_limits(tmp_path) -> None:
    s = Server(tmp_path, max_transfers=3, max_transfers_per_client=2)
    try:
        (s.root / "f").write_bytes(b"z" * 5000)
        clients = [Raw(s.port) for _ in range(3)]
        for c in clients[:2]:
            c.rrq(b"f")
            first, addr = c.recv()
            assert isinstance(first, tftp.DATA)
            c.send(tftp.ACK(1), addr)               # confirmed: never evicted for a new request
            assert c.recv()[0] == tftp.DATA(2, b"z" * 512)
        clients[2].rrq(b"f")
        err = clients[2].recv()[0]
        assert isinstance(err, tftp.ERROR) and "too many" in err.message
        assert s.counters()["tftp.refused.per_client"] == 1
        s.runtime.config = s.make_config(max_transfers=2, max_transfers_per_client=2)
        clients[2].rrq(b"f")
        err = clients[2].recv()[0]
        assert isinstance(err, tftp.ERROR) and "busy" in err.message
        assert s.counters()["tftp.refused.busy"] == 1
        for c in clients:
            c.close()
    finally:
        s.close()


def test_reload_never_cuts_a_transfer(server, tmp_path) -> None:
    data = os.urandom(5000)
    (server.root / "f").write_bytes(data)
    raw = Raw(server.port)
    raw.rrq(b"f", options={"blksize": 1000})
    pkt, addr = raw.recv()
    assert pkt == tftp.OACK((("blksize", "1000"),))
    # new config: other root, smaller limits; the old file changes name on disk
    other = tmp_path / "other"
    other.mkdir()
    server.runtime.config = server.make_config(root=other, max_blksize=512, retries=0)
    os.rename(server.root / "f", server.root / "g")
    raw.send(tftp.ACK(0), addr)
    got = bytearray()
    while True:
        pkt, _ = raw.recv()
        got += pkt.data
        raw.send(tftp.ACK(pkt.block), addr)
        if len(pkt.data) < 1000:
            break
    raw.close()
    assert bytes(got) == data
    server.wait_idle()
    assert server.transfers()[0]["outcome"] == "ok"


def test_stop_lets_transfers_finish_then_ends_the_rest(server) -> None:
    (server.root / "f").write_bytes(b"q" * 1200)
    raw = Raw(server.port)
    raw.rrq(b"f")
    pkt, addr = raw.recv()
    stopping = asyncio.run_coroutine_threadsafe(server.svc.stop(grace_s=WAIT_S), server.loop)
    time.sleep(0.1)
    assert not stopping.done()                       # waits for the transfer in flight
    newcomer = Raw(server.port)
    newcomer.rrq(b"f")
    while True:
        raw.send(tftp.ACK(pkt.block), addr)
        if len(pkt.data) < 512:
            break
        pkt, _ = raw.recv()
    stopping.result(WAIT_S)
    assert server.transfers()[0]["outcome"] == "ok"
    with pytest.raises(TimeoutError):
        newcomer.recv(timeout=0.5)                   # nobody listens any more
    raw.close()
    newcomer.close()


class SlowOpener:
    """An ``io.open_file`` that waits for a go-ahead (as the worker's, which asks the supervisor)."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.started = threading.Event()
        self.opened: list[int] = []

    async def __call__(self, root, parts):
        if self.gate is None:
            self.gate = asyncio.Event()
        self.started.set()
        await self.gate.wait()
        fd, size = files.open_confined(root, parts)
        self.opened.append(fd)
        return fd, size

    def go(self, server: Server) -> None:
        server.loop.call_soon_threadsafe(self.gate.set)


def lockstep_rest(raw: Raw, pkt, addr) -> bytes:
    """Read a lockstep transfer to its end from its first DATA (512-byte blocks)."""
    got = bytearray()
    while True:
        assert isinstance(pkt, tftp.DATA), pkt
        got += pkt.data
        raw.send(tftp.ACK(pkt.block), addr)
        if len(pkt.data) < 512:
            return bytes(got)
        pkt, _ = raw.recv()


def test_a_file_opened_asynchronously_counts_while_opening_then_is_served(tmp_path) -> None:
    opener = SlowOpener()
    s = Server(tmp_path, io=local_io(open_file=opener), max_transfers=1, max_transfers_per_client=1)
    try:
        data = os.urandom(3000)
        (s.root / "f").write_bytes(data)
        first, other = Raw(s.port), Raw(s.port)
        first.rrq(b"f")
        assert opener.started.wait(WAIT_S)
        first.rrq(b"f")                                  # resent while the file is being opened
        other.rrq(b"f")
        err = other.recv()[0]
        assert isinstance(err, tftp.ERROR) and "busy" in err.message     # the open in flight counts
        assert s.counters()["tftp.duplicate_rrq"] == 1
        opener.go(s)
        pkt, addr = first.recv()
        assert addr[0] == "127.0.0.1" and addr[1] != s.port      # from the transfer socket
        assert lockstep_rest(first, pkt, addr) == data
        s.wait_idle()
        assert [e["outcome"] for e in s.transfers()] == ["ok"]
        assert s.on_loop(lambda: (dict(s.svc._intake.pending), dict(s.svc._intake.per_client))) == ({}, {})
        first.close()
        other.close()
    finally:
        s.close()


def test_an_open_that_completes_during_the_stop_grace_is_served(tmp_path) -> None:
    opener = SlowOpener()
    s = Server(tmp_path, io=local_io(open_file=opener))
    try:
        data = os.urandom(1500)
        (s.root / "f").write_bytes(data)
        raw = Raw(s.port)
        raw.rrq(b"f")
        assert opener.started.wait(WAIT_S)
        stopping = asyncio.run_coroutine_threadsafe(s.svc.stop(grace_s=WAIT_S), s.loop)
        time.sleep(0.1)
        assert not stopping.done()                       # the admitted request is in flight
        opener.go(s)
        pkt, addr = raw.recv()
        assert lockstep_rest(raw, pkt, addr) == data
        stopping.result(WAIT_S)
        assert [e["outcome"] for e in s.transfers()] == ["ok"]
        raw.close()
    finally:
        s.close()


def test_stop_while_a_file_is_being_opened_leaves_nothing_behind(tmp_path) -> None:
    opener = SlowOpener()
    s = Server(tmp_path, io=local_io(open_file=opener))
    try:
        (s.root / "f").write_bytes(b"x" * 100)
        raw = Raw(s.port)
        raw.rrq(b"f")
        assert opener.started.wait(WAIT_S)
        s.call(s.svc.stop(grace_s=0.3))                  # the open never completes
        assert s.on_loop(lambda: (dict(s.svc._intake.pending), dict(s.svc._intake.per_client),
                                  s.svc.active_transfers(), s.svc._sock)) == ({}, {}, 0, None)
        assert opener.opened == []
        with pytest.raises(TimeoutError):
            raw.recv(timeout=0.3)
        raw.close()
    finally:
        s.close()


def test_stop_after_grace_sends_error(tmp_path) -> None:
    s = Server(tmp_path, timeout_s=30.0)
    (s.root / "f").write_bytes(b"q" * 1200)
    raw = Raw(s.port)
    raw.rrq(b"f")
    raw.recv()
    s.close()                                        # grace 1 s, the client never ACKs
    pkt, _ = raw.recv()
    raw.close()
    assert pkt == tftp.ERROR(0, "server shutting down")
    assert s.transfers()[0]["outcome"] == "stopped"


# -- the whole chain in qemu: iPXE -> pxelinux -> rendered 01-<mac> ------------------------

@pytest.mark.e2e
def test_ipxe_then_pxelinux_boot_through_sidus_tftp(tmp_path) -> None:
    require_tool("qemu-system-x86_64")
    for f in ("/usr/lib/PXELINUX/pxelinux.0", "/usr/lib/syslinux/modules/bios/ldlinux.c32"):
        if not Path(f).exists():
            pytest.skip(f"missing file: {f} (packages pxelinux, syslinux-common)")
    golden = Path(__file__).resolve().parents[1] / "golden" / "tftp"
    sys.path.insert(0, str(golden))
    from pxe_relay import PxeRelay, qemu_argv
    # the production timer (1 s, 5 retries with backoff: 31 s of silence before giving up), not
    # the tightened one of the other tests: a TCG guest on a loaded machine can pause that long
    s = Server(tmp_path, timeout_s=1.0, retries=5)
    marker = "sidus-pxelinux-" + os.urandom(4).hex()
    doc = f"SERIAL 0 115200\nSAY {marker}\nPROMPT 0\nDEFAULT poweroff.c32\n".encode()
    s.runtime.render = lambda kind, mac, srv, cli: doc if (kind, mac) == ("pxelinux", MAC) else None
    for f in ("/usr/lib/PXELINUX/pxelinux.0", "/usr/lib/syslinux/modules/bios/ldlinux.c32",
              "/usr/lib/syslinux/modules/bios/poweroff.c32", "/usr/lib/syslinux/modules/bios/libcom32.c32"):
        shutil.copy(f, s.root)
    relay = PxeRelay(s.port).start()
    log = tmp_path / "serial.log"
    q = subprocess.Popen(qemu_argv(relay.port, log, mac=MAC), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        q.wait(240)                                  # poweroff.c32 ends the VM
    except subprocess.TimeoutExpired:
        pass
    finally:
        if q.poll() is None:
            q.terminate()
            q.wait(10)
        relay.stop()
        s.close()
    text = console_text(log)
    assert marker in text, text[-2000:]
    files = [e["file"] for e in s.transfers() if e["outcome"] == "ok"]
    assert files[:3] == ["pxelinux.0", "ldlinux.c32", "pxelinux.cfg/01-52-54-00-12-34-56"]
    assert relay.first_packets[0] == bytes.fromhex((golden / "ipxe-rrq-pxelinux0.hex").read_text().split()[0])


# -- the real daemon (python3 -m sidusd --config FILE) -------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_real_daemon_serves_every_client_and_refuses_escapes(tmp_path, engine, monkeypatch) -> None:
    """Through the real daemon (supervisor + worker): with the C engine by default, without
    it when sidusd is started with SIDUS_TFTP_ACCEL=0 (the supervisor passes it on)."""
    from daemon_fixture import SidusDaemon
    use_engine(engine, monkeypatch)
    host = {"mac": MAC, "hostname": "node01", "profile": "default", "append": "sidus.test=daemon"}
    d = SidusDaemon(tmp_path, hosts=[host])
    root = Path(d.config["tftp"]["root"])
    data = os.urandom(1_000_003)
    (root / "images" / "demo" / "vmlinuz").write_bytes(data)
    (tmp_path / "secret.txt").write_bytes(b"SECRET")
    (root / "escape").symlink_to(tmp_path / "secret.txt")
    with d:
        for client in CLIENTS:
            got = fetch(client, d.tftp_port, "images/demo/vmlinuz", tmp_path / f"out-{client}")
            assert sha(got) == sha(data), client
        raw = Raw(d.tftp_port)
        doc, oack = raw.get(b"/pxelinux.cfg/01-52-54-00-12-34-56", options={"tsize": 0})
        assert b"sidus.test=daemon" in doc and oack == {"tsize": str(len(doc))}
        for name in (b"../secret.txt", b"escape", b"images/../../secret.txt", b"..\\secret.txt"):
            raw.rrq(name)
            pkt, _ = raw.recv()
            assert isinstance(pkt, tftp.ERROR) and pkt.code in (1, 2), (name, pkt)
        raw.close()
        status = d.ctl_json("status")
    events = [e for e in d.events() if e.get("event") == "tftp.transfer"]
    assert len(events) == len(CLIENTS) + 1 and all(e["outcome"] == "ok" for e in events)
    assert status["counters"]["tftp.transfers.done"] == len(CLIENTS) + 1
    assert status["counters"]["tftp.refused.access"] + status["counters"]["tftp.refused.name"] == 4
    sockets = [e for e in d.events() if e.get("event") == "tftp.transfer_socket"]
    assert sockets and all(e["accel"] is (engine == "accel") for e in sockets)
    steps = status["counters"].get("tftp.accel_steps", 0)
    lockstep_blocks = 3 * (len(data) // 1468)          # curl, busybox, tftpy read in lockstep
    assert steps > 0.9 * lockstep_blocks if engine == "accel" else steps == 0, steps


@pytest.mark.netns
def test_blksize_capped_by_the_mtu_of_the_arrival_interface(tmp_path) -> None:
    """In a namespace whose loopback has MTU 1200, blksize 65464 is cut to 1168."""
    require_root()
    require_tool("ip")
    import yaml
    from daemon_fixture import REPO, RRQ_65464, base_config, base_inventory
    from netns import NetNs
    cfg = base_config(tmp_path, 6969)
    (Path(cfg["tftp"]["root"]) / "f").write_bytes(b"m" * 5000)
    (tmp_path / "sidus.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(base_inventory()))
    (tmp_path / "state").mkdir()
    with NetNs("sidus-t-tftp") as ns:
        ns.run("ip", "link", "set", "lo", "mtu", "1200")
        log = open(tmp_path / "daemon.log", "wb")
        ns.popen([sys.executable, "-m", "sidusd", "--config", str(tmp_path / "sidus.yaml")],
                 stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        r = ns.run(sys.executable, "-c", RRQ_65464, check=False, timeout=60)
        log.close()
    assert r.returncode == 0, r.stderr + (tmp_path / "daemon.log").read_text()[-2000:]
    assert tftp.decode(bytes.fromhex(r.stdout)) == tftp.OACK((("blksize", "1168"),))


@pytest.mark.netns
def test_mtu_is_read_in_the_process_namespace_not_from_sysfs() -> None:
    """In a namespace made with ``unshare --net`` (sysfs still the host's), the MTU that caps
    blksize is this namespace's: lo set to 1200 there reads 1200 (from /sys/class/net the
    host's lo, 65536, was read; a veth there was not found at all and gave 1500)."""
    require_root()
    unshare = require_tool("unshare")
    ip = require_tool("ip")
    code = ("import socket,subprocess,sys\n"
            f"subprocess.run([{ip!r},'link','set','lo','mtu','1200'],check=True)\n"
            "from sidusd.net.tftp_ports import PortRegistry\n"
            "r=PortRegistry(lambda *a: None, None)\n"
            "sys.stdout.write(str(r.mtu_for(socket.if_nametoindex('lo'), 0.0)))\n")
    r = subprocess.run([unshare, "--net", sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-1000:]
    assert r.stdout == "1200"

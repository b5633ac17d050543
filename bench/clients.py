"""The boot storm's simulated TFTP client (atftp, the PXELINUX sequence) and the readiness probes.

Shared by the storm (:mod:`bench.storm`) and the DHCP latency runs
(:mod:`bench.latency`): :func:`run_client` fetches what PXELINUX firmware
fetches, one file after the other, and never raises; :func:`wait_ready` and
:func:`wait_http` wait until a just-started server serves a file.

With a *spool* directory (the storm's, on tmpfs) the kernel and the initrd are written there
by atftp and hashed only after the storm (:func:`verify_spooled`), outside its timing.
Through a pipe, the bench's one Python thread read and hashed every client's bytes while the
storm ran: on session 13's machine that capped window16 at ~481 MB/s for sidusd and atftpd
alike (the same MB/s, each server at ~65 % of one CPU).
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .peers import BenchSetupError

KERNEL = "images/demo/vmlinuz"
INITRD = "images/demo/initrd.img"
BLKSIZE = 1468
MODES = {"lockstep": 1, "window16": 16}          # TFTP modes: windowsize


def mac_of(i: int) -> str:
    return f"52:54:00:be:{(i >> 8) & 0xff:02x}:{i & 0xff:02x}"


SPOOLED = (KERNEL, INITRD)                       # the files a spool takes (the big ones)
SPOOL_BASE = "/dev/shm"                          # where the spool is made (tmpfs)


def client_argv(name: str, mode: str, port: int, host: str = "127.0.0.1",
                out: str = "/dev/stdout", pin: str | None = None) -> list[str]:
    """atftp fetching ``name`` to ``out`` (pinned to CPUs ``pin`` with taskset, if given)."""
    argv = ["taskset", "-c", pin] if pin else []
    argv += ["atftp", "--option", f"blksize {BLKSIZE}", "--tftp-timeout", "2"]
    if MODES[mode] > 1:
        argv += ["--option", f"windowsize {MODES[mode]}"]
    return argv + ["-g", "-r", name, "-l", out, host, str(port)]


async def fetch_to(path: Path, name: str, mode: str, port: int, pin: str | None,
                   host: str = "127.0.0.1") -> tuple[int, int]:
    """One file with atftp, written to ``path``: (returncode, bytes written)."""
    argv = client_argv(name, mode, port, host, str(path), pin)
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    rc = await proc.wait()
    try:
        return rc, path.stat().st_size
    except OSError:
        return rc, 0


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_spooled(rec: dict[str, Any], expect: dict[str, str]) -> None:
    """Hash the files :func:`run_client` spooled for ``rec`` (after the storm), record any
    mismatch, and remove them."""
    for name, path in rec.pop("spooled", []):
        try:
            if sha256_file(path) != expect[name]:
                rec["mismatch"].append(name)
        except OSError as exc:
            rec["failed"].append(f"{name}: spooled copy unreadable: {exc}")
        finally:
            path.unlink(missing_ok=True)


async def fetch(name: str, mode: str, port: int, pin: str | None,
                host: str = "127.0.0.1") -> tuple[int, bytes, str, int]:
    """One file with atftp: (returncode, first 4 KiB, sha256 hex digest, bytes)."""
    argv = client_argv(name, mode, port, host, pin=pin)
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE,
                                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    h, n, head = hashlib.sha256(), 0, b""
    assert proc.stdout is not None
    while chunk := await proc.stdout.read(1 << 20):
        h.update(chunk)
        if n < 4096:
            head += chunk[:4096]
        n += len(chunk)
    rc = await proc.wait()
    return rc, head, h.hexdigest(), n


def spool_dir(need: int) -> Path | None:
    """A directory on tmpfs for the storm's kernel and initrd copies (bench.clients: hashed
    after the storm), or None (hashed through a pipe as they come) if /dev/shm lacks room
    for ``need`` bytes and a quarter more."""
    try:
        free = shutil.disk_usage(SPOOL_BASE).free
    except OSError:
        return None
    if free < need * 1.25:
        print(f"bench.storm: {SPOOL_BASE} has {free // 1_000_000} MB free, {need // 1_000_000} MB wanted: "
              "hashing through a pipe during the storm (the bench's own CPU then counts)", file=sys.stderr)
        return None
    return Path(tempfile.mkdtemp(prefix="sidus-storm-spool-", dir=SPOOL_BASE))


async def run_client(i: int, mode: str, port: int, expect: dict[str, str], delay: float,
                     pin: str | None, spool: Path | None = None) -> dict[str, Any]:
    """Fetch the PXELINUX sequence as client ``i``; never raises.  With ``spool``, the kernel
    and the initrd go to files there, listed in ``rec["spooled"]`` for :func:`verify_spooled`."""
    await asyncio.sleep(delay)
    mac = mac_of(i)
    names = ["pxelinux.0", "ldlinux.c32", "pxelinux.cfg/01-" + mac.replace(":", "-"), KERNEL, INITRD]
    t0 = time.monotonic()
    rec: dict[str, Any] = {"client": i, "bytes": 0, "failed": [], "mismatch": [], "spooled": []}
    for name in names:
        path = spool / f"{i}.{len(rec['spooled'])}" if spool is not None and name in SPOOLED else None
        try:
            if path is not None:
                (rc, n), head, digest = await fetch_to(path, name, mode, port, pin), b"", ""
            else:
                rc, head, digest, n = await fetch(name, mode, port, pin)
        except OSError as exc:
            rec["failed"].append(f"{name}: {exc}")
            continue
        rec["bytes"] += n
        if rc != 0:
            rec["failed"].append(f"{name}: atftp rc {rc}")
            if path is not None:
                path.unlink(missing_ok=True)
        elif path is not None:
            rec["spooled"].append((name, path))       # hashed after the storm: verify_spooled
        elif name in expect:
            if digest != expect[name]:
                rec["mismatch"].append(name)
        elif KERNEL.encode() not in head:           # the per-MAC config
            rec["mismatch"].append(name)
    rec["duration_s"] = time.monotonic() - t0
    rec["end"] = time.monotonic()
    return rec


async def wait_ready(proc: subprocess.Popen, port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchSetupError(f"server exited with {proc.returncode} before serving")
        rc, _h, _d, n = await fetch("pxelinux.0", "lockstep", port, None)
        if rc == 0 and n > 0:
            return
        await asyncio.sleep(0.2)
    raise BenchSetupError(f"server not serving after {timeout_s}s")


async def wait_http(proc: subprocess.Popen, port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchSetupError(f"server exited with {proc.returncode} before serving HTTP")
        p = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--fail", "-o", "/dev/null", f"http://127.0.0.1:{port}/pxelinux.0",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if await p.wait() == 0:
            return
        await asyncio.sleep(0.2)
    raise BenchSetupError(f"server not serving HTTP after {timeout_s}s")

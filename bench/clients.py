"""The boot storm's simulated TFTP client (atftp, the PXELINUX sequence) and the readiness probes.

Shared by the storm (:mod:`bench.storm`) and the DHCP latency runs
(:mod:`bench.latency`): :func:`run_client` fetches what PXELINUX firmware
fetches, one file after the other, and never raises; :func:`wait_ready` and
:func:`wait_http` wait until a just-started server serves a file.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import time
from typing import Any

from .peers import BenchSetupError

KERNEL = "images/demo/vmlinuz"
INITRD = "images/demo/initrd.img"
BLKSIZE = 1468
MODES = {"lockstep": 1, "window16": 16}          # TFTP modes: windowsize


def mac_of(i: int) -> str:
    return f"52:54:00:be:{(i >> 8) & 0xff:02x}:{i & 0xff:02x}"


def client_argv(name: str, mode: str, port: int, host: str = "127.0.0.1") -> list[str]:
    argv = ["atftp", "--option", f"blksize {BLKSIZE}", "--tftp-timeout", "2"]
    if MODES[mode] > 1:
        argv += ["--option", f"windowsize {MODES[mode]}"]
    return argv + ["-g", "-r", name, "-l", "/dev/stdout", host, str(port)]


async def fetch(name: str, mode: str, port: int, pin: str | None,
                host: str = "127.0.0.1") -> tuple[int, bytes, str, int]:
    """One file with atftp: (returncode, first 4 KiB, sha256 hex digest, bytes)."""
    argv = client_argv(name, mode, port, host)
    if pin:
        argv = ["taskset", "-c", pin, *argv]
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


async def run_client(i: int, mode: str, port: int, expect: dict[str, str], delay: float,
                     pin: str | None) -> dict[str, Any]:
    """Fetch the PXELINUX sequence as client ``i``; never raises."""
    await asyncio.sleep(delay)
    mac = mac_of(i)
    names = ["pxelinux.0", "ldlinux.c32", "pxelinux.cfg/01-" + mac.replace(":", "-"), KERNEL, INITRD]
    t0 = time.monotonic()
    rec: dict[str, Any] = {"client": i, "bytes": 0, "failed": [], "mismatch": []}
    for name in names:
        try:
            rc, head, digest, n = await fetch(name, mode, port, pin)
        except OSError as exc:
            rec["failed"].append(f"{name}: {exc}")
            continue
        rec["bytes"] += n
        if rc != 0:
            rec["failed"].append(f"{name}: atftp rc {rc}")
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

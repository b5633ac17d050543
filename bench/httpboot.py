"""The HTTP-mode client of the boot storm: what a BIOS machine chainloading iPXE does.

1. proxyDHCP as a PXE ROM (DISCOVER -> OFFER, REQUEST on 4011 -> ACK) over the
   bench's DHCP link: the answer names ``undionly.kpxe`` (``boot.ipxe_chain``);
2. that file over TFTP (atftp, blksize 1468, lockstep: a PXE ROM) from the
   server the answer named;
3. proxyDHCP again as iPXE (option 77 ``iPXE``): the OFFER carries the URL of
   this machine's iPXE script (iPXE then skips port 4011);
4. the script over HTTP (curl), which must name the kernel;
5. the kernel and the initrd the script names, one ``curl`` process for both
   (HTTP/1.1, one keep-alive connection, as iPXE fetches them), hashed as they
   arrive and split at the kernel's size.

Every file is checked against the sha256 of what was served.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import time
from typing import Any

IPXE_BINARY = "undionly.kpxe"


async def curl(urls: list[str], sizes: list[int] | None, timeout_s: float) -> tuple[int, list[str], int, bytes]:
    """GET ``urls`` with one curl process; (rc, sha256 per url, bytes, first 4 KiB).

    With ``sizes`` the output stream is split at those sizes to hash each file
    (curl writes the bodies one after the other).
    """
    argv = ["curl", "-sS", "--fail", "--http1.1", "--max-time", str(int(timeout_s)), *urls]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    limits = list(sizes or [])
    hashes, h, left, n, head = [], hashlib.sha256(), (limits.pop(0) if limits else None), 0, b""
    while chunk := await proc.stdout.read(1 << 20):
        if n < 4096:
            head += chunk[:4096]
        n += len(chunk)
        while chunk:
            if left is None:
                h.update(chunk)
                break
            part, chunk = chunk[:left], chunk[left:]
            h.update(part)
            left -= len(part)
            if left == 0:
                hashes.append(h.hexdigest())
                h, left = hashlib.sha256(), (limits.pop(0) if limits else None)
    rc = await proc.wait()
    if left is None or left > 0 or not hashes:
        hashes.append(h.hexdigest())
    return rc, hashes, n, head


def script_urls(text: str) -> tuple[str | None, str | None]:
    """The kernel and initrd URLs of an iPXE script (``kernel URL ...``, ``initrd [--name N] URL``)."""
    kernel = initrd = None
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "kernel" and len(words) > 1:
            kernel = words[1]
        elif words[0] == "initrd":
            args, j = words[1:], 0
            while j < len(args) and args[j].startswith("--"):
                j += 2 if args[j] in ("--name", "-n") else 1
            initrd = args[j] if j < len(args) else None
    return kernel, initrd


async def run_http_client(i: int, link: Any, fetch: Any, expect: dict[str, str], sizes: dict[str, int],
                          kernel: str, initrd: str, mac: str, delay: float,
                          timeout_s: float) -> dict[str, Any]:
    """Boot client ``i`` the iPXE/HTTP way; never raises (failures are in the record)."""
    await asyncio.sleep(delay)
    t0 = time.monotonic()
    rec: dict[str, Any] = {"client": i, "bytes": 0, "failed": [], "mismatch": [], "dhcp_ms": []}
    try:
        await _boot(rec, link, fetch, expect, sizes, kernel, initrd, mac, timeout_s)
    except Exception as exc:            # a client's failure is data, not a crash of the bench
        rec["failed"].append(f"{type(exc).__name__}: {exc}")
    rec["duration_s"] = time.monotonic() - t0
    rec["end"] = time.monotonic()
    return rec


async def _boot(rec: dict[str, Any], link: Any, fetch: Any, expect: dict[str, str], sizes: dict[str, int],
                kernel: str, initrd: str, mac: str, timeout_s: float) -> None:
    pxe = await link.boot(mac, False)
    rec["dhcp_ms"] += [x for x in (pxe.get("offer_ms"), pxe.get("ack_ms")) if x is not None]
    if not pxe.get("ok") or pxe.get("file") != IPXE_BINARY:
        rec["failed"].append(f"dhcp (PXE ROM): {pxe.get('error') or pxe.get('file')!r}")
        return
    rc, _head, digest, n = await fetch(IPXE_BINARY, "lockstep", 69, None, host=pxe["siaddr"])
    rec["bytes"] += n
    if rc != 0:
        rec["failed"].append(f"{IPXE_BINARY}: atftp rc {rc}")
        return
    if digest != expect[IPXE_BINARY]:
        rec["mismatch"].append(IPXE_BINARY)
    ipxe = await link.boot(mac, True)
    rec["dhcp_ms"] += [x for x in (ipxe.get("offer_ms"),) if x is not None]
    url = ipxe.get("file") or ""
    if not ipxe.get("ok") or not url.startswith("http://"):
        rec["failed"].append(f"dhcp (iPXE): {ipxe.get('error') or url!r}")
        return
    rc, _hs, n, head = await curl([url], None, timeout_s)
    rec["bytes"] += n
    if rc != 0:
        rec["failed"].append(f"script: curl rc {rc}")
        return
    kurl, iurl = script_urls(head.decode("ascii", "replace"))
    if kurl is None or iurl is None or not kurl.endswith("/" + kernel) or not iurl.endswith("/" + initrd):
        rec["mismatch"].append("ipxe-script")
        return
    rc, hashes, n, _ = await curl([kurl, iurl], [sizes[kernel], sizes[initrd]], timeout_s)
    rec["bytes"] += n
    if rc != 0:
        rec["failed"].append(f"kernel+initrd: curl rc {rc}")
    if n != sizes[kernel] + sizes[initrd]:
        rec["failed"].append(f"kernel+initrd: {n} bytes, expected {sizes[kernel] + sizes[initrd]}")
    for name, got in zip((kernel, initrd), hashes, strict=False):
        if got != expect[name]:
            rec["mismatch"].append(name)

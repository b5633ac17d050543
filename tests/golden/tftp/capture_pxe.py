"""Re-capture the golden packets of real PXE firmware (run by hand, needs qemu).

    python3 tests/golden/tftp/capture_pxe.py bios    # iPXE ROM -> pxelinux.0 -> ldlinux.c32 -> 01-<mac>
    python3 tests/golden/tftp/capture_pxe.py uefi    # OVMF PXE (tsize probe) -> syslinux.efi -> ldlinux.e64

Serves a throw-away TFTP root with sidus's own TftpService on 127.0.0.1 (high port)
through pxe_relay.PxeRelay, and writes every distinct client packet it saw as
<firmware>-<kind>-<n>.hex next to this file for review (rename the ones to keep).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE))

from pxe_relay import OVMF_VARS, PxeRelay, qemu_argv  # noqa: E402

from sidusd import config as config_mod  # noqa: E402
from sidusd.boot import content, provider  # noqa: E402
from sidusd.net.tftp_server import TftpService  # noqa: E402
from sidusd.observability import Observer  # noqa: E402

CFG = b"SERIAL 0 115200\nSAY sidus-pxe-marker\nPROMPT 0\nDEFAULT poweroff.c32\n"


def main(fw: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="sidus-cap-"))
    root = tmp / "root"
    root.mkdir()
    if fw == "bios":
        shutil.copy("/usr/lib/PXELINUX/pxelinux.0", root)
        mods, boot = Path("/usr/lib/syslinux/modules/bios"), "pxelinux.0"
    else:
        shutil.copy("/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi", root)
        mods, boot = Path("/usr/lib/syslinux/modules/efi64"), "syslinux.efi"
    for m in ("ldlinux.c32", "ldlinux.e64", "poweroff.c32", "libcom32.c32"):
        if (mods / m).exists():
            shutil.copy(mods / m, root)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config_mod.parse(f"dhcp: {{mode: 'off'}}\ntftp: {{root: '{root}', address: 127.0.0.1, port: {port}}}\n")
    def provide(name, server, client):      # RuntimeView.provide: every pxelinux config is CFG
        res = content.resolve(name)
        if isinstance(res, content.Refused):
            return provider.Refusal(provider.NAME, res.reason)
        if isinstance(res, content.StaticPath):
            return provider.FileAt(root, res.parts)
        if res.kind == "pxelinux":
            return provider.Document(CFG, res.kind, res.mac)
        return provider.Refusal(provider.NOT_FOUND, "not rendered here", res.mac)
    rt = SimpleNamespace(config=cfg, observer=Observer(), provide=provide)
    loop = asyncio.new_event_loop()
    svc = TftpService(rt)
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    asyncio.run_coroutine_threadsafe(svc.start(), loop).result()
    relay = PxeRelay(port, bootfile=boot).start()
    vars_copy = None
    if fw == "uefi":
        vars_copy = tmp / "vars.fd"
        shutil.copy(OVMF_VARS, vars_copy)
    log = tmp / "serial.log"
    q = subprocess.Popen(qemu_argv(relay.port, log, uefi_vars=vars_copy))
    try:
        q.wait(180)
    except subprocess.TimeoutExpired:
        q.terminate()
        q.wait(10)
    relay.stop()
    asyncio.run_coroutine_threadsafe(svc.stop(1), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    seen: list[bytes] = []          # requests, errors, and ACK 0 / ACK 1 once each
    for p in relay.guest_payloads:
        keep = p[:2] != b"\x00\x04" or p[:4] in (b"\x00\x04\x00\x00", b"\x00\x04\x00\x01")
        if keep and p not in seen:
            seen.append(p)
    kinds = {1: "rrq", 4: "ack", 5: "error"}
    for i, p in enumerate(seen):
        kind = kinds.get(int.from_bytes(p[:2], "big"), "other")
        (HERE / f"{fw}-{kind}-{i}.hex").write_text(p.hex() + "\n")
        print(f"{fw}-{kind}-{i}", p)
    print("counters", rt.observer.snapshot())
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bios")

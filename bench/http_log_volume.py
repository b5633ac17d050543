"""Log bytes written for N refused HTTP connections (issue 14 item 11).

    python -m bench.http_log_volume 20000 2>/tmp/http.log; wc -c /tmp/http.log

The real HttpService over a real Runtime on 127.0.0.1, logging JSON lines to
stderr (as under journald), ``max_per_client=1``: one connection is held open
and N more from the same address are each refused (503, ``http.refused``).
Prints (to stdout) the refusals counted and how long the flood took; the log
volume is what ``wc -c`` says.  Uses only the HttpService API that existed
before the log limiter, so the same command measures the old code
(``PYTHONPATH=<old checkout>``).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from sidusd.net.http_server import HttpService
from sidusd.observability import setup_logging
from sidusd.runtime import Runtime


def main(n: int) -> None:
    setup_logging("json", "info")
    tmp = Path(tempfile.mkdtemp(prefix="sidus-logvol-"))
    (tmp / "tftp").mkdir()
    (tmp / "image").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {"state_dir": str(tmp / "state"), "inventory_file": str(tmp / "inventory.yaml"),
           "dhcp": {"mode": "off"}, "tftp": {"enabled": False, "root": str(tmp / "tftp")},
           "http": {"enabled": True, "address": "127.0.0.1", "port": port},
           "nfs": {"backend": "none", "server_address": "10.13.20.1"},
           "images": {"demo": {"root": str(tmp / "image"), "kernel": "demo/vmlinuz",
                               "initrd": "demo/initrd.img", "append": ""}}}
    (tmp / "sidus.yaml").write_text(yaml.safe_dump(cfg))
    profile = {"image": "demo", "overlay": "tmpfs", "append": ""}
    (tmp / "inventory.yaml").write_text(yaml.safe_dump({"profiles": {"default": profile}, "hosts": []}))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    async def make() -> HttpService:
        svc = HttpService(Runtime.load(tmp / "sidus.yaml"), max_per_client=1, idle_timeout_s=3600)
        await svc.start()
        return svc

    svc = call(make())
    held = socket.create_connection(("127.0.0.1", port))
    t0 = time.monotonic()
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port))
        try:
            c.recv(100)
        except OSError:
            pass
        c.close()
    took = time.monotonic() - t0
    held.close()

    async def counters() -> dict:
        return svc.runtime.observer.snapshot()

    refused = call(counters()).get("http.refused.per_client", 0)
    call(svc.stop(grace_s=0))
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    print(f"{n} connections, {refused} refused, {took:.1f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)

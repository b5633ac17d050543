"""Network namespaces for tests: created by the test, removed by the test.

    with NetNs("sidus-t-dhcp") as ns:
        ns.run("ip", "link", "set", "lo", "up")
        proc = ns.popen([...])

Only loopback and namespaces the test made itself are ever used.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import uuid

CLONE_NEWNET = 0x40000000


def socket_in_netns(ns: str, fn):
    """Run ``fn()`` in a thread that entered network namespace ``ns`` (sockets keep it)."""
    out: dict = {}

    def run():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            out["value"] = fn()
        except BaseException as exc:   # handed to the caller
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def veth_link(server: NetNs, client: NetNs, server_ip: str, client_ip: str,
              server_if: str = "vs0", client_if: str = "vc0", prefix: int = 24) -> None:
    """A veth pair between two namespaces, addressed and up (the DHCP labs' wire)."""
    server.run("ip", "link", "add", server_if, "type", "veth", "peer", "name", client_if,
               "netns", client.name)
    server.run("ip", "addr", "add", f"{server_ip}/{prefix}", "dev", server_if)
    server.run("ip", "link", "set", server_if, "up")
    client.run("ip", "addr", "add", f"{client_ip}/{prefix}", "dev", client_if)
    client.run("ip", "link", "set", client_if, "up")


class NetNs:
    def __init__(self, prefix: str = "sidus-t"):
        self.name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> NetNs:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run("ip", "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(*argv), check=check, **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(self.argv(*argv), start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def close(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
        self._procs.clear()
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)

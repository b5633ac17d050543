"""Network namespaces for tests: created by the test, removed by the test.

    with NetNs("sidus-t-dhcp") as ns:
        ns.run("ip", "link", "set", "lo", "up")
        proc = ns.popen([...])

Only loopback and namespaces the test made itself are ever used.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid


class NetNs:
    def __init__(self, prefix: str = "sidus-t"):
        self.name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> "NetNs":
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

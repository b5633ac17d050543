"""A real nfs-ganesha running in a network namespace of its own, for tests whose config must
pass ``sidusd --check`` (which asks whether the NFS backend runs: sidusd/preflight.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sidusd.lab.ganesha import GaneshaServer
from tests.conftest import require_tool
from tests.netns import NetNs

SERVER_IP = "10.13.29.1"


@contextmanager
def running_ganesha(workdir: Path) -> Iterator[GaneshaServer]:
    """nfs-ganesha (+ its rpcbind) started, ready, and stopped by PID on exit with its netns."""
    for t in ("ganesha.nfsd", "rpcbind", "unshare"):
        require_tool(t)
    with NetNs("sidus-t-gr") as ns:
        ns.run("ip", "link", "add", "gr0", "type", "veth", "peer", "name", "gr1")
        ns.run("ip", "addr", "add", f"{SERVER_IP}/24", "dev", "gr0")
        ns.run("ip", "link", "set", "gr0", "up")
        ns.run("ip", "link", "set", "gr1", "up")
        workdir.mkdir(parents=True, exist_ok=True)
        server = GaneshaServer(ns.name, workdir / "ganesha", workdir / "sidus-exports.conf", SERVER_IP)
        try:
            server.start()
            server.wait_ready(timeout_s=60)
            yield server
        finally:
            server.stop()


def point_pid_file(server: GaneshaServer, pid_file: Path) -> None:
    """Write the running ganesha's pid where the config under test looks for it."""
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(server.pid_file.read_text())

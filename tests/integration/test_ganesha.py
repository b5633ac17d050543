"""NfsManager + GaneshaBackend against a real nfs-ganesha (and rpcbind) in a netns.

The namespace, ganesha and rpcbind are created here and stopped by PID (and
the namespace removed) also when an assertion fails.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conftest import require_root, require_tool
from netns import NetNs
from sidusd import config as config_mod
from sidusd.lab.ganesha import GaneshaServer
from sidusd.storage.nfs import NfsManager
from sidusd.storage.runner import Runner

pytestmark = pytest.mark.netns

SERVER_IP = "10.13.20.1"


def make_config(tmp: Path, server: GaneshaServer, images: dict[str, Path]):
    lines = ["dhcp: {mode: 'off'}", f"tftp: {{root: {tmp}}}",
             "nfs:", "  backend: ganesha", "  client_networks: [10.13.20.0/24]",
             f"  ganesha_config: {server.exports_file}", f"  ganesha_pid_file: {server.pid_file}",
             "images:"]
    lines += [f"  {name}: {{root: {root}, kernel: k, initrd: i}}" for name, root in images.items()]
    return config_mod.parse("\n".join(lines) + "\n", "test.yaml", tmp)


def test_apply_add_remove_and_health(tmp_path):
    require_root()
    for t in ("ganesha.nfsd", "rpcbind", "showmount", "unshare"):
        require_tool(t)
    roots = {"alpha": tmp_path / "img-alpha", "beta": tmp_path / "img-beta"}
    for r in roots.values():
        r.mkdir()
        (r / "etc").mkdir()
    with NetNs("sidus-t-nfs") as ns:
        ns.run("ip", "link", "add", "sv0", "type", "veth", "peer", "name", "sv1")
        ns.run("ip", "addr", "add", f"{SERVER_IP}/24", "dev", "sv0")
        ns.run("ip", "link", "set", "sv0", "up")
        ns.run("ip", "link", "set", "sv1", "up")
        server = GaneshaServer(ns.name, tmp_path / "ganesha", tmp_path / "sidus-exports.conf", SERVER_IP)
        try:
            server.start()
            server.wait_ready(timeout_s=60)
            assert server.exports() == []

            cfg = make_config(tmp_path, server, roots)
            manager = NfsManager(cfg, Runner())
            asyncio.run(manager.apply(cfg))
            server.wait_exported(roots["alpha"], timeout_s=30)
            server.wait_exported(roots["beta"], timeout_s=30)
            assert sorted(server.exports()) == sorted(str(r) for r in roots.values())
            health = manager.health()
            assert health["ok"], health
            assert health["backend"] == "ganesha"
            assert sorted(health["exports"]) == sorted(str(r) for r in roots.values())

            # beta leaves the config: ganesha stops exporting it, without a restart
            pid_before = int(server.pid_file.read_text())
            cfg2 = make_config(tmp_path, server, {"alpha": roots["alpha"]})
            asyncio.run(manager.apply(cfg2))
            server.wait_unexported(roots["beta"], timeout_s=30)
            assert server.exports() == [str(roots["alpha"])]
            assert int(server.pid_file.read_text()) == pid_before and server.running()

            # and comes back
            asyncio.run(manager.apply(cfg))
            server.wait_exported(roots["beta"], timeout_s=30)

            # ganesha dies: health says so, with the reason
            server.stop()
            health = manager.health()
            assert not health["ok"]
            assert "not running" in health["detail"], health
            with pytest.raises(Exception) as ei:
                asyncio.run(manager.apply(cfg))
            assert "not running" in str(ei.value)
        finally:
            log = server.log_tail()
            server.stop()
            print(log)

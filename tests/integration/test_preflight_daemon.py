"""What a boot needs, through the real daemon (sidusd/preflight.py): ``--check``, the start and
``sidusctl reload`` refuse a mistake naming the key, the path and the fix; one broken image never
blocks the exports of the others (real nfs-ganesha in a netns made and removed here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import poll_until, require_root, require_tool
from daemon_fixture import REPO, SidusDaemon, base_config, free_udp_port
from netns import NetNs

from sidusd.image import publish
from sidusd.lab.ganesha import GaneshaServer

SERVER_IP = "10.13.21.1"


def check(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidusd", "--check", "--config", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def image(tmp, name: str) -> dict:
    root = tmp / "images" / name
    root.mkdir(parents=True, exist_ok=True)
    tftp = tmp / "tftp" / "images" / name
    tftp.mkdir(parents=True, exist_ok=True)
    for f in ("vmlinuz", "initrd.img"):
        (tftp / f).write_bytes(f"{name} {f}\n".encode())
    return {"root": str(root), "kernel": f"images/{name}/vmlinuz", "initrd": f"images/{name}/initrd.img"}


def test_check_names_key_path_and_fix_and_warns_for_interfaces(tmp_path):
    d = SidusDaemon(tmp_path)
    assert check(d.config_path).returncode == 0
    (tmp_path / "tftp" / "ldlinux.c32").unlink()
    cfg = dict(d.config)
    cfg["images"] = {**cfg["images"], "ghost": {"root": str(tmp_path / "never-built"),
                                                "kernel": "images/ghost/vmlinuz",
                                                "initrd": "images/ghost/initrd.img"}}
    cfg["dhcp"] = {"mode": "proxy", "interfaces": ["lo", "sidus-nosuch0"]}
    d.write_config(cfg)
    r = check(d.config_path)
    assert r.returncode == 2, r
    err = r.stderr
    assert (f"boot.boot_files.bios (its companion): {tmp_path}/tftp/ldlinux.c32: no such regular file" in err
            and "apt-get install syslinux-common" in err), err
    assert f"images.ghost.root: {tmp_path}/never-built: no such directory" in err and "sidus-image build" in err
    assert f"images.ghost.kernel: {tmp_path}/tftp/images/ghost/vmlinuz" in err
    assert "warning: dhcp.interfaces[1]: sidus-nosuch0: no such network interface" in err
    # the interface alone is a warning at --check ...
    (tmp_path / "tftp" / "ldlinux.c32").write_bytes(b"x")
    cfg["images"] = d.config["images"]
    d.write_config(cfg)
    r = check(d.config_path)
    assert r.returncode == 0 and "warning: dhcp.interfaces[1]: sidus-nosuch0" in r.stderr, r
    # ... and refuses the start
    p = subprocess.run([sys.executable, "-m", "sidusd", "--config", str(d.config_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 2 and "dhcp.interfaces[1]: sidus-nosuch0: no such network interface" in p.stderr, p


def test_start_refused_without_tftp_root(tmp_path):
    d = SidusDaemon(tmp_path)
    shutil.rmtree(tmp_path / "tftp")
    p = subprocess.run([sys.executable, "-m", "sidusd", "--config", str(d.config_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 2, p
    assert f"tftp.root: {tmp_path}/tftp: no such directory; fix: mkdir -p {tmp_path}/tftp" in p.stderr


def test_bad_image_reload_refused_others_stay_exported(tmp_path):
    require_root()
    for t in ("ganesha.nfsd", "rpcbind", "showmount", "unshare"):
        require_tool(t)
    with NetNs("sidus-t-h15pf") as ns:
        ns.run("ip", "link", "add", "pf0", "type", "veth", "peer", "name", "pf1")
        ns.run("ip", "addr", "add", f"{SERVER_IP}/24", "dev", "pf0")
        ns.run("ip", "link", "set", "pf0", "up")
        ns.run("ip", "link", "set", "pf1", "up")
        server = GaneshaServer(ns.name, tmp_path / "ganesha", tmp_path / "sidus-exports.conf", SERVER_IP)
        try:
            server.start()
            server.wait_ready(timeout_s=60)
            cfg = base_config(tmp_path, free_udp_port())
            cfg["nfs"] = {"backend": "ganesha", "server_address": SERVER_IP,
                          "client_networks": ["10.13.21.0/24"],
                          "ganesha_config": str(server.exports_file), "ganesha_pid_file": str(server.pid_file)}
            cfg["images"] = {**cfg["images"], "alpha": image(tmp_path, "alpha"), "beta": image(tmp_path, "beta")}
            alpha, beta = cfg["images"]["alpha"]["root"], cfg["images"]["beta"]["root"]
            demo = cfg["images"]["demo"]["root"]
            d = SidusDaemon(tmp_path, config=cfg)
            d.tftp_port = cfg["tftp"]["port"]
            with d:
                server.wait_exported(alpha, timeout_s=30)
                server.wait_exported(beta, timeout_s=30)
                gen = d.ctl_json("status")["generation"]

                # a reload that brings an image whose root was never built: refused, loudly
                bad = {**cfg, "images": {**cfg["images"], "ghost": {**image(tmp_path, "ghost"),
                                                                   "root": str(tmp_path / "never-built")}}}
                d.write_config(bad)
                r = d.ctl("reload", check=False)
                assert r.returncode == 1, r
                assert (f"images.ghost.root: {tmp_path}/never-built: no such directory; fix: build it "
                        "(sidus-image build)") in r.stderr, r.stderr
                st = d.ctl_json("status")
                assert st["generation"] == gen and not st["last_reload"]["ok"]
                assert any(e.get("event") == "reload.refused" and e.get("level") == "error"
                           and "never-built" in e.get("error", "") for e in d.events())
                # the old config keeps serving, the other images stay exported
                assert sorted(server.exports()) == sorted([demo, alpha, beta])
                assert d.tftp_get("images/alpha/vmlinuz") == b"alpha vmlinuz\n"
                text = d.ctl("status").stdout
                assert "REFUSED" in text and "never-built" in text

                # beta's root disappears under the running daemon; a new image gamma comes: beta's
                # problem is the running config's too, so the reload goes on; gamma is exported,
                # beta is left out and said (before: one missing root blocked every export change)
                shutil.rmtree(beta)
                good = {**cfg, "images": {**cfg["images"], "gamma": image(tmp_path, "gamma")}}
                gamma = good["images"]["gamma"]["root"]
                d.write_config(good)
                d.ctl("reload")
                server.wait_exported(gamma, timeout_s=30)
                assert poll_until(lambda: sorted(server.exports()) == sorted([demo, alpha, gamma]), timeout_s=30), \
                    server.exports()
                st = d.ctl_json("status")
                nfs = st["backend_status"]["nfs"]
                assert not nfs["ok"] and nfs["skipped"] == [beta], nfs
                assert list(st["broken_images"]) == ["beta"]
                assert [(p["key"], p["path"]) for p in st["preflight"]] == [("images.beta.root", beta)]
                text = d.ctl("status").stdout
                assert "PROBLEMS (1)" in text and f"images.beta.root: {beta}: no such directory" in text
                assert any(e.get("event") == "preflight.problem" and e.get("level") == "error"
                           and e.get("path") == beta for e in d.events())
                # what sidus-image is told before it says "served"
                assert publish.confirm_served(d.socket_path, "gamma", Path(gamma)).text == \
                    "served (exported, boot config rendered)"
                said = publish.confirm_served(d.socket_path, "beta", Path(beta))
                assert said.refused and "no such directory" in said.text, said
                assert f"{beta} is not exported by the NFS backend (ganesha" in said.text, said
        finally:
            log = server.log_tail()
            server.stop()
            print(log)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


def test_start_and_reload_ask_the_nfs_backend(tmp_path):
    """Issue 15: start and reload verify that the NFS backend answers (before, only --check
    asked it): a ganesha that does not run is logged at error with the key and the fix and shown
    by status, and refuses neither (DHCP/TFTP keep serving; ganesha starts on its own)."""
    d = SidusDaemon(tmp_path)
    cfg = dict(d.config)
    cfg["nfs"] = {"backend": "ganesha", "server_address": "127.0.0.1",
                  "ganesha_config": str(tmp_path / "sidus-exports.conf"),
                  "ganesha_pid_file": str(tmp_path / "no-ganesha.pid"), "client_networks": ["127.0.0.0/8"]}
    d.write_config(cfg)
    with d:
        said = [e for e in d.events() if e.get("event") == "preflight.problem" and e.get("key") == "nfs.backend"]
        assert said and said[0].get("level") == "error", d.log_tail()
        assert "systemctl start nfs-ganesha" in said[0].get("fix", ""), said
        st = d.ctl_json("status")
        assert [p for p in st["preflight"] if p["key"] == "nfs.backend"], st["preflight"]
        assert d.ctl("reload", check=False).returncode == 0, d.log_tail()
        assert d.tftp_get("pxelinux.0"), "TFTP still serves"

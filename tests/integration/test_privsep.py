"""Least privilege, checked on the real daemon from /proc (docs/security.md, "Least privilege").

The daemon runs in a network namespace made here, on the real ports (DHCP 67
and 4011 bound to a dummy interface, TFTP 69).  What is checked:

* the process that handles the traffic (reads 67/69, owns every transfer
  socket) is the worker: uid not 0, CapEff/CapPrm/CapBnd/CapAmb all 0,
  NoNewPrivs, no supplementary group; the supervisor is the only root process;
* ``kill -9`` of the worker: it is restarted (counted in status) and serves again;
* messages from a compromised worker (its own descriptors, taken with
  ``pidfd_getfd``): oversized, not JSON, pickle, unknown type, bad fields on
  both channels -- each dropped and counted by the supervisor, which keeps
  serving; the worker is not restarted for it;
* a missing worker user: ``--check`` and the start refuse, saying which user.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import require_root, require_tool
from netns import NetNs, socket_in_netns

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
SERVER_IP = "10.79.0.1"
SYS_PIDFD_GETFD = 438


def status_of(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                out += kids
                todo += kids
        except FileNotFoundError:
            pass
    return out


def udp_inodes(pid: int, port: int, remote_port: int | None = None) -> set[str]:
    """Inodes of the UDP sockets on local ``port`` (and remote port) in ``pid``'s namespace."""
    found = set()
    with open(f"/proc/{pid}/net/udp") as f:
        next(f)
        for line in f:
            cols = line.split()
            lport = int(cols[1].split(":")[1], 16)
            rport = int(cols[2].split(":")[1], 16)
            if lport == port and (remote_port is None or rport == remote_port):
                found.add(cols[9])
    return found


def holders(inode: str, pids: list[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        out.add(pid)
                except OSError:
                    pass
        except FileNotFoundError:
            pass
    return out


def pidfd_getfd(pid: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        new = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        return new
    finally:
        os.close(pidfd)


class Daemon:
    def __init__(self, tmp: Path, ns: NetNs, worker_user: str = "sidus"):
        self.tmp, self.ns = tmp, ns
        self.log_path = tmp / "sidusd.log"
        for d in ("state", "tftp/images/demo", "images/demo"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        self.payload = os.urandom(300_000)
        kernel = tmp / "tftp" / "images" / "demo" / "vmlinuz"
        kernel.write_bytes(self.payload)
        kernel.chmod(0o600)        # root-only, like a Debian kernel: the supervisor opens it
        cfg = {"state_dir": str(tmp / "state"), "inventory_file": str(tmp / "inventory.yaml"),
               "log": {"format": "json", "level": "info"},
               "control": {"socket_path": str(tmp / "control.sock")},
               "dhcp": {"mode": "proxy", "interfaces": ["d0"]},
               "tftp": {"root": str(tmp / "tftp"), "timeout_s": 0.5, "retries": 20},
               "nfs": {"backend": "none", "server_address": SERVER_IP},
               "security": {"worker_user": worker_user},
               "images": {"demo": {"root": str(tmp / "images" / "demo"), "kernel": "images/demo/vmlinuz",
                                   "initrd": "images/demo/initrd.img"}}}
        self.config_path = tmp / "sidus.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        (tmp / "inventory.yaml").write_text(yaml.safe_dump(
            {"profiles": {"default": {"image": "demo", "overlay": "tmpfs", "append": ""}}, "hosts": []}))
        self.proc: subprocess.Popen | None = None

    def start(self, expect_ready: bool = True, prefix: list[str] | None = None) -> None:
        log = open(self.log_path, "ab")
        self.proc = self.ns.popen([*(prefix or []), sys.executable, "-m", "sidusd", "--config", str(self.config_path)],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        if not expect_ready:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidusd exited {self.proc.returncode}:\n{self.log_tail()}")
            if any(e.get("event") == "daemon.ready" for e in self.events()):
                return
            time.sleep(0.1)
        raise AssertionError(f"sidusd not ready:\n{self.log_tail()}")

    def events(self) -> list[dict]:
        out = []
        if self.log_path.exists():
            for line in self.log_path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"event": "<non-json>", "line": line})
        return out

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-40:]) if self.log_path.exists() else ""

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sidusd.ctl", "--socket", str(self.tmp / "control.sock"),
                               *args], capture_output=True, text=True, cwd=REPO, timeout=30)

    def status(self) -> dict:
        r = self.ctl("--json", "status")
        assert r.returncode == 0, r.stderr + self.log_tail()
        return json.loads(r.stdout)

    def worker(self) -> dict:
        return next(p for p in self.status()["processes"] if p["role"] == "worker")

    def tftp_get(self, name: str) -> bytes:
        import logging

        import tftpy  # a real client we did not write
        logging.getLogger("tftpy").setLevel(logging.CRITICAL)

        def fetch():
            buf = io.BytesIO()
            tftpy.TftpClient(SERVER_IP, 69, options={"blksize": 1400}).download(name, buf, timeout=5)
            return buf.getvalue()
        return socket_in_netns(self.ns.name, fetch)


@pytest.fixture
def daemon(tmp_path):
    require_root()
    require_tool("ip")
    pytest.importorskip("tftpy", reason="missing tool: tftpy (pip, pyproject test extra)")
    os.chmod(tmp_path, 0o700)          # nothing below is readable by the worker user itself
    with NetNs("sidus-t-priv") as ns:
        ns.run("ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ns.run("ip", "link", "set", "d1", "up")
        ns.run("ip", "addr", "add", f"{SERVER_IP}/24", "dev", "d0")
        ns.run("ip", "link", "set", "d0", "up")
        d = Daemon(tmp_path, ns)
        try:
            yield d
        finally:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
                try:
                    d.proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(d.proc.pid, signal.SIGKILL)
                    d.proc.wait(5)


def test_traffic_is_handled_by_an_unprivileged_worker(daemon):
    daemon.start()
    sup = daemon.proc.pid
    st = daemon.status()
    assert st["privsep"] is True
    roles = {p["role"]: p for p in st["processes"]}
    wpid = roles["worker"]["pid"]
    assert roles["supervisor"]["pid"] == sup and roles["worker"]["state"] == "running"
    assert roles["worker"]["user"] == "sidus" and roles["worker"]["cap_eff"] == "0000000000000000"

    # from /proc, not from what the daemon says
    w = status_of(wpid)
    uids = [int(x) for x in w["Uid"].split()]
    gids = [int(x) for x in w["Gid"].split()]
    assert 0 not in uids and 0 not in gids and len(set(uids)) == 1, w["Uid"]
    for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        assert int(w[k], 16) == 0, (k, w[k])
    assert w["NoNewPrivs"] == "1" and w["Groups"] == ""
    assert int(status_of(sup)["Uid"].split()[1]) == 0
    tree = descendants(sup)
    assert wpid in tree
    root_procs = [p for p in [sup] + tree if int(status_of(p)["Uid"].split()[1]) == 0]
    assert root_procs == [sup], f"root processes in the daemon: {root_procs}"

    # the privileged sockets: bound by the supervisor, held by both, read by the worker
    for port in (67, 4011, 69):
        inodes = udp_inodes(sup, port)
        assert inodes, f"nothing listens on udp/{port}"
        for ino in inodes:
            assert holders(ino, [sup, wpid]) == {sup, wpid}, port

    # a transfer in flight: its socket exists only in the worker.  A raw RRQ that is never ACKed
    # keeps the server's transfer socket (bound to SERVER_IP, port 0) alive for retries x timeout.
    def all_udp() -> dict[str, int]:
        out = {}
        with open(f"/proc/{sup}/net/udp") as f:
            next(f)
            for line in f:
                cols = line.split()
                out[cols[9]] = int(cols[1].split(":")[1], 16)
        return out
    before = all_udp()

    def rrq():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((SERVER_IP, 0))
        s.settimeout(5)
        s.sendto(b"\x00\x01images/demo/vmlinuz\x00octet\x00", (SERVER_IP, 69))
        data, src = s.recvfrom(2048)
        return s, data, src
    cli, first, src = socket_in_netns(daemon.ns.name, rrq)
    try:
        assert first[:4] == b"\x00\x03\x00\x01" and first[4:] == daemon.payload[:512]
        new = {ino: port for ino, port in all_udp().items() if ino not in before}
        transfer = [ino for ino, port in new.items() if port == src[1]]
        assert len(transfer) == 1, (new, src)
        assert holders(transfer[0], [sup, wpid]) == {wpid}
    finally:
        cli.close()

    # the whole file, through a real client, sha256-exact although only root can read it
    got = daemon.tftp_get("images/demo/vmlinuz")
    assert hashlib.sha256(got).digest() == hashlib.sha256(daemon.payload).digest()

    # state stays root's: control socket 0600, inventory written 0640 by the supervisor
    cs = os.stat(daemon.tmp / "control.sock")
    assert (cs.st_uid, cs.st_mode & 0o777) == (0, 0o600)
    r = daemon.ctl("hosts", "add", "52:54:00:aa:00:01", "--profile", "default")
    assert r.returncode == 0, r.stderr
    inv = os.stat(daemon.tmp / "inventory.yaml")
    assert (inv.st_uid, inv.st_mode & 0o777) == (0, 0o640)
    # the worker got the new inventory: the host's config renders
    cfg = daemon.tftp_get("pxelinux.cfg/01-52-54-00-aa-00-01")
    assert b"52:54:00:aa:00:01" in cfg

    # every module the worker uses was imported before the drop (a Python under /root is not
    # readable by the worker user: a later import fails there)
    late = [e.get("module") for e in daemon.events() if e.get("event") == "worker.late_import"]
    assert late == [], late

    # sidusctl status (table) shows both processes
    r = daemon.ctl("status")
    assert r.returncode == 0
    assert "supervisor" in r.stdout and "worker" in r.stdout and "sidus" in r.stdout


def test_a_killed_worker_is_restarted_and_serves_again(daemon):
    daemon.start()
    # a reload that moves the TFTP port needs a restart: a restarted worker keeps serving port 69
    cfg = yaml.safe_load(daemon.config_path.read_text())
    cfg["tftp"]["port"] = 6969
    daemon.config_path.write_text(yaml.safe_dump(cfg))
    r = daemon.ctl("--json", "reload")
    assert r.returncode == 0, r.stderr
    assert any("tftp.port" in x for x in json.loads(r.stdout)["restart_needed"])
    w1 = daemon.worker()
    os.kill(w1["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        w2 = daemon.worker()
        if w2.get("pid") not in (None, w1["pid"]) and w2["state"] == "running":
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"worker not restarted:\n{daemon.log_tail()}")
    assert w2["restarts"] == 1 and w2["last_exit"]["status"] == -signal.SIGKILL
    assert w2["cap_eff"] == "0000000000000000" and w2["user"] == "sidus"
    got = daemon.tftp_get("images/demo/vmlinuz")
    assert got == daemon.payload
    st = daemon.status()
    assert st["counters"]["privsep.worker_restarts"] == 1
    assert st["counters"]["tftp.transfers.done"] >= 1          # counted by the new worker
    assert daemon.proc.poll() is None
    assert any(e.get("event") == "privsep.worker_exited" for e in daemon.events())


def test_hostile_worker_messages_are_dropped_and_counted(daemon):
    daemon.start()
    wpid = daemon.worker()["pid"]
    argv = open(f"/proc/{wpid}/cmdline", "rb").read().split(b"\0")
    ctl_fd = int(argv[argv.index(b"--ctl-fd") + 1])
    rpc_fd = int(argv[argv.index(b"--rpc-fd") + 1])
    # the worker's own ends of its channels: what a compromised worker could write
    ctl = socket.socket(fileno=pidfd_getfd(wpid, ctl_fd))
    rpc = socket.socket(fileno=pidfd_getfd(wpid, rpc_fd))
    try:
        bad_ctl = [
            b"{" + b" " * (70 * 1024) + b"}",                            # oversized
            b"{not json",                                                # bad_json
            b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94.",  # a pickle: bad_json
            b'{"t": "events", "t": "hello"}',                            # duplicate key: bad_json
            b'{"t": "events", "counters": {"x": NaN}}',                  # NaN: bad_json
            b'[1, 2]',                                                   # not an object: bad_json
            b'{"t": "pwn"}',                                             # unknown_type
            b'{"t": "events", "counters": {"../../etc": 1}}',            # bad_field
            b'{"t": "events", "counters": {"x": -5}}',                   # bad_field
            b'{"t": "events", "events": [["tl", "zz", 1, "e", {}]]}',    # bad_field (mac)
            b'{"t": "events", "events": [["tl", "52:54:00:00:00:09", 1, "e", {"t": 1}]]}',   # reserved
            b'{"t": "stats", "id": 1, "listeners": {}, "transfers": {}, "extra": 1}',       # bad_field
            b"",                                                         # empty
        ]
        for m in bad_ctl:
            ctl.send(m)
        bad_rpc = [
            b'{"t": "open", "id": 1, "parts": ["..", "etc", "shadow"]}',
            b'{"t": "open", "id": 2, "parts": ["a/b"]}',
            b'{"t": "lease.append", "id": 3, "lease": {"ip": "1.2.3.4", "mac": "x", "state": "bound", "expires": 1}}',
            b'{"t": "exec", "id": 4}',
            b"\xff\xfe",
        ]
        for m in bad_rpc:
            rpc.send(m)
        # a valid counter from the "compromised" worker is accepted: the channel still works
        ctl.send(b'{"t": "events", "counters": {"test.injected": 3}}')
        # the supervisor reads each channel in order: once the last message of each is counted
        # (the injected counter on ctl, 18 refusals in all), every message was
        deadline = time.monotonic() + 30
        while True:
            c = daemon.status()["counters"]
            refused_n = sum(v for k, v in c.items() if k.startswith("privsep.refused."))
            if (c.get("test.injected") == 3 and refused_n >= 18) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        ctl.close()
        rpc.close()
    refused = {k: v for k, v in c.items() if k.startswith("privsep.refused.")}
    assert refused.get("privsep.refused.oversized") == 1, refused
    assert refused.get("privsep.refused.bad_json") == 6, refused          # 5 on ctl + 1 on rpc
    assert refused.get("privsep.refused.unknown_type") == 2, refused      # 1 + 1
    assert refused.get("privsep.refused.bad_field") == 8, refused         # 5 + 3
    assert refused.get("privsep.refused.empty") == 1, refused
    assert c.get("test.injected") == 3
    assert daemon.proc.poll() is None
    assert daemon.worker()["restarts"] == 0
    assert daemon.tftp_get("images/demo/vmlinuz") == daemon.payload
    assert not [e for e in daemon.events() if e.get("event") == "<non-json>" and "Traceback" in e["line"]]
    assert any(e.get("event") == "privsep.message_refused" for e in daemon.events())


def test_a_missing_worker_user_is_refused_clearly(tmp_path):
    require_root()
    with NetNs("sidus-t-priv") as ns:
        ns.run("ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ns.run("ip", "link", "set", "d1", "up")
        ns.run("ip", "addr", "add", f"{SERVER_IP}/24", "dev", "d0")
        ns.run("ip", "link", "set", "d0", "up")
        d = Daemon(tmp_path, ns, worker_user="sidus-no-such-user")
        r = subprocess.run([sys.executable, "-m", "sidusd", "--check", "--config", str(d.config_path)],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 2
        assert "user 'sidus-no-such-user' does not exist" in r.stderr
        d.start(expect_ready=False)
        assert d.proc.wait(60) == 1
        failed = [e for e in d.events() if e.get("event") == "startup.failed"]
        assert failed and "sidus-no-such-user" in failed[0]["error"]
        assert not any(e.get("event") == "daemon.ready" for e in d.events())


def unit_capabilities() -> list[str]:
    """The CapabilityBoundingSet of systemd/sidusd.service, as setpriv names."""
    for line in (REPO / "systemd" / "sidusd.service").read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return [c.lower().removeprefix("cap_") for c in line.split("=", 1)[1].split()]
    raise AssertionError("no CapabilityBoundingSet in systemd/sidusd.service")


def setpriv(caps: list[str]) -> list[str]:
    return [require_tool("setpriv"), "--bounding-set=-all" + "".join(f",+{c}" for c in caps),
            "--inh-caps=-all", "--no-new-privs"]


def test_the_units_capability_set_is_enough(daemon):
    """The daemon under the unit's bounding set and NoNewPrivileges: starts, serves a 0600 kernel,
    restarts a killed worker, stops cleanly.  Without CAP_NET_BIND_SERVICE it cannot start."""
    caps = unit_capabilities()
    assert "sys_admin" not in caps and "dac_override" not in caps and "net_raw" not in caps
    daemon.start(prefix=setpriv(caps))
    sup = status_of(daemon.proc.pid)
    assert sup["NoNewPrivs"] == "1"
    bits = {"net_bind_service": 10, "setuid": 7, "setgid": 6, "setpcap": 8, "kill": 5, "dac_read_search": 2}
    assert int(sup["CapBnd"], 16) == sum(1 << bits[c] for c in caps)
    assert daemon.tftp_get("images/demo/vmlinuz") == daemon.payload
    w1 = daemon.worker()
    assert w1["cap_bnd"] == "0000000000000000" and w1["user"] == "sidus"
    os.kill(w1["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while daemon.worker().get("pid") in (None, w1["pid"]) or daemon.worker()["state"] != "running":
        assert time.monotonic() < deadline, daemon.log_tail()
        time.sleep(0.2)
    assert daemon.tftp_get("images/demo/vmlinuz") == daemon.payload
    w2 = daemon.worker()["pid"]
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0

    def worker_gone() -> bool:
        try:
            return status_of(w2).get("State", "").startswith("Z")
        except FileNotFoundError:
            return True
    deadline = time.monotonic() + 10
    while not worker_gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{w2}") or status_of(w2).get("State", "").startswith("Z")

    daemon.log_path.unlink()
    daemon.start(expect_ready=False, prefix=setpriv([c for c in caps if c != "net_bind_service"]))
    assert daemon.proc.wait(60) == 1
    failed = [e for e in daemon.events() if e.get("event") == "startup.failed"]
    assert failed and "cannot listen on d0 udp/67: Permission denied" in failed[0]["error"]

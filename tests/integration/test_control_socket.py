"""The control socket end to end: a real Runtime, a real TftpService on loopback,
the ControlServer on a temporary socket, driven by the real ``sidusctl``
(``python -m sidusd.ctl``) as a subprocess and by raw socket clients."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from conftest import require_root, require_tool

from sidusd.boot.inventory import parse_inventory
from sidusd.control import messages as m
from sidusd.control.server import ControlServer
from sidusd.errors import StartupError
from sidusd.net.tftp_server import TftpService
from sidusd.runtime import Runtime

REPO = Path(__file__).resolve().parents[2]
MAC1 = "52:54:00:00:00:01"
MAC2 = "52:54:00:00:00:02"
MAX_CONN = 4
WAIT_S = 20.0               # upper bound for the server thread to answer, never a timing assertion


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp: Path, sock: Path, tftp_port: int) -> Path:
    (tmp / "tftp").mkdir()
    (tmp / "tftp" / "hello.bin").write_bytes(bytes(range(256)) * 6)      # 1536 bytes
    (tmp / "img").mkdir()
    cfg = {"state_dir": str(tmp / "state"), "inventory_file": str(tmp / "inventory.yaml"),
           "control": {"socket_path": str(sock)}, "dhcp": {"mode": "off"},
           "tftp": {"address": "127.0.0.1", "port": tftp_port, "root": str(tmp / "tftp")},
           "nfs": {"backend": "none"},
           "images": {"demo": {"root": str(tmp / "img"), "kernel": "vmlinuz", "initrd": "initrd.img"}}}
    (tmp / "sidus.yaml").write_text(yaml.safe_dump(cfg))
    (tmp / "inventory.yaml").write_text(yaml.safe_dump(
        {"profiles": {"default": {"image": "demo"}},
         "hosts": [{"mac": MAC1, "hostname": "vm1", "profile": "default"}]}))
    return tmp / "sidus.yaml"


class Daemon:
    """Runtime + TftpService + ControlServer on an event loop in a thread (the test drives it)."""

    def __init__(self, config_path: Path):
        self.config_path = config_path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self._start())

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)

    async def _start(self) -> None:
        self.runtime = Runtime.load(self.config_path)
        self.tftp = TftpService(self.runtime)
        await self.tftp.start()
        self.control = ControlServer(self.runtime, {"tftp": self.tftp}, max_connections=MAX_CONN)
        await self.control.start()

    async def _stop(self) -> None:
        await self.control.stop()
        await self.tftp.stop(grace_s=0)

    def close(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT_S)
            self.loop.close()

    @property
    def sock(self) -> str:
        return str(self.runtime.config.control.socket_path)


@pytest.fixture
def daemon(tmp_path):
    sock = tmp_path / "run" / "sidus" / "control.sock"         # parent directories do not exist yet
    d = Daemon(write_config(tmp_path, sock, free_udp_port()))
    yield d
    d.close()
    assert not sock.exists(), "stop() removes the socket file"


def ctl(d: Daemon | str, *argv: str, user: str | None = None) -> subprocess.CompletedProcess:
    path = d if isinstance(d, str) else d.sock
    cmd = [sys.executable, "-m", "sidusd.ctl", "--socket", path, *argv]
    if user:
        cmd = [require_tool("setpriv"), f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)


def ctl_json(d: Daemon, *argv: str):
    p = ctl(d, "--json", *argv)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


class Raw:
    """A raw client speaking JSON lines, to send what sidusctl never would."""

    def __init__(self, path: str):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(WAIT_S)
        self.s.connect(path)
        self.f = self.s.makefile("rb")

    def ask(self, data: bytes) -> dict:
        self.s.sendall(data)
        return json.loads(self.f.readline())

    def close(self) -> None:
        self.f.close()
        self.s.close()


# -- tests -----------------------------------------------------------------------

def test_socket_file_is_root_only_in_a_created_directory(daemon):
    st = os.lstat(daemon.sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(Path(daemon.sock).parent).st_mode) == 0o755
    assert [p.name for p in Path(daemon.sock).parent.iterdir()] == ["control.sock"]   # no temp left over


def test_status(daemon):
    r = ctl_json(daemon, "status")
    assert r["pid"] == os.getpid()
    assert r["config_path"] == str(daemon.config_path)
    assert r["generation"] == 1 and r["last_reload"] is None
    port = daemon.runtime.config.tftp.port
    assert r["listeners"]["tftp"] == [{"proto": "udp", "service": "tftp", "address": "127.0.0.1", "port": port}]
    assert r["active_transfers"] == 0
    assert r["counters"]["control.requests"] >= 1
    human = ctl(daemon, "status")
    assert human.returncode == 0, human.stderr
    assert "(generation 1)" in human.stdout
    lines = [line.split() for line in human.stdout.splitlines()]
    assert ["SERVICE", "PROTO", "ADDRESS", "PORT"] in lines and ["tftp", "udp", "127.0.0.1", str(port)] in lines


def test_hosts_add_list_remove(daemon):
    assert [h["mac"] for h in ctl_json(daemon, "hosts", "list")] == [MAC1]
    p = ctl(daemon, "hosts", "add", "52-54-00-00-00-02", "--profile", "default", "--hostname", "vm2",
            "--ip", "10.13.20.102", "--append", "sidus.marker=two quiet")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"host {MAC2} added\n")
    on_disk = parse_inventory((Path(daemon.config_path).parent / "inventory.yaml").read_text())
    h = on_disk.hosts[MAC2]
    assert (h.hostname, str(h.ip), h.append) == ("vm2", "10.13.20.102", "sidus.marker=two quiet")
    listed = {h["mac"]: h for h in ctl_json(daemon, "hosts", "list")}
    assert listed[MAC2] == {"mac": MAC2, "profile": "default", "hostname": "vm2", "image": None,
                            "ip": "10.13.20.102", "append": "sidus.marker=two quiet"}

    again = ctl_json(daemon, "hosts", "add", MAC2, "--profile", "default", "--hostname", "vm2b")
    assert again["previous"]["hostname"] == "vm2" and again["host"]["hostname"] == "vm2b"
    assert again["host"]["ip"] is None and again["host"]["append"] == ""       # replaced whole, not merged
    assert ctl_json(daemon, "hosts", "list")[1]["hostname"] == "vm2b"
    human = ctl(daemon, "hosts", "add", MAC2, "--profile", "default")
    assert human.returncode == 0 and human.stdout.startswith(f"host {MAC2} replaced (before / after)\n")

    bad = ctl(daemon, "hosts", "add", "52:54:00:00:00:03", "--profile", "nope")
    assert bad.returncode == 1 and "unknown profile 'nope'" in bad.stderr
    dup = ctl(daemon, "hosts", "add", "52:54:00:00:00:03", "--profile", "default", "--hostname", "VM1")
    assert dup.returncode == 1 and "duplicate host name" in dup.stderr

    rm = ctl(daemon, "hosts", "remove", MAC2)
    assert rm.returncode == 0 and rm.stdout.strip() == f"host {MAC2} removed"
    gone = ctl(daemon, "hosts", "remove", MAC2)
    assert gone.returncode == 1 and f"no host {MAC2}" in gone.stderr
    assert [h["mac"] for h in ctl_json(daemon, "hosts", "list")] == [MAC1]
    assert list(parse_inventory((Path(daemon.config_path).parent / "inventory.yaml").read_text()).hosts) == [MAC1]


def test_bad_mac_is_refused_by_sidusctl_and_by_the_server(daemon):
    p = ctl(daemon, "hosts", "add", "52:54:00:00:01", "--profile", "default")
    assert p.returncode == 2
    assert "'52:54:00:00:01' is not a MAC address" in p.stderr
    raw = Raw(daemon.sock)
    try:
        r = raw.ask(m.encode_request(m.OP_HOSTS_ADD, {"mac": "01:00:5e:00:00:01", "profile": "default"}))
        assert r["ok"] is False and "multicast" in r["error"]
        r = raw.ask(m.encode_request(m.OP_HOSTS_REMOVE, {"mac": "hello"}))
        assert r["ok"] is False and "is not a MAC address" in r["error"]
    finally:
        raw.close()
    assert [h["mac"] for h in ctl_json(daemon, "hosts", "list")] == [MAC1]


def test_reload_good_then_bad_keeps_serving(daemon):
    inv = Path(daemon.config_path).parent / "inventory.yaml"
    doc = yaml.safe_load(inv.read_text())
    doc["hosts"].append({"mac": MAC2, "profile": "default"})
    inv.write_text(yaml.safe_dump(doc))
    ok = ctl(daemon, "reload")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "reloaded (generation 2)"
    assert [h["mac"] for h in ctl_json(daemon, "hosts", "list")] == [MAC1, MAC2]

    Path(daemon.config_path).write_text(Path(daemon.config_path).read_text() + "tftp_typo: 1\n")
    bad = ctl(daemon, "reload")
    assert bad.returncode == 1
    assert "reload refused, the previous configuration keeps serving" in bad.stderr and "tftp_typo" in bad.stderr
    st = ctl_json(daemon, "status")
    assert st["generation"] == 2 and st["last_reload"]["ok"] is False
    assert "REFUSED" in ctl(daemon, "status").stdout
    assert [h["mac"] for h in ctl_json(daemon, "hosts", "list")] == [MAC1, MAC2]


def test_garbage_gets_error_responses_and_the_connection_keeps_serving(daemon):
    raw = Raw(daemon.sock)
    try:
        assert raw.ask(b"garbage\n") == {"v": 1, "ok": False, "error": raw_error(b"garbage")}
        assert "unsupported protocol version 2" in raw.ask(b'{"v":2,"op":"status"}\n')["error"]
        assert "unknown op 'halt'" in raw.ask(b'{"v":1,"op":"halt"}\n')["error"]
        assert "unknown argument(s) force" in raw.ask(b'{"v":1,"op":"reload","args":{"force":true}}\n')["error"]
        assert "not UTF-8" in raw.ask(b"\xff\xfe\n")["error"]
        r = raw.ask(b"{" * (m.MAX_REQUEST_BYTES + 5000) + b"\n")
        assert r["ok"] is False and "too long" in r["error"]
        r = raw.ask(m.encode_request(m.OP_STATUS))         # same connection, still serving
        assert r["ok"] is True and r["result"]["counters"]["control.malformed"] == 6
    finally:
        raw.close()
    assert ctl(daemon, "status").returncode == 0           # and new connections too


def raw_error(line: bytes) -> str:
    try:
        m.decode_request(line)
    except Exception as exc:
        return str(exc)
    raise AssertionError("expected a refusal")


def test_connections_are_bounded(daemon):
    held = [Raw(daemon.sock) for _ in range(MAX_CONN)]
    try:
        for c in held:                                     # each one is registered by the server
            assert c.ask(m.encode_request(m.OP_HOSTS_LIST))["ok"] is True
        p = ctl(daemon, "status")
        assert p.returncode == 1 and "too many control connections (limit 4)" in p.stderr
        held.pop().close()
        ok = None
        for _ in range(50):                                # the server notices the close asynchronously
            ok = ctl(daemon, "hosts", "list")
            if ok.returncode == 0:
                break
        assert ok.returncode == 0, ok.stderr
    finally:
        for c in held:
            c.close()


def test_idle_connection_is_closed_after_the_read_timeout(daemon):
    path = str(Path(daemon.sock).with_name("short.sock"))
    short = ControlServer(daemon.runtime, {}, socket_path=path, read_timeout_s=0.2)
    daemon.run(short.start())
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(WAIT_S)
        s.connect(path)
        assert s.recv(100) == b""                          # closed by the server, nothing sent
        s.close()
    finally:
        daemon.run(short.stop())


def test_clients_shows_the_boot_timeline(daemon):
    require_tool("atftp")
    obs = daemon.runtime.observer

    async def dhcp_side() -> None:                          # what the DHCP service records
        obs.client_seen(MAC1, "127.0.0.1", "bios")
        obs.timeline(MAC1, "dhcp.offer", file="pxelinux.0")
    daemon.run(dhcp_side())
    out = Path(daemon.config_path).parent / "got.bin"
    got = subprocess.run(["atftp", "--get", "-r", "hello.bin", "-l", str(out), "127.0.0.1",
                          str(daemon.runtime.config.tftp.port)], capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert out.stat().st_size == 1536

    p = ctl(daemon, "clients")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["MAC", "IP", "ARCH", "LAST", "SEEN", "EVENTS", "ANSWER"]
    assert lines[1].split()[:3] == [MAC1, "127.0.0.1", "bios"] and lines[1].split()[-1] == "-"
    assert lines[2].startswith("    ") and lines[2].split()[1:] == ["dhcp.offer", "file=pxelinux.0"]
    assert lines[3].startswith("    ") and lines[3].split()[1:5] == ["tftp", "hello.bin", "1.5", "KiB"]
    one = ctl_json(daemon, "clients", MAC1.upper())
    assert [e["event"] for e in one[0]["timeline"]] == ["dhcp.offer", "tftp"]
    assert one[0]["timeline"][1]["bytes"] == 1536
    unknown = ctl(daemon, "clients", MAC2)
    assert unknown.returncode == 1 and f"no machine with MAC {MAC2}" in unknown.stderr


def test_not_running_and_stale_socket(tmp_path):
    p = ctl(str(tmp_path / "absent.sock"), "status")
    assert p.returncode == 3
    assert f"sidusd is not running: no control socket at {tmp_path / 'absent.sock'}" in p.stderr
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()                                              # file left behind, nobody listening
    p = ctl(str(stale), "status")
    assert p.returncode == 3 and "refuses connections" in p.stderr


def test_non_root_users_are_refused(daemon):
    require_root()
    import tempfile
    top = Path(tempfile.mkdtemp(prefix="sidus-ctl-test-"))   # reachable by others, unlike pytest's tmp
    try:
        os.chmod(top, 0o755)
        path = top / "run" / "control.sock"
        srv = ControlServer(daemon.runtime, {}, socket_path=path)
        daemon.run(srv.start())
        try:
            p = ctl(str(path), "status", user="65534")
            assert p.returncode == 4
            assert f"permission denied on {path}: sidusctl must run as root" in p.stderr
            os.chmod(path, 0o666)          # even if someone widens the mode, the server checks the peer
            p = ctl(str(path), "status", user="65534")
            assert p.returncode == 1
            assert "permission denied: the control socket is for root" in p.stderr
        finally:
            daemon.run(srv.stop())
    finally:
        import shutil
        shutil.rmtree(top)


def test_start_replaces_a_stale_socket_but_nothing_else(tmp_path, daemon):
    path = tmp_path / "c.sock"

    def start_stop() -> None:
        srv = ControlServer(daemon.runtime, {}, socket_path=path)
        daemon.run(srv.start())
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        daemon.run(srv.stop())

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    start_stop()                                           # stale socket: replaced
    assert not path.exists()

    path.write_text("mine")                                # a regular file: refused, left alone
    with pytest.raises(StartupError, match="exists and is not a socket"):
        start_stop()
    assert path.read_text() == "mine"
    path.unlink()

    target = tmp_path / "target"
    target.write_text("keep")
    path.symlink_to(target)                                # a symlink: refused, never followed
    with pytest.raises(StartupError, match="is a symlink"):
        start_stop()
    assert path.is_symlink() and target.read_text() == "keep"
    path.unlink()

    with pytest.raises(StartupError, match="is in use: is another sidusd running"):
        daemon.run(ControlServer(daemon.runtime, {}, socket_path=daemon.sock).start())
    assert ctl(daemon, "status").returncode == 0           # the live one was not disturbed

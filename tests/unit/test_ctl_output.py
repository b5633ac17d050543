"""sidusctl human output (golden strings) and command line -> request mapping."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from sidusd import ctl
from sidusd.control import messages as m

UTC = dt.UTC
T = 1764000000.0            # 2025-11-24 16:00:00 UTC


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (412, "412 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (43210, "42.2 KiB"), (34 * 1024 * 1024 + 200000, "34.2 MiB"), (3 * 1024 ** 3, "3.0 GiB"),
    (None, "-"), ("12", "-"),
])
def test_fmt_size(n, text):
    assert ctl.fmt_size(n) == text


@pytest.mark.parametrize("s, text", [
    (0, "0.00 s"), (0.0123, "0.01 s"), (9.994, "9.99 s"), (9.999, "10.0 s"), (12.34, "12.3 s"),
    (59.94, "59.9 s"), (59.96, "1 min 0 s"), (125, "2 min 5 s"), (3725.4, "1 h 2 min"),
    (2 * 86400 + 4 * 3600 + 5, "2 d 4 h"), (None, "-"),
])
def test_fmt_duration(s, text):
    assert ctl.fmt_duration(s) == text


STATUS = {
    "version": "0.1.0", "pid": 4242, "started_at": T - 3725, "uptime_s": 3725.4,
    "config_path": "/etc/sidus/sidus.yaml", "generation": 3,
    "last_reload": {"t": T - 60, "ok": False, "error": "images.demo.kernel: required key is missing",
                    "restart_needed": []},
    "listeners": {
        "dhcp": [{"proto": "udp", "address": "0.0.0.0", "port": 67, "interface": "eth1"},
                 {"proto": "udp", "address": "0.0.0.0", "port": 4011, "interface": "eth1"}],
        "tftp": [{"proto": "udp", "address": "127.0.0.1", "port": 6969}],
    },
    "active_transfers": 2, "transfers_by_service": {"tftp": 2, "http": 0},
    "counters": {"dhcp.rx": 12, "tftp.transfers.done": 140, "dhcp.malformed": 1},
    "backend_status": {"nfs": {"ok": True, "detail": "2 exports"}},
}

STATUS_TEXT = """\
sidusd 0.1.0  pid 4242  up 1 h 2 min
config            /etc/sidus/sidus.yaml (generation 3)
last reload       REFUSED at 2025-11-24 15:59:00: images.demo.kernel: required key is missing
transfers         2 in flight (http 0, tftp 2)

SERVICE  PROTO  ADDRESS    PORT  INTERFACE
dhcp     udp    0.0.0.0    67    eth1
dhcp     udp    0.0.0.0    4011  eth1
tftp     udp    127.0.0.1  6969  -

BACKEND  OK   DETAIL
nfs      yes  2 exports

COUNTER              VALUE
dhcp.malformed       1
dhcp.rx              12
tftp.transfers.done  140"""


def test_status_golden():
    assert ctl.render_status(STATUS, UTC) == STATUS_TEXT


def test_status_after_good_reload_and_nothing_running():
    r = {"version": "0.1.0", "pid": 1, "uptime_s": 5, "config_path": "/c.yaml", "generation": 2,
         "last_reload": {"t": T, "ok": True, "error": None,
                         "restart_needed": ["listeners changed: restart sidusd to apply them"]},
         "listeners": {}, "active_transfers": 0, "counters": {}, "backend_status": {}}
    assert ctl.render_status(r, UTC) == """\
sidusd 0.1.0  pid 1  up 5.00 s
config            /c.yaml (generation 2)
last reload       ok at 2025-11-24 16:00:00
                  note: listeners changed: restart sidusd to apply them
transfers         0 in flight

no listeners

no counters yet"""


CLIENTS = [
    {"mac": "52:54:00:00:00:01", "ip": "10.13.20.101", "arch": "bios", "first_seen": T, "last_seen": T + 2.5,
     "timeline": [
         {"t": T + 0.123, "event": "dhcp.offer", "file": "pxelinux.0"},
         {"t": T + 0.5, "event": "tftp", "file": "pxelinux.0", "bytes": 43210, "duration_s": 0.1042},
         {"t": T + 1.0, "event": "tftp", "file": "pxelinux.cfg/01-52-54-00-00-00-01", "bytes": 412,
          "duration_s": 0.0123, "blksize": 1468},
         {"t": T + 2.5, "event": "tftp.error", "file": "ldlinux.c32", "error": "not found"},
     ]},
    {"mac": "52:54:00:00:00:02", "ip": None, "arch": "uefi-x64", "first_seen": T, "last_seen": T, "timeline": [],
     "unanswered": None},
    {"mac": "52:54:00:00:00:03", "ip": None, "arch": "efi-ia32", "first_seen": T, "last_seen": T,
     "timeline": [{"t": T, "event": "dhcp.unanswered", "code": "no_boot_file", "reason": "no boot_files.uefi_ia32"}],
     "unanswered": {"t": T, "code": "no_boot_file", "reason": "no boot_files.uefi_ia32"}},
]

CLIENTS_TEXT = """\
MAC                IP            ARCH      LAST SEEN            EVENTS  ANSWER
52:54:00:00:00:01  10.13.20.101  bios      2025-11-24 16:00:02  4       -
    16:00:00.123  dhcp.offer  file=pxelinux.0
    16:00:00.500  tftp  pxelinux.0  42.2 KiB  0.10 s
    16:00:01.000  tftp  pxelinux.cfg/01-52-54-00-00-00-01  412 B  0.01 s  blksize=1468
    16:00:02.500  tftp.error  file=ldlinux.c32  error="not found"
52:54:00:00:00:02  -             uefi-x64  2025-11-24 16:00:00  0       -
52:54:00:00:00:03  -             efi-ia32  2025-11-24 16:00:00  1       NONE: no boot_files.uefi_ia32
    16:00:00.000  dhcp.unanswered  code=no_boot_file  reason="no boot_files.uefi_ia32\""""


def test_clients_golden():
    assert ctl.render_clients(CLIENTS, UTC) == CLIENTS_TEXT
    assert ctl.render_clients([], UTC) == "no machine seen yet"


def test_event_size_field_may_be_called_size():
    e = {"t": T, "event": "http", "file": "vmlinuz", "size": 7 * 1024 * 1024, "duration_s": 1.5}
    assert ctl.render_event(e, UTC) == "16:00:00.000  http  vmlinuz  7.0 MiB  1.50 s"


HOSTS = [
    {"mac": "52:54:00:00:00:01", "profile": "default", "hostname": "vm1", "image": None, "ip": "10.0.0.5",
     "append": "sidus.marker=one"},
    {"mac": "52:54:00:00:00:02", "profile": "compute", "hostname": None, "image": "bookworm", "ip": None,
     "append": ""},
]


def test_hosts_golden():
    assert ctl.render_hosts(HOSTS) == """\
MAC                HOSTNAME  PROFILE  IMAGE     IP        APPEND
52:54:00:00:00:01  vm1       default  -         10.0.0.5  sidus.marker=one
52:54:00:00:00:02  -         compute  bookworm  -         -"""
    assert ctl.render_hosts([]) == "no hosts in the inventory"


def test_other_ops_output():
    assert ctl.render(m.OP_HOSTS_ADD, {"host": HOSTS[0], "previous": None}) == """\
host 52:54:00:00:00:01 added
MAC                HOSTNAME  PROFILE  IMAGE  IP        APPEND
52:54:00:00:00:01  vm1       default  -      10.0.0.5  sidus.marker=one"""
    before = {**HOSTS[0], "hostname": None, "ip": None, "image": "bookworm"}
    assert ctl.render(m.OP_HOSTS_ADD, {"host": HOSTS[0], "previous": before}) == """\
host 52:54:00:00:00:01 replaced (before / after)
MAC                HOSTNAME  PROFILE  IMAGE     IP        APPEND
52:54:00:00:00:01  -         default  bookworm  -         sidus.marker=one
52:54:00:00:00:01  vm1       default  -         10.0.0.5  sidus.marker=one"""
    assert ctl.render(m.OP_HOSTS_REMOVE, {"removed": "52:54:00:00:00:01"}) == "host 52:54:00:00:00:01 removed"
    assert ctl.render(m.OP_RELOAD, {"ok": True, "generation": 4, "restart_needed": ["restart sidusd"]}) == \
        "reloaded (generation 4)\nwarning: restart sidusd"


# -- command line -> request -------------------------------------------------------

@pytest.mark.parametrize("argv, op, args", [
    (["status"], "status", {}),
    (["reload"], "reload", {}),
    (["clients"], "clients", {}),
    (["clients", "52-54-00-AB-CD-EF"], "clients", {"mac": "52:54:00:ab:cd:ef"}),
    (["hosts", "list"], "hosts.list", {}),
    (["hosts", "remove", "52:54:00:00:00:0A"], "hosts.remove", {"mac": "52:54:00:00:00:0a"}),
    (["hosts", "add", "52:54:00:00:00:01", "--profile", "default"], "hosts.add",
     {"mac": "52:54:00:00:00:01", "profile": "default"}),
    (["hosts", "add", "52:54:00:00:00:01", "--profile", "p", "--hostname", "vm1", "--image", "deb",
      "--ip", "10.0.0.9", "--append", "quiet splash"], "hosts.add",
     {"mac": "52:54:00:00:00:01", "profile": "p", "hostname": "vm1", "image": "deb", "ip": "10.0.0.9",
      "append": "quiet splash"}),
])
def test_requests_from_argv(argv, op, args):
    assert ctl._request(ctl._parser().parse_args(argv)) == (op, args)


def test_global_options_before_or_after_the_command():
    p = ctl._parser()
    for argv in (["--json", "--socket", "/x.sock", "status"], ["status", "--json", "--socket", "/x.sock"],
                 ["hosts", "list", "--json", "--socket", "/x.sock"]):
        ns = p.parse_args(argv)
        assert ns.json is True and ns.socket == "/x.sock", argv
    ns = p.parse_args(["status"])
    assert ns.json is False and ns.socket is None and ns.timeout == ctl.DEFAULT_TIMEOUT_S


@pytest.mark.parametrize("argv", [
    ["hosts", "add", "52:54:00:00:00", "--profile", "p"],
    ["hosts", "remove", "zz:54:00:00:00:01"],
    ["clients", "ff:ff:ff:ff:ff:ff"],
])
def test_bad_mac_refused_locally_with_usage_exit(argv, tmp_path, capsys):
    # the socket does not exist: reaching it would exit 3, so 2 proves nothing was sent
    code = ctl.main(["--socket", str(tmp_path / "absent.sock")] + argv)
    err = capsys.readouterr().err
    assert code == ctl.EXIT_USAGE
    assert err.startswith("sidusctl: ") and ("not a MAC address" in err or "multicast" in err)


def test_json_output_is_the_raw_result(monkeypatch, capsys):
    monkeypatch.setenv(m.SOCKET_ENV, "/x.sock")
    monkeypatch.setattr(ctl, "call", lambda path, op, args, t: m.Response(ok=True, result=HOSTS))
    assert ctl.main(["hosts", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == HOSTS


def test_daemon_error_is_printed_and_exits_1(monkeypatch, capsys):
    monkeypatch.setenv(m.SOCKET_ENV, "/x.sock")
    monkeypatch.setattr(ctl, "call", lambda path, op, args, t: m.Response(ok=False, error="no host x"))
    assert ctl.main(["reload"]) == ctl.EXIT_ERROR
    assert capsys.readouterr().err == "sidusd: no host x\n"


def test_socket_path_precedence(monkeypatch, tmp_path):
    """--socket > $SIDUS_SOCKET > control.socket_path of the config (--config > $SIDUS_CONFIG)."""
    seen = []
    monkeypatch.setattr(ctl, "call", lambda path, op, args, t: seen.append(path) or m.Response(True, {}))
    for name in (m.SOCKET_ENV, "SIDUS_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    env_cfg, flag_cfg = tmp_path / "env.yaml", tmp_path / "flag.yaml"
    base = 'tftp: {root: /srv/t}\ndhcp: {mode: "off"}\nnfs: {backend: none}\n'
    env_cfg.write_text(base + "control: {socket_path: /envcfg.sock}\n")
    flag_cfg.write_text(base + "control: {socket_path: /flagcfg.sock}\n")
    monkeypatch.setenv("SIDUS_CONFIG", str(env_cfg))
    ctl.main(["reload"])
    ctl.main(["--config", str(flag_cfg), "reload"])
    monkeypatch.setenv(m.SOCKET_ENV, "/env.sock")
    ctl.main(["--config", str(flag_cfg), "reload"])
    ctl.main(["--socket", "/opt.sock", "reload"])
    assert seen == ["/envcfg.sock", "/flagcfg.sock", "/env.sock", "/opt.sock"]


def test_status_shows_the_supervisor_and_the_worker():
    r = {"version": "0.1.0", "pid": 10, "uptime_s": 5, "config_path": "/c", "generation": 1,
         "listeners": {}, "counters": {}, "privsep": True,
         "processes": [{"role": "supervisor", "pid": 10, "user": "root", "cap_eff": "000001ffffffffff"},
                       {"role": "worker", "pid": 11, "user": "sidus", "state": "running",
                        "cap_eff": "0000000000000000", "restarts": 2}]}
    text = ctl.render_status(r, UTC)
    lines = text.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("PROCESS"))
    assert lines[head].split() == ["PROCESS", "PID", "USER", "STATE", "CAPABILITIES", "RESTARTS"]
    assert lines[head + 1].split() == ["supervisor", "10", "root", "running", "0x1ffffffffff", "-"]
    assert lines[head + 2].split() == ["worker", "11", "sidus", "running", "none", "2"]

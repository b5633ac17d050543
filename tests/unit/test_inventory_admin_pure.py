"""The pure parts of hosts show/set/adopt and clients reasons: control/ops.py, net/unanswered.py,
ctl_inventory.py (the daemon-side behaviour: tests/integration/test_inventory_admin.py)."""

from __future__ import annotations

import argparse

from sidusd import ctl, ctl_inventory
from sidusd.control import messages as m
from sidusd.control.ops import unanswered
from sidusd.net.unanswered import UNANSWERED, UnansweredLog


def test_unanswered_is_the_last_refusal_not_followed_by_an_answer():
    refused = {"t": 1.0, "event": "dhcp.unanswered", "code": "unknown_host", "reason": "not in the inventory"}
    assert unanswered([refused]) == {"t": 1.0, "code": "unknown_host", "reason": "not in the inventory"}
    assert unanswered([refused, {"t": 2.0, "event": "tftp", "file": "x"}])["code"] == "unknown_host"
    assert unanswered([refused, {"t": 2.0, "event": "dhcp.offer"}]) is None
    assert unanswered([{"t": 0.5, "event": "dhcp.ack"}, refused])["t"] == 1.0
    assert unanswered([]) is None


def test_unanswered_log_is_rate_limited_per_mac_and_bounded():
    log = UnansweredLog(max_macs=2, first_s=60, max_s=600)
    assert log.note("a", "unknown_host", 0.0) == 0           # the first at once
    assert log.note("a", "unknown_host", 1.0) is None        # a PXE ROM retrying: not again
    assert log.note("a", "unknown_host", 2.0) is None
    assert log.note("b", "no_boot_file", 2.0) == 0           # another machine: its own limit
    assert log.note("a", "unknown_host", 61.0) == 2          # then after first_s, saying how many were not
    assert log.note("a", "no_boot_file", 62.0) == 0          # a new reason: at once
    log.answered("a")
    assert log.note("a", "no_boot_file", 63.0) == 0          # answered in between: at once
    log.note("c", "unknown_host", 64.0)                      # bounded: the least recent (b) goes
    assert log.note("b", "no_boot_file", 65.0) == 0
    assert UNANSWERED == {"unknown_host", "no_boot_file"}


def parse(*argv: str) -> argparse.Namespace:
    return ctl._parser().parse_args(list(argv))


def test_requests_of_hosts_show_set_adopt():
    mac = "52:54:00:00:00:0a"
    assert ctl._request(parse("hosts", "show", "52-54-00-00-00-0A")) == (m.OP_HOSTS_SHOW, {"mac": mac})
    assert ctl._request(parse("hosts", "set", mac, "--append", "quiet", "--unset", "ip", "--unset", "image")) == (
        m.OP_HOSTS_SET, {"mac": mac, "append": "quiet", "unset": ["ip", "image"]})
    assert ctl._request(parse("hosts", "adopt", mac, "--hostname", "n1")) == (
        m.OP_HOSTS_ADOPT, {"mac": mac, "hostname": "n1"})


def test_render_show_set_adopt_and_problems():
    host = {"mac": "52:54:00:00:00:0a", "profile": "default", "hostname": "n1", "image": None, "ip": None,
            "append": "quiet"}
    shown = ctl.render(m.OP_HOSTS_SHOW, {
        "mac": host["mac"], "host": host,
        "boots": {"profile": "default", "image": "demo", "image_root": "/srv/demo", "kernel": "k",
                  "initrd": "i", "overlay": "tmpfs", "append": "quiet"},
        "client": {"ip": "10.0.0.9", "arch": "bios", "events": 3,
                   "unanswered": {"code": "unknown_host", "reason": "not in the inventory"}}})
    assert shown.splitlines()[0] == "host 52:54:00:00:00:0a"
    assert "hostname:      n1" in shown and "  image_root:    /srv/demo" in shown
    assert "  answer:        NONE: not in the inventory" in shown
    stranger = ctl.render(m.OP_HOSTS_SHOW, {"mac": host["mac"], "host": None, "boots": None, "client": None})
    assert "(not in the inventory)" in stranger and "boots:         nothing" in stranger
    changed = ctl.render(m.OP_HOSTS_SET, {"host": host, "previous": {**host, "append": ""}, "changed": ["append"]})
    assert changed.splitlines()[0] == "host 52:54:00:00:00:0a changed (append; before / after)"
    assert len(changed.splitlines()) == 4                     # the header and two rows
    assert ctl.render(m.OP_HOSTS_ADOPT, {"host": host, "client": {}}).startswith("host 52:54:00:00:00:0a adopted")
    lines = ctl_inventory.problem_lines([{"key": "tftp.root", "path": "/srv/tftp", "reason": "no such directory",
                                          "fix": "mkdir -p /srv/tftp"}])
    assert lines == ["", "PROBLEMS (1): what a boot needs and does not find (sidusd --check)",
                     "  tftp.root: /srv/tftp: no such directory; fix: mkdir -p /srv/tftp"]
    assert ctl_inventory.problem_lines([]) == []

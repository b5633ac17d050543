"""Boot history survives a restart: a scripted boot (scapy DHCP, tftpy, curl up-reports) against the
real sidusd, SIGTERM, start again, and ``sidusctl clients`` still shows the machine, its timeline
and its "up after N s"; a torn journal line (kill -9 mid-write) is dropped, the rest kept."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from conftest import require_root, require_tool
from scripted_boot import boot_lab

from sidusd.history import FLUSH_S

pytestmark = pytest.mark.netns

MAC = "52:54:00:00:17:01"


@pytest.fixture(params=[True, False], ids=["privsep", "one-process"])
def lab(tmp_path, request):
    require_root()
    require_tool("ip")
    require_tool("curl")
    pytest.importorskip("scapy", reason="missing tool: scapy (pip, pyproject test extra)")
    pytest.importorskip("tftpy", reason="missing tool: tftpy (pip, pyproject test extra)")
    with boot_lab(tmp_path, [{"mac": MAC, "hostname": "node17", "profile": "default"}], "sidus-t-hist",
                  privsep=request.param) as lab:
        yield lab


def clients(lab) -> list[dict]:
    r = lab.ctl("--json", "clients")
    assert r.returncode == 0, r.stderr + lab.log_tail()
    return json.loads(r.stdout)


def test_clients_and_timelines_survive_a_restart(lab):
    lab.start()
    lab.boot(MAC)
    before = [c for c in clients(lab) if c["mac"] == MAC]
    assert before, clients(lab)
    events = [e["event"] for e in before[0]["timeline"]]
    assert events[0] == "dhcp.offer" and events[-1] == "up", events
    assert lab.stop() == 0
    journal = lab.tmp / "state" / "history.jsonl"
    assert journal.exists() and MAC in journal.read_text()

    lab.start()
    after = [c for c in clients(lab) if c["mac"] == MAC]
    assert after, (clients(lab), lab.log_tail())
    assert after[0]["timeline"] == before[0]["timeline"]
    assert after[0]["ip"] == before[0]["ip"] == "10.78.0.50" and after[0]["arch"] == "bios"
    last = after[0]["timeline"][-1]
    assert last["event"] == "up" and last["stage"] == "multiuser" and last["after_s"] >= 0
    text = lab.ctl("clients").stdout                      # the table an operator reads
    assert MAC in text and "up after" in text, text
    # the daemon keeps recording after a restart: a second boot lands behind the first one
    lab.boot(MAC, xid=0x7101)
    again = [c for c in clients(lab) if c["mac"] == MAC][0]["timeline"]
    assert len(again) > len(before[0]["timeline"]) and again[-1]["event"] == "up"


def test_a_torn_journal_tail_is_dropped_and_the_rest_kept(lab):
    lab.start()
    lab.boot(MAC)
    n = len([c for c in clients(lab) if c["mac"] == MAC][0]["timeline"])
    time.sleep(FLUSH_S + 1.0)                              # the journal's batch is on disk
    os.killpg(lab.proc.pid, signal.SIGKILL)                # no graceful stop: what is on disk counts
    lab.proc.wait(10)
    lab.proc = None
    journal = lab.tmp / "state" / "history.jsonl"
    with open(journal, "ab") as f:
        f.write(b'{"k":"e","mac":"52:54:00:00:17:01","e":{"t":1.0,"ev')   # a write cut short
    lab.start()
    after = [c for c in clients(lab) if c["mac"] == MAC]
    assert after and len(after[0]["timeline"]) == n, (after, lab.log_tail())
    assert all(e.get("t") != 1.0 for e in after[0]["timeline"])
    assert journal.read_bytes().endswith(b"\n")           # rewritten at start: whole lines only

"""Boots cut out of timelines (sidusd.boottrack), the counter families (sidusd.metrics), the
up-report rules (sidusd.net.http_up) and the history journal's replay (sidusd.history)."""

from __future__ import annotations

import asyncio
import json

from aiohttp.test_utils import make_mocked_request

from sidusd.boottrack import BOOT_IDLE_S, current_boot, step
from sidusd.history import HistoryJournal, replay
from sidusd.metrics import SidusCollector
from sidusd.net.http_up import BURST, UpReports
from sidusd.observability import Observer

MAC = "52:54:00:00:17:0a"
FILES = ("images/demo/vmlinuz", "images/demo/initrd.img")


def e(t, event, **f):
    return {"t": t, "event": event, **f}


def ok(t, name, via="tftp"):
    return e(t, via, file=name, outcome="ok", status=200, duration_s=0.1)


# -- boottrack -------------------------------------------------------------------------

def test_stages_of_one_boot_each_once_from_the_first_reply():
    tl = [e(10, "dhcp.offer", file="pxelinux.0"), e(11, "dhcp.ack", file="pxelinux.0"),
          ok(12, "pxelinux.0"), ok(13, "pxelinux.cfg/01-x"), ok(20, "images/demo/vmlinuz"),
          ok(25, "images/demo/initrd.img"), e(40, "up", stage="root"), e(41, "up", stage="root"),
          e(55, "up", stage="multiuser")]
    boot, seen = None, []
    for x in tl:
        boot, reached = step(boot, x, FILES)
        seen += reached
    assert seen == [("first_file", 2.0), ("kernel", 10.0), ("initrd", 15.0), ("root", 30.0), ("up", 45.0)]


def test_a_chainload_is_one_boot_a_reboot_after_the_kernel_is_another():
    tl = [e(0, "dhcp.offer", file="undionly.kpxe"), ok(1, "undionly.kpxe"),
          e(2, "dhcp.offer", file="http://s/boot/x.ipxe"), ok(3, "boot/x.ipxe", "http")]
    assert current_boot(tl, FILES).start == 0
    tl += [ok(5, "images/demo/vmlinuz"), e(60, "dhcp.offer", file="undionly.kpxe")]
    assert current_boot(tl, FILES).start == 60


def test_a_rom_starting_over_or_an_idle_boot_begins_again_failed_transfers_reach_nothing():
    tl = [e(0, "dhcp.offer", file="pxelinux.0"), ok(1, "pxelinux.0"), e(30, "dhcp.offer", file="pxelinux.0")]
    assert current_boot(tl, FILES).start == 30
    tl = [e(0, "dhcp.offer", file="pxelinux.0"), e(BOOT_IDLE_S + 1, "dhcp.offer", file="pxelinux.0")]
    assert current_boot(tl, FILES).start == BOOT_IDLE_S + 1
    b = current_boot([e(0, "dhcp.offer", file="a"), e(1, "tftp", file="a", outcome="timeout"),
                      e(2, "http", file="a", outcome="ok", status=404), e(3, "up", stage="bogus")], FILES)
    assert b.reached == {}
    assert current_boot([ok(1, "a"), e(2, "up", stage="root")], FILES) is None    # no boot began
    assert current_boot([e(0, "dhcp.offer", file=None)], FILES) is None           # no boot file: no boot


# -- the collector ---------------------------------------------------------------------

class _Rt:
    def __init__(self, counters):
        self.observer = Observer()
        self.observer.counters.update(counters)
        self.backend_status = {"nfs": {"ok": False}}
        self.started_at, self.generation = 5.0, 2

    def refresh_backend_status(self):
        pass


def _samples(counters):
    col = SidusCollector(_Rt(counters), lambda: {"tftp": 3})
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in col.collect() for s in m.samples}


def test_counters_become_families_with_labels_unknown_ones_are_kept():
    got = _samples({"dhcp.offers": 4, "dhcp.drop.unknown_host": 2, "dhcp.malformed": 1,
                    "tftp.refused.not_found": 7, "reload.refused": 1, "x.y.z": 9, "http.up.refused.rate": 3})
    assert got[("sidus_dhcp_replies_total", (("kind", "offer"),))] == 4
    assert got[("sidus_dhcp_replies_total", (("kind", "ack"),))] == 0          # known: exported from 0
    assert got[("sidus_dhcp_dropped_total", (("reason", "unknown_host"),))] == 2
    assert got[("sidus_dhcp_dropped_total", (("reason", "malformed"),))] == 1
    assert got[("sidus_tftp_refused_total", (("reason", "not_found"),))] == 7
    assert got[("sidus_reloads_total", (("result", "refused"),))] == 1
    assert got[("sidus_up_reports_total", (("result", "rate"),))] == 3
    assert got[("sidus_events_total", (("name", "x.y.z"),))] == 9
    assert got[("sidus_transfers_in_flight", (("service", "tftp"),))] == 3
    assert got[("sidus_backend_up", (("backend", "nfs"),))] == 0
    assert all(n.startswith("sidus_") for n, _ in got)


# -- up-reports ------------------------------------------------------------------------

class _UpRt:
    def __init__(self):
        self.t = 1000.0
        self.observer = Observer(clock=lambda: self.t)
        self.config = None
        self.inventory = self

    def resolve(self, mac, config):
        return None


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, event, **kw):
        self.lines.append(event)


def _ask(up, path, method="POST", peer="10.0.0.5"):
    return asyncio.run(up.answer(make_mocked_request(method, path), peer))


def test_up_reports_only_for_the_asker_booting_each_stage_once():
    rt, log = _UpRt(), _Log()
    up = UpReports(rt, log, clock=lambda: rt.t, monotonic=lambda: 0.0)
    assert _ask(up, "/up?stage=root").status == 403                       # nobody did DHCP from there
    rt.observer.client_seen(MAC, "10.0.0.5", "bios")
    assert _ask(up, "/up?stage=root").status == 409                       # seen, but no boot began
    rt.observer.timeline(MAC, "dhcp.offer", file="pxelinux.0")
    rt.observer.client_seen("52:54:00:00:17:0b", "10.0.0.6")
    assert _ask(up, "/up?stage=root&mac=52:54:00:00:17:0b").status == 403  # another machine's MAC
    assert _ask(up, "/up?stage=root&mac=zz").status == 400
    assert _ask(up, "/up?stage=reboot").status == 400
    assert _ask(up, "/up?stage=root", method="DELETE").status == 405
    rt.t += 12.5
    r = _ask(up, "/up?stage=root&mac=52-54-00-00-17-0A")
    assert r.status == 200 and r.text == "up after 12.5 s (root)\n"
    assert _ask(up, "/up?stage=root").status == 200                       # a repeat changes nothing
    rt.t += 10
    assert _ask(up, "/up?stage=multiuser", method="GET").status == 200
    last = list(rt.observer.clients[MAC].timeline)[-2:]
    assert [(x["event"], x["stage"], x["after_s"]) for x in last] == [("up", "root", 12.5),
                                                                       ("up", "multiuser", 22.5)]
    c = rt.observer.counters
    assert (c["http.up.accepted"], c["http.up.repeated"]) == (2, 1)
    assert c["http.up.refused.not_yours"] == 1 and c["http.up.refused.unknown"] == 1
    assert log.lines.count("http.up_refused") == 1                       # refusals: one line per 10 s


def test_up_reports_are_rate_limited_before_anything_is_read():
    rt = _UpRt()
    up = UpReports(rt, _Log(), clock=lambda: rt.t, monotonic=lambda: 0.0)
    codes = [_ask(up, "/up?stage=root").status for _ in range(int(BURST) + 5)]
    assert codes.count(429) == 5 and rt.observer.counters["http.up.refused.rate"] == 5


# -- the history journal ---------------------------------------------------------------

def test_replay_keeps_order_and_skips_bad_lines():
    lines = [json.dumps({"k": "c", "mac": MAC, "ip": "10.0.0.5", "arch": "bios", "first_seen": 1.0,
                         "last_seen": 2.0, "timeline": [e(1.0, "dhcp.offer", file="p")]}),
             json.dumps({"k": "s", "mac": "52:54:00:00:17:0b", "ip": "10.0.0.6", "arch": None, "t": 3.0}),
             "not json", json.dumps({"k": "e", "mac": "bad", "e": e(4.0, "x")}),
             json.dumps({"k": "e", "mac": MAC, "e": e(5.0, "tftp", file="p")}), ""]
    recs, bad = replay(lines)
    assert bad == 2
    assert [r.mac for r in recs] == ["52:54:00:00:17:0b", MAC]              # the last one touched is newest
    assert [x["event"] for x in recs[1].timeline] == ["dhcp.offer", "tftp"] and recs[1].last_seen == 5.0


def test_journal_round_trip_torn_tail_and_restore_behind_new_records(tmp_path):
    path = tmp_path / "history.jsonl"
    obs = Observer(clock=lambda: 50.0)

    async def run():
        j = HistoryJournal(path, obs)
        j.load()
        obs.client_seen(MAC, "10.0.0.5", "bios")
        obs.timeline(MAC, "dhcp.offer", file="pxelinux.0")
        await j.aclose()
    asyncio.run(run())
    with open(path, "ab") as f:
        f.write(b'{"k":"e","mac":"52:54:00:00:17:0a","e":{"t":9')         # torn by a crash
    fresh = Observer(clock=lambda: 60.0)
    fresh.timeline("52:54:00:00:17:0c", "dhcp.offer", file="x")            # seen since the start
    j2 = HistoryJournal(path, fresh)
    assert j2.load() == 1
    assert list(fresh.clients) == [MAC, "52:54:00:00:17:0c"]
    assert fresh.clients[MAC].ip == "10.0.0.5" and fresh.mac_for_ip("10.0.0.5") == MAC
    assert [x["event"] for x in fresh.clients[MAC].timeline] == ["dhcp.offer"]
    assert fresh.counters["history.lines_torn"] == 1
    assert path.read_bytes().endswith(b"\n") and len(path.read_text().splitlines()) == 2   # rewritten
    asyncio.run(j2.aclose())


def test_journal_compaction_keeps_it_bounded(tmp_path):
    n = 5
    path = tmp_path / "h.jsonl"
    obs = Observer(clock=lambda: 1.0)
    j = HistoryJournal(path, obs, compact_after=n)
    j.load()
    for i in range(100):
        obs.timeline(MAC, "tftp", file=f"f{i}", outcome="ok")
        j.flush()
    assert len(path.read_text().splitlines()) < 2 * n + 2
    recs, bad = replay(path.read_text().splitlines())
    assert bad == 0 and len(recs[0].timeline) == 64 and recs[0].timeline[-1]["file"] == "f99"
    asyncio.run(j.aclose())


def test_the_endpoint_is_off_and_on_loopback_by_default_history_on():
    from sidusd import config
    cfg = config.parse("dhcp: {mode: 'off'}\ntftp: {root: /srv/tftp}\n", base_dir=None)
    assert cfg.metrics.enabled is False and str(cfg.metrics.address) == "127.0.0.1"
    assert cfg.history.enabled is True
    from sidusd.history import history_path
    assert history_path(cfg) == cfg.state_dir / "history.jsonl"
    bad = "dhcp: {mode: 'off'}\ntftp: {root: /srv/tftp}\nmetrics: {port: 0}\n"
    with __import__("pytest").raises(config.ConfigError, match="metrics.port"):
        config.parse(bad, base_dir=None)


def test_journal_writes_a_seen_only_on_change_and_bounds_its_buffer(tmp_path):
    obs = Observer(clock=lambda: 1.0)
    j = HistoryJournal(tmp_path / "h.jsonl", obs, max_buffered=10)
    j.load()
    for _ in range(5):
        obs.client_seen(MAC, "10.0.0.5", "bios")          # every DHCP reply of a storm says the same
    obs.client_seen(MAC, "10.0.0.7", "bios")
    assert [json.loads(b)["ip"] for b in j._buf] == ["10.0.0.5", "10.0.0.7"]
    for i in range(20):
        obs.timeline(MAC, "tftp", file=f"f{i}")
    assert len(j._buf) == 10 and obs.counters["history.lines_dropped"] == 12
    asyncio.run(j.aclose())


def test_summary_for_the_live_views():
    from sidusd.boottrack import summary
    assert summary(None, 5.0)["state"] == "never"
    tl = [e(10, "dhcp.offer", file="pxelinux.0"), ok(12, "pxelinux.0"), ok(20, "images/demo/vmlinuz")]
    s = summary(current_boot(tl, FILES), 30.0)
    assert (s["state"], s["stage"], s["started"], s["stages"]) == ("booting", "kernel", 10, {"first_file": 2.0,
                                                                                            "kernel": 10.0})
    assert summary(current_boot(tl, FILES), 20 + BOOT_IDLE_S)["state"] == "stale"
    s = summary(current_boot(tl + [e(50, "up", stage="multiuser")], FILES), 60.0)
    assert (s["state"], s["stage"], s["stages"]["up"]) == ("up", "up", 40.0)
    assert summary(current_boot(tl[:1], FILES), 11.0)["stage"] == "dhcp"

"""The live views' pure part (sidusd/liveview.py): states, rows, filter, screen lines, safe JSON/SSE."""

from __future__ import annotations

import json
import re

from sidusd import liveview as lv
from sidusd.watch import Keys

T0 = 1764000000.0
FILES = ("images/demo/vmlinuz", "images/demo/initrd.img")
MAC1, MAC2, MAC3 = "52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:09"


def boot(t0: float, *, upto: str) -> list[dict]:
    tl = [{"t": t0, "event": "dhcp.offer", "file": "pxelinux.0", "ip": "10.0.0.5"},
          {"t": t0 + 1, "event": "tftp", "file": "pxelinux.0", "bytes": 40000, "outcome": "ok"},
          {"t": t0 + 2, "event": "tftp", "file": "images/demo/vmlinuz", "bytes": 300000, "outcome": "ok"},
          {"t": t0 + 3, "event": "tftp", "file": "images/demo/initrd.img", "bytes": 200000, "outcome": "ok"},
          {"t": t0 + 9, "event": "up", "stage": "multiuser", "after_s": 9.0}]
    n = {"dhcp": 1, "first_file": 2, "kernel": 3, "initrd": 4, "up": 5}[upto]
    return tl[:n]


def client(mac: str, tl: list[dict], ip: str = "10.0.0.5") -> dict:
    return {"mac": mac, "ip": ip, "arch": "bios", "first_seen": T0, "last_seen": tl[-1]["t"], "timeline": tl}


HOSTS = [{"mac": MAC1, "hostname": "node1", "profile": "compute", "ip": None, "append": "secret=hunter2"},
         {"mac": MAC2, "hostname": "node2", "profile": "login", "ip": None}]


def files(mac: str):
    return FILES


def test_states_of_machines():
    rows = lv.machines(HOSTS, [client(MAC1, boot(T0, upto="kernel")), client(MAC3, boot(T0, upto="up"))],
                       T0 + 5, files)
    by = {r["mac"]: r for r in rows}
    assert [r["mac"] for r in rows] == [MAC1, MAC2, MAC3]        # inventory first, then the unknown seen
    assert (by[MAC1]["state"], by[MAC1]["stage"]) == ("booting", "kernel")
    assert by[MAC1]["stages"] == {"first_file": 1.0, "kernel": 2.0}
    assert (by[MAC2]["state"], by[MAC2]["stage"], by[MAC2]["known"]) == ("never", None, True)
    assert (by[MAC3]["state"], by[MAC3]["known"]) == ("up", False)
    assert lv.by_state(rows) == {"never": 1, "booting": 1, "up": 1, "failed": 0, "stale": 0}
    # stale: nothing for BOOT_IDLE_S before up
    assert lv.machines(HOSTS[:1], [client(MAC1, boot(T0, upto="kernel"))], T0 + 2000, files)[0]["state"] == "stale"


def test_a_failed_transfer_is_failed_with_its_reason():
    tl = boot(T0, upto="first_file") + [{"t": T0 + 2, "event": "tftp", "file": "images/demo/vmlinuz",
                                         "bytes": 1024, "outcome": "timeout"}]
    row = lv.machines(HOSTS[:1], [client(MAC1, tl)], T0 + 3, files)[0]
    assert row["state"] == "failed" and "vmlinuz" in row["reason"] and "timeout" in row["reason"]
    # a summary sent by the daemon (control socket) is used as is
    row = lv.machines(HOSTS[:1], [{**client(MAC1, tl), "summary": {"state": "up", "stage": "up"}}], T0, None)[0]
    assert row["state"] == "up"


def test_no_secret_and_only_safe_fields_leave():
    tl = boot(T0, upto="dhcp")
    tl[0]["server"] = "10.0.0.1"
    tl[0]["chap_secret"] = "hunter2"
    row = lv.machines(HOSTS, [client(MAC1, tl)], T0, files)[0]
    text = json.dumps(lv.room([row], {}, [], {}, T0)) + json.dumps(row)
    assert "hunter2" not in text and "append" not in text and "server" not in row["timeline"][0]
    assert set(row["timeline"][0]) <= set(lv.SAFE_FIELDS)


def test_filter_by_mac_hostname_profile_state():
    rows = lv.machines(HOSTS, [client(MAC1, boot(T0, upto="up"))], T0 + 10, files)
    assert [r["mac"] for r in rows if lv.matches(r, "NODE2")] == [MAC2]
    assert [r["mac"] for r in rows if lv.matches(r, "00:01")] == [MAC1]
    assert [r["mac"] for r in rows if lv.matches(r, "login")] == [MAC2]
    assert [r["mac"] for r in rows if lv.matches(r, "up")] == [MAC1]
    assert len([r for r in rows if lv.matches(r, "")]) == 2


def test_screen_lines_and_the_filter_hides_others():
    status = {"version": "0.1.0", "counters": {"dhcp.offers": 3}, "active_transfers": 1,
              "transfers": [{"service": "tftp", "file": "images/demo/vmlinuz", "peer": "10.0.0.5:3333",
                             "bytes": 2 * 1048576, "size": 8 * 1048576, "duration_s": 2.0}]}
    clients = [client(MAC1, boot(T0, upto="first_file"))]
    lines = lv.screen(status, HOSTS, clients, T0 + 1.5, width=150, height=40)
    text = "\n".join(lines)
    assert re.search(MAC1 + r"\s+node1\s+compute\s+booting\s+first_file", text), text
    assert MAC2 in text and "never" in text and "dhcp offers 3" in text
    assert re.search(r"tftp\s+" + MAC1 + r"\s+images/demo/vmlinuz\s+2\.0 MiB of 8\.0 MiB\s+1\.0 MiB/s", text), text
    assert "LAST EVENTS" in text and "tftp pxelinux.0" in text
    only = "\n".join(lv.screen(status, HOSTS, clients, T0 + 1.5, filt="node1", width=150))
    assert MAC1 in only and MAC2 not in only and "1 hidden by the filter" in only
    small = lv.screen(status, HOSTS, clients, T0, width=30, height=8)
    assert len(small) <= 8 and all(len(line) <= 30 for line in small)


def test_keys_type_a_filter_and_quit():
    k = Keys()
    for ch in "/node1":
        k.feed(ch)
    assert k.typing and k.filter == "node1"
    k.feed("\x7f")
    k.feed("\n")
    assert not k.typing and k.filter == "node"
    k.feed("/")
    k.feed("\x1b")
    assert k.filter == "" and not k.quit
    k.feed("q")
    assert k.quit


HOSTILE = '</script><script>alert(1)</script>'


def test_a_hostile_hostname_is_escaped_in_the_page_and_the_events():
    from sidusd.web import asset
    row = lv.machines([{"mac": MAC1, "hostname": HOSTILE, "profile": "<b>p</b>", "ip": None}],
                      [client(MAC1, [{"t": T0, "event": "dhcp.offer", "file": "<img src=x onerror=alert(1)>"}])],
                      T0, files)
    data = lv.room(row, {"dhcp.offers": 1}, [], {}, T0)
    html = lv.page(asset("index.html"), data)
    # the only <script> elements are the page's own two: the data block and /room.js
    assert html.count("<script") == 2 and "alert(1)</script>" not in html and "<img" not in html
    block = re.search(r'<script type="application/json" id="room">(.*?)</script>', html, re.S)
    assert block is not None
    assert json.loads(block.group(1))["machines"][0]["hostname"] == HOSTILE     # the text, intact, as data
    ev = lv.sse("machine", lv.tile(row[0]))
    assert b"<" not in ev and b">" not in ev and ev.count(b"\n\n") == 1 and ev.startswith(b"event: machine\ndata: ")
    assert json.loads(ev.split(b"data: ", 1)[1])["hostname"] == HOSTILE
    assert "\n" not in lv.safe_json({"h": "a\nb\u2028c"}) and "\u2028" not in lv.safe_json({"h": "\u2028"})
    # the script writes text only
    js = asset("room.js")
    assert ".innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js


def test_transfers_in_flight_cross_the_privsep_wire_bounded():
    """The worker's ``stats`` lists its transfers in flight (``ipc.Active``), checked and bounded."""
    import pytest

    from sidusd.errors import RemoteProtocolError
    from sidusd.privsep import ipc

    one = {"service": "tftp", "file": "images/demo/vmlinuz", "peer": "10.0.0.5:3333", "bytes": 4096,
           "size": 300000, "duration_s": 1.5}

    def stats(active):
        return json.dumps({"t": "stats", "id": 1, "transfers": {"tftp": 1}, "listeners": {},
                           "active": active}).encode()
    assert ipc.decode_worker(stats([one])).body["active"] == [one]
    for bad in ([one] * (ipc.MAX_ACTIVE + 1), [{**one, "bytes": -1}], [{**one, "file": "x" * 600}],
                [{**one, "duration_s": float("inf")}], [{**one, "extra": 1}], [{**one, "service": "A B"}]):
        with pytest.raises(RemoteProtocolError):
            ipc.decode_worker(stats(bad))


def _web_room():
    from types import SimpleNamespace

    from sidusd.boot.inventory import Host, Inventory, Profile
    from sidusd.observability import Observer
    from sidusd.web import WebRoom
    inv = Inventory({"p": Profile(name="p", image="demo", append="sidus.key=hunter2")},
                    {MAC1: Host(mac=MAC1, profile="p", hostname="node1", append="x.secret=hunter3")})
    rt = SimpleNamespace(observer=Observer(), inventory=inv, config=None)
    return WebRoom(rt, {}, lambda: {"tftp": 0}), rt


def test_web_room_state_has_no_secret_and_a_slow_viewer_is_cut_off():
    import asyncio

    from sidusd.web import QUEUE
    room, rt = _web_room()
    rt.observer.client_seen(MAC1, "10.0.0.5", "bios")
    rt.observer.timeline(MAC1, "dhcp.offer", file="pxelinux.0", server="10.0.0.1")
    st = room.state()
    assert [m["state"] for m in st["machines"]] == ["booting"] and st["machines"][0]["hostname"] == "node1"
    assert "hunter" not in lv.safe_json(st) and "hunter" not in lv.page(room.template, st)

    async def slow():
        q: asyncio.Queue[bytes] = asyncio.Queue(QUEUE)
        room._subs.add(q)
        for i in range(QUEUE + 1):                 # nobody reads: the last one does not fit
            room._send(lv.sse("counters", {"i": i}))
        return q
    q = asyncio.run(slow())
    assert q not in room._subs and rt.observer.counters["web.slow_clients"] == 1
    items = [q.get_nowait() for _ in range(q.qsize())]
    assert items[-1] == b"" and len(items) == QUEUE               # the handler ends at the empty item

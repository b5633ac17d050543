"""What the live views show (pure): ``sidusctl watch`` and the web page of the room (issue 17).

Both read the same data: the inventory's hosts, the client history (each
machine's timeline, :mod:`sidusd.observability`) and the daemon's counters
and transfers in flight.  This module turns it into rows, states and screen
lines; it reads no clock (``now`` is passed in) and does no I/O.

* A machine's **state** (:data:`STATES`): ``never`` (an inventory host never
  seen), ``booting`` (at a stage, :func:`sidusd.boottrack.summary`), ``up``
  (its up-report said multi-user), ``failed`` (a boot in progress whose last
  entry is a failure: a TFTP transfer that did not finish, an HTTP error, a
  DHCP NAK) and ``stale`` (no entry for ``boottrack.BOOT_IDLE_S`` before ``up``).
* Only the fields of :data:`SAFE_FIELDS` of a timeline entry leave the daemon
  for the web page, and of a host only :data:`HOST_FIELDS` (never the kernel
  command line of a host, never a per-MAC config, never an iSCSI secret).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .boottrack import current_boot, summary

STATES = ("never", "booting", "up", "failed", "stale")
SAFE_FIELDS = ("t", "event", "file", "bytes", "size", "duration_s", "outcome", "status", "stage",
               "after_s", "ip")
HOST_FIELDS = ("mac", "hostname", "profile", "ip")
MAX_TEXT = 200                  # any string shown (a file name from the network is hostile)
Files = Callable[[str], "tuple[str, str] | None"]


def _text(v: Any) -> Any:
    if isinstance(v, str):
        return v[:MAX_TEXT]
    if v is None or isinstance(v, (bool, int, float)):
        return v
    return str(v)[:MAX_TEXT]


def safe_entry(e: Mapping[str, Any]) -> dict[str, Any]:
    """A timeline entry with only :data:`SAFE_FIELDS`, strings cut at :data:`MAX_TEXT`."""
    return {k: _text(e[k]) for k in SAFE_FIELDS if k in e}


def failure(e: Mapping[str, Any] | None) -> str | None:
    """Why entry ``e`` is a failed step of a boot, or None if it is not one."""
    if not e:
        return None
    ev = e.get("event")
    if ev == "tftp" and e.get("outcome") not in ("ok", "done", "probe", None):
        return f"tftp {e.get('file', '?')}: {e.get('outcome')}"
    if ev == "http" and (e.get("outcome") not in ("ok", None)
                         or (isinstance(e.get("status"), int) and e["status"] >= 400)):
        return f"http {e.get('file', '?')}: {e.get('status')} {e.get('outcome')}"
    if ev == "dhcp.nak":
        return "dhcp: NAK"
    return None


def client_summary(timeline: Sequence[Mapping[str, Any]], files: tuple[str, str] | None,
                   now: float) -> dict[str, Any]:
    """:func:`sidusd.boottrack.summary` of a timeline's last boot, with ``failed`` and its ``reason``."""
    s = summary(current_boot(list(timeline), files), now)
    s["reason"] = None
    if s["state"] in ("booting", "stale") and timeline:
        why = failure(timeline[-1])
        if why is not None:
            s["state"], s["reason"] = "failed", why
    return s


def describe(e: Mapping[str, Any]) -> str:
    """One short line for an entry: ``tftp images/demo/vmlinuz 293.0 KiB``, ``up after 4.2 s``."""
    ev = str(e.get("event", "?"))
    if ev == "up":
        return f"up ({e.get('stage')}) after {e.get('after_s')} s"
    parts = [ev]
    if e.get("file"):
        parts.append(str(e["file"]))
    if isinstance(e.get("bytes"), int):
        parts.append(fmt_size(e["bytes"]))
    if e.get("outcome") not in (None, "ok", "done"):
        parts.append(str(e["outcome"]))
    if ev.startswith("dhcp.") and e.get("ip"):
        parts.append(str(e["ip"]))
    return " ".join(parts)[:MAX_TEXT]


def fmt_size(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    return f"{n:.1f} GiB"


def machines(hosts: Iterable[Mapping[str, Any]], clients: Iterable[Mapping[str, Any]],
             now: float, files: Files | None = None) -> list[dict[str, Any]]:
    """One row per machine: every inventory host (seen or not) then the unknown machines seen.

    ``clients``: ``ClientRecord.as_dict()`` dicts, with a ``summary`` already (the control
    socket's reply) or computed here with ``files`` (kernel, initrd of a MAC)."""
    seen = {str(c.get("mac")): c for c in clients}
    rows = []
    for h in hosts:
        mac = str(h.get("mac"))
        rows.append(_row({k: _text(h.get(k)) for k in HOST_FIELDS}, seen.pop(mac, None), now, files, True))
    for mac, c in seen.items():
        rows.append(_row({"mac": mac, "hostname": None, "profile": None, "ip": None}, c, now, files, False))
    return rows


def _row(host: dict[str, Any], c: Mapping[str, Any] | None, now: float, files: Files | None,
         known: bool) -> dict[str, Any]:
    row = {**host, "known": known, "arch": None, "last_seen": None, "last": None,
           "state": "never", "stage": None, "started": None, "stages": {}, "reason": None, "timeline": []}
    if c is None:
        return row
    tl = list(c.get("timeline") or [])
    s = c.get("summary")
    if not isinstance(s, Mapping):
        s = client_summary(tl, files(host["mac"]) if files else None, now)
    row.update({k: s.get(k) for k in ("state", "stage", "started", "stages", "reason")})
    if row["state"] not in STATES:
        row["state"] = "never"
    row["ip"] = _text(c.get("ip")) or row["ip"]
    row["arch"] = _text(c.get("arch"))
    row["last_seen"] = c.get("last_seen")
    row["last"] = describe(tl[-1]) if tl else None
    row["timeline"] = [safe_entry(e) for e in tl]
    return row


def matches(row: Mapping[str, Any], text: str) -> bool:
    """Whether ``text`` (any case) is in the row's MAC, hostname, profile or state."""
    t = text.strip().lower()
    return not t or any(t in str(row.get(k) or "").lower() for k in ("mac", "hostname", "profile", "state"))


def by_state(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    out = dict.fromkeys(STATES, 0)
    for r in rows:
        out[str(r.get("state"))] = out.get(str(r.get("state")), 0) + 1
    return out


def transfers(rows: Iterable[Mapping[str, Any]], mac_for_ip: Mapping[str, str]) -> list[dict[str, Any]]:
    """Transfers in flight with their speed (bytes/s) and the MAC of their peer when known."""
    out = []
    for t in rows:
        d = t.get("duration_s") or 0.0
        b = t.get("bytes") or 0
        peer = str(t.get("peer") or "")
        out.append({"service": _text(t.get("service", "tftp")), "file": _text(t.get("file")), "peer": peer[:64],
                    "mac": mac_for_ip.get(peer.rpartition(":")[0]), "bytes": b, "size": t.get("size"),
                    "speed": round(b / d) if isinstance(d, (int, float)) and d > 0 else None})
    return out


def last_events(clients: Iterable[Mapping[str, Any]], n: int) -> list[tuple[float, str, str]]:
    """The ``n`` newest timeline entries of all machines: (t, mac, text), newest first."""
    evs = [(float(e.get("t") or 0.0), str(c.get("mac")), describe(e))
           for c in clients for e in (c.get("timeline") or [])]
    evs.sort(key=lambda x: x[0], reverse=True)
    return evs[:n]


def _hms(t: Any) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%H:%M:%S") if isinstance(t, (int, float)) else "-"


def _age(now: float, t: Any) -> str:
    return f"{max(0, int(now - t))}s" if isinstance(t, (int, float)) else "-"


def screen(status: Mapping[str, Any], hosts: Sequence[Mapping[str, Any]], clients: Sequence[Mapping[str, Any]],
           now: float, filt: str = "", width: int = 120, height: int = 40, typing: bool = False) -> list[str]:
    """The ``sidusctl watch`` page as lines (at most ``height``, each at most ``width`` chars)."""
    rows = machines(hosts, clients, now)
    shown = [r for r in rows if matches(r, filt)]
    counts = by_state(rows)
    c = status.get("counters") or {}
    head = [f"sidusd {status.get('version', '?')}  {_hms(now)}  machines {len(rows)}: "
            + "  ".join(f"{k} {v}" for k, v in counts.items()),
            f"dhcp offers {c.get('dhcp.offers', 0)} acks {c.get('dhcp.acks', 0)}   tftp done "
            f"{c.get('tftp.transfers.done', 0)} failed {c.get('tftp.transfers.failed', 0)}   http done "
            f"{c.get('http.transfers.done', 0)}   up-reports {c.get('http.up.accepted', 0)}   "
            f"in flight {status.get('active_transfers', 0)}",
            ("filter: " + filt + "_" if typing else f"filter: {filt or '-'}   (/ filter, q quit)"), ""]
    mrows = [f"{'MAC':<17}  {'HOSTNAME':<16}  {'PROFILE':<10}  {'STATE':<8}  {'STAGE':<10}  {'SINCE':>6}  LAST"]
    order = {s: i for i, s in enumerate(("failed", "booting", "stale", "up", "never"))}
    for r in sorted(shown, key=lambda r: (order.get(r["state"], 9), r["mac"])):
        mrows.append(f"{r['mac']:<17}  {str(r['hostname'] or '-')[:16]:<16}  {str(r['profile'] or '-')[:10]:<10}  "
                     f"{r['state']:<8}  {str(r['stage'] or '-'):<10}  {_age(now, r['started']):>6}  "
                     f"{r['reason'] or r['last'] or '-'}")
    if len(shown) < len(rows):
        mrows.append(f"({len(rows) - len(shown)} hidden by the filter)")
    ips = {str(x.get("ip")): str(x.get("mac")) for x in clients if x.get("ip")}
    trows = ["", "TRANSFERS"]
    for t in transfers(status.get("transfers") or [], ips):
        speed = f"{fmt_size(t['speed'])}/s" if t["speed"] is not None else "-"
        size = fmt_size(t["size"]) if isinstance(t["size"], int) else "?"
        trows.append(f"  {t['service']:<5} {t['mac'] or t['peer']:<21} {str(t['file'])[:40]:<40} "
                     f"{fmt_size(t['bytes'])} of {size}  {speed}")
    if len(trows) == 2:
        trows.append("  none in flight")
    visible = {r["mac"] for r in shown}
    erows = ["", "LAST EVENTS"] + [f"  {_hms(t)}  {mac}  {text}"
                                   for t, mac, text in last_events([x for x in clients if x.get("mac") in visible],
                                                                   max(3, height))]
    room = max(3, height - len(head) - len(trows) - 5)
    lines = head + mrows[:room] + trows
    lines += erows[:max(0, height - len(lines))]
    return [line[:width] for line in lines[:height]]


# -- the web page (sidusd/web.py): data that goes into HTML and server-sent events -------------------

_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def safe_json(obj: Any) -> str:
    """JSON that is safe inside an HTML ``<script type="application/json">`` block and an SSE ``data:``
    line: no ``<``, ``>``, ``&`` (a hostname ``</script><script>`` stays text), no line breaks."""
    import json
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), default=str, allow_nan=False)
    return "".join(_JSON_ESCAPES.get(ch, ch) for ch in text)


def sse(event: str, data: Any) -> bytes:
    """One server-sent event: ``event: <name>`` and one ``data:`` line of :func:`safe_json`."""
    if not event.isidentifier():
        raise ValueError(f"bad event name {event!r}")
    return f"event: {event}\ndata: {safe_json(data)}\n\n".encode()


def tile(row: Mapping[str, Any]) -> dict[str, Any]:
    """A machine row without its timeline (the page asks for it on click)."""
    return {k: v for k, v in row.items() if k != "timeline"}


def room(rows: Sequence[Mapping[str, Any]], counters: Mapping[str, int], transfer_rows: Sequence[Mapping[str, Any]],
         in_flight: Mapping[str, int], now: float) -> dict[str, Any]:
    """Everything the page shows at once: tiles, counts by state, counters, transfers."""
    return {"now": now, "machines": [tile(r) for r in rows], "states": by_state(rows),
            "counters": dict(sorted(counters.items())), "transfers": list(transfer_rows),
            "in_flight": dict(in_flight)}


def page(template: str, data: Mapping[str, Any]) -> str:
    """The page's HTML: ``template`` with the room's JSON in place of ``{{ROOM}}``."""
    return template.replace("{{ROOM}}", safe_json(data))

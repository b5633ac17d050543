"""The report half of bench/bootcompare.py (pure): medians per path and server, the printed
lines and the docs/performance.md tables of a run's boots."""

from __future__ import annotations

import statistics
from typing import Any

from .bootwire import PATHS, PHASES, SERVERS


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{path: {server: {phase: median seconds}}}`` over the boots that reached READY."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in results:
        if r["phases"].get("total") is None:
            continue
        out.setdefault(r["path"], {}).setdefault(r["server"], {})
    for path, servers in out.items():
        for server in servers:
            boots = [r["phases"] for r in results if r["path"] == path and r["server"] == server
                     and r["phases"].get("total") is not None]
            keys = [k for k in (*PHASES, "total") if all(b.get(k) is not None for b in boots)]
            servers[server] = {k: round(statistics.median(b[k] for b in boots), 2) for k in keys}
            servers[server]["n"] = len(boots)
    return out


def print_boot(r: dict[str, Any]) -> None:
    ph = r["phases"]

    def f(v: float | None) -> str:
        return "  -  " if v is None else f"{v:5.1f}"
    files = " ".join(f"{k[5:]}={v:.2f}" for k, v in ph.items() if k.startswith("file:") and v is not None)
    print(f"  {r['path']:4} {r['server']:12} total {f(ph['total'])} s | " + " ".join(
        f"{p} {f(ph[p])}" for p in PHASES) + f" | {files}", flush=True)


def print_summary(summary: dict[str, dict[str, dict[str, float]]]) -> None:
    for path, servers in summary.items():
        print(f"\n{path}: median seconds (n boots)")
        print("  server       " + " ".join(f"{p:>8}" for p in (*PHASES, "total")) + "   n")
        for server, med in servers.items():
            print(f"  {server:12} " + " ".join(f"{med.get(p, float('nan')):8.2f}" for p in (*PHASES, "total"))
                  + f"   {med['n']:.0f}")
        if "sidus" in servers:
            for peer, med in servers.items():
                if peer != "sidus":
                    print(f"  ratio sidus/{peer}: {servers['sidus']['total'] / med['total']:.2f}")


def _short(name: str) -> str:
    """A file's name in the tables: ``cfg`` for pxelinux.cfg/01-<mac>, ``script`` for the iPXE
    script, else its last component."""
    if name.startswith("pxelinux.cfg/"):
        return "cfg"
    return "script" if name.endswith(".ipxe") else name.rsplit("/", 1)[-1]


def markdown(results: list[dict[str, Any]]) -> str:
    """docs/performance.md tables of a run: the medians per path and server with the ratio
    sidus / server of the median totals, then every boot in run order with its files."""
    summary = summarize(results)
    cols = (*PHASES, "total")
    out = ["| path | server | " + " | ".join(cols) + " | n | sidus / it |",
           "| --- | --- | " + " | ".join("---:" for _ in cols) + " | ---: | ---: |"]
    for path, servers in summary.items():
        sidus = servers.get("sidus", {}).get("total")
        for server, med in sorted(servers.items(), key=lambda kv: SERVERS.index(kv[0])):
            ratio = "" if server == "sidus" or sidus is None else f"**{sidus / med['total']:.2f}**"
            cells = [f"{med[c]:.2f}" if c in med else "-" for c in cols]
            out.append(f"| {path.upper() if path != 'ipxe' else 'iPXE'} | {server} | " + " | ".join(cells)
                       + f" | {med['n']:.0f} | {ratio} |")
    out += ["", "| # | path | server | " + " | ".join(cols)
            + " | each file (request -> last ACK, s) | initrd: server / client s |",
            "| ---: | --- | --- | " + " | ".join("---:" for _ in cols) + " | --- | ---: |"]
    for i, r in enumerate(results):
        ph = r["phases"]
        files = " ".join(f"{_short(k[5:])}={v:.2f}" for k, v in ph.items() if k.startswith("file:") and v is not None)
        cells = ["-" if ph.get(c) is None else f"{ph[c]:.1f}" for c in cols]
        turn = r.get("initrd_turnaround")
        split = "" if not turn else f"{turn[1]:.1f} / {turn[2]:.1f}"
        out.append(f"| {i} | {r['path']} | {r['server']} | " + " | ".join(cells) + f" | {files} | {split} |")
    return "\n".join(out) + "\n\n" + timeline_table(results)


def median_boot(results: list[dict[str, Any]], path: str, server: str) -> dict[str, Any] | None:
    """The boot of ``server`` on ``path`` whose total is the median (the lower middle of an even
    count) of those that reached READY."""
    boots = sorted((r for r in results if r["path"] == path and r["server"] == server
                    and r["phases"].get("total") is not None), key=lambda r: r["phases"]["total"])
    return boots[(len(boots) - 1) // 2] if boots else None


def timeline_table(results: list[dict[str, Any]]) -> str:
    """One boot per path and server (:func:`median_boot`) as a timeline: seconds from qemu start
    to the first DISCOVER, the ACK, each file (request-last ACK), the Linux banner, root mounted
    and READY."""
    out = ["| path | server | boot # | DISCOVER | ACK | files (request-last ACK) | Linux | root mounted | READY |",
           "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    seen: list[tuple[str, str]] = []
    for r in results:
        if (r["path"], r["server"]) not in seen:
            seen.append((r["path"], r["server"]))
    for path, server in sorted(seen, key=lambda k: (PATHS.index(k[0]), SERVERS.index(k[1]))):
        r = median_boot(results, path, server)
        if r is None:
            continue
        ph = r["phases"]
        t, marks = 0.0, {}
        for name in PHASES:
            t += ph.get(name) or 0.0
            marks[name] = t
        files = ", ".join(f"{_short(n)} {s:.1f}-{e:.1f}" for n, s, e in r.get("files", []))
        out.append(f"| {path} | {server} | {results.index(r)} | {marks['firmware']:.1f} | {marks['dhcp']:.1f} | "
                   f"{files} | {marks['kernel']:.1f} | {marks['root']:.1f} | {ph['total']:.1f} |")
    return "\n".join(out) + "\n"

"""A new generation rolled out to the simulated racks during a storm (issue #19's fifth scenario).

Used by tests/integration/test_racks.py and ``python3 -m bench.racks --rollout``.  Each rack has
its own disk (``RACK`` = ``work/rackdisk<k>``: the layout of sidusd.image.rollout_plan), which
every sidusd of the rack serves (``tftp.root: RACK/tftp``, ``images_file: RACK/images/images.yaml``,
no ``images:`` of its own).  The build host (``work/build``) has generation 1, pushed to every rack
before the servers start, and generation 2 (a changed file of ``BIG`` bytes and a small one).

During the storm :meth:`Rollout.during` moves the build host's ``current`` to 2 and runs the real
``sidus-image push demo --to RACK0 --to RACK1 ...`` (``--bwlimit``: slowed); with ``interrupt``,
rack 0's rsync is killed (SIGKILL) once it has written part of the big file, so rack 0's push is
not finished and the command goes on with the next racks.  Every rack server is told
``sidusctl reload`` every ``reload_every_s`` throughout (as a PostgreSQL notification would
make it re-read its images file at any moment), and once more after the push.

:func:`check` then reads every boot config a client was served (its ``nfsroot=``): each must name
a root of *its own rack's* disk, a final ``gen-N`` (never ``.incoming``) whose completion marker
was valid and written *before* the client received the config.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .peers import REPO

BIG = 3 * 1024 * 1024
NFSROOT = re.compile(r"nfsroot=([0-9.]+):([^ ,\s]+)")
KERNEL = re.compile(r"images/demo/gen-(\d{4})/(?:vmlinuz|initrd\.img)")


def make_generation(store: Any, tftp: Path, number: int, files: dict[str, bytes], parent: int | None) -> Path:
    """A generation as sidus-image makes one (without a chroot): gen N+1 a hard-link farm of gen N
    with the changed files replaced; its kernel and initrd published under ``tftp``."""
    from sidusd.fsutil import atomic_write
    from sidusd.image import publish
    d = store.image_dir("demo")
    (d / "meta").mkdir(parents=True, exist_ok=True)
    g = store.path("demo", number)
    if parent is None:
        (g / "boot").mkdir(parents=True)
        (g / "boot" / "vmlinuz-6.1.0-rack").write_bytes(b"K" * 4096)
        (g / "boot" / "initrd.img-6.1.0-rack").write_bytes(b"I" * 8192)
        (g / "etc").mkdir()
    else:
        subprocess.run(["cp", "-a", "-l", str(store.path("demo", parent)), str(g)], check=True)
    for rel, data in files.items():
        p = g / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".new")
        tmp.write_bytes(data)
        t = 1_700_000_000 + 60 * number
        os.utime(tmp, (t, t))
        os.replace(tmp, p)
    atomic_write(d / "meta" / f"gen-{number:04d}.json", json.dumps({"parent": parent}).encode())
    publish.publish_generation(g, tftp, "demo", number)
    return g


def rsync_child(pid: int, needle: str = "") -> int | None:
    """The rsync process among ``pid``'s children (push's own rsync, not the remote one) whose
    command line has ``needle`` (the rack's path: push runs the racks' rsyncs side by side)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):     # push runs each rack's rsync from a thread
        try:
            kids += (task / "children").read_text().split()
        except OSError:
            continue
    for k in kids:
        try:
            if Path(f"/proc/{k}/comm").read_text().strip() == "rsync" and \
                    needle in Path(f"/proc/{k}/cmdline").read_text(errors="replace"):
                return int(k)
        except OSError:
            continue
    return None


def reload(server: Any) -> Any:
    """``sidusctl reload`` of one rack server, over its control socket from this process."""
    from sidusd import ctl
    return ctl.call(str(server.dir / "control.sock"), "reload")


class Rollout:
    def __init__(self, work: Path, racks: int):
        from sidusd.image.generations import ImageStore
        self.work, self.k = work, racks
        self.store = ImageStore(work / "build" / "images")
        self.tftp = work / "build" / "tftp"

    def rack_dir(self, k: int) -> Path:
        return self.work / f"rackdisk{k}"

    def prepare(self, loaders: dict[str, Path]) -> None:
        """Generation 1 on the build host and on every rack (served), generation 2 on the build
        host only (not served yet); the boot loaders in each rack's TFTP root."""
        from sidusd.image import rollout
        make_generation(self.store, self.tftp, 1, {"usr/lib/big.bin": os.urandom(BIG), "etc/motd": b"one\n"}, None)
        self.store.switch("demo", 1)
        for k in range(self.k):
            for rel, src in loaders.items():
                dst = self.rack_dir(k) / "tftp" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read_bytes())
            rollout.push(self.store, self.tftp, "demo", 1, rollout.Rack(self.rack_dir(k)), serve=True)
        make_generation(self.store, self.tftp, 2, {"usr/lib/big.bin": os.urandom(BIG), "etc/motd": b"two\n"}, 1)

    def push_argv(self, bwlimit_kbps: int | None = None, racks: list[int] | None = None) -> list[str]:
        """``sidus-image push demo --to RACK ...`` (the build host's current generation)."""
        return [sys.executable, "-m", "sidusd.image", "--images-dir", str(self.store.dir),
                "--tftp-root", str(self.tftp), "push", "demo",
                *[a for k in (range(self.k) if racks is None else racks) for a in ("--to", str(self.rack_dir(k)))],
                *([f"--rsync-arg=--bwlimit={bwlimit_kbps}"] if bwlimit_kbps else [])]

    async def during(self, servers: list[Any], start_after_s: float = 1.0, interrupt: bool = True,
                     bwlimit_kbps: int = 4000, reload_every_s: float = 0.3) -> dict[str, Any]:
        """Move ``current`` to 2 and push it to every rack while the storm runs (see the module)."""
        await asyncio.sleep(start_after_s)
        out: dict[str, Any] = {"reloads": 0, "reload_errors": []}
        stop = asyncio.Event()

        async def reloader() -> None:
            while not stop.is_set():
                for s in servers:
                    try:
                        got = await asyncio.to_thread(reload, s)
                        out["reloads"] += 1
                        if not got.ok:
                            out["reload_errors"].append(f"{s.name}: {got.error}")
                    except Exception as e:          # noqa: BLE001 -- reported, the run goes on
                        out["reload_errors"].append(f"{s.name}: {e}")
                try:
                    await asyncio.wait_for(stop.wait(), reload_every_s)
                except TimeoutError:
                    pass

        task = asyncio.create_task(reloader())
        self.store.switch("demo", 2)
        out["t_switch"] = time.time()
        proc = await asyncio.create_subprocess_exec(
            *self.push_argv(bwlimit_kbps), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        if interrupt:
            staging = self.rack_dir(0) / "images" / "demo" / "gen-0002.incoming" / "usr" / "lib"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.returncode is None:
                if staging.is_dir() and any(p.stat().st_size > 0 for p in staging.glob(".big.bin*")):
                    pid = rsync_child(proc.pid, str(self.rack_dir(0)) + "/")
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        out["t_interrupt"] = time.time()
                        break
                await asyncio.sleep(0.02)
        so, se = await proc.communicate()
        out.update(push_rc=proc.returncode, push_out=so.decode(), push_err=se.decode()[-2000:],
                   t_push_end=time.time())
        stop.set()
        await task
        for s in servers:                           # the operator's `sidusctl --all reload`
            got = await asyncio.to_thread(reload, s)
            if not got.ok:
                out["reload_errors"].append(f"{s.name}: {got.error}")
        out["t_reloaded"] = time.time()
        return out


def check(records: list[dict[str, Any]], rollout: Rollout, servers: list[Any]) -> dict[str, Any]:
    """Every served boot config against the racks' markers (see the module); the violations and,
    per rack, how many configs named each generation."""
    from sidusd.image import rollout as ro
    rack_of = {s.ip: s.rack for s in servers}
    marker_t: dict[tuple[int, int], float | None] = {}
    violations: list[str] = []
    served: dict[int, dict[int, int]] = {}
    for rec in records:
        text = rec.get("config")
        if text is None:
            continue
        m = NFSROOT.search(text)
        if m is None:
            violations.append(f"{rec['mac']}: no nfsroot= in its config")
            continue
        ip, root = m.group(1), m.group(2)
        k = rack_of.get(rec.get("server", ""))
        if k is None or ip != rec["server"]:
            violations.append(f"{rec['mac']}: nfsroot names {ip}, not the server that answered ({rec.get('server')})")
            continue
        rack = ro.Rack(rollout.rack_dir(k))
        gm = re.fullmatch(re.escape(str(rack.store.image_dir("demo").resolve())) + r"/gen-(\d{4})", root)
        if gm is None:
            violations.append(f"{rec['mac']}: rack {k} served a root that is no final generation of its own: {root}")
            continue
        n = int(gm.group(1))
        kernels = {int(x) for x in KERNEL.findall(text)}
        if kernels != {n}:
            violations.append(f"{rec['mac']}: rack {k} served root gen {n} with the kernel of {sorted(kernels)}")
        served.setdefault(k, {}).setdefault(n, 0)
        served[k][n] += 1
        if (k, n) not in marker_t:
            ok = rack.marker("demo", n) is not None and n in rack.arrived("demo", verify=True)
            marker_t[(k, n)] = rack.marker_path("demo", n).stat().st_mtime if ok else None
        t = marker_t[(k, n)]
        if t is None:
            violations.append(f"{rec['mac']}: rack {k} served generation {n}, which has no valid marker there")
        elif t >= rec["t_cfg_wall"]:
            violations.append(f"{rec['mac']}: rack {k} served generation {n} {t - rec['t_cfg_wall']:.3f} s "
                              "before its marker was written")
    return {"violations": violations, "served": served}

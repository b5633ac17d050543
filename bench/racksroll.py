"""A new generation rolled out to the simulated racks during a storm (issue #19's fifth scenario).

Used by tests/integration/test_racks.py and ``python3 -m bench.racks --rollout``.  Each rack has
its own disk (``RACK`` = ``work/rackdisk<k>``: the layout of sidusd.image.rollout_plan), which
every sidusd of the rack serves (``tftp.root: RACK/tftp``, ``images_file: RACK/images/images.yaml``,
no ``images:`` of its own).  The build host (``work/build``) has generation 1, pushed to every rack
before the servers start, and generation 2 (a changed file of ``BIG`` bytes and a small one).

During the storm :meth:`Rollout.during` moves the build host's ``current`` to 2 and runs the real
``sidus-image push demo --to RACK0 --to RACK1 ...`` (``--bwlimit``: slowed; the racks side by
side); with ``interrupt``, rack 0's rsync is killed (SIGKILL) once it has written part of the big
file, so rack 0's push is not finished while the other racks' go on.  With ``ssh`` the push goes
over ssh (``--to root@<rack's first server>:RACK``, an sshd in that server's namespace, the push
run in ``build_ns``: across the core and the rack uplinks, their delay and loss).  Every rack server is told
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


SSHD = next((p for p in ("/usr/sbin/sshd", "/usr/bin/sshd") if os.path.exists(p)), None)


def sshd_setup(d: Path, listen: list[str], port: int) -> tuple[Path, list[str]]:
    """Keys and an sshd_config in ``d`` (key authentication only, root allowed, listening on
    ``listen``); (the config, the ssh command with its options as a list)."""
    d.mkdir(parents=True, exist_ok=True)
    key = d / "id_ed25519"
    if not key.exists():
        for k in (d / "host_ed25519", key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
        (d / "authorized_keys").write_bytes(key.with_suffix(".pub").read_bytes())
    cfg = d / f"sshd_config.{listen[0]}.{port}"
    cfg.write_text(f"Port {port}\n" + "".join(f"ListenAddress {a}\n" for a in listen) + f"""HostKey {d / 'host_ed25519'}
AuthorizedKeysFile {d / 'authorized_keys'}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
""")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)       # sshd's privilege separation directory
    return cfg, ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                 "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]


class Rollout:
    def __init__(self, work: Path, racks: int, ssh: bool = False):
        from sidusd.image.generations import ImageStore
        self.work, self.k = work, racks
        self.store = ImageStore(work / "build" / "images")
        self.tftp = work / "build" / "tftp"
        self.ssh: list[str] | None = None          # push over ssh: the ssh command (start_sshd)
        self.ssh_hosts: dict[int, str] = {}
        self.want_ssh = ssh

    def start_sshd(self, servers: list[Any], from_ns: Any) -> None:
        """An sshd in the namespace of each rack's first server, on its rack address: the push (run
        in ``from_ns``, the build host's) then crosses the core and the rack's uplink (its delay
        and loss) to reach the rack."""
        if SSHD is None:
            raise RuntimeError("missing tool: sshd (Debian package openssh-server)")
        for k in range(self.k):
            s = next(x for x in servers if x.rack == k)
            cfg, self.ssh = sshd_setup(self.work / "ssh", [s.ip], 22)
            log = open(self.work / "ssh" / f"sshd-{k}.log", "ab")
            s.ns.popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
            log.close()
            self.ssh_hosts[k] = s.ip
        for k, ip in self.ssh_hosts.items():
            deadline = time.monotonic() + 30
            while (r := subprocess.run(from_ns.argv(*self.ssh, f"root@{ip}", "true"), capture_output=True,
                                       text=True, timeout=30)).returncode:
                if time.monotonic() > deadline:
                    log_text = (self.work / "ssh" / f"sshd-{k}.log").read_text()[-1500:]
                    raise RuntimeError(f"sshd of rack {k} does not answer: {r.stderr[-500:]}\n{log_text}")
                time.sleep(0.2)

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
        """``sidus-image push demo --to RACK ...`` (the build host's current generation); over ssh
        (``--to root@<rack server>:RACK``) once :meth:`start_sshd` ran."""
        def to(k: int) -> str:
            return f"root@{self.ssh_hosts[k]}:{self.rack_dir(k)}" if self.ssh else str(self.rack_dir(k))
        more = ["--ssh", " ".join(self.ssh), "--remote-cmd",
                f"env PYTHONPATH={REPO} {sys.executable} -m sidusd.image"] if self.ssh else []
        return [sys.executable, "-m", "sidusd.image", "--images-dir", str(self.store.dir),
                "--tftp-root", str(self.tftp), "push", "demo",
                *[a for k in (range(self.k) if racks is None else racks) for a in ("--to", to(k))], *more,
                *([f"--rsync-arg=--bwlimit={bwlimit_kbps}"] if bwlimit_kbps else [])]

    async def during(self, servers: list[Any], start_after_s: float = 1.0, interrupt: bool = True,
                     bwlimit_kbps: int = 4000, reload_every_s: float = 0.3, build_ns: Any = None) -> dict[str, Any]:
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
        argv = self.push_argv(bwlimit_kbps)
        if build_ns is not None:                # `ip netns exec` execs: proc.pid is the push
            argv = build_ns.argv(*argv)
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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

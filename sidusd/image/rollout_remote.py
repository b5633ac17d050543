"""``sidus-image push --to host:/path``: a push to a rack over ssh (docs/scale.md "Image rollout").

The steps after rsync (the manifest check, the renames, the marker, ``current``, the images file)
must run on the rack's own file system, so a push over ssh runs the rack side there::

    build host                                   rack (over ssh)
    ssh HOST sidus-image ... rack-receive RACK NAME N --manifest H ...
                                                 takes the rack image's lock, plans (reclaims a
                                                 final directory without a marker), prints the
                                                 plan as one JSON line, waits on its stdin
    rsync -e ssh ... --link-dest=<rack path>  HOST:<staging>/    (boot files, then the root)
    "commit" on the session's stdin  ----------> checks the manifest of what arrived against H,
                                                 renames, writes the marker, switches, rewrites
                                                 the images file; one JSON line back; exits

The rack side holds the lock for the whole push.  If the build host, rsync or the link goes
away before "commit" (EOF on the session), the rack side exits having committed nothing: the
generation stays in ``.incoming`` without a marker, which the rack never serves, and the next
push resumes it.  A rack that does not check the manifest itself could be told "done" about a
tree that is not: here the hash comes from the build host and the check reads the rack's disk.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sidusd.errors import BackendError, SidusError
from sidusd.image import rollout_plan as rp
from sidusd.image.chroot import ImageLock, LockBusy
from sidusd.image.generations import ImageStore
from sidusd.image.rollout_rack import PushResult, Rack, begin, commit, push_source, run_rsync

ANSWER_TIMEOUT_S = 120          # the rack side's answer to "commit" (a manifest of a big tree)


def _say(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def receive(args) -> int:
    """The rack side (``sidus-image rack-receive``); its stdout is the session's JSON lines."""
    rack = Rack(args.rack)
    try:
        with ImageLock(rack.store.image_dir(args.name), f"push of generation {args.number} (rack-receive)"):
            plan = begin(rack, args.name, args.number, args.parent)
            link = plan.link_dest
            _say({"plan": {
                "already": plan.already, "link_dest": link,
                "staging_root": str((rack.path / plan.staging_root).resolve()),
                "staging_boot": str((rack.path / plan.staging_boot).resolve()),
                "link_root": str(rack.store.path(args.name, link).resolve()) if link else None,
                "link_boot": str(rack.boot_dir(args.name, link).resolve()) if link else None}})
            if sys.stdin.readline().strip() != "commit":
                print(f"sidus-image rack-receive: the pusher went away before the commit: generation "
                      f"{args.number} stays in staging, not served", file=sys.stderr)
                return 1
            commit(rack, plan, rp.Marker(args.name, args.number, args.manifest, args.entries, args.source),
                   serve=not args.no_serve)
            _say({"ok": True, "served": not args.no_serve})
            return 0
    except LockBusy as e:
        _say({"error": str(e), "busy": True})
        return 75
    except (SidusError, OSError) as e:
        _say({"error": str(e)})
        return 1


def remote_argv(ssh: str, target: rp.Target, remote_cmd: str, name: str, number: int, parent: int | None,
                manifest: str, entries: int, source: str, serve: bool) -> list[str]:
    """The ssh command line that runs ``rack-receive`` on the rack (each word quoted for its shell)."""
    rack = target.path.rstrip("/") or "/"
    words = [*shlex.split(remote_cmd), "--images-dir", f"{rack}/images", "--tftp-root", f"{rack}/tftp",
             "rack-receive", rack, name, str(number), "--manifest", manifest, "--entries", str(entries),
             "--source", source]
    if parent is not None:
        words += ["--parent", str(parent)]
    if not serve:
        words.append("--no-serve")
    assert target.host is not None
    return [*shlex.split(ssh), target.host, " ".join(shlex.quote(w) for w in words)]


def _answer(proc: subprocess.Popen, what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        msg = json.loads(line)
    except ValueError:
        msg = None
    if not isinstance(msg, dict):
        proc.wait(ANSWER_TIMEOUT_S)
        err = proc.stderr.read().decode("utf-8", "replace")[-2000:] if proc.stderr else ""
        raise BackendError(f"the rack side gave no {what} (ssh or rack-receive exit {proc.returncode})", detail=err)
    if "error" in msg:
        if msg.get("busy"):
            raise LockBusy(str(msg["error"]), detail="another push or administration holds the rack's image")
        raise BackendError(f"the rack refused: {msg['error']}")
    return msg


def push_ssh(store: ImageStore, tftp_root: Path, name: str, number: int, target: rp.Target, *, serve: bool,
             extra: Sequence[str] = (), ssh: str = "ssh", remote_cmd: str = "sidus-image", rsync: str = "rsync",
             on_start: Callable[[subprocess.Popen], None] | None = None) -> PushResult:
    """Push generation ``number`` of ``name`` to the rack ``target`` (``host:/path``) over ssh."""
    source = push_source(store, tftp_root, name, number)
    src_root, src_boot, manifest, count = source.root, source.boot, source.manifest, source.count
    argv = remote_argv(ssh, target, remote_cmd, name, number, source.parent,
                       manifest, count, str(src_root), serve)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    if on_start is not None:            # the session too: killing it ends the rack side uncommitted
        on_start(proc)
    assert proc.stdin is not None
    stats = rp.RsyncStats(0, 0, 0, 0)
    try:
        plan = _answer(proc, "plan")["plan"]
        if not plan["already"]:
            for src, stg, link, more in ((src_boot, plan["staging_boot"], plan["link_boot"], ["-c"]),
                                         (src_root, plan["staging_root"], plan["link_root"], [])):
                r_argv = rp.rsync_argv(rsync, str(src), f"{target.host}:{stg}", link, ["-e", ssh, *more, *extra])
                stats = stats + run_rsync(r_argv, on_start)
        proc.stdin.write(b"commit\n")
        proc.stdin.flush()
        done = _answer(proc, "answer to the commit")
    finally:
        try:
            proc.stdin.close()             # EOF: a rack side still waiting commits nothing
        except OSError:
            pass
        try:
            proc.wait(ANSWER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return PushResult(Path(target.path), name, number, bool(plan["already"]), plan["link_dest"], stats,
                      bool(done.get("served")))

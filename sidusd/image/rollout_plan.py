"""What a push of one generation to one rack server does (pure; docs/scale.md "Image rollout").

A rack server's directory (``RACK``, the ``--to`` of ``sidus-image push``)::

    RACK/images/<name>/gen-0007/               an arrived generation's root (NFS export)
    RACK/images/<name>/gen-0008.incoming/      a push under way or interrupted: never served
    RACK/images/<name>/meta/gen-0007.arrived   the completion marker (JSON: manifest hash, counts)
    RACK/images/<name>/current -> gen-0007     what the rack serves under the image's name
    RACK/tftp/images/<name>/gen-0007/          its vmlinuz + initrd.img (the rack's tftp.root is RACK/tftp)
    RACK/images/images.yaml                    the rack sidusd's images_file: arrived generations only

The rule of the rack: a generation is served only when its marker is there and names the
manifest of what is on disk.  A push rsyncs into ``.incoming`` (``--link-dest`` = the rack's
nearest arrived generation, so unchanged files are hard links and only changed files travel),
checks the manifest, renames into place, then writes the marker, then the images file.
Nothing here touches the file system: the edge (sidusd.image.rollout) passes in what it found.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from sidusd.image.generations import gen_dirname as gen_name  # one on-disk name of a generation

INCOMING = ".incoming"
MARKER_SUFFIX = ".arrived"
MARKER_VERSION = 1
_STAT = re.compile(r"^(Number of regular files transferred|Total file size|Total transferred file size"
                   r"|Literal data|Matched data): ([\d,.]+)")


@dataclass(frozen=True)
class Entry:
    """One name of a tree, as the manifest sees it: kind f/d/l/c/b/p, and what rsync -a keeps."""
    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    size: int = 0
    mtime: int = 0          # seconds; files and links only (a directory's time is not compared)
    target: str = ""        # a symlink's target, a device's rdev

    def line(self) -> str:
        return json.dumps([self.path, self.kind, self.mode, self.uid, self.gid, self.size, self.mtime,
                           self.target], separators=(",", ":"))


def manifest_hash(entries: Iterable[Entry]) -> str:
    """sha256 over the sorted entries: equal trees (names, kinds, modes, owners, sizes, times,
    targets) have equal hashes; any missing, extra or different file changes it."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.path):
        h.update(e.line().encode() + b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class Marker:
    """The completion marker of one generation on a rack."""
    image: str
    generation: int
    manifest: str
    entries: int
    source: str = ""

    def to_json(self) -> bytes:
        return (json.dumps({"v": MARKER_VERSION, "image": self.image, "generation": self.generation,
                            "manifest": self.manifest, "entries": self.entries, "source": self.source},
                           indent=1) + "\n").encode()


def parse_marker(data: bytes | None, image: str, generation: int) -> Marker | None:
    """The marker in ``data`` if it is a valid one for (image, generation), else None (a torn,
    foreign or hand-made file is no marker)."""
    if data is None:
        return None
    try:
        d = json.loads(data)
    except ValueError:
        return None
    if not isinstance(d, dict) or d.get("v") != MARKER_VERSION or d.get("image") != image \
            or d.get("generation") != generation:
        return None
    manifest, entries = d.get("manifest"), d.get("entries")
    if not (isinstance(manifest, str) and re.fullmatch(r"[0-9a-f]{64}", manifest)) \
            or not isinstance(entries, int) or isinstance(entries, bool):
        return None
    return Marker(image, generation, manifest, entries, str(d.get("source", "")))


def arrived(markers: Mapping[int, Marker | None], on_disk: Iterable[int],
            manifests: Mapping[int, str] | None = None) -> list[int]:
    """Generations the rack may serve: a complete directory on disk and a valid marker, and when
    ``manifests`` (number -> hash of what is on disk now) is given, the marker's hash matches it."""
    out = []
    for n in sorted(set(on_disk)):
        m = markers.get(n)
        if m is None:
            continue
        if manifests is not None and manifests.get(n) != m.manifest:
            continue
        out.append(n)
    return out


@dataclass(frozen=True)
class PushPlan:
    """The steps of one push: ``reclaim`` (a final directory without a marker goes back to
    staging first), the staging and final directories (relative to RACK), ``link_dest`` (the
    rack generation rsync hard-links unchanged files from, or None: everything travels)."""
    image: str
    generation: int
    already: bool
    reclaim: bool
    staging_root: str
    final_root: str
    staging_boot: str
    final_boot: str
    link_dest: int | None


def plan_push(image: str, generation: int, parent: int | None, rack_arrived: Iterable[int],
              rack_on_disk: Iterable[int]) -> PushPlan:
    """How to push generation ``generation`` (whose parent on the build host is ``parent``) to a
    rack that has ``rack_arrived`` complete generations and ``rack_on_disk`` generations with a
    final directory (root or boot files: either may be there without the other after a crash).

    ``link_dest``: the parent when it arrived on the rack (it shares most inodes), else the newest
    arrived generation older than this one, else the oldest newer one, else None."""
    got = sorted(set(rack_arrived))
    disk = set(rack_on_disk)
    older = [n for n in got if n < generation]
    newer = [n for n in got if n > generation]
    if parent is not None and parent in got:
        link: int | None = parent
    elif older:
        link = older[-1]
    elif newer:
        link = newer[0]
    else:
        link = None
    g = gen_name(generation)
    root = PurePosixPath("images") / image
    boot = PurePosixPath("tftp") / "images" / image
    return PushPlan(image, generation, already=generation in got,
                    reclaim=generation in disk and generation not in got,
                    staging_root=str(root / (g + INCOMING)), final_root=str(root / g),
                    staging_boot=str(boot / (g + INCOMING)), final_boot=str(boot / g),
                    link_dest=link)


def rsync_argv(rsync: str, src: str, dest: str, link_dest: str | None, extra: Iterable[str] = ()) -> list[str]:
    """The rsync of one tree into its staging directory: archive, hard links, numeric owners,
    extra names deleted (a resumed push), unchanged files linked from ``link_dest`` (absolute)."""
    argv = [rsync, "-aH", "--numeric-ids", "--delete", "--stats", *extra]
    if link_dest is not None:
        argv.append(f"--link-dest={link_dest}")
    return argv + [src.rstrip("/") + "/", dest.rstrip("/") + "/"]


@dataclass(frozen=True)
class Target:
    """Where ``push --to`` sends: a local rack directory (``host`` None) or ``[user@]host:/path``
    over ssh, rsync's own rule (a colon before the first slash)."""
    path: str
    host: str | None = None


def parse_target(text: str) -> Target:
    """The rack named by ``--to``; a ValueError for what is neither a path nor ``host:/abs/path``."""
    if text.startswith("rsync://"):
        raise ValueError(f"{text}: rsync:// racks are not supported (no rack-side step runs there); "
                         "use host:/path over ssh")
    head, colon, rest = text.partition(":")
    if not colon or "/" in head:
        return Target(text)
    if not head or head.startswith("-") or not rest.startswith("/") or any(c.isspace() for c in text):
        raise ValueError(f"{text}: a remote rack is [user@]host:/absolute/path")
    return Target(rest, head)


@dataclass(frozen=True)
class RsyncStats:
    """What rsync --stats said: regular files sent, bytes of the files sent, literal bytes."""
    files: int
    transferred_bytes: int
    literal_bytes: int
    total_bytes: int

    def __add__(self, other: RsyncStats) -> RsyncStats:
        return RsyncStats(self.files + other.files, self.transferred_bytes + other.transferred_bytes,
                          self.literal_bytes + other.literal_bytes, self.total_bytes + other.total_bytes)


def parse_stats(text: str) -> RsyncStats:
    """The figures of ``rsync --stats`` output (missing ones are 0)."""
    got: dict[str, int] = {}
    for line in text.splitlines():
        m = _STAT.match(line.strip())
        if m:
            got[m.group(1)] = int(m.group(2).replace(",", "").replace(".", ""))
    return RsyncStats(got.get("Number of regular files transferred", 0), got.get("Total transferred file size", 0),
                      got.get("Literal data", 0), got.get("Total file size", 0))


def rack_entries(image: str, arrived_numbers: Iterable[int], current: int | None,
                 root_of: Mapping[int, str]) -> dict[str, dict[str, str]]:
    """The rack's ``images:`` entries for one image (the same shape as the build host's,
    sidusd.image.publish.images_entries): every arrived generation as ``<image>.gen-N``, and the
    image's own name for ``current`` only if it arrived."""
    out: dict[str, dict[str, str]] = {}
    for n in sorted(set(arrived_numbers)):
        rel = f"images/{image}/{gen_name(n)}"
        entry = {"root": root_of[n], "kernel": f"{rel}/vmlinuz", "initrd": f"{rel}/initrd.img"}
        out[f"{image}.gen-{n}"] = entry
        if n == current:
            out[image] = dict(entry)
    return out

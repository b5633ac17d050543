"""The architecture of an image build: the recipe's ``architecture`` key, or ``sidus-image build --arch``.

An image for another architecture than the build host's (arm64 nodes from an amd64 boot host) is
made by the same debootstrap, ``--arch=<arch>``: debootstrap unpacks the packages and runs their
maintainer scripts in the new root through ``chroot`` (no ``--foreign``: the second stage runs at
once), and so do the later stages (apt, ``update-initramfs`` with sidus's overlay hook), so the
host must run that architecture's programs: qemu-user-static's binfmt_misc handler
(``/proc/sys/fs/binfmt_misc/qemu-aarch64`` and the others, with the ``F`` flag, so the handler
works inside a chroot).  :func:`check_build_host` makes sure of it before debootstrap starts
(:func:`sidusd.image.foreign.decide`: it registers the handler from qemu-user-static's binfmt.d
file when only the registration is missing, and otherwise refuses with the reason and the fix),
instead of failing half-way in the second stage.

Pure: :func:`with_arch`, :func:`foreign_problem`; I/O: :func:`host_architecture`,
:func:`binfmt_handlers`, :func:`check_build_host`.
"""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys
import typing
from pathlib import Path
from typing import TextIO

from sidusd.errors import BackendError, ConfigError
from sidusd.image import foreign
from sidusd.image.recipe import Architecture, Recipe
from sidusd.storage.runner import Runner

ARCHITECTURES: tuple[str, ...] = typing.get_args(Architecture)
#: Debian architecture -> the binfmt_misc handler qemu-user-static registers for it
QEMU_HANDLER = {"amd64": "qemu-x86_64", "arm64": "qemu-aarch64", "i386": "qemu-i386", "armhf": "qemu-arm",
                "ppc64el": "qemu-ppc64le", "riscv64": "qemu-riscv64", "s390x": "qemu-s390x"}
#: what a host of the key architecture runs natively besides its own
NATIVE_EXTRA = {"amd64": ("i386",)}
BINFMT = Path("/proc/sys/fs/binfmt_misc")
#: binfmt.d(5) directories, in systemd-binfmt's order of precedence (/etc overrides the package's)
BINFMT_D = (Path("/etc/binfmt.d"), Path("/run/binfmt.d"), Path("/usr/lib/binfmt.d"))


def with_arch(recipe: Recipe, arch: str | None) -> Recipe:
    """``recipe`` with ``--arch`` applied (None: the recipe's own); ConfigError for an unknown one (pure)."""
    name = with_arch_name(arch)
    return recipe if name is None else dataclasses.replace(recipe, architecture=name)


def with_arch_name(arch: str | None) -> str | None:
    """``arch`` if sidus-image knows it (None stays None); ConfigError otherwise (pure)."""
    if arch is not None and arch not in ARCHITECTURES:
        raise ConfigError("--arch", f"{arch!r} is not a Debian architecture sidus-image builds "
                                    f"(one of {', '.join(ARCHITECTURES)})")
    return arch


def foreign_problem(arch: str, host_arch: str, handlers: frozenset[str] | set[str]) -> str | None:
    """Why a build of ``arch`` cannot run on a ``host_arch`` host with these enabled binfmt handlers
    (None: it can) (pure)."""
    if arch == host_arch or arch in NATIVE_EXTRA.get(host_arch, ()):
        return None
    handler = QEMU_HANDLER.get(arch)
    if handler is not None and handler in handlers:
        return None
    return (f"an {arch} image on this {host_arch} host needs the {handler or arch} binfmt_misc handler "
            f"(debootstrap runs the image's programs in its chroot), and {BINFMT}/{handler} is not "
            "enabled; fix: apt-get install qemu-user-static binfmt-support (and mount binfmt_misc, "
            "e.g. in a container: mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc)")


def host_architecture() -> str:
    """dpkg's architecture of this host (``amd64``); without dpkg, the kernel's machine name mapped."""
    try:
        return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        machine = platform.machine()
        return {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64el"}.get(machine, machine)


def binfmt_handlers(directory: Path = BINFMT) -> set[str]:
    """The enabled binfmt_misc handlers (their file's first line is ``enabled``)."""
    out: set[str] = set()
    try:
        entries = list(directory.iterdir())
    except OSError:
        return out
    for p in entries:
        if p.name in ("register", "status"):
            continue
        try:
            if p.read_text().splitlines()[:1] == ["enabled"]:
                out.add(p.name)
        except (OSError, UnicodeDecodeError):
            continue
    return out


def packaged_rules(handler: str, dirs: tuple[Path, ...] = BINFMT_D) -> list[tuple[str, foreign.BinfmtRule]]:
    """(file, rule) of the binfmt.d files that register ``handler`` (``<handler>.conf`` first)."""
    out = []
    seen: set[str] = set()
    for d in dirs:
        for p in sorted(d.glob("*.conf"), key=lambda p: p.name != f"{handler}.conf") if d.is_dir() else ():
            if p.name in seen:                    # /etc/binfmt.d/x.conf masks /usr/lib/binfmt.d/x.conf
                continue
            seen.add(p.name)
            try:
                rules = foreign.rules_in(p.read_text())
            except (OSError, UnicodeDecodeError, ConfigError):
                continue
            out += [(str(p), r) for r in rules if r.name == handler]
    return out


def prepare_foreign(arch: str, out: TextIO | None = None, binfmt: Path = BINFMT,
                    dirs: tuple[Path, ...] = BINFMT_D, host: str | None = None) -> foreign.Decision | None:
    """Make this host able to run ``arch`` programs in a chroot, or BackendError why not (None:
    ``arch`` runs natively).  Registers the packaged handler when only that is missing."""
    host = host or host_architecture()
    if arch == host or arch in NATIVE_EXTRA.get(host, ()):
        return None
    handler = QEMU_HANDLER.get(arch, f"qemu-{arch}")
    status = None
    try:
        status = foreign.parse_status((binfmt / handler).read_text())
    except (OSError, UnicodeDecodeError):
        pass
    d = foreign.decide(arch, handler, (binfmt / "register").exists(), status, packaged_rules(handler, dirs),
                       str(binfmt))
    if d.action == "register" and d.rule is not None:
        try:
            with open(binfmt / "register", "w") as f:
                f.write(d.rule.line)
        except OSError as e:
            raise BackendError(f"cannot register the {handler} binfmt_misc handler",
                               detail=f"{binfmt}/register: {e}") from e
        print(f"sidus-image: {d.reason}", file=out or sys.stderr, flush=True)
    elif d.action == "refuse":
        raise BackendError(f"cannot build an {arch} image on this {host} host", detail=d.reason)
    return d


def check_build_host(recipe: Recipe, out: TextIO | None = None) -> None:
    """BackendError when this host cannot build ``recipe``'s architecture (see the module docstring)."""
    prepare_foreign(recipe.architecture, out)


def is_foreign(arch: str) -> bool:
    """Whether ``arch`` programs run on this host only through emulation."""
    host = host_architecture()
    return arch != host and arch not in NATIVE_EXTRA.get(host, ())


def verify_generation(root: Path, arch: str, runner: Runner | None = None) -> dict[str, object]:
    """The ``architecture`` of a generation for its meta record; for a foreign one with a kernel,
    after :func:`sidusd.image.bootarch.check_boot_files` (BackendError: not published)."""
    from sidusd.image import bootarch
    from sidusd.image.publish import boot_meta
    if is_foreign(arch) and boot_meta(root):
        return bootarch.check_boot_files(root, arch, runner)
    return {"architecture": arch}

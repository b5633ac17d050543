"""The architecture of an image build: the recipe's ``architecture`` key, or ``sidus-image build --arch``.

An image for another architecture than the build host's (arm64 nodes from an amd64 boot host) is
made by the same debootstrap, ``--arch=<arch>``: debootstrap unpacks the packages and runs their
maintainer scripts in the new root through ``chroot``, so the host must run that architecture's
programs: qemu-user-static's binfmt_misc handler (``qemu-user-static`` + ``binfmt-support``
register ``/proc/sys/fs/binfmt_misc/qemu-aarch64`` and the others with the ``F`` flag, so the
handler works inside a chroot).  Without it the build is refused before debootstrap starts, with
the reason and the fix, instead of failing half-way in the second stage.

Pure: :func:`with_arch`, :func:`foreign_problem`; I/O: :func:`host_architecture`,
:func:`binfmt_handlers`, :func:`check_build_host`.
"""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import typing
from pathlib import Path

from sidusd.errors import BackendError, ConfigError
from sidusd.image.recipe import Architecture, Recipe

ARCHITECTURES: tuple[str, ...] = typing.get_args(Architecture)
#: Debian architecture -> the binfmt_misc handler qemu-user-static registers for it
QEMU_HANDLER = {"amd64": "qemu-x86_64", "arm64": "qemu-aarch64", "i386": "qemu-i386", "armhf": "qemu-arm",
                "ppc64el": "qemu-ppc64le", "riscv64": "qemu-riscv64", "s390x": "qemu-s390x"}
#: what a host of the key architecture runs natively besides its own
NATIVE_EXTRA = {"amd64": ("i386",)}
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def with_arch(recipe: Recipe, arch: str | None) -> Recipe:
    """``recipe`` with ``--arch`` applied (None: the recipe's own); ConfigError for an unknown one (pure)."""
    if arch is None:
        return recipe
    if arch not in ARCHITECTURES:
        raise ConfigError("--arch", f"{arch!r} is not a Debian architecture sidus-image builds "
                                    f"(one of {', '.join(ARCHITECTURES)})")
    return dataclasses.replace(recipe, architecture=arch)


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


def check_build_host(recipe: Recipe) -> None:
    """BackendError when this host cannot build ``recipe``'s architecture (see the module docstring)."""
    problem = foreign_problem(recipe.architecture, host_architecture(), binfmt_handlers())
    if problem is not None:
        raise BackendError(f"cannot build image {recipe.name} for {recipe.architecture}", detail=problem)

"""Foreign-architecture images: the binfmt_misc handler a build needs, and what a built file is for.

An arm64 image built on an amd64 host runs arm64 programs in its chroot (debootstrap's second
stage, apt's maintainer scripts, ``update-initramfs``), through qemu-user-static's binfmt_misc
handler.  The handler must be registered with the ``F`` flag (fix binary: the kernel opens the
interpreter when it is registered, so it works inside a chroot that has no qemu of its own).

:func:`decide` says, before the build starts, what to do (pure):

* binfmt_misc not mounted: refuse, with the ``mount`` command (mounting a file system under /proc
  is the host's choice: systemd's ``proc-sys-fs-binfmt_misc.automount`` does it on a booted host;
  a container may not be allowed to);
* the handler registered and enabled with ``F``: go on;
* registered without ``F`` or disabled: refuse (it is the administrator's registration; the
  message says how to replace it);
* not registered, and qemu-user-static's ``binfmt.d`` file has it with ``F``: **register that very
  line** (what ``systemd-binfmt.service`` does with the same file at boot; it is missing only where
  that did not run: a container, a chroot, a package installed without systemd), said on the output;
* not registered and no such file: refuse, naming the package (``apt-get install qemu-user-static``).

:func:`kernel_arch`, :func:`elf_arch` and :func:`cpio_files` tell what architecture a kernel
image, an ELF program and an initramfs are for, so a build never publishes an amd64 kernel under an
arm64 image (:mod:`sidusd.image.bootarch` reads the files).  Formats: arm64 ``Image`` header
(Documentation/arch/arm64/booting.rst: magic ``ARM\\x64`` at 0x38), x86 boot protocol
(Documentation/arch/x86/boot.rst: ``HdrS`` at 0x202), PE/COFF machine types (EFI stub, zboot),
ELF ``e_machine``; cpio "newc" (the initramfs buffer format, Documentation/driver-api/early-userspace).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Generator
from dataclasses import dataclass

from sidusd.errors import ConfigError

#: Debian architecture -> ELF e_machine (elf.h)
ELF_MACHINE = {"amd64": 62, "arm64": 183, "i386": 3, "armhf": 40, "ppc64el": 21, "riscv64": 243, "s390x": 22}
#: PE/COFF machine types (the EFI stub of a kernel image)
PE_MACHINE = {0x8664: "amd64", 0xAA64: "arm64", 0x14C: "i386", 0x1C2: "armhf", 0x1C4: "armhf", 0x5064: "riscv64"}
ARM64_MAGIC = b"ARM\x64"
_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


@dataclass(frozen=True)
class BinfmtRule:
    """One binfmt_misc registration line ``:name:type:offset:magic:mask:interpreter:flags``
    (Documentation/admin-guide/binfmt-misc.rst), as in a binfmt.d(5) file."""
    name: str
    kind: str                 # "M" (magic) or "E" (extension)
    offset: int
    magic: bytes
    mask: bytes
    interpreter: str
    flags: str
    line: str                 # the line itself, written to ``register`` as it is

    def matches_elf_machine(self, machine: int) -> bool:
        """Whether this magic rule takes a 64-bit little-endian ELF executable of ``machine``."""
        if self.kind != "M" or self.offset != 0:
            return False
        probe = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HH", 2, machine)
        mask = self.mask or b"\xff" * len(self.magic)
        if len(probe) < len(self.magic) or len(mask) != len(self.magic):
            return False
        return all((probe[i] & mask[i]) == (self.magic[i] & mask[i]) for i in range(len(self.magic)))


def _unescape(field: str) -> bytes:
    raw = field.encode("latin-1")
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)


def parse_rule(line: str) -> BinfmtRule:
    """A :class:`BinfmtRule` from a registration line; ConfigError (the field and why) otherwise."""
    line = line.strip()
    if len(line) < 2:
        raise ConfigError("binfmt", "empty registration line")
    sep = line[0]
    fields = line[1:].split(sep)
    if len(fields) != 7:
        raise ConfigError("binfmt", f"{len(fields)} fields, a registration line has 7 "
                                    "(:name:type:offset:magic:mask:interpreter:flags)")
    name, kind, offset, magic, mask, interpreter, flags = fields
    if not name or "/" in name or name in (".", "..", "register", "status"):
        raise ConfigError("binfmt.name", f"{name!r} is not a handler name")
    if kind not in ("M", "E"):
        raise ConfigError("binfmt.type", f"{kind!r}: M (magic) or E (extension)")
    if not offset.isdigit() and offset != "":
        raise ConfigError("binfmt.offset", f"{offset!r} is not a number")
    if not interpreter.startswith("/"):
        raise ConfigError("binfmt.interpreter", f"{interpreter!r} is not an absolute path")
    if set(flags) - set("POCF"):
        raise ConfigError("binfmt.flags", f"{flags!r}: only P, O, C, F")
    m, k = _unescape(magic), _unescape(mask)
    if kind == "M" and (not m or (k and len(k) != len(m))):
        raise ConfigError("binfmt.mask", "a magic rule needs a magic, and a mask of its length")
    return BinfmtRule(name, kind, int(offset or 0), m, k, interpreter, flags, line)


def rules_in(text: str) -> list[BinfmtRule]:
    """The rules of a binfmt.d(5) file (comments ``#``/``;`` and blank lines skipped)."""
    return [parse_rule(ln) for ln in text.splitlines() if ln.strip() and ln.strip()[0] not in "#;"]


@dataclass(frozen=True)
class HandlerStatus:
    """``/proc/sys/fs/binfmt_misc/<name>`` of a registered handler."""
    enabled: bool
    interpreter: str
    flags: str


def parse_status(text: str) -> HandlerStatus:
    """The kernel's description of a registered handler (``enabled``, ``interpreter``, ``flags:``)."""
    lines = text.splitlines()
    interp = flags = ""
    for ln in lines[1:]:
        if ln.startswith("interpreter "):
            interp = ln[len("interpreter "):].strip()
        elif ln.startswith("flags:"):
            flags = ln[len("flags:"):].strip()
    return HandlerStatus(lines[:1] == ["enabled"], interp, flags)


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` says: ``ok`` (nothing to do), ``register`` (this rule), or ``refuse`` (why)."""
    action: str
    reason: str = ""
    rule: BinfmtRule | None = None


def decide(arch: str, handler: str, mounted: bool, status: HandlerStatus | None,
           packaged: list[tuple[str, BinfmtRule]], binfmt_dir: str) -> Decision:
    """What to do before building an ``arch`` image through binfmt handler ``handler`` (see the module
    docstring).  ``packaged``: (file, rule) of the binfmt.d files that name the handler."""
    fix_pkg = "apt-get install qemu-user-static"
    if not mounted:
        return Decision("refuse", f"binfmt_misc is not mounted at {binfmt_dir} (an {arch} image runs {arch} "
                                  f"programs in its chroot); mount it: mount -t binfmt_misc binfmt_misc {binfmt_dir}")
    if status is not None:
        if not status.enabled:
            return Decision("refuse", f"the {handler} binfmt_misc handler is disabled; enable it: "
                                      f"echo 1 > {binfmt_dir}/{handler}")
        if "F" not in status.flags:
            return Decision("refuse", f"the {handler} binfmt_misc handler is registered without the F flag "
                                      f"(flags {status.flags or 'none'}): {status.interpreter} would be looked "
                                      f"for inside the image's chroot; replace it: echo -1 > {binfmt_dir}/{handler}"
                                      f" && {fix_pkg} (its binfmt.d file has F), or update-binfmts --enable")
        return Decision("ok")
    machine = ELF_MACHINE.get(arch)
    for path, rule in packaged:
        if rule.name == handler and "F" in rule.flags and (machine is None or rule.matches_elf_machine(machine)):
            return Decision("register", f"registered the {handler} binfmt_misc handler from {path} "
                                        f"(flags {rule.flags}), as systemd-binfmt does at boot", rule)
    seen = ", ".join(f"{p} (flags {r.flags or 'none'})" for p, r in packaged if r.name == handler)
    return Decision("refuse", f"no {handler} binfmt_misc handler for an {arch} image (it runs {arch} programs "
                              "in its chroot)" + (f", and {seen} has no F flag" if seen else "")
                              + f"; fix: {fix_pkg}")


def elf_arch(head: bytes) -> str | None:
    """The Debian architecture of an ELF file from its first 20 bytes (None: not ELF / unknown)."""
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[5] not in (1, 2):
        return None
    (machine,) = struct.unpack("<H" if head[5] == 1 else ">H", head[18:20])
    if machine == 62 and head[4] == 1:
        return "i386"      # x32 is not a Debian architecture sidus builds; a 32-bit x86-64 object
    for deb, m in ELF_MACHINE.items():
        if m == machine:
            return deb
    return None


def kernel_arch(head: bytes) -> str | None:
    """The architecture of a kernel image from its first 4 KiB (None: not a kernel image known here).

    An arm64 ``Image`` (with or without the EFI stub) has ``ARM\\x64`` at 0x38; an x86 bzImage has
    ``HdrS`` at 0x202; otherwise a PE/COFF image (an EFI zboot kernel) says its machine."""
    if head[0x38:0x3C] == ARM64_MAGIC:
        return "arm64"
    if head[0x202:0x206] == b"HdrS":
        return _pe_machine(head) or "x86"          # a bzImage without the EFI stub: amd64 or i386
    return _pe_machine(head)


def _pe_machine(head: bytes) -> str | None:
    if head[:2] != b"MZ" or len(head) < 0x40:
        return None
    (pe,) = struct.unpack_from("<I", head, 0x3C)
    if pe + 6 > len(head) or head[pe:pe + 4] != b"PE\0\0":
        return None
    (machine,) = struct.unpack_from("<H", head, pe + 4)
    return PE_MACHINE.get(machine)


CPIO_MAGIC = (b"070701", b"070702")
CPIO_TRAILER = "TRAILER!!!"


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def cpio_files(data: bytes, start: int = 0) -> Generator[tuple[str, int, bytes], None, int]:
    """(name, mode, content) of each member of one cpio "newc" archive in ``data`` from ``start``;
    ends at its trailer or where ``data`` ends (a prefix of a larger archive).  The offset after
    the trailer is the iterator's return value (``StopIteration.value``)."""
    pos = start
    while pos + 110 <= len(data) and data[pos:pos + 6] in CPIO_MAGIC:
        try:
            fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            return pos
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110:name_end - 1].decode("utf-8", "replace")
        body = _pad4(name_end)
        if name == CPIO_TRAILER:
            return _pad4(body)
        yield name, mode, data[body:body + filesize]
        pos = _pad4(body + filesize)
    return pos


def skip_early_cpio(data: bytes) -> int:
    """The offset of an initramfs's main (compressed) part: after the uncompressed early archives
    (x86 microcode) and the zero padding between them; 0 if it starts compressed."""
    pos = 0
    while data[pos:pos + 6] in CPIO_MAGIC:
        it = cpio_files(data, pos)
        try:
            while True:
                next(it)
        except StopIteration as stop:
            if stop.value is None or stop.value <= pos:
                return pos
            pos = stop.value
        while pos < len(data) and data[pos] == 0:
            pos += 1
    return pos


COMPRESSORS = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"),
               (b"\x5d\x00\x00", "lzma"), (b"BZh", "bzip2"), (b"\x89LZO", "lzop"), (b"\x02\x21\x4c\x18", "lz4"))


def compression(head: bytes) -> str | None:
    """The compressor of an initramfs part from its first bytes ("cpio": none; None: unknown)."""
    if head[:6] in CPIO_MAGIC:
        return "cpio"
    for magic, name in COMPRESSORS:
        if head.startswith(magic):
            return name
    return None

"""Foreign-architecture images (issue 18, arm64): the binfmt_misc registration line and the
decision before a build, the architecture of kernels, ELF programs and initrds, and ``sidus-image
import --arch`` refusing a tree of another architecture (pure parts and small trees in tmp; the
real arm64 build is tests/integration/test_arm64_image.py)."""

from __future__ import annotations

import gzip
import io
import shutil
import struct
from collections import Counter
from pathlib import Path

import pytest

from sidusd.errors import BackendError, ConfigError
from sidusd.image import arch, bootarch, foreign

# Debian 12's /usr/lib/binfmt.d/qemu-aarch64.conf (qemu-user-static 1:7.2), as it is
QEMU_AARCH64 = (r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00"
                r"\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:"
                r"/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OPF")
STATUS = ("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POF\noffset 0\n"
          "magic 7f454c460201010000000000000000000200b700\nmask ffffffffffffff00fffffffffffffffffeffffff\n")


def elf(machine: int, cls: int = 2) -> bytes:
    """A 64-byte ELF executable header stand-in for ``machine``."""
    return b"\x7fELF" + bytes([cls, 1, 1]) + b"\0" * 9 + struct.pack("<HH", 2, machine) + b"\0" * 44


def test_the_packaged_registration_line_parses():
    r = foreign.parse_rule(QEMU_AARCH64 + "\n")
    assert (r.name, r.kind, r.offset, r.interpreter, r.flags) == (
        "qemu-aarch64", "M", 0, "/usr/libexec/qemu-binfmt/aarch64-binfmt-P", "OPF")
    assert r.magic[:4] == b"\x7fELF" and r.magic[18] == 0xB7 and len(r.mask) == len(r.magic) == 20
    assert r.line == QEMU_AARCH64                        # written to `register` as the package has it
    assert r.matches_elf_machine(183) and not r.matches_elf_machine(62)
    text = f"# a comment\n; another\n\n{QEMU_AARCH64}\n"
    assert [x.name for x in foreign.rules_in(text)] == ["qemu-aarch64"]


@pytest.mark.parametrize(("line", "key"), [
    (":qemu-aarch64:M::\\x7f:", "binfmt"),                                  # too few fields
    (":qemu-aarch64:X::\\x7f::/usr/bin/q:F", "binfmt.type"),
    (":qemu-aarch64:M::\\x7f::usr/bin/q:F", "binfmt.interpreter"),
    (":qemu-aarch64:M::\\x7f::/usr/bin/q:FZ", "binfmt.flags"),
    (":register:M::\\x7f::/usr/bin/q:F", "binfmt.name"),
    (":q:M::\\x7f\\x45:\\xff:/usr/bin/q:F", "binfmt.mask"),                # mask shorter than magic
    (":q:M:x:\\x7f::/usr/bin/q:F", "binfmt.offset"),
])
def test_a_malformed_registration_line_is_refused_with_the_field(line, key):
    with pytest.raises(ConfigError) as ei:
        foreign.parse_rule(line)
    assert ei.value.path == key


def test_the_kernel_status_file_parses():
    st = foreign.parse_status(STATUS)
    assert st == foreign.HandlerStatus(True, "/usr/libexec/qemu-binfmt/aarch64-binfmt-P", "POF")
    assert not foreign.parse_status("disabled\ninterpreter /x\nflags: \n").enabled


PACKAGED = [("/usr/lib/binfmt.d/qemu-aarch64.conf", foreign.parse_rule(QEMU_AARCH64))]


def test_decide_before_a_foreign_build():
    d = foreign.decide("arm64", "qemu-aarch64", False, None, PACKAGED, "/proc/sys/fs/binfmt_misc")
    assert d.action == "refuse" and "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc" in d.reason
    ok = foreign.parse_status(STATUS)
    assert foreign.decide("arm64", "qemu-aarch64", True, ok, [], "/b").action == "ok"
    d = foreign.decide("arm64", "qemu-aarch64", True, foreign.HandlerStatus(True, "/usr/bin/qemu-aarch64", "OC"),
                       PACKAGED, "/b")
    assert d.action == "refuse" and "without the F flag" in d.reason and "echo -1 > /b/qemu-aarch64" in d.reason
    d = foreign.decide("arm64", "qemu-aarch64", True, foreign.HandlerStatus(False, "/x", "F"), PACKAGED, "/b")
    assert d.action == "refuse" and "echo 1 > /b/qemu-aarch64" in d.reason
    # only the registration is missing: the package's own line is registered
    d = foreign.decide("arm64", "qemu-aarch64", True, None, PACKAGED, "/b")
    assert d.action == "register" and d.rule is PACKAGED[0][1] and "qemu-aarch64.conf" in d.reason
    no_f = [("/etc/binfmt.d/q.conf", foreign.parse_rule(QEMU_AARCH64[:-3] + "OP"))]
    d = foreign.decide("arm64", "qemu-aarch64", True, None, no_f, "/b")
    assert d.action == "refuse" and "/etc/binfmt.d/q.conf (flags OP) has no F flag" in d.reason
    d = foreign.decide("arm64", "qemu-aarch64", True, None, [], "/b")
    assert d.action == "refuse" and "apt-get install qemu-user-static" in d.reason
    # a rule of that name whose magic is not aarch64 ELF is not taken
    wrong = [("/x.conf", foreign.parse_rule(QEMU_AARCH64.replace(r"\xb7\x00:", r"\x3e\x00:")))]
    assert foreign.decide("arm64", "qemu-aarch64", True, None, wrong, "/b").action == "refuse"


def test_prepare_foreign_registers_the_packaged_line(tmp_path, capsys):
    """Before: check_build_host refused when the handler was not registered, whatever was installed."""
    binfmt, conf = tmp_path / "binfmt_misc", tmp_path / "binfmt.d"
    binfmt.mkdir()
    conf.mkdir()
    (binfmt / "register").write_text("")
    (conf / "qemu-aarch64.conf").write_text(QEMU_AARCH64 + "\n")
    d = arch.prepare_foreign("arm64", None, binfmt, (conf,), host="amd64")
    assert d is not None and d.action == "register"
    assert (binfmt / "register").read_text() == QEMU_AARCH64
    assert "registered the qemu-aarch64 binfmt_misc handler" in capsys.readouterr().err
    (binfmt / "qemu-aarch64").write_text(STATUS)          # what the kernel shows then
    again = arch.prepare_foreign("arm64", None, binfmt, (conf,), host="amd64")
    assert again is not None and again.action == "ok"
    assert arch.prepare_foreign("amd64", None, binfmt, (conf,), host="amd64") is None
    (binfmt / "register").unlink()
    with pytest.raises(BackendError, match="binfmt_misc is not mounted"):
        arch.prepare_foreign("arm64", None, binfmt, (conf,), host="amd64")


def test_etc_binfmt_d_masks_the_package_file(tmp_path):
    etc, usr = tmp_path / "etc", tmp_path / "usr"
    etc.mkdir()
    usr.mkdir()
    (etc / "qemu-aarch64.conf").write_text("# disabled by the site\n")
    (usr / "qemu-aarch64.conf").write_text(QEMU_AARCH64 + "\n")
    assert arch.packaged_rules("qemu-aarch64", (etc, usr)) == []
    (etc / "qemu-aarch64.conf").unlink()
    assert [p for p, _ in arch.packaged_rules("qemu-aarch64", (etc, usr))] == [str(usr / "qemu-aarch64.conf")]


def arm64_image_head(pe: bool = True) -> bytes:
    """An arm64 ``Image`` header (booting.rst): code0/1, offsets, magic ARM\\x64 at 0x38, PE offset."""
    h = bytearray(4096)
    if pe:
        h[0:2] = b"MZ"
    h[0x38:0x3C] = b"ARM\x64"
    struct.pack_into("<I", h, 0x3C, 0x40)
    h[0x40:0x44] = b"PE\0\0"
    struct.pack_into("<H", h, 0x44, 0xAA64)
    return bytes(h)


def bzimage_head() -> bytes:
    h = bytearray(4096)
    h[0:2] = b"MZ"
    struct.pack_into("<I", h, 0x3C, 0x80)
    h[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<H", h, 0x84, 0x8664)
    h[0x202:0x206] = b"HdrS"
    return bytes(h)


def test_kernel_arch_from_the_image_header():
    assert foreign.kernel_arch(arm64_image_head()) == "arm64"
    assert foreign.kernel_arch(arm64_image_head(pe=False)) == "arm64"
    assert foreign.kernel_arch(bzimage_head()) == "amd64"
    h = bytearray(bzimage_head())
    h[0x3C:0x40] = b"\xff\xff\0\0"                 # no PE header: an x86 boot-protocol image
    assert foreign.kernel_arch(bytes(h)) == "x86"
    zboot = bytearray(4096)                          # an EFI zboot image: only its PE machine says
    zboot[0:2], zboot[4:8] = b"MZ", b"zimg"
    struct.pack_into("<I", zboot, 0x3C, 0x40)
    zboot[0x40:0x44] = b"PE\0\0"
    struct.pack_into("<H", zboot, 0x44, 0xAA64)
    assert foreign.kernel_arch(bytes(zboot)) == "arm64"
    assert foreign.kernel_arch(b"\0" * 4096) is None and foreign.kernel_arch(b"MZ") is None


def test_elf_arch():
    assert foreign.elf_arch(elf(183)) == "arm64" and foreign.elf_arch(elf(62)) == "amd64"
    assert foreign.elf_arch(elf(40, cls=1)) == "armhf" and foreign.elf_arch(elf(62, cls=1)) == "i386"
    assert foreign.elf_arch(b"#!/bin/sh\n" + b"\0" * 20) is None and foreign.elf_arch(elf(9999)) is None
    assert foreign.elf_arch(Path(shutil.which("sh") or "/bin/sh").read_bytes()[:20]) == arch.host_architecture()


def newc(members: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio "newc" archive (the initramfs buffer format) of (name, mode, content), with its trailer."""
    out = io.BytesIO()
    for i, (name, mode, body) in enumerate([*members, ("TRAILER!!!", 0, b"")]):
        n = name.encode() + b"\0"
        hdr = b"070701" + b"".join(b"%08X" % v for v in (i + 1, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(n), 0))
        out.write(hdr + n)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(body)
        out.write(b"\0" * (-out.tell() % 4))
    return out.getvalue()


REG, DIR = 0o100755, 0o040755


def initrd(main: list[tuple[str, int, bytes]], early: bool = True) -> bytes:
    """An initramfs as initramfs-tools makes one: an uncompressed early archive (microcode), zero
    padding, then the gzip'd main archive."""
    head = newc([("kernel", DIR, b""), ("kernel/x86/microcode/GenuineIntel.bin", 0o100644, b"\x01" * 37)])
    body = gzip.compress(newc(main))
    return (head + b"\0" * 512 + body) if early else body


def test_initrd_contents_sees_through_the_early_archive(tmp_path):
    p = tmp_path / "initrd.img"
    p.write_bytes(initrd([(".", DIR, b""), ("./bin/busybox", REG, elf(183) + b"x" * 100),
                          ("./lib/modules/6.1/kernel/fs/overlay.ko", 0o100644, elf(183, cls=2)),
                          ("./scripts/init-bottom/sidus-overlay", REG, b"#!/bin/sh\n"),
                          ("./bin/sh", 0o120777, b"busybox")]))
    archs, names = bootarch.initrd_contents(p)
    assert archs == Counter({"arm64": 2}) and bootarch.OVERLAY in names
    assert "kernel/x86/microcode/GenuineIntel.bin" in names
    assert foreign.skip_early_cpio(p.read_bytes()[:300]) > 0


def test_boot_problem_refuses_what_is_not_the_images_architecture():
    assert bootarch.boot_problem("arm64", "arm64", Counter(arm64=3), True) is None
    assert "the kernel is amd64, not arm64" in bootarch.boot_problem("arm64", "amd64", Counter(arm64=3), True)
    assert "not a kernel image known here" in bootarch.boot_problem("arm64", None, Counter(arm64=3), True)
    why = bootarch.boot_problem("arm64", "arm64", Counter(arm64=3, amd64=1), True)
    assert why == "the initrd has programs for amd64 (1), besides 3 for arm64"
    assert "no ELF file" in bootarch.boot_problem("arm64", "arm64", Counter(), True)
    assert "sidus-overlay" in bootarch.boot_problem("arm64", "arm64", Counter(arm64=1), False)
    assert bootarch.boot_problem("amd64", "x86", Counter(amd64=1), True) is None


def boot_tree(root: Path, kernel: bytes, initrd_bytes: bytes, kver: str = "6.1.0-9-arm64") -> Path:
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{kver}").write_bytes(kernel)
    (root / "boot" / f"initrd.img-{kver}").write_bytes(initrd_bytes)
    return root


def test_an_amd64_kernel_is_never_published_under_an_arm64_image(tmp_path):
    good = initrd([("bin/busybox", REG, elf(183)), ("scripts/init-bottom/sidus-overlay", REG, b"#!/bin/sh\n")])
    ok = boot_tree(tmp_path / "ok", arm64_image_head(), good)
    assert bootarch.check_boot_files(ok, "arm64") == {"architecture": "arm64", "kernel_arch": "arm64",
                                                      "initrd_elf": {"arm64": 1}}
    bad = boot_tree(tmp_path / "bad", bzimage_head(), good)
    with pytest.raises(BackendError) as ei:
        bootarch.check_boot_files(bad, "arm64")
    assert "nothing is published" in str(ei.value) and "the kernel is amd64, not arm64" in ei.value.detail
    mixed = boot_tree(tmp_path / "mixed", arm64_image_head(),
                      initrd([("bin/busybox", REG, elf(62)), ("scripts/init-bottom/sidus-overlay", REG, b"")]))
    with pytest.raises(BackendError, match="programs for amd64"):
        bootarch.check_boot_files(mixed, "arm64")
    gz = boot_tree(tmp_path / "gz", gzip.compress(arm64_image_head()), good)     # a gzip'd Image
    assert bootarch.check_boot_files(gz, "arm64")["kernel_arch"] == "arm64"


def usrmerged_tree(root: Path, sh: bytes) -> Path:
    """A usr-merged tree: bin -> usr/bin, usr/bin/sh -> dash (relative), sbin/init -> /usr/bin/dash."""
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "sbin").mkdir()
    (root / "bin").symlink_to("usr/bin")
    (root / "usr" / "bin" / "dash").write_bytes(sh)
    (root / "usr" / "bin" / "sh").symlink_to("dash")
    return root


def test_tree_arch_follows_the_trees_own_symlinks(tmp_path):
    assert bootarch.tree_arch(usrmerged_tree(tmp_path / "a", elf(183))) == "arm64"
    b = tmp_path / "b"
    (b / "bin").mkdir(parents=True)
    (b / "bin" / "busybox").write_bytes(elf(62))
    (b / "bin" / "sh").symlink_to("/bin/busybox")          # absolute: the tree's, not this host's
    assert bootarch.tree_arch(b) == "amd64"
    c = tmp_path / "c"
    (c / "bin").mkdir(parents=True)
    (c / "bin" / "sh").symlink_to("../../../../../usr/bin/dash")   # escapes: not followed
    assert bootarch.tree_arch(c) is None


def importable(root: Path, sh: bytes, kver: str) -> Path:
    """The least tree `sidus-image import` takes (check_tree), with ``sh`` as its bin/sh."""
    usrmerged_tree(root, sh)
    (root / "etc").mkdir()
    (root / "usr" / "sbin" / "update-initramfs").write_text("#!/bin/sh\n")
    (root / "usr" / "lib" / "modules" / kver).mkdir(parents=True)
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinuz-{kver}").write_bytes(bzimage_head())
    return root


def cli(tmp_path: Path, *args: str) -> int:
    from sidusd.image.__main__ import main
    return main(["--images-dir", str(tmp_path / "images"), "--tftp-root", str(tmp_path / "tftp"),
                 "--images-file", str(tmp_path / "images.yaml"), *args])


def test_import_of_an_amd64_tree_as_arm64_is_refused_with_the_reason(tmp_path, capsys):
    """Before: argparse refused ``import --arch`` (SystemExit 2, "unrecognized arguments")."""
    tree = importable(tmp_path / "tree", elf(62), "6.1.0-9-amd64")
    assert cli(tmp_path, "import", "arm", str(tree), "--arch", "arm64") == 2
    err = capsys.readouterr().err
    assert f"--arch: {tree} is an amd64 tree (its bin/sh is an amd64 program), not arm64: nothing imported" in err
    assert not (tmp_path / "images" / "arm").exists() and tree.is_dir()
    assert cli(tmp_path, "import", "arm", str(tree), "--arch", "sparc") == 2
    assert "'sparc' is not a Debian architecture" in capsys.readouterr().err
    script = importable(tmp_path / "script", b"#!/bin/busybox sh\n", "6.1.0-9-arm64")
    assert cli(tmp_path, "import", "arm", str(script), "--arch", "arm64") == 2
    assert "architecture cannot be told" in capsys.readouterr().err


def test_tree_architecture_marks_what_the_tree_is(tmp_path):
    from sidusd.image.importer import tree_architecture
    arm = usrmerged_tree(tmp_path / "arm", elf(183))
    assert tree_architecture(arm, "arm64", "amd64") == "arm64"
    assert tree_architecture(arm, None, "amd64") == "arm64"          # no --arch: what it is
    assert tree_architecture(tmp_path, None, "amd64") == "amd64"     # nothing to tell: the host's


def test_a_tree_without_initramfs_tools_keeps_an_initrd_with_sidus_overlay(tmp_path):
    """Before: refused ("no usr/sbin/update-initramfs"), whatever initrd the tree had (the arm64
    lab's tree, assembled on the host, could not become a generation)."""
    from sidusd.image.importer import check_tree, import_plan
    kver = "6.1.0-9-arm64"
    root = usrmerged_tree(tmp_path / "t", elf(183))
    (root / "etc").mkdir()
    (root / "lib" / "modules" / kver).mkdir(parents=True)
    boot_tree(root, arm64_image_head(), initrd([("bin/busybox", REG, elf(183)),
                                                ("scripts/init-bottom/sidus-overlay", REG, b"#!/bin/sh\n")]), kver)
    found = check_tree(root)
    assert found.own_initrd and found.kernels == (kver,)
    assert [s.name for s in import_plan(root, {"modules": b"overlay\n"}, False, found.own_initrd)] == ["hostname"]
    (root / "boot" / f"initrd.img-{kver}").write_bytes(initrd([("bin/busybox", REG, elf(183))]))
    with pytest.raises(ConfigError, match="no usr/sbin/update-initramfs.*sidus-overlay"):
        check_tree(root)

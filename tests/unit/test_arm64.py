"""arm64: the boot file's Debian source (preflight, populate), ``sidus-image build --arch``, the lab's
module closure (pure parts; the boot itself is tests/e2e/test_arm64.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidusd import config as config_mod
from sidusd import preflight as pf
from sidusd.errors import ConfigError
from sidusd.image import arch
from sidusd.image.recipe import parse_recipe
from sidusd.image.stages import debootstrap_argv

GRUBAA64 = "/usr/lib/grub/arm64-efi-signed/grubnetaa64.efi.signed"


def conf(boot: str = "boot: {boot_files: {arm64: grubaa64.efi}}", root: str = "/srv/tftp"):
    return config_mod.parse(f"dhcp: {{mode: 'off'}}\ntftp: {{root: {root}}}\n{boot}\n", "t.yaml", Path("/etc/sidus"))


def test_grubaa64_comes_from_the_signed_arm64_network_grub():
    """Before: no source known ("copy your grubaa64.efi into tftp.root"), populate left it MISSING."""
    c = conf()
    plan = {str(d): s for d, s, _ in pf.populate_plan(c)}
    src = plan["/srv/tftp/grubaa64.efi"]
    assert src is not None and (src.package, src.path) == ("grub-efi-arm64-signed:arm64", GRUBAA64)
    present = frozenset((n.kind, n.path) for n in pf.needs(c) if n.path != "/srv/tftp/grubaa64.efi")
    (p,) = pf.problems(pf.needs(c), present)
    assert p.key == "boot.boot_files.arm64" and "apt-get install grub-efi-arm64-signed:arm64" in p.fix
    # the shipped default stays null: no arm64 file is needed (and none copied) unless configured
    shipped = config_mod.parse((Path(pf.__file__).parent / "data" / "sidus.yaml").read_text()
                               .replace("interfaces: [eth1]", "interfaces: [lo]"), "sidus.yaml", Path("/etc/sidus"))
    assert shipped.boot.boot_files.arm64 is None
    assert not any("grubaa64" in str(d) for d, _, _ in pf.populate_plan(shipped))


def test_tftp_root_populate_copies_grubaa64(tmp_path, capsys):
    if not Path(GRUBAA64).is_file():
        pytest.skip(f"missing {GRUBAA64} (package grub-efi-arm64-signed:arm64, multiarch: scripts/setup)")
    from sidusd import tftproot
    cfg = tmp_path / "sidus.yaml"
    cfg.write_text("dhcp: {mode: 'off'}\ntftp: {root: /nonexistent}\n"
                   "boot: {boot_files: {arm64: grubaa64.efi}}\n")
    assert tftproot.main(str(tmp_path / "tftp"), str(cfg)) == 0, capsys.readouterr().out
    assert (tmp_path / "tftp" / "grubaa64.efi").read_bytes() == Path(GRUBAA64).read_bytes()
    assert "grub-efi-arm64-signed:arm64" in capsys.readouterr().out


RECIPE = parse_recipe("name: arm\ninclude: [linux-image-arm64, initramfs-tools]\n")


def test_arch_option_sets_the_debootstrap_architecture():
    assert arch.with_arch(RECIPE, None) is RECIPE
    r = arch.with_arch(RECIPE, "arm64")
    assert r.architecture == "arm64" and RECIPE.architecture == "amd64"
    assert "--arch=arm64" in debootstrap_argv(r, "/target", "http://deb.example/debian", None)


def test_arch_option_refuses_an_unknown_architecture():
    with pytest.raises(ConfigError) as ei:
        arch.with_arch(RECIPE, "sparc")
    assert ei.value.path == "--arch" and "'sparc'" in ei.value.reason and "arm64" in ei.value.reason


def test_sidus_image_build_arch_unknown_is_refused_before_any_work(tmp_path, capsys):
    """Before: argparse refused ``--arch`` itself (SystemExit, "unrecognized arguments")."""
    from sidusd.image.__main__ import main
    recipe = tmp_path / "arm.yaml"
    recipe.write_text("name: arm\n")
    rc = main(["--images-dir", str(tmp_path / "images"), "--tftp-root", str(tmp_path / "tftp"),
               "--images-file", str(tmp_path / "images.yaml"), "build", str(recipe), "--arch", "sparc"])
    err = capsys.readouterr().err
    assert rc == 2 and "--arch: 'sparc' is not a Debian architecture" in err, err
    assert not (tmp_path / "images" / "arm").exists()


def test_a_foreign_architecture_needs_the_qemu_binfmt_handler():
    assert arch.foreign_problem("amd64", "amd64", set()) is None
    assert arch.foreign_problem("i386", "amd64", set()) is None
    assert arch.foreign_problem("arm64", "amd64", {"qemu-aarch64"}) is None
    why = arch.foreign_problem("arm64", "amd64", {"qemu-arm"})
    assert why is not None and "qemu-aarch64" in why and "qemu-user-static" in why


def test_binfmt_handlers_reads_enabled_entries(tmp_path):
    (tmp_path / "status").write_text("enabled\n")
    (tmp_path / "register").write_text("")
    (tmp_path / "qemu-aarch64").write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n")
    (tmp_path / "qemu-arm").write_text("disabled\n")
    assert arch.binfmt_handlers(tmp_path) == {"qemu-aarch64"}
    assert arch.binfmt_handlers(tmp_path / "absent") == set()


def test_lab_module_closure_follows_modules_dep(tmp_path):
    from sidusd.errors import BackendError
    from sidusd.lab.arm64 import _closure
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/nfs/nfsv3.ko: kernel/fs/nfs/nfs.ko kernel/net/sunrpc/sunrpc.ko\n"
        "kernel/fs/nfs/nfs.ko: kernel/net/sunrpc/sunrpc.ko\n"
        "kernel/net/sunrpc/sunrpc.ko:\n"
        "kernel/fs/overlayfs/overlay.ko:\n"
        "kernel/drivers/virtio/virtio-pci.ko:\n")
    got = _closure(tmp_path, ("nfsv3", "virtio_pci"))
    assert sorted(got) == ["kernel/drivers/virtio/virtio-pci.ko", "kernel/fs/nfs/nfs.ko",
                           "kernel/fs/nfs/nfsv3.ko", "kernel/net/sunrpc/sunrpc.ko"]
    with pytest.raises(BackendError, match="ext9 not in"):
        _closure(tmp_path, ("ext9",))

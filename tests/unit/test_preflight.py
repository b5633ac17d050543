"""sidusd/preflight.py: what a boot needs (pure: the found files and interfaces are passed in)."""

from __future__ import annotations

from pathlib import Path

from sidusd import config as config_mod
from sidusd import preflight as pf


def conf(extra: str = "", images: str = "", boot: str = "", dhcp: str = "dhcp: {mode: 'off'}"):
    text = (f"{dhcp}\ntftp: {{root: /srv/tftp}}\n{boot}\n{extra}\n"
            + (f"images:\n{images}\n" if images else ""))
    return config_mod.parse(text, "t.yaml", Path("/etc/sidus"))


IMG = "  demo: {root: /srv/img/demo, kernel: images/demo/vmlinuz, initrd: images/demo/initrd.img}\n"


def everything(config) -> frozenset:
    return frozenset((n.kind, n.path) for n in pf.needs(config))


def without(config, *paths: str) -> frozenset:
    return frozenset(x for x in everything(config) if x[1] not in paths)


def test_all_present_no_problem():
    c = conf(images=IMG)
    assert pf.problems(pf.needs(c), everything(c)) == []


def test_boot_files_and_their_companions_are_needed():
    c = conf()
    paths = {n.path: n.key for n in pf.needs(c) if n.kind == pf.FILE}
    assert paths == {"/srv/tftp/pxelinux.0": "boot.boot_files.bios",
                     "/srv/tftp/ldlinux.c32": "boot.boot_files.bios (its companion)",
                     "/srv/tftp/syslinux.efi": "boot.boot_files.uefi_x64",
                     "/srv/tftp/ldlinux.e64": "boot.boot_files.uefi_x64 (its companion)"}
    (p,) = pf.problems(pf.needs(c), without(c, "/srv/tftp/ldlinux.c32"))
    assert p.key == "boot.boot_files.bios (its companion)" and p.path == "/srv/tftp/ldlinux.c32"
    assert "syslinux-common" in p.fix and "/usr/lib/syslinux/modules/bios/ldlinux.c32" in p.fix
    assert "tftp-root populate" in p.fix
    assert str(p).startswith("boot.boot_files.bios (its companion): /srv/tftp/ldlinux.c32: no such")


def test_ipxe_chain_needs_the_ipxe_binaries_not_pxelinux():
    c = conf(boot="boot: {ipxe_chain: true}", extra="http: {enabled: true}")
    files = {n.path for n in pf.needs(c) if n.kind == pf.FILE}
    assert files == {"/srv/tftp/undionly.kpxe", "/srv/tftp/snponly.efi"}
    (p,) = pf.problems(pf.needs(c), without(c, "/srv/tftp/snponly.efi"))
    assert p.key == "boot.boot_files.ipxe_efi" and "apt-get install ipxe" in p.fix
    assert "/usr/lib/ipxe/snponly.efi" in p.fix


def test_a_subdirectory_boot_file_has_its_companion_beside_it():
    c = conf(boot="boot: {boot_files: {bios: bios/lpxelinux.0}}")
    files = {n.path for n in pf.needs(c) if n.kind == pf.FILE and n.key.startswith("boot.boot_files.bios")}
    assert files == {"/srv/tftp/bios/lpxelinux.0", "/srv/tftp/bios/ldlinux.c32"}


def test_an_unknown_boot_file_says_to_copy_it():
    c = conf(boot="boot: {boot_files: {bios: mine.0}}")
    (p,) = pf.problems(pf.needs(c), without(c, "/srv/tftp/mine.0"))
    assert p.path == "/srv/tftp/mine.0" and p.fix == "copy your mine.0 into tftp.root"


def test_missing_tftp_root_is_named_once_not_each_file():
    c = conf(images=IMG)
    found = pf.problems(pf.needs(c), without(c, "/srv/tftp"))
    assert [(p.key, p.path) for p in found] == [("tftp.root", "/srv/tftp")]
    assert "mkdir -p /srv/tftp" in found[0].fix
    assert pf.fatal_at_start(found) == found


def test_image_root_kernel_initrd_each_named_with_the_image():
    c = conf(images=IMG)
    found = pf.problems(pf.needs(c), without(c, "/srv/img/demo", "/srv/tftp/images/demo/initrd.img"))
    assert [(p.key, p.path, p.image) for p in found] == [
        ("images.demo.root", "/srv/img/demo", "demo"),
        ("images.demo.initrd", "/srv/tftp/images/demo/initrd.img", "demo")]
    assert "sidus-image build" in found[0].fix
    assert pf.broken_images(found) == {"demo": [str(found[0]), str(found[1])]}
    # an image problem does not stop the start (the other images keep booting), it fails --check
    assert pf.fatal_at_start(found) == []
    errors, warnings = pf.at_check(found)
    assert errors == found and warnings == []


def test_interfaces_warned_at_check_refused_at_start():
    c = conf(dhcp="dhcp: {mode: proxy, interfaces: [eth0, nosuch0]}")
    found = pf.problems(pf.needs(c), without(c, "nosuch0"))
    assert [(p.key, p.path) for p in found] == [("dhcp.interfaces[1]", "nosuch0")]
    assert "ip -br link" in found[0].fix
    assert pf.at_check(found) == ([], found)
    assert pf.fatal_at_start(found) == found
    assert pf.refused_at_reload(found, []) == []        # listeners change at a restart only


def test_reload_refuses_new_problems_only():
    c = conf(images=IMG + "  other: {root: /srv/img/other, kernel: k, initrd: i}\n")
    old = pf.problems(pf.needs(c), without(c, "/srv/tftp/k"))
    new = pf.problems(pf.needs(c), without(c, "/srv/tftp/k", "/srv/img/demo"))
    refused = pf.refused_at_reload(new, old)
    assert [(p.key, p.path) for p in refused] == [("images.demo.root", "/srv/img/demo")]
    assert pf.refused_at_reload(old, old) == []


def test_dhcp_off_needs_no_interface_and_tftp_off_no_file():
    c = conf(extra="", boot="")
    assert not [n for n in pf.needs(c) if n.kind == pf.IFACE]
    off = config_mod.parse("dhcp: {mode: 'off'}\ntftp: {root: /srv/tftp, enabled: false}\nimages:\n" + IMG,
                           "t.yaml", None)
    assert [(n.kind, n.path) for n in pf.needs(off)] == [("dir", "/srv/img/demo")]


def test_gather_looks_at_the_file_system(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    (tmp_path / "l").symlink_to(tmp_path / "f")
    wanted = [pf.Need("k", pf.DIR, str(tmp_path / "d"), pf.IMAGE, ""),
              pf.Need("k", pf.FILE, str(tmp_path / "f"), pf.BOOT, ""),
              pf.Need("k", pf.FILE, str(tmp_path / "l"), pf.BOOT, ""),     # a symlink is not served
              pf.Need("k", pf.FILE, str(tmp_path / "d"), pf.BOOT, ""),     # a directory is no file
              pf.Need("k", pf.IFACE, "eth9", pf.INTERFACE, ""),
              pf.Need("k", pf.IFACE, "eth8", pf.INTERFACE, "")]
    assert pf.gather(wanted, {"eth9"}.__contains__) == {("dir", str(tmp_path / "d")), ("file", str(tmp_path / "f")),
                                      ("interface", "eth9")}


def test_nfs_problem_names_the_backend_and_the_fix(tmp_path):
    ganesha = config_mod.parse(
        "dhcp: {mode: 'off'}\ntftp: {root: /srv/tftp}\n"
        f"nfs: {{backend: ganesha, client_networks: [10.0.0.0/24], ganesha_pid_file: {tmp_path}/g.pid}}\n",
        "t.yaml", None)
    p = pf.nfs_problem(ganesha)
    assert p is not None and p.key == "nfs.backend" and "no pid file" in p.reason
    assert "systemctl start nfs-ganesha" in p.fix
    assert pf.nfs_problem(conf()) is None                # backend none: nothing to ask


def test_populate_plan_lists_sources():
    plan = pf.populate_plan(conf())
    assert [(str(d), s.path if s else None) for d, s, _ in plan] == [
        ("/srv/tftp/pxelinux.0", "/usr/lib/PXELINUX/pxelinux.0"),
        ("/srv/tftp/ldlinux.c32", "/usr/lib/syslinux/modules/bios/ldlinux.c32"),
        ("/srv/tftp/syslinux.efi", "/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi"),
        ("/srv/tftp/ldlinux.e64", "/usr/lib/syslinux/modules/efi64/ldlinux.e64")]


def test_interface_exists_in_this_namespace():
    assert pf.interface_exists("lo") and not pf.interface_exists("sidus-nosuch")


def test_config_refuses_ipxe_chain_without_http():
    """Before: accepted, and every chained iPXE then got no answer (policy: no_boot_file)."""
    import pytest

    from sidusd.errors import ConfigError
    with pytest.raises(ConfigError) as ei:
        conf(boot="boot: {ipxe_chain: true}")
    assert ei.value.path == "boot.ipxe_chain" and "needs http.enabled: true" in ei.value.reason
    assert conf(boot="boot: {ipxe_chain: true}", extra="http: {enabled: true}").boot.ipxe_chain


def test_shim_needs_the_signed_network_grub_as_grubx64_efi():
    c = conf(boot="boot: {boot_files: {uefi_x64: shimx64.efi}}")
    paths = {n.path: n.key for n in pf.needs(c) if n.kind == pf.FILE and "uefi_x64" in n.key}
    assert paths == {"/srv/tftp/shimx64.efi": "boot.boot_files.uefi_x64",
                     "/srv/tftp/grubx64.efi": "boot.boot_files.uefi_x64 (its companion)"}
    (p,) = pf.problems(pf.needs(c), without(c, "/srv/tftp/grubx64.efi"))
    assert "grub-efi-amd64-signed" in p.fix and "/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed" in p.fix
    plan = {str(d): s.path for d, s, _ in pf.populate_plan(c) if s is not None}
    assert plan["/srv/tftp/shimx64.efi"] == "/usr/lib/shim/shimx64.efi.signed"
    assert plan["/srv/tftp/grubx64.efi"] == "/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"

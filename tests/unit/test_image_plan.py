"""The stage plan (pure), generation bookkeeping on a temporary directory, TFTP publishing."""

import os

import pytest

from sidusd.errors import BackendError, ConfigError
from sidusd.image import publish
from sidusd.image.build import StageFailed, copy_site_files, run_stage
from sidusd.image.generations import ImageStore, gc_candidates
from sidusd.image.recipe import parse_recipe
from sidusd.image.stages import INTERFACES, Stage, debootstrap_argv, packages_to_install, plan, resolv_conf, update_plan
from sidusd.storage.runner import RecordingRunner

INITRAMFS = {"hooks/sidus-overlay": b"#!/bin/sh\n", "scripts/init-bottom/sidus-overlay": b"#!/bin/sh\n",
             "modules": b"overlay\n"}
MIRROR = "http://mirror.example/debian"


def names(stages):
    return [s.name for s in stages]


def test_minimal_plan_order_and_contents():
    st = plan(parse_recipe("name: m\n"), mirror=MIRROR, initramfs=INITRAMFS)
    assert names(st) == ["apt-sources", "upgrade", "packages", "locale", "timezone", "network", "secrets",
                         "machine-id", "clean"]
    by = {s.name: s for s in st}
    assert by["apt-sources"].files[0][1] == (f"# sidus: from the image recipe (docs/images.md)\n"
                                             f"deb {MIRROR} bookworm main\n"
                                             f"deb {MIRROR} bookworm-updates main\n").encode()
    assert by["packages"].commands == (("apt-get", "-q", "update"),)        # nothing to install
    assert by["network"].remove == ("etc/hostname",)
    assert dict((p, d) for p, d, _ in by["network"].files)["etc/network/interfaces"] == INTERFACES
    assert by["secrets"].remove == ("etc/ssh/ssh_host_*",)
    assert by["secrets"].commands == (("usermod", "-p", "*", "root"),)      # no password: locked
    assert all(s.chroot for s in st if s.commands and s.name != "apt-sources")


def test_kernel_recipe_gets_initramfs_stage_and_packages():
    r = parse_recipe("name: k\npackages: [linux-image-amd64, nfs-common]\nlocale: fr_FR.UTF-8\n"
                     "timezone: Europe/Paris\nkeyboard: {layout: fr}\ninstall_suggests: true\n"
                     "purge: [nano]\nlimits: [{domain: '*', type: soft, item: nofile, value: 10}]\n"
                     "site_files: /s\nenable_units: [a.service]\n"
                     "root_password_hash: '$y$j9T$abcdefghijklmnop'\n")
    st = plan(r, mirror=MIRROR, initramfs=INITRAMFS)
    assert names(st) == ["apt-sources", "upgrade", "packages", "purge", "locale", "timezone", "keyboard",
                         "network", "limits", "site-files", "units", "secrets", "machine-id", "initramfs", "clean"]
    by = {s.name: s for s in st}
    install = by["packages"].commands[1]
    assert install[-7:] == ("linux-image-amd64", "nfs-common", "locales", "tzdata", "keyboard-configuration",
                            "initramfs-tools", "busybox")
    assert "-o" in install and "APT::Install-Suggests=true" in install and "--no-install-recommends" in install
    assert by["purge"].commands[0][-1] == "nano"
    files = {p: (d, m) for p, d, m in by["initramfs"].files}
    assert files["etc/initramfs-tools/hooks/sidus-overlay"][1] == 0o755
    assert files["etc/initramfs-tools/modules"] == (b"overlay\n", 0o644)
    assert b"fr_FR.UTF-8 UTF-8" in dict((p, d) for p, d, _ in by["locale"].files)["etc/locale.gen"]
    assert by["secrets"].commands == (("usermod", "-p", "$y$j9T$abcdefghijklmnop", "root"),)
    assert by["limits"].files[0][1].endswith(b"*\tsoft\tnofile\t10\n")


def test_packages_to_install_skips_purged_helpers_and_duplicates():
    r = parse_recipe("name: k\npackages: [tzdata, vim]\ntimezone: Europe/Paris\n")
    assert packages_to_install(r) == ("tzdata", "vim")


def test_debootstrap_argv():
    r = parse_recipe("name: d\ninclude: [a1, b2]\nexclude: [c3]\ncomponents: [main, contrib]\n")
    assert debootstrap_argv(r, "/x/root", MIRROR, "/cache") == (
        "debootstrap", "--variant=minbase", "--arch=amd64", "--components=main,contrib", "--include=a1,b2",
        "--exclude=c3", "--cache-dir=/cache", "bookworm", "/x/root", MIRROR)
    assert "--cache-dir" not in " ".join(debootstrap_argv(parse_recipe("name: d\n"), "/r", MIRROR, None))


def test_resolv_conf_and_unstable_sources():
    r = parse_recipe("name: r\nsuite: sid\nresolv_conf: {nameservers: [192.0.2.9], search: [a.example]}\n")
    assert resolv_conf(r).splitlines()[1:] == [b"search a.example", b"nameserver 192.0.2.9"]
    assert plan(r, mirror=MIRROR, initramfs=INITRAMFS, security=SECURITY)[0].files[0][1] == (
        f"# sidus: from the image recipe (docs/images.md)\ndeb {MIRROR} sid main\n".encode())  # no -updates/-security


SECURITY = "http://security.example/debian-security"


def test_sources_list_has_updates_and_security_for_stable_suites():
    r = parse_recipe("name: s\nsuite: trixie\ncomponents: [main, contrib]\n")
    st = plan(r, mirror=MIRROR, initramfs=INITRAMFS, security=SECURITY)[0]
    assert st.name == "apt-sources" and st.summary.endswith("-updates, -security")
    assert st.files[0][0] == "etc/apt/sources.list" and st.files[0][2] == 0o644
    assert st.files[0][1].decode().splitlines()[1:] == [
        f"deb {MIRROR} trixie main contrib", f"deb {MIRROR} trixie-updates main contrib",
        f"deb {SECURITY} trixie-security main contrib"]
    assert b"security" not in plan(r, mirror=MIRROR, initramfs=INITRAMFS)[0].files[0][1]   # security=None


def test_security_mirror_from_recipe_host_or_disabled(tmp_path):
    from sidusd.image.build import security_mirror
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://m.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\n# a comment inside a stanza\nURIs: http://s.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    assert security_mirror(parse_recipe("name: a\n"), apt) == "http://s.example/debian-security"
    assert security_mirror(parse_recipe(f"name: a\nsecurity_mirror: {SECURITY}/\n"), apt) == SECURITY
    assert security_mirror(parse_recipe("name: a\nsecurity_mirror: false\n"), apt) is None
    assert security_mirror(parse_recipe("name: a\nsuite: sid\n"), apt) is None
    with pytest.raises(BackendError, match="no trixie-security archive") as ei:
        security_mirror(parse_recipe("name: a\nsuite: trixie\n"), apt)
    assert "security_mirror: false" in ei.value.detail


def test_update_plan_names():
    assert names(update_plan()) == ["upgrade", "initramfs", "secrets", "clean"]


def test_stage_names_unique():
    r = parse_recipe("name: k\npackages: [linux-image-amd64]\npurge: [nano]\nkeyboard: {}\n")
    n = names(plan(r, mirror=MIRROR, initramfs=INITRAMFS))
    assert len(n) == len(set(n))


class FakeChroot:
    def __init__(self, runner):
        self.runner = runner

    def run(self, argv, timeout_s=600, env=None, input=None):
        return self.runner.run(["chroot", "R", *argv])


def test_run_stage_writes_removes_and_is_idempotent(tmp_path):
    root = tmp_path / "root"
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/ssh_host_rsa_key").write_text("secret")
    (root / "etc/hostname").write_text("builder")
    os.symlink("../run/resolv.conf", root / "etc/resolv.conf")
    st = Stage("t", "test", chroot=True, commands=(("true",),),
               files=(("etc/resolv.conf", b"nameserver 192.0.2.1\n", 0o644), ("etc/new/dir/f", b"x", 0o600)),
               remove=("etc/hostname", "etc/ssh/ssh_host_*"))
    runner = RecordingRunner()
    for _ in range(2):
        run_stage(st, root, FakeChroot(runner))
        assert not (root / "etc/resolv.conf").is_symlink()
        assert (root / "etc/resolv.conf").read_bytes() == b"nameserver 192.0.2.1\n"
        assert (root / "etc/new/dir/f").stat().st_mode & 0o777 == 0o600
        assert not (root / "etc/hostname").exists() and not list((root / "etc/ssh").iterdir())
    assert runner.calls == [["chroot", "R", "true"]] * 2


def test_run_stage_failure_names_the_stage(tmp_path):
    runner = RecordingRunner()
    runner.script(["chroot", "R", "apt-get"], rc=100, stderr=b"E: Unable to locate package nosuch")
    with pytest.raises(StageFailed) as ei:
        run_stage(Stage("packages", "x", chroot=True, commands=(("apt-get", "install", "nosuch"),)),
                  tmp_path, FakeChroot(runner))
    assert ei.value.stage == "packages"
    assert "stage packages failed" in str(ei.value) and "Unable to locate package nosuch" in str(ei.value)


def test_run_stage_refuses_paths_escaping_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.symlink(str(tmp_path / "outside"), root / "etc/evil")
    (tmp_path / "outside").mkdir()
    for rel in ("../x", "etc/evil/f"):
        with pytest.raises(StageFailed, match="outside|escapes"):
            run_stage(Stage("t", "t", files=((rel, b"x", 0o644),)), root, FakeChroot(RecordingRunner()))
    assert not (tmp_path / "outside/f").exists() and not (tmp_path / "x").exists()


def test_copy_site_files(tmp_path):
    src = tmp_path / "site"
    (src / "etc").mkdir(parents=True)
    (src / "etc/idmapd.conf").write_text("[General]\n")
    os.chmod(src / "etc/idmapd.conf", 0o640)
    root = tmp_path / "root"
    root.mkdir()
    assert copy_site_files(src, root) == 1
    assert (root / "etc/idmapd.conf").read_text() == "[General]\n"
    assert (root / "etc/idmapd.conf").stat().st_mode & 0o777 == 0o640
    os.symlink("/etc/shadow", src / "etc/link")
    with pytest.raises(BackendError, match="not a regular file"):
        copy_site_files(src, root)


def test_pinned_generations():
    from sidusd.image.generations import pinned_generations
    assert pinned_generations(["deb", "deb.gen-3", "deb.gen-x", "debx.gen-4", "other.gen-1"], "deb") == {3}


def test_gc_candidates():
    assert gc_candidates([1, 2, 3, 4, 5], current=5, keep=2) == [1, 2, 3]
    assert gc_candidates([1, 2, 3, 4, 5], current=2, keep=2, in_use=[1]) == [3]
    assert gc_candidates([1, 2], current=None, keep=0) == [1, 2]
    assert gc_candidates([], current=None, keep=2) == []


def test_store_generations_switch_rollback_remove(tmp_path):
    store = ImageStore(tmp_path / "images")
    assert store.current("img") is None and store.numbers("img") == []
    n1, part = store.begin("img", None)
    (part / "marker").write_text("one")
    assert n1 == 1 and store.numbers("img") == []          # a partial is not a generation
    store.commit("img", 1, {"kind": "build"})
    store.switch("img", 1)
    assert store.current("img") == 1
    assert (store.served_path("img") / "marker").read_text() == "one"
    n2, part2 = store.begin("img", 1)                      # a copy of generation 1 (real cp -a)
    assert n2 == 2 and (part2 / "marker").read_text() == "one"
    (part2 / "marker").write_text("two")
    with pytest.raises(BackendError):
        store.switch("img", 2)                             # not complete: never served
    store.commit("img", 2, {"kind": "update"})
    store.switch("img", 2)
    assert (store.served_path("img") / "marker").read_text() == "two"
    assert os.readlink(store.served_path("img")) == "gen-0002"
    gens = store.list("img")
    assert [(g.number, g.current, g.kind) for g in gens] == [(1, False, "build"), (2, True, "update")]
    assert gens[0].size_bytes > 0 and gens[0].created
    assert store.rollback_target("img") == 1
    store.switch("img", 1)
    with pytest.raises(BackendError, match="no generation older"):
        store.rollback_target("img")
    with pytest.raises(BackendError, match="served"):
        store.remove("img", 1)
    store.remove("img", 2)
    assert store.numbers("img") == [1]
    n3, _ = store.begin("img", 1)
    assert n3 == 2                                          # numbers follow the generations on disk
    store.abort("img", n3)
    assert not any(p.name.endswith(".partial") for p in store.image_dir("img").iterdir())


def test_publish_finds_newest_kernel_and_copies_per_generation(tmp_path):
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    for v in ("6.1.0-9-amd64", "6.1.0-10-amd64"):
        (root / f"boot/vmlinuz-{v}").write_bytes(b"k" + v.encode())
        (root / f"boot/initrd.img-{v}").write_bytes(b"i" + v.encode())
    (root / "boot/vmlinuz-6.2.0-1-amd64").write_bytes(b"no initrd")
    bf = publish.find_boot_files(root)
    assert bf.kver == "6.1.0-10-amd64"
    tftp = tmp_path / "tftp"
    publish.publish_generation(root, tftp, "img", 3)
    d = tftp / "images" / "img" / "gen-0003"
    assert (d / "vmlinuz").read_bytes() == b"k6.1.0-10-amd64" and not (d / "vmlinuz").is_symlink()
    assert (d / "initrd.img").read_bytes() == b"i6.1.0-10-amd64"
    with pytest.raises(BackendError, match="no kernel"):
        publish.find_boot_files(tmp_path / "empty")


def _generation_with_kernel(store, tftp, name, parent=None):
    n, part = store.begin(name, parent)
    (part / "boot").mkdir(exist_ok=True)
    (part / "boot/vmlinuz-6.1.0-1-amd64").write_bytes(b"k%d" % n)
    (part / "boot/initrd.img-6.1.0-1-amd64").write_bytes(b"i%d" % n)
    store.commit(name, n, {"kernel": "vmlinuz-6.1.0-1-amd64"})
    publish.publish_generation(store.path(name, n), tftp, name, n)
    return n


def test_images_file_follows_switches_and_sidusd_config_reads_it(tmp_path):
    from sidusd import config
    store = ImageStore(tmp_path / "images")
    tftp = tmp_path / "tftp"
    g1 = _generation_with_kernel(store, tftp, "deb")
    g2 = _generation_with_kernel(store, tftp, "deb", g1)
    nokernel, _ = store.begin("small", None)
    store.commit("small", nokernel, {})
    store.switch("small", nokernel)
    images_file = tmp_path / "images" / "images.yaml"
    cfg_file = tmp_path / "sidus.yaml"
    cfg_file.write_text(f"dhcp: {{mode: 'off'}}\ntftp: {{root: {tftp}}}\nimages_file: {images_file}\n"
                        "images: {demo: {root: /srv/demo, kernel: d/k, initrd: d/i}}\n")
    assert set(config.read(cfg_file).images) == {"demo"}                  # no images file yet
    for served in (g2, g1):
        store.switch("deb", served)
        publish.write_images_file(images_file, publish.images_entries(store, tftp))
        cfg = config.read(cfg_file)
        assert set(cfg.images) == {"demo", "deb", "deb.gen-1", "deb.gen-2"}  # no kernel: not bootable
        assert cfg.images["deb"].root == store.path("deb", served).resolve()
        assert cfg.images["deb"].kernel == f"images/deb/gen-{served:04d}/vmlinuz"
        assert (tftp / cfg.images["deb"].initrd).read_bytes() == b"i%d" % served
        assert cfg.images["deb.gen-1"].root == store.path("deb", 1).resolve()
    images_file.write_text("images: {demo: {root: /x, kernel: a, initrd: b}}\n")
    with pytest.raises(ConfigError, match="defined both"):
        config.read(cfg_file)
    images_file.write_text("images: {x: {root: /x, kernel: a, initrd: b}}\nother: 1\n")
    with pytest.raises(ConfigError, match="other"):
        config.read(cfg_file)


def test_booted_generations_matches_roots():
    from sidusd.image.generations import booted_generations
    roots = {1: "/i/deb/gen-0001", 2: "/i/deb/gen-0002", 3: "/i/deb/gen-0003"}
    assert booted_generations(["/i/deb/gen-0002", "/i/deb//gen-0003/", "/i/other/gen-0001"], roots) == {2, 3}
    assert booted_generations([], roots) == set()


def test_gc_keeps_what_a_machine_booted_until_it_boots_another_generation(tmp_path, capsys):
    """The whole chain without a VM: sidusd's runtime renders a boot config (records the root),
    `sidus-image gc` keeps that generation, `list` shows who booted it; once the machine is
    served another generation, gc removes the old one and its TFTP copies."""
    import asyncio
    import json as _json

    from sidusd.image.__main__ import main
    from sidusd.image.build import Administrator
    from sidusd.runtime import Runtime
    try:
        _gc_chain(tmp_path, capsys, asyncio, _json, main, Administrator, Runtime)
    finally:
        import structlog
        structlog.reset_defaults()          # main() set logging up on capsys's stream


def _gc_chain(tmp_path, capsys, asyncio, _json, main, Administrator, Runtime):
    store = ImageStore(tmp_path / "images")
    tftp = tmp_path / "tftp"
    for parent in (None, 1, 2):
        _generation_with_kernel(store, tftp, "deb", parent)
    images_file = tmp_path / "images" / "images.yaml"
    adm = Administrator(store.dir, tftp, images_file=images_file)
    adm.serve("deb", 2)
    (tmp_path / "inventory.yaml").write_text(
        "profiles: {default: {image: deb}}\nhosts:\n  - {mac: '52:54:00:00:00:01', hostname: vm1, profile: default}\n")
    cfg_file = tmp_path / "sidus.yaml"
    cfg_file.write_text(f"state_dir: {tmp_path / 'state'}\ninventory_file: {tmp_path / 'inventory.yaml'}\n"
                        f"dhcp: {{mode: 'off'}}\ntftp: {{root: {tftp}}}\nimages_file: {images_file}\n")
    rt = Runtime.load(cfg_file)
    assert b"gen-0002" in rt.render("pxelinux", "52:54:00:00:00:01", "10.0.0.1", "10.0.0.5")
    adm.serve("deb", 3)                                        # a new generation is served
    base = ["--images-dir", str(store.dir), "--tftp-root", str(tftp), "--images-file", str(images_file),
            "--config", str(cfg_file)]
    capsys.readouterr()
    assert main(base + ["list", "deb", "--json"]) == 0
    rows = {r["generation"]: r for r in _json.loads(capsys.readouterr().out)}
    assert [b["hostname"] for b in rows[2]["booted"]] == ["vm1"] and rows[1]["booted"] == []
    assert rows[3]["hosts"] == ["vm1", "(unknown hosts)"] and rows[3]["served"]   # who boots the served one
    assert main(base + ["gc", "deb", "--keep", "0"]) == 0
    out = capsys.readouterr().out
    assert "keeping generation 2: booted by vm1" in out and "removed generation(s) 1" in out
    assert store.numbers("deb") == [2, 3]
    assert (tftp / "images/deb/gen-0002/vmlinuz").is_file() and not (tftp / "images/deb/gen-0001").exists()
    assert "deb.gen-2" in images_file.read_text()              # still exported while in use
    # the machine reboots: sidusd (reloaded by the switch) serves it generation 3
    assert asyncio.run(rt.reload()).ok
    assert b"gen-0003" in rt.render("pxelinux", "52:54:00:00:00:01", "10.0.0.1", "10.0.0.5")
    assert main(base + ["gc", "deb", "--keep", "0"]) == 0
    assert "removed generation(s) 2" in capsys.readouterr().out
    assert store.numbers("deb") == [3] and "deb.gen-2" not in images_file.read_text()
    # without --config gc says what it cannot know
    assert main(base[:-2] + ["gc", "deb"]) == 0
    assert "without --config" in capsys.readouterr().err


def test_network_stage_removes_hostname_and_installs_the_boot_time_namer():
    from sidusd.image.stages import HOSTNAME_SCRIPT, HOSTNAME_UNIT, HOSTS
    by = {s.name: s for s in plan(parse_recipe("name: m\n"), mirror=MIRROR, initramfs=INITRAMFS)}
    net = by["network"]
    files = {p: (d, m) for p, d, m in net.files}
    assert net.remove == ("etc/hostname",) and net.chroot
    assert files["etc/hosts"][0] == HOSTS and b"127.0.1.1" not in HOSTS        # no fixed name
    assert files["usr/lib/sidus/sidus-hostname"] == (HOSTNAME_SCRIPT, 0o755)
    assert files["etc/systemd/system/sidus-hostname.service"] == (HOSTNAME_UNIT, 0o644)
    assert b"WantedBy=sysinit.target" in HOSTNAME_UNIT
    assert net.commands[-1][-1] == "/etc/systemd/system/sysinit.target.wants/sidus-hostname.service"


def _run_namer(tmp_path, cmdline: str, net_conf: str | None = None, hosts: str = "127.0.0.1\tlocalhost\n"):
    import subprocess

    from sidusd.image.stages import HOSTNAME_SCRIPT
    from tests.conftest import require_tool
    require_tool("sh")
    d = tmp_path / "fs"
    for sub in ("etc", "run", "proc"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    script = d / "sidus-hostname"
    script.write_bytes(HOSTNAME_SCRIPT)
    (d / "proc/cmdline").write_text(cmdline + "\n")
    (d / "proc/hostname").write_text("localhost\n")
    (d / "etc/hosts").write_text(hosts)
    if net_conf is not None:
        (d / "run/net-eth0.conf").write_text(net_conf)
    env = {"PATH": "/usr/bin:/bin", "SIDUS_HOSTNAME_CMDLINE": str(d / "proc/cmdline"),
           "SIDUS_HOSTNAME_ETC": str(d / "etc"), "SIDUS_HOSTNAME_RUN": str(d / "run"),
           "SIDUS_HOSTNAME_KERNEL": str(d / "proc/hostname")}
    r = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    hostname = d / "etc/hostname"
    return (r.stdout, (d / "proc/hostname").read_text(), hostname.read_text() if hostname.exists() else None,
            (d / "etc/hosts").read_text())


def test_hostname_script_takes_the_kernel_argument_first(tmp_path):
    out, kernel, etc, hosts = _run_namer(
        tmp_path, "root=/dev/nfs ip=dhcp sidus.overlay=tmpfs sidus.hostname=node7.lab.example console=ttyS0",
        "DEVICE='eth0'\nHOSTNAME='fromdhcp'\n", hosts="127.0.0.1\tlocalhost\n127.0.1.1\told\n")
    assert kernel == etc == "node7.lab.example\n"
    assert hosts == "127.0.0.1\tlocalhost\n127.0.1.1\tnode7.lab.example node7\n"     # old name replaced
    assert "from sidus.hostname" in out


def test_hostname_script_falls_back_to_dhcp_then_keeps_the_kernel_name(tmp_path):
    out, kernel, etc, hosts = _run_namer(tmp_path / "a", "root=/dev/nfs ip=dhcp",
                                         "DEVICE='eth0'\nIPV4ADDR='10.0.0.5'\nHOSTNAME='deb2'\n")
    assert kernel == etc == "deb2\n" and "127.0.1.1\tdeb2\n" in hosts and "from DHCP" in out
    # hostile or missing names are not used: nothing written
    for cmdline, conf in (("sidus.hostname=$(reboot)", None), ("x", "HOSTNAME='a;b'\n"),
                          ("sidus.hostname=-bad", None), ("", None), ("sidus.hostname=" + "a" * 65, None)):
        out, kernel, etc, hosts = _run_namer(tmp_path / str(abs(hash(cmdline + str(conf)))), cmdline, conf)
        assert kernel == "localhost\n" and etc is None and "127.0.1.1" not in hosts, (cmdline, out)

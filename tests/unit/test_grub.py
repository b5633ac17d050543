"""sidusd.boot.grub: per-MAC grub.cfg, the default grub.cfg, and GRUB-script injection attempts.

The rendered files are read back by the GRUB-script tokenizer of tests/grub_script.py.
"""

from __future__ import annotations

import dataclasses

import pytest
from grub_script import tokenize
from hypothesis import given, settings
from hypothesis import strategies as st

from sidusd import config
from sidusd.boot import cmdline, content, grub, render
from sidusd.boot.inventory import Host, Inventory, Profile
from sidusd.boot.render import RenderContext, RenderError

CFG = config.parse("""
dhcp: {mode: proxy, interfaces: [eth1]}
tftp: {root: /srv/tftp}
images:
  demo: {root: /srv/images/demo, kernel: demo/vmlinuz, initrd: demo/initrd.img, append: console=ttyS0}
""")
MAC = "52:54:00:00:00:01"
INV = Inventory({"default": Profile("default", "demo", "tmpfs", "quiet")},
                {MAC: Host(MAC, "default", hostname="vm1", append="sidus.marker=one")})
TARGET = INV.resolve(MAC, CFG)
CTX = RenderContext(server_ip="10.0.0.1", nfs_server="10.0.0.2", mount_options="tcp,vers=3")
ENV = {"prefix": "(tftp,10.0.0.1)/grub", "net_default_mac": MAC}


def test_per_mac_grub_cfg_boots_with_the_pxelinux_command_line():
    text = grub.grub_config(TARGET, CTX).decode("ascii")
    assert text.startswith("# sidus GRUB configuration for 52:54:00:00:00:01 (vm1), profile default")
    cmds = tokenize(text, ENV)
    assert [c[0] for c in cmds] == ["echo", "linux", "initrd", "boot"]
    assert cmds[1] == ["linux", "/demo/vmlinuz", *render.kernel_cmdline(TARGET, CTX).split(),
                       "BOOTIF=01-52-54-00-00-00-01"]
    assert cmds[2] == ["initrd", "/demo/initrd.img"]


def test_default_grub_cfg_sources_the_per_mac_name_then_the_default_profile():
    cmds = tokenize(grub.grub_default(CTX, INV.resolve(None, CFG)).decode("ascii"), ENV)
    assert cmds[:2] == [["set", "timeout=0"], ["source", "(tftp,10.0.0.1)/grub/grub.cfg-01-" + MAC]]
    # the name GRUB asks for is the per-MAC document
    leaf = cmds[1][1].split(")/", 1)[1]
    assert content.resolve(leaf) == content.Generated("grub", MAC)
    assert [c[0] for c in cmds[2:]] == ["echo", "linux", "initrd", "boot"]
    assert cmds[3][-1] == "BOOTIF=01-" + MAC


def test_default_grub_cfg_without_default_profile_exits_to_the_firmware():
    cmds = tokenize(grub.grub_default(CTX, None).decode("ascii"), ENV)
    assert [c[0] for c in cmds] == ["set", "source", "echo", "sleep", "exit"]
    assert not any(c[0] in ("linux", "boot") for c in cmds)


def test_grub_names():
    assert content.resolve("grub/grub.cfg") == content.Generated("grub-default", None)
    assert content.resolve("/grub/grub.cfg-01-52-54-00-00-00-01") == content.Generated("grub", MAC)
    assert content.resolve("grub/grub.cfg-01-52:54:00:00:00:01") == content.Generated("grub", MAC)
    assert isinstance(content.resolve("grub/grub.cfg-01-52:54:00"), content.Refused)
    # the other probes are plain files: not found unless the operator put them there
    assert content.resolve("grub/x86_64-efi/grub.cfg") == content.StaticPath(("grub", "x86_64-efi", "grub.cfg"))
    assert content.resolve("grub/grub.cfg-0A000064") == content.StaticPath(("grub", "grub.cfg-0A000064"))


@pytest.mark.parametrize("append", [
    "a;reboot", "x}{", "a<b", "a>b", "x=1;set root=(tftp,6.6.6.6)", "a#b", "(hd0)", "{", "}", "a;;b",
])
def test_grub_metacharacters_stay_inside_one_argument(append):
    assert cmdline.append_problem(append) is None         # pxelinux/iPXE/Linux accept it
    target = dataclasses.replace(TARGET, append=append)
    cmds = tokenize(grub.grub_config(target, CTX).decode("ascii"), ENV)
    assert [c[0] for c in cmds] == ["echo", "linux", "initrd", "boot"]
    assert cmds[1][2:-1] == render.kernel_cmdline(target, CTX).split()


@pytest.mark.parametrize("append", ["a'b", "x=' ; reboot '", 'a="b c"', "'"])
def test_quotes_are_refused_for_grub(append):
    assert cmdline.grub_append_problem(append) is not None
    with pytest.raises(RenderError):
        grub.grub_config(dataclasses.replace(TARGET, append=append), CTX)


_SAFE = st.text(st.sampled_from(list("abz09=.,:;_-/#{}()<>[]~!%*+?@^ ")), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_SAFE)
def test_any_accepted_append_reads_back_word_for_word(append):
    if cmdline.grub_append_problem(append) is not None:
        return
    target = dataclasses.replace(TARGET, append=append)
    cmds = tokenize(grub.grub_config(target, CTX).decode("ascii"), ENV)
    assert [c[0] for c in cmds] == ["echo", "linux", "initrd", "boot"]
    assert cmds[1][2:-1] == cmdline.linux_words(render.kernel_cmdline(target, CTX))


def test_iscsi_login_is_in_the_per_mac_grub_cfg_only():
    login = render.IscsiLogin("iqn.2026-12.org.sidus:vm1", "10.0.0.1", 3260, "iqn.2026-12.org.sidus:i1",
                              "vm1", "s" * 20)
    target = dataclasses.replace(TARGET, overlay="iscsi")
    cmds = tokenize(grub.grub_config(target, CTX, login).decode("ascii"), ENV)
    assert "sidus.iscsi.secret=" + "s" * 20 in cmds[1]
    with pytest.raises(RenderError):
        grub.grub_config(target, CTX)


# -- provider: the GRUB names go through the same decision as pxelinux's ----------------------

def _decide(name, client_ip="10.0.0.5", dhcp_mac=None, unknown="default"):
    from sidusd.boot import provider
    c = config.parse(f"""
dhcp: {{mode: proxy, interfaces: [eth1], unknown_hosts: {unknown}}}
tftp: {{root: /srv/tftp}}
images:
  demo: {{root: /srv/images/demo, kernel: demo/vmlinuz, initrd: demo/initrd.img}}
""")
    inv = Inventory({"default": Profile("default", "demo"), "persist": Profile("persist", "demo", overlay="iscsi")},
                    {MAC: Host(MAC, "persist", hostname="vm1"),
                     "52:54:00:00:00:02": Host("52:54:00:00:00:02", "default")})
    login = render.IscsiLogin("iqn.2026-12.org.sidus:vm1", "10.0.0.1", 3260, "iqn.2026-12.org.sidus:i1",
                              "vm1", "S3cretS3cretS3cret")
    return provider.decide(name, provider.Asker("10.0.0.1", client_ip, dhcp_mac), c, inv, lambda m, s: login)


def test_provider_renders_grub_names_and_keeps_the_secret_guard():
    from sidusd.boot import provider
    out = _decide("grub/grub.cfg-01-52:54:00:00:00:02")
    assert isinstance(out, provider.Document) and out.kind == "grub" and out.booted_mac == "52:54:00:00:00:02"
    assert b"linux '/demo/vmlinuz'" in out.body and b"'BOOTIF=01-52-54-00-00-00-02'" in out.body
    # the host with a disk login: only to the address that did that MAC's DHCP
    refused = _decide("grub/grub.cfg-01-" + MAC, dhcp_mac="52:54:00:00:00:02")
    assert isinstance(refused, provider.Refusal) and refused.cause == provider.SECRET
    served = _decide("grub/grub.cfg-01-" + MAC.replace(":", "-"), dhcp_mac=MAC)
    assert isinstance(served, provider.Document) and b"sidus.iscsi.secret=S3cretS3cretS3cret" in served.body
    default = _decide("grub/grub.cfg", dhcp_mac="52:54:00:00:00:03")
    assert isinstance(default, provider.Document) and default.kind == "grub-default"
    assert default.booted_mac == "52:54:00:00:00:03" and b"secret" not in default.body
    # a known host reads grub.cfg first too: its booted record comes from its own name
    known = _decide("grub/grub.cfg", dhcp_mac="52:54:00:00:00:02")
    assert isinstance(known, provider.Document) and known.booted_mac is None
    ignored = _decide("grub/grub.cfg", unknown="ignore")
    assert isinstance(ignored, provider.Document) and ignored.booted_mac is None and b"\nexit\n" in ignored.body

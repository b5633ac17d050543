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
ROOT = [["set", "root=tftp,10.0.0.1"], ["set", "prefix=(tftp,10.0.0.1)/grub"]]   # the server the request reached
BOOT = ["set", "set", "echo", "linux", "initrd", "boot"]


def test_per_mac_grub_cfg_boots_with_the_pxelinux_command_line():
    text = grub.grub_config(TARGET, CTX).decode("ascii")
    assert text.startswith("# sidus GRUB configuration for 52:54:00:00:00:01 (vm1), profile default")
    cmds = tokenize(text, ENV)
    assert [c[0] for c in cmds] == BOOT and cmds[:2] == ROOT
    assert cmds[3] == ["linux", "/demo/vmlinuz", *render.kernel_cmdline(TARGET, CTX).split(),
                       "BOOTIF=01-52-54-00-00-00-01"]
    assert cmds[4] == ["initrd", "/demo/initrd.img"]


def test_default_grub_cfg_sources_the_per_mac_name_then_the_default_profile():
    text = grub.grub_default(CTX, INV.resolve(None, CFG)).decode("ascii")
    # GRUB started with the site server's prefix (Debian GRUB: the ACK's siaddr, proxy mode)
    site = {**ENV, "prefix": "(tftp,10.0.0.2)/grub"}
    cmds = tokenize(text, site)
    assert cmds[:3] == [["set", "timeout=0"], *ROOT]
    # after `set prefix` the per-MAC name goes to the server that answered this file
    prefix = cmds[2][1].split("=", 1)[1]
    source = tokenize(text, {**site, "prefix": prefix})[3]
    assert source == ["source", "(tftp,10.0.0.1)/grub/grub.cfg-01-" + MAC]
    assert content.resolve(source[1].split(")/", 1)[1]) == content.Generated("grub", MAC)
    assert [c[0] for c in cmds[4:]] == ["echo", "linux", "initrd", "boot"]
    assert cmds[5][-1] == "BOOTIF=01-" + MAC


def test_default_grub_cfg_without_default_profile_exits_to_the_firmware():
    cmds = tokenize(grub.grub_default(CTX, None).decode("ascii"), ENV)
    assert [c[0] for c in cmds] == ["set", "set", "set", "source", "echo", "sleep", "exit"]
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
    assert [c[0] for c in cmds] == BOOT
    assert cmds[3][2:-1] == render.kernel_cmdline(target, CTX).split()


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
    assert [c[0] for c in cmds] == BOOT
    assert cmds[3][2:-1] == cmdline.linux_words(render.kernel_cmdline(target, CTX))


def test_iscsi_login_is_in_the_per_mac_grub_cfg_only():
    login = render.IscsiLogin("iqn.2026-12.org.sidus:vm1", "10.0.0.1", 3260, "iqn.2026-12.org.sidus:i1",
                              "vm1", "s" * 20)
    target = dataclasses.replace(TARGET, overlay="iscsi")
    cmds = tokenize(grub.grub_config(target, CTX, login).decode("ascii"), ENV)
    assert "sidus.iscsi.secret=" + "s" * 20 in cmds[3]
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


# -- boot.loader.grub_http: kernel and initrd from (http,<server>:<port>) when GRUB has http ------

HTTP_CFG = config.parse("""
dhcp: {mode: proxy, interfaces: [eth1]}
tftp: {root: /srv/tftp}
http: {enabled: true, port: 8081}
boot: {loader: {grub_http: true}}
images:
  demo: {root: /srv/images/demo, kernel: demo/vmlinuz, initrd: demo/initrd.img, append: console=ttyS0}
""")


def test_grub_http_loads_over_http_and_falls_back_to_tftp_without_the_module():
    http = grub.http_server(HTTP_CFG, "10.0.0.1")
    assert http == "10.0.0.1:8081"
    cmds = tokenize(grub.grub_config(TARGET, CTX, None, http).decode("ascii"), ENV)
    heads = [c[0] for c in cmds]
    assert heads == ["set", "set", "echo", "insmod", "if", "then", "echo", "initrd",
                     "else", "echo", "linux", "initrd", "fi", "boot"], cmds
    # insmod returns 0 even when refused (GRUB 2.06): loading the kernel over http is the test
    words = [*render.kernel_cmdline(TARGET, CTX).split(), "BOOTIF=01-52-54-00-00-00-01"]
    assert cmds[3] == ["insmod", "http"]
    assert cmds[4] == ["if", "linux", "(http,10.0.0.1:8081)/demo/vmlinuz", *words]
    assert cmds[7] == ["initrd", "(http,10.0.0.1:8081)/demo/initrd.img"]
    # no http module (Debian's signed GRUB under Secure Boot): the same kernel line over TFTP
    assert cmds[10] == ["linux", "/demo/vmlinuz", *words] and cmds[11] == ["initrd", "/demo/initrd.img"]
    default = tokenize(grub.grub_default(CTX, INV.resolve(None, CFG), http).decode("ascii"), ENV)
    assert ["if", "linux", "(http,10.0.0.1:8081)/demo/vmlinuz"] == default[6][:3], default


def test_grub_http_is_off_by_default_and_needs_http_enabled():
    assert grub.http_server(CFG, "10.0.0.1") is None                     # grub_http: false (default)
    on_no_http = config.parse("""
dhcp: {mode: proxy, interfaces: [eth1]}
tftp: {root: /srv/tftp}
http: {enabled: true}
images: {}
""")
    assert grub.http_server(on_no_http, "10.0.0.1") is None              # http on, grub_http off
    with pytest.raises(config.ConfigError) as err:
        config.parse("""
dhcp: {mode: proxy, interfaces: [eth1]}
tftp: {root: /srv/tftp}
boot: {loader: {grub_http: true}}
images: {}
""")
    assert err.value.path == "boot.loader.grub_http" and "http.enabled" in str(err.value)


@pytest.mark.parametrize("bad", ["10.0.0.1", "evil:80)/x'", "(http,1.2.3.4:80)", "1.2.3.4:80; reboot"])
def test_grub_http_server_must_be_ipv4_and_port(bad):
    with pytest.raises(RenderError):
        grub.grub_config(TARGET, CTX, None, bad)


def test_provider_renders_http_loads_when_configured():
    from sidusd.boot import provider
    inv = Inventory({"default": Profile("default", "demo")}, {MAC: Host(MAC, "default")})
    out = provider.decide("grub/grub.cfg-01-" + MAC, provider.Asker("10.0.0.9", "10.0.0.5", MAC),
                          HTTP_CFG, inv, lambda m, s: None)
    assert isinstance(out, provider.Document)
    assert b"linux '(http,10.0.0.9:8081)/demo/vmlinuz'" in out.body and b"set root='tftp,10.0.0.9'" in out.body
    plain = _decide("grub/grub.cfg-01-52:54:00:00:00:02")
    assert isinstance(plain, provider.Document) and b"http" not in plain.body

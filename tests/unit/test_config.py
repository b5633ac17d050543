"""sidusd.config: the example file, defaults, strictness (a table of refusals), reload keys."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
from pathlib import Path

import pytest
import yaml

from sidusd import config, data
from sidusd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = data.EXAMPLE_CONFIG

BASE = {
    "dhcp": {"mode": "full", "interfaces": ["eth1"],
             "pool": {"network": "10.0.0.0/24", "range_start": "10.0.0.100", "range_end": "10.0.0.199",
                      "router": "10.0.0.1"}},
    "tftp": {"root": "/srv/sidus/tftp"},
    "nfs": {"backend": "ganesha", "client_networks": ["10.0.0.0/24"]},
    "images": {"demo": {"root": "/srv/sidus/images/demo", "kernel": "demo/vmlinuz",
                        "initrd": "demo/initrd.img"}},
}
_DELETE = type("Delete", (), {"__repr__": lambda self: "<deleted>"})()   # a stable test id (pytest-xdist)


def variant(path: str, value) -> str:
    """BASE with ``path`` (dotted) set to ``value`` (or deleted), as YAML text."""
    doc = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return yaml.safe_dump(doc)


def test_base_is_valid():
    cfg = config.parse(variant("log.level", "info"))
    assert cfg.dhcp.pool.range_start == ipaddress.IPv4Address("10.0.0.100")


# (dotted key to change, new value, expected error path, expected words in the reason)
BAD = [
    ("dhcp.pool.rnage_start", "10.0.0.1", "dhcp.pool.rnage_start", "unknown key (did you mean range_start?)"),
    ("tftpp", {}, "tftpp", "did you mean tftp?"),
    ("tftp.prot", 69, "tftp.prot", "did you mean port?"),
    ("log.colour", True, "log.colour", "unknown key (allowed: format, level)"),
    ("tftp.port", True, "tftp.port", "expected an integer, got boolean True"),
    ("tftp.port", "69", "tftp.port", "expected an integer, got string '69'"),
    ("tftp.port", 0, "tftp.port", "between 1 and 65535"),
    ("tftp.port", 65536, "tftp.port", "between 1 and 65535"),
    ("dhcp.pxe_port", 70000, "dhcp.pxe_port", "between 1 and 65535"),
    ("dhcp.pxe_port", 67, "dhcp.pxe_port", "same as dhcp.port"),
    ("http.port", -1, "http.port", "between 1 and 65535"),
    ("tftp.root", _DELETE, "tftp.root", "required key is missing"),
    ("tftp", _DELETE, "tftp", "required key is missing"),
    ("tftp", "somewhere", "tftp", "expected a mapping, got string"),
    ("dhcp.interfaces", _DELETE, "dhcp.interfaces", "required key is missing"),
    ("dhcp.interfaces", [], "dhcp.interfaces", "empty: list at least one interface"),
    ("dhcp.interfaces", "eth1", "dhcp.interfaces", "expected a list"),
    ("dhcp.interfaces", ["eth1", 5], "dhcp.interfaces[1]", "expected a string, got integer 5"),
    ("dhcp.interfaces", ["a-very-long-interface"], "dhcp.interfaces[0]", "not a network interface name"),
    ("dhcp.interfaces", ["eth1", "eth1"], "dhcp.interfaces", "listed twice"),
    ("dhcp.mode", "fulll", "dhcp.mode", "must be one of: proxy, full, off (got 'fulll')"),
    ("dhcp.mode", False, "dhcp.mode", "expected a string, got boolean False"),
    ("dhcp.pool", _DELETE, "dhcp.pool", "required key is missing"),
    ("dhcp.unknown_hosts", "boot", "dhcp.unknown_hosts", "must be one of: default, ignore"),
    ("dhcp.pool.range_start", "10.0.1.5", "dhcp.pool.range_start", "not a host address of network 10.0.0.0/24"),
    ("dhcp.pool.range_end", "10.0.0.255", "dhcp.pool.range_end", "not a host address"),
    ("dhcp.pool.range_end", "10.0.0.50", "dhcp.pool.range_start", "is after range_end 10.0.0.50"),
    ("dhcp.pool.range_start", "10.0.0.256", "dhcp.pool.range_start", "not an IPv4 address: '10.0.0.256'"),
    ("dhcp.pool.network", "10.0.0.1/24", "dhcp.pool.network", "has host bits set"),
    ("dhcp.pool.network", "10.0.0.0/33", "dhcp.pool.network", "not an IPv4 network"),
    ("dhcp.pool.router", "10.9.0.1", "dhcp.pool.router", "outside network 10.0.0.0/24"),
    ("dhcp.pool.dns_servers", ["10.0.0.1", "1.2.3"], "dhcp.pool.dns_servers[1]", "not an IPv4 address"),
    ("dhcp.pool.domain", "bad_domain.example", "dhcp.pool.domain", "not a valid domain label"),
    ("dhcp.pool.lease_time_s", -5, "dhcp.pool.lease_time_s", "out of range"),
    ("dhcp.pool.lease_time_s", 2 ** 32, "dhcp.pool.lease_time_s", "out of range"),
    ("tftp.address", "localhost", "tftp.address", "not an IPv4 address: 'localhost'"),
    ("tftp.address", "::1", "tftp.address", "not an IPv4 address"),
    ("tftp.timeout_s", -1, "tftp.timeout_s", "out of range"),
    ("tftp.timeout_s", 0, "tftp.timeout_s", "out of range"),
    ("tftp.timeout_s", float("nan"), "tftp.timeout_s", "out of range"),
    ("tftp.timeout_s", "1", "tftp.timeout_s", "expected a number, got string '1'"),
    ("tftp.max_blksize", 7, "tftp.max_blksize", "between 8 and 65464"),
    ("tftp.max_blksize", 65465, "tftp.max_blksize", "between 8 and 65464"),
    ("tftp.max_windowsize", 0, "tftp.max_windowsize", "between 1 and 65535"),
    ("tftp.max_windowsize", 65536, "tftp.max_windowsize", "between 1 and 65535"),
    ("tftp.max_transfers_per_client", 600, "tftp.max_transfers_per_client", "between 1 and 512"),
    ("tftp.retries", -1, "tftp.retries", "out of range"),
    ("tftp.enabled", "yes", "tftp.enabled", "expected a boolean (true or false), got string 'yes'"),
    ("http.enabled", 1, "http.enabled", "expected a boolean (true or false), got integer 1"),
    ("http.max_connections", 0, "http.max_connections", "between 1 and 65535, got 0"),
    ("http.max_connections", 65536, "http.max_connections", "between 1 and 65535"),
    ("http.max_connections", True, "http.max_connections", "expected an integer, got boolean True"),
    ("http.max_conections", 9, "http.max_conections", "did you mean max_connections?"),
    ("http.max_per_client", 0, "http.max_per_client", "between 1 and 256, got 0"),
    ("http.max_per_client", 257, "http.max_per_client", "between 1 and 256, got 257"),
    ("http.idle_timeout_s", 0, "http.idle_timeout_s", "between 0.1 and 3600.0, got 0"),
    ("http.idle_timeout_s", 3601, "http.idle_timeout_s", "out of range"),
    ("http.idle_timeout_s", float("nan"), "http.idle_timeout_s", "out of range"),
    ("http.idle_timeout_s", "30", "http.idle_timeout_s", "expected a number, got string '30'"),
    ("log.level", "verbose", "log.level", "must be one of: debug, info, warning, error"),
    ("log.format", "xml", "log.format", "must be one of: auto, json, console"),
    ("nfs.backend", "nfsd", "nfs.backend", "must be one of: ganesha, kernel, none"),
    ("nfs.client_networks", _DELETE, "nfs.client_networks", "required when backend is ganesha"),
    ("nfs.client_networks", ["10.0.0.0/24", "bad"], "nfs.client_networks[1]", "not an IPv4 network"),
    ("nfs.mount_options", "tcp, vers=3", "nfs.mount_options", "without spaces"),
    ("nfs.server_address", "10.0.0", "nfs.server_address", "not an IPv4 address"),
    ("images.demo.kernel", "../../etc/shadow", "images.demo.kernel", "contains '..'"),
    ("images.demo.kernel", "demo/../../x", "images.demo.kernel", "contains '..'"),
    ("images.demo.initrd", "/boot/initrd.img", "images.demo.initrd", "is absolute"),
    ("images.demo.initrd", "demo/initrd img", "images.demo.initrd", "contains ' '"),
    ("images.demo.initrd", _DELETE, "images.demo.initrd", "required key is missing"),
    ("images.demo.root", "/", "images.demo.root", "whole file system"),
    ("images.demo.root", "/srv/a,b", "images.demo.root", "contains ','"),
    ("images.demo.append", "quiet\ninit=/bin/sh", "images.demo.append", "control character"),
    ("images.demo.append", "a=${x}", "images.demo.append", "not allowed in kernel arguments"),
    ("images.demo.extra", 1, "images.demo.extra", "unknown key"),
    ("images.bad name", {"root": "/x", "kernel": "k", "initrd": "i"}, "images.bad name", "not a valid image name"),
    ("images.demo", "just-a-string", "images.demo", "expected a mapping"),
    ("boot.boot_files.bios", "../pxelinux.0", "boot.boot_files.bios", "contains '..'"),
    ("boot.boot_files.bios", None, "boot.boot_files.bios", "cannot be null"),
    ("boot.boot_files.uefi_x64", "x" * 130, "boot.boot_files.uefi_x64", "longer than 127 bytes"),
    ("boot.default_profile", "", "boot.default_profile", "not a valid profile name"),
    ("boot.default_profile", "default\n", "boot.default_profile", "not a valid profile name"),
    ("boot.ipxe_chain", "false", "boot.ipxe_chain", "expected a boolean"),
    ("state_dir", 5, "state_dir", "expected a string, got integer 5"),
    ("control.socket_path", "", "control.socket_path", "non-empty path"),
    ("iscsi.backend", "iet", "iscsi.backend", "must be one of: tgt, lio, none"),
    ("iscsi.iqn_prefix", "IQN.2026-01.org.x", "iscsi.iqn_prefix", "not iqn.YYYY-MM.reversed.domain"),
    ("iscsi.iqn_prefix", "iqn.2026-13.org.x", "iscsi.iqn_prefix", "not iqn.YYYY-MM.reversed.domain"),
    ("iscsi.iqn_prefix", "iqn.2026-01.org.x:name", "iscsi.iqn_prefix", "not iqn.YYYY-MM.reversed.domain"),
    ("iscsi.portal", "10.0.0", "iscsi.portal", "not an IPv4 address"),
    ("iscsi.port", 0, "iscsi.port", "between 1 and 65535"),
    ("iscsi.default_size_mib", 8, "iscsi.default_size_mib", "out of range"),
    ("iscsi.secrets_file", "", "iscsi.secrets_file", "non-empty path"),
    ("iscsi.chap", "off", "iscsi.chap", "unknown key"),
    ("iscsi.tgt_control_port", 32768, "iscsi.tgt_control_port", "between 0 and 32767"),
    ("security.privsep", "yes", "security.privsep", "expected a boolean"),
    ("security.worker_user", "root", "security.worker_user", "not an unprivileged user name"),
    ("security.worker_user", "Bad User", "security.worker_user", "not an unprivileged user name"),
    ("security.worker_user", "../x", "security.worker_user", "not an unprivileged user name"),
    ("security.sandbox", True, "security.sandbox", "unknown key"),
]


@pytest.mark.parametrize("key,value,path,reason", BAD, ids=[f"{b[0]}={b[1]!r}"[:60] for b in BAD])
def test_bad_config_refused_with_path_and_reason(key, value, path, reason):
    with pytest.raises(ConfigError) as exc:
        config.parse(variant(key, value))
    assert exc.value.path == path
    assert reason in exc.value.reason
    assert str(exc.value) == f"{path}: {exc.value.reason}"


def test_the_table_is_long_enough():
    assert len({(k, repr(v)) for k, v, _, _ in BAD}) >= 30


@pytest.mark.parametrize("text,path,reason", [
    ("tftp: {root: /t, root: /u}\n", "<string>", "line 1, column 18: duplicate key 'root'"),
    ("tftp: {root: /t\n", "<string>", "YAML syntax error"),
    ("tftp:\n  root: /t\n   port: 69\n", "<string>", "line 3, column 8"),
    ("- a\n- b\n", "<document>", "expected a mapping, got a list"),
    ("tftp: {root: /t}\n---\nx: 1\n", "<string>", "single document"),
    ("1: x\n", "1", "a key must be a string"),
    ("? [a, b]\n: x\n", "<string>", "a key must be a plain value"),
    ("tftp: {root: \x07}\n", "<string>", "character U+0007 at position 13 is not allowed in YAML"),
])
def test_yaml_level_refusals(text, path, reason):
    with pytest.raises(ConfigError) as exc:
        config.parse(text)
    assert exc.value.path == path
    assert reason in str(exc.value)


def test_yaml_12_scalars():
    # 'off' is a word (YAML 1.1 would make it False); 010 is not octal; no sexagesimal ints.
    cfg = config.parse("dhcp: {mode: off}\ntftp: {root: /t, port: 0x45, timeout_s: 2}\n")
    assert cfg.dhcp.mode == "off" and cfg.dhcp.interfaces == ()
    assert cfg.tftp.port == 69
    assert cfg.tftp.timeout_s == 2.0 and isinstance(cfg.tftp.timeout_s, float)
    with pytest.raises(ConfigError, match="expected an integer, got string '010'"):
        config.parse("dhcp: {mode: off}\ntftp: {root: /t, port: 010}\n")
    with pytest.raises(ConfigError, match="got string '1:09'"):
        config.parse("dhcp: {mode: off}\ntftp: {root: /t, port: 1:09}\n")


def test_minimal_config_gets_documented_defaults():
    cfg = config.parse("dhcp: {interfaces: [eth0]}\ntftp: {root: /srv/tftp}\n")
    assert cfg.state_dir == Path("/var/lib/sidus")
    assert cfg.inventory_file == Path("/var/lib/sidus/inventory.yaml")
    assert (cfg.log.format, cfg.log.level) == ("auto", "info")
    assert cfg.control.socket_path == Path("/run/sidus/control.sock")
    assert (cfg.security.privsep, cfg.security.worker_user) == (True, "sidus")
    d = cfg.dhcp
    assert (d.mode, d.interfaces, d.port, d.pxe_port, d.client_port, d.unknown_hosts, d.pool) == \
        ("proxy", ("eth0",), 67, 4011, 68, "default", None)
    assert cfg.boot.default_profile == "default" and cfg.boot.ipxe_chain is False
    assert cfg.boot.boot_files == config.BootFiles("pxelinux.0", "syslinux.efi", None, None,
                                                   "undionly.kpxe", "snponly.efi")
    t = cfg.tftp
    assert (t.enabled, t.address, t.port, t.root) == (True, ipaddress.IPv4Address("0.0.0.0"), 69, Path("/srv/tftp"))
    assert (t.max_transfers, t.max_transfers_per_client, t.intake_queue) == (512, 16, 4096)
    assert (t.max_blksize, t.max_windowsize, t.timeout_s, t.retries) == (65464, 64, 1.0, 5)
    assert (cfg.http.enabled, str(cfg.http.address), cfg.http.port) == (False, "0.0.0.0", 8080)
    n = cfg.nfs
    assert (n.backend, n.server_address, n.mount_options, n.client_networks) == ("none", None, "tcp,vers=3", ())
    assert n.ganesha_config == Path("/etc/ganesha/sidus.conf")
    assert n.exports_file == Path("/etc/exports.d/sidus.exports")
    assert dict(cfg.images) == {}


def test_state_dir_moves_the_derived_defaults():
    cfg = config.parse("state_dir: /data/sidus\ndhcp:\n  mode: full\n  interfaces: [e]\n  pool: "
                       "{network: 10.1.0.0/16, range_start: 10.1.0.10, range_end: 10.1.0.10}\ntftp: {root: /t}\n")
    assert cfg.inventory_file == Path("/data/sidus/inventory.yaml")
    assert cfg.dhcp.pool.lease_file == Path("/data/sidus/leases.jsonl")


def test_iscsi_defaults_follow_the_state_dirs():
    cfg = config.parse("state_dir: /data/s\ndhcp: {mode: off}\ntftp: {root: /t}\n")
    assert cfg.iscsi.backend == "none"
    assert cfg.iscsi.state_dir == Path("/data/s/iscsi")
    assert cfg.iscsi.secrets_file == Path("/data/s/iscsi/secrets.json")
    cfg = config.parse("dhcp: {mode: off}\ntftp: {root: /t}\niscsi: {backend: tgt, state_dir: /d}\n")
    assert cfg.iscsi.backend == "tgt" and cfg.iscsi.secrets_file == Path("/d/secrets.json")
    assert cfg.iscsi.port == 3260 and cfg.iscsi.portal is None


def test_config_is_frozen():
    cfg = config.parse("dhcp: {mode: off}\ntftp: {root: /t}\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tftp.port = 70
    with pytest.raises(TypeError):
        cfg.images["x"] = None


def _all_keys(cls, prefix=""):
    """Dotted key names of a config dataclass tree (images excluded: user-named)."""
    out = set()
    for f in dataclasses.fields(cls):
        if f.name in ("source", "images"):
            continue
        sub = {"log": config.LogConfig, "control": config.ControlConfig, "dhcp": config.DhcpConfig,
               "pool": config.PoolConfig, "boot": config.BootConfig, "boot_files": config.BootFiles,
               "tftp": config.TftpConfig, "http": config.HttpConfig, "nfs": config.NfsConfig,
               "iscsi": config.IscsiConfig, "security": config.SecurityConfig,
               "booted": config.BootedConfig}.get(f.name)
        out.add(prefix + f.name)
        if sub is not None:
            out |= _all_keys(sub, prefix + f.name + ".")
    return out


def _yaml_keys(node, prefix=""):
    out = set()
    if isinstance(node, dict):
        for k, v in node.items():
            out.add(prefix + k)
            if k != "images":
                out |= _yaml_keys(v, prefix + k + ".")
    return out


def test_example_file_parses_and_names_every_key():
    cfg = config.read(EXAMPLE)
    assert cfg.tftp.root == Path("/srv/sidus/tftp")
    assert dict(cfg.images) == {}           # built images come from images_file; a hand-made one is shown
    assert cfg.nfs.backend == "ganesha" and cfg.dhcp.pool is not None
    raw = yaml.safe_load(EXAMPLE.read_text())
    missing = _all_keys(config.Config) - _yaml_keys(raw)
    assert not missing, f"sidusd/data/sidus.yaml does not show: {sorted(missing)}"
    text = EXAMPLE.read_text()
    block = text[text.index("# One written by hand looks like this:\n"):text.index("\nimages: {}\n")].splitlines()[1:]
    shown = yaml.safe_load("\n".join(l[4:] for l in block))
    assert set(shown["images"]["bookworm"]) == {f.name for f in dataclasses.fields(config.ImageConfig)}
    with_it = text.replace("images: {}\n", yaml.safe_dump({"images": shown["images"]}))
    assert config.parse(with_it).images["bookworm"].root == Path("/srv/sidus/images/bookworm/root")


def test_read_resolves_relative_paths_against_the_file(tmp_path):
    (tmp_path / "etc").mkdir()
    f = tmp_path / "etc" / "sidus.yaml"
    f.write_text("state_dir: ../state\ndhcp: {mode: off}\ntftp: {root: tftp}\n"
                 "images: {d: {root: img/root, kernel: d/k, initrd: d/i}}\n")
    cfg = config.read(f)
    assert cfg.tftp.root == tmp_path / "etc" / "tftp"
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.inventory_file == tmp_path / "state" / "inventory.yaml"
    assert cfg.images["d"].root == tmp_path / "etc" / "img" / "root"
    assert cfg.source == str(f)


def test_parse_without_base_dir_refuses_relative_image_root():
    with pytest.raises(ConfigError) as exc:
        config.parse("dhcp: {mode: off}\ntftp: {root: t}\nimages: {d: {root: img, kernel: k, initrd: i}}\n")
    assert exc.value.path == "images.d.root" and "must be absolute" in exc.value.reason


def test_read_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        config.read(missing)
    assert (exc.value.path, exc.value.reason) == (str(missing), "no such file")
    with pytest.raises(ConfigError, match="is a directory"):
        config.read(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"tftp: {root: \xff}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.read(bad)
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("dhcp:\n  mode: off\n tftp: x\n")
    with pytest.raises(ConfigError) as exc:
        config.read(syntax)
    assert exc.value.path == str(syntax) and "line 3, column 2" in exc.value.reason


def test_listener_key_and_restart_needed():
    a = config.parse(variant("log.level", "info"))
    b = config.parse(variant("log.level", "debug"))          # reloadable
    assert a.listener_key() == b.listener_key() and config.restart_needed(a, b) == []
    c = config.parse(variant("tftp.port", 6969))
    d = config.parse(variant("dhcp.interfaces", ["eth1", "eth2"]))
    assert a.listener_key() != c.listener_key() and config.restart_needed(a, c) == ["tftp.port"]
    assert config.restart_needed(a, d) == ["dhcp.interfaces"]
    e = config.parse(variant("control.socket_path", "/run/other.sock"))
    assert config.restart_needed(a, e) == ["control.socket_path"]


def test_unreadable_path_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as exc:
        config.read(tmp_path / "file" / "sidus.yaml")
    assert exc.value.path == str(tmp_path / "file" / "sidus.yaml")
    assert exc.value.reason == "cannot read: Not a directory"


# -- fuzz: whatever the text, parse() returns a Config or raises ConfigError -------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_scalars = st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats() | \
    st.sampled_from(["eth0", "10.0.0.1", "10.0.0.0/24", "off", "full", "/srv/x", "a/../b", ""]) | st.text(max_size=8)
_trees = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=3) |
                      st.dictionaries(st.sampled_from(sorted(_all_keys(config.Config) | {"demo", "root", "x"})),
                                      kids, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_text(text):
    try:
        config.parse(text)
    except ConfigError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["dhcp", "tftp", "nfs", "images", "boot", "log", "http"]), _trees,
                       max_size=5))
def test_fuzz_structure(doc):
    try:
        config.parse(yaml.safe_dump(doc))
    except ConfigError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10) |
                    st.from_regex(r"[-+0-9.eExo:_]{1,8}", fullmatch=True),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                    max_leaves=12))
def test_dump_yaml_reads_back_identically_with_both_loaders(doc):
    text = config.dump_yaml({"k": doc})
    assert config.load_yaml(text) == {"k": doc}
    assert yaml.safe_load(text) == {"k": doc}


def test_security_keys_need_a_restart():
    a = config.parse("dhcp: {mode: off}\ntftp: {root: /t}\n")
    b = config.parse("dhcp: {mode: off}\ntftp: {root: /t}\nsecurity: {privsep: false, worker_user: nobody}\n")
    assert (b.security.privsep, b.security.worker_user) == (False, "nobody")
    assert config.restart_needed(a, b) == ["security.privsep", "security.worker_user"]


def test_http_limits_defaults_ranges_and_the_per_client_bound():
    cfg = config.parse("dhcp: {mode: off}\ntftp: {root: /t}\n")
    h = cfg.http
    assert (h.max_connections, h.max_per_client, h.idle_timeout_s) == (256, 32, 30.0)
    cfg = config.parse("dhcp: {mode: off}\ntftp: {root: /t}\n"
                       "http: {max_connections: 65535, max_per_client: 65535, idle_timeout_s: 0.1}\n")
    assert (cfg.http.max_connections, cfg.http.max_per_client, cfg.http.idle_timeout_s) == (65535, 65535, 0.1)
    # a small max_connections lowers the per-client default instead of refusing it
    cfg = config.parse("dhcp: {mode: off}\ntftp: {root: /t}\nhttp: {max_connections: 8}\n")
    assert (cfg.http.max_connections, cfg.http.max_per_client) == (8, 8)
    with pytest.raises(ConfigError) as exc:
        config.parse("dhcp: {mode: off}\ntftp: {root: /t}\nhttp: {max_connections: 8, max_per_client: 9}\n")
    assert exc.value.path == "http.max_per_client" and "between 1 and 8, got 9" in exc.value.reason
    assert isinstance(config.parse("dhcp: {mode: off}\ntftp: {root: /t}\nhttp: {idle_timeout_s: 5}\n")
                      .http.idle_timeout_s, float)
    # limits apply on reload: they are not restart keys
    a = config.parse("dhcp: {mode: off}\ntftp: {root: /t}\n")
    b = config.parse("dhcp: {mode: off}\ntftp: {root: /t}\nhttp: {max_connections: 9, idle_timeout_s: 2}\n")
    assert config.restart_needed(a, b) == []


def test_http_service_takes_its_limits_from_the_live_config():
    from types import SimpleNamespace

    from sidusd.net.http_server import HttpService
    text = "dhcp: {mode: off}\ntftp: {root: /t}\nhttp: {max_connections: 40, max_per_client: 7, idle_timeout_s: 4.5}\n"
    runtime = SimpleNamespace(config=config.parse(text))
    svc = HttpService(runtime)
    assert (svc.max_connections, svc.max_per_client, svc.idle_timeout_s) == (40, 7, 4.5)
    # a reload swaps runtime.config: the service follows it
    runtime.config = config.parse(text.replace("40", "41").replace("7,", "3,"))
    assert (svc.max_connections, svc.max_per_client, svc.idle_timeout_s) == (41, 3, 4.5)
    # explicit constructor values pin a limit (tests of the server use that)
    pinned = HttpService(runtime, max_per_client=2, idle_timeout_s=1.0)
    assert (pinned.max_connections, pinned.max_per_client, pinned.idle_timeout_s) == (41, 2, 1.0)


def test_booted_section_defaults_follow_images_file_and_bounds_are_checked():
    base = "state_dir: /s\ndhcp: {mode: \"off\"}\ntftp: {root: /t}\n"
    assert config.parse(base).booted.file is None
    c = config.parse(base + "images_file: /s/images/images.yaml\n")
    assert c.booted == config.BootedConfig(file=Path("/s/booted.json"), ttl_s=30 * 86400, max_hosts=10000)
    c = config.parse(base + "booted: {file: b.json, ttl_s: 0, max_hosts: 5}\n", base_dir=Path("/etc/sidus"))
    assert c.booted == config.BootedConfig(file=Path("/etc/sidus/b.json"), ttl_s=0, max_hosts=5)
    with pytest.raises(ConfigError, match="booted.max_hosts"):
        config.parse(base + "booted: {max_hosts: 0}\n")
    with pytest.raises(ConfigError, match="booted.ttl_s"):
        config.parse(base + "booted: {ttl_s: -1}\n")
    with pytest.raises(ConfigError, match="booted.ttl_h"):
        config.parse(base + "booted: {ttl_h: 1}\n")

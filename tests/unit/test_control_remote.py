"""The remote control plane's pure parts and refusals: who may run which op (remote_authz),
the config keys of control.tcp / control.client (refused with key and reason), the TLS
file checks (tls.py: missing, not PEM, key not matching the cert, key mode), the client's
settings (cliconfig: flag > environment > config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import require_tool

from sidusd import cliconfig, config
from sidusd.control import messages as m
from sidusd.control import remote_authz as authz
from sidusd.control import tls, tls_pki
from sidusd.errors import ConfigError

CERT = {"subject": ((("countryName", "FR"),), (("commonName", "alice"),))}


# -- authz -------------------------------------------------------------------------

def test_subject_cn_one_cn_only():
    assert authz.subject_cn(CERT) == "alice"
    two = {"subject": ((("commonName", "alice"),), (("commonName", "admin"),))}
    assert authz.subject_cn(two) is None                 # ambiguous: refused
    assert authz.subject_cn({"subject": ((("organizationName", "x"),),)}) is None
    assert authz.subject_cn(None) is None
    assert authz.subject_cn({}) is None


def test_roles_from_lists():
    assert authz.role_for("alice", ["alice"], ["bob"]) == "admin"
    assert authz.role_for("bob", ["alice"], ["bob"]) == "read"
    assert authz.role_for("carol", ["alice"], ["bob"]) is None
    assert authz.role_for("Alice", ["alice"], []) is None            # exact match
    assert authz.role_for(None, ["alice"], ["bob"]) is None


def test_every_op_has_a_decision():
    for op in m.OPS:
        assert authz.decide("admin", op).allowed
        assert not authz.decide(None, op).allowed
        assert authz.decide(None, op).reason == "no_role"
        assert authz.decide("read", op).allowed == (op in authz.READ_OPS)
    assert authz.READ_OPS <= set(m.OPS)


@pytest.mark.parametrize("op", [m.OP_HOSTS_ADD, m.OP_HOSTS_SET, m.OP_HOSTS_REMOVE, m.OP_RELOAD,
                                m.OP_HOSTS_DISK, m.OP_HOSTS_IMPORT, m.OP_HOSTS_ROTATE_SECRET])
def test_read_only_cannot_change_or_see_secrets(op):
    d = authz.decide("read", op)
    assert (d.allowed, d.reason) == (False, "read_only")
    assert "read-only" in authz.denial_message(d, "bob", op) and op in authz.denial_message(d, "bob", op)


def test_unknown_op_refused_even_for_admin():
    assert authz.decide("admin", "shutdown") == authz.Decision(False, "unknown_op")


@pytest.mark.parametrize("text,ok", [("127.0.0.1:9744", True), ("[::1]:9744", True), ("0.0.0.0:1", True),
                                     ("localhost:9744", False), ("127.0.0.1", False), ("127.0.0.1:0", False),
                                     ("127.0.0.1:70000", False), (":9744", False), ("1.2.3.4:x", False)])
def test_listen_parsing(text, ok):
    assert (authz.listen_problem(text) is None) == ok


# -- config refusals -----------------------------------------------------------------

def _cfg(tmp_path: Path, control: dict) -> str:
    (tmp_path / "tftp").mkdir(exist_ok=True)
    return yaml.safe_dump({"dhcp": {"mode": "off"}, "tftp": {"root": str(tmp_path / "tftp")},
                           "control": control})


TCP = {"listen": "127.0.0.1:9744", "tls_cert": "s.crt", "tls_key": "s.key", "client_ca": "ca.crt",
       "admins": ["alice"]}


def _refused(tmp_path: Path, control: dict) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        config.parse(_cfg(tmp_path, control), "t.yaml", tmp_path)
    return exc.value


def test_tcp_config_parses_relative_paths(tmp_path):
    c = config.parse(_cfg(tmp_path, {"tcp": TCP, "servers": ["10.0.0.1:9744"]}), "t.yaml", tmp_path)
    assert c.control.tcp.tls_cert == tmp_path / "s.crt"
    assert c.control.tcp.admins == ("alice",) and c.control.tcp.readers == ()
    assert c.control.servers == ("10.0.0.1:9744",)
    assert config.parse(_cfg(tmp_path, {}), "t.yaml", tmp_path).control.tcp is None   # the default: none


@pytest.mark.parametrize("change,key,reason", [
    ({"listen": "example.org:9744"}, "control.tcp", "not an IP address"),
    ({"listen": "127.0.0.1"}, "control.tcp", "not ip:port"),
    ({"admins": []}, "control.tcp", "both empty"),
    ({"readers": ["alice"]}, "control.tcp", "in both admins and readers"),
    ({"admins": [""]}, "control.tcp", "empty name"),
    ({"max_connections": 0}, "control.tcp.max_connections", "between 1 and 1024"),
])
def test_tcp_config_refused_with_key_and_reason(tmp_path, change, key, reason):
    e = _refused(tmp_path, {"tcp": {**TCP, **change}})
    assert e.path == key and reason in e.reason, (e.path, e.reason)


@pytest.mark.parametrize("missing", ["tls_cert", "tls_key", "client_ca", "listen"])
def test_tcp_config_needs_every_file(tmp_path, missing):
    e = _refused(tmp_path, {"tcp": {k: v for k, v in TCP.items() if k != missing}})
    assert e.path.startswith("control.tcp") and missing in f"{e.path} {e.reason}"


def test_unknown_tcp_key_refused(tmp_path):
    e = _refused(tmp_path, {"tcp": {**TCP, "client_cert": "x"}})
    assert "client_cert" in f"{e.path} {e.reason}"


# -- TLS files -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    require_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    tls_pki.init_ca(d / "a", "site-a")
    tls_pki.init_ca(d / "b", "site-b")
    tls_pki.issue(d / "a", "rack1", "server", ["127.0.0.1"])
    tls_pki.issue(d / "b", "rack1", "server", ["127.0.0.1"])
    tls_pki.issue(d / "a", "alice", "client")
    return d


class Tcp:
    def __init__(self, cert, key, ca):
        self.tls_cert, self.tls_key, self.client_ca = Path(cert), Path(key), Path(ca)


def test_server_context_loads_a_good_set(pki):
    a = pki / "a"
    ctx = tls.server_context(Tcp(a / "rack1.crt", a / "rack1.key", a / "ca.crt"))
    import ssl
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert oct((a / "rack1.key").stat().st_mode & 0o777) == "0o600"


def test_key_not_matching_cert_refused(pki):
    a, b = pki / "a", pki / "b"
    with pytest.raises(ConfigError) as exc:
        tls.server_context(Tcp(a / "rack1.crt", b / "rack1.key", a / "ca.crt"))
    assert exc.value.path == "control.tcp.tls_key" and "is not the key of the certificate" in exc.value.reason


def test_missing_and_non_pem_files_refused(pki, tmp_path):
    a = pki / "a"
    with pytest.raises(ConfigError) as exc:
        tls.server_context(Tcp(tmp_path / "nope.crt", a / "rack1.key", a / "ca.crt"))
    assert exc.value.path == "control.tcp.tls_cert" and "no such file" in exc.value.reason
    (tmp_path / "junk.pem").write_text("hello\n")
    with pytest.raises(ConfigError) as exc:
        tls.server_context(Tcp(a / "rack1.crt", a / "rack1.key", tmp_path / "junk.pem"))
    assert exc.value.path == "control.tcp.client_ca" and "not a PEM file" in exc.value.reason


def test_world_readable_key_refused(pki, tmp_path):
    a = pki / "a"
    key = tmp_path / "open.key"
    key.write_bytes((a / "rack1.key").read_bytes())
    key.chmod(0o644)
    with pytest.raises(ConfigError) as exc:
        tls.server_context(Tcp(a / "rack1.crt", key, a / "ca.crt"))
    assert exc.value.path == "control.tcp.tls_key" and "chmod 600" in exc.value.reason


def test_pki_never_overwrites(pki):
    with pytest.raises(tls_pki.PkiError, match="exists"):
        tls_pki.issue(pki / "a", "alice", "client")
    with pytest.raises(tls_pki.PkiError, match="needs --address"):
        tls_pki.issue(pki / "a", "rack2", "server", [])
    with pytest.raises(tls_pki.PkiError, match="neither an IP"):
        tls_pki.issue(pki / "a", "rack3", "server", ["bad name!"])


# -- the client's settings ---------------------------------------------------------------

def test_client_settings_flag_env_config(tmp_path):
    cfg = tmp_path / "sidus.yaml"
    cfg.write_text(_cfg(tmp_path, {"servers": ["10.0.0.1:9744", "10.0.0.2:9744"],
                                   "client": {"cert": "c.crt", "key": "c.key", "ca": "ca.crt"}}))
    env = {"SIDUS_CONFIG": str(cfg)}
    assert cliconfig.remote_servers(None, False, None, {}) == ()                  # local socket
    assert cliconfig.remote_servers(["h:1"], False, None, {}) == ("h:1",)
    assert cliconfig.remote_servers(None, False, None, {"SIDUS_SERVER": "a:1, b:2"}) == ("a:1", "b:2")
    assert cliconfig.remote_servers(None, True, None, env) == ("10.0.0.1:9744", "10.0.0.2:9744")
    with pytest.raises(cliconfig.ToolConfigError, match="--all and --server"):
        cliconfig.remote_servers(["h:1"], True, None, env)
    t = cliconfig.client_tls(None, "/k", None, None, env)
    assert (t.cert, t.key, t.ca) == (tmp_path / "c.crt", Path("/k"), tmp_path / "ca.crt")
    t = cliconfig.client_tls(None, None, None, None, {"SIDUS_CERT": "/c", "SIDUS_KEY": "/k", "SIDUS_CA": "/a"})
    assert (t.cert, t.key, t.ca) == (Path("/c"), Path("/k"), Path("/a"))       # no config needed


def test_all_with_no_servers_and_no_client_refused(tmp_path):
    cfg = tmp_path / "sidus.yaml"
    cfg.write_text(_cfg(tmp_path, {}))
    with pytest.raises(cliconfig.ToolConfigError, match="control.servers is empty"):
        cliconfig.remote_servers(None, True, str(cfg), {})
    with pytest.raises(cliconfig.ToolConfigError, match="no control.client"):
        cliconfig.client_tls(None, None, None, str(cfg), {})


def test_no_role_is_reported_as_such_whatever_the_op():
    # the listener refuses a certificate without a role before it reads any op
    d = authz.decide(None, "")
    assert d.reason == "no_role"
    assert "neither control.tcp.admins nor control.tcp.readers" in authz.denial_message(d, "carol", "")


def test_null_optional_sections_are_absent(tmp_path):
    # as the example config writes them (sidusd/data/sidus.yaml): tcp: null, client: null
    c = config.parse(_cfg(tmp_path, {"tcp": None, "client": None, "servers": []}), "t.yaml", tmp_path)
    assert c.control.tcp is None and c.control.client is None and c.control.servers == ()


def test_a_changed_tcp_section_needs_a_restart(tmp_path):
    old = config.parse(_cfg(tmp_path, {"tcp": TCP}), "t.yaml", tmp_path)
    new = config.parse(_cfg(tmp_path, {"tcp": {**TCP, "readers": ["bob"]}}), "t.yaml", tmp_path)
    assert config.restart_needed(old, new) == ["control.tcp"]
    assert config.restart_needed(old, old) == []

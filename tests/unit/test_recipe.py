"""The image recipe parser: strict, every refusal names its key path; host mirror detection."""

from pathlib import Path

import pytest

from sidusd import data
from sidusd.errors import ConfigError
from sidusd.image.recipe import Keyboard, Limit, mirror_from_sources, parse_recipe, read_recipe, security_from_sources

REPO = Path(__file__).resolve().parents[2]


def refused(text: str, base_dir: Path | None = Path("/r")) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        parse_recipe(text, "r.yaml", base_dir)
    return ei.value


def test_minimal_defaults():
    r = parse_recipe("name: img\n")
    assert (r.name, r.suite, r.architecture, r.variant, r.components) == ("img", "bookworm", "amd64", "minbase",
                                                                         ("main",))
    assert r.mirror is None and r.packages == () and r.root_password_hash is None
    assert r.locale == "C.UTF-8" and r.timezone == "Etc/UTC" and r.keyboard is None
    assert not r.has_kernel


def test_full_recipe():
    r = parse_recipe("""
name: lab
suite: trixie
architecture: arm64
variant: buildd
components: [main, contrib]
mirror: https://mirror.example/debian
include: [ca-certificates]
exclude: [nano]
packages: [linux-image-arm64, nfs-common]
install_suggests: true
purge: [vim-tiny]
locale: fr_FR.UTF-8
timezone: Europe/Paris
keyboard: {layout: fr, variant: oss}
site_files: site
resolv_conf: {nameservers: [192.0.2.1, 192.0.2.2], search: [lab.example]}
limits:
  - {domain: "@users", type: hard, item: nofile, value: 4096}
  - {domain: "*", type: "-", item: core, value: unlimited}
root_password_hash: "$6$saltsalt$abcdefghijklmnopqrstuv"
enable_units: [foo.service]
""", "lab.yaml", Path("/recipes"))
    assert r.components == ("main", "contrib") and r.mirror == "https://mirror.example/debian"
    assert r.include == ("ca-certificates",) and r.exclude == ("nano",) and r.purge == ("vim-tiny",)
    assert r.install_suggests and not r.install_recommends and r.has_kernel
    assert r.keyboard == Keyboard(layout="fr", model="pc105", variant="oss", options="")
    assert r.site_files == Path("/recipes/site")
    assert r.nameservers == ("192.0.2.1", "192.0.2.2") and r.search == ("lab.example",)
    assert r.limits == (Limit("@users", "hard", "nofile", "4096"), Limit("*", "-", "core", "unlimited"))
    assert r.limits[0].line() == "@users\thard\tnofile\t4096"
    assert r.enable_units == ("foo.service",)


@pytest.mark.parametrize("text,path,words", [
    ("suite: bookworm\n", "name", "missing"),
    ("name: a\npackge: [x]\n", "packge", "did you mean packages"),
    ("name: a\npackages: [Bad_Name]\n", "packages[0]", "not a Debian package name"),
    ("name: a\npackages: [vim, vim]\n", "packages[1]", "listed twice"),
    ("name: a\npackages: vim\n", "packages", "expected a list"),
    ("name: a\npackages: [1]\n", "packages[0]", "expected a string"),
    ("name: a\npackages: [vim]\npurge: [vim]\n", "purge", "also installed"),
    ("name: a\ninclude: [vim]\nexclude: [vim]\n", "exclude", "also in include"),
    ("name: a\nvariant: tiny\n", "variant", "must be one of"),
    ("name: a\narchitecture: x86\n", "architecture", "must be one of"),
    ("name: a\ncomponents: []\n", "components", "at least one"),
    ("name: a\nmirror: ftp://x/debian\n", "mirror", "URL"),
    ("name: a\nmirror: 'http://x/debian; rm -rf /'\n", "mirror", "URL"),
    ("name: a\ntimezone: ../../etc/shadow\n", "timezone", "timezone"),
    ("name: a\ntimezone: Europe/../../x\n", "timezone", ".."),
    ("name: a\nlocale: english\n", "locale", "locale"),
    ("name: a\nkeyboard: {layout: 'fr\"; x'}\n", "keyboard.layout", "keyboard"),
    ("name: a\nkeyboard: {layuot: fr}\n", "keyboard.layuot", "did you mean layout"),
    ("name: a\nresolv_conf: {nameservers: [dns.example]}\n", "resolv_conf.nameservers[0]", "IPv4"),
    ("name: a\nresolv_conf: {nameservers: [192.0.2.1, 192.0.2.2, 192.0.2.3, 192.0.2.4]}\n",
     "resolv_conf.nameservers", "at most 3"),
    ("name: a\nlimits: [{domain: '*', type: soft, item: nofiles, value: 1}]\n", "limits[0].item", "one of"),
    ("name: a\nlimits: [{domain: '*', type: soft, item: nofile}]\n", "limits[0].value", "missing"),
    ("name: a\nlimits: [{domain: '*', type: soft, item: nofile, value: lots}]\n", "limits[0].value", "integer"),
    ("name: a\nroot_password_hash: secret\n", "root_password_hash", "crypt"),
    ("name: a\ninstall_suggests: yes\n", "install_suggests", "boolean"),
    ("name: ../x\n", "name", "not a valid image name"),
    ("name: a\nenable_units: ['x; reboot']\n", "enable_units[0]", "systemd unit"),
    ("name: a\nsite_files: \"a\\nb\"\n", "site_files", "control character"),
])
def test_refusals_name_the_key(text, path, words):
    e = refused(text)
    assert e.path == path, e
    assert words in e.reason, e


def test_relative_site_files_need_a_base():
    assert refused("name: a\nsite_files: s\n", base_dir=None).path == "site_files"


def test_yaml_errors_and_duplicates():
    assert "duplicate key" in str(refused("name: a\nname: b\n"))
    assert "expected a mapping" in str(refused("- a\n"))


def test_shipped_recipes_parse():
    for p in sorted(data.RECIPES.glob("*.yaml")):
        r = read_recipe(p)
        assert r.name == p.stem or p.stem == "example"
        if r.site_files is not None:
            assert r.site_files.is_dir(), p


DEB822 = """Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror-a.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror-a.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_mirror_from_deb822():
    assert mirror_from_sources(DEB822, "bookworm") == "http://mirror-a.example/debian"
    assert mirror_from_sources(DEB822, "trixie") == "http://mirror-a.example/debian"
    only_security = DEB822.split("\n\n")[1]
    assert mirror_from_sources(only_security, "bookworm") is None


def test_mirror_from_one_line_form():
    text = ("# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://one.example/debian/ trixie main\n"
            "deb http://two.example/debian bookworm main contrib\n"
            "deb http://sec.example/debian-security bookworm-security main\n")
    assert mirror_from_sources(text, "bookworm") == "http://two.example/debian"
    assert mirror_from_sources(text, None) == "http://one.example/debian"
    assert mirror_from_sources("deb cdrom:[x]/ bookworm main\n", "bookworm") is None
    assert mirror_from_sources("", None) is None


def test_security_from_sources_both_forms():
    assert security_from_sources(DEB822, "bookworm") == "http://mirror-a.example/debian-security"
    assert security_from_sources(DEB822, "trixie") is None
    one = ("deb http://two.example/debian bookworm main\n"
           "deb [signed-by=/k.gpg] http://sec.example/debian-security/ bookworm-security main\n"
           "deb-src http://src.example/debian-security trixie-security main\n")
    assert security_from_sources(one, "bookworm") == "http://sec.example/debian-security"
    assert security_from_sources(one, "trixie") is None                      # deb-src is not an archive to use
    src_only = "Types: deb-src\nURIs: http://x.example/debian-security\nSuites: bookworm-security\n"
    assert security_from_sources(src_only, "bookworm") is None
    assert mirror_from_sources(src_only, "bookworm") is None


def test_security_mirror_key():
    assert parse_recipe("name: a\n").security_mirror is None                 # the host's
    assert parse_recipe("name: a\nsecurity_mirror: false\n").security_mirror is False
    assert parse_recipe("name: a\nsecurity_mirror: http://s.example/ds/\n").security_mirror == "http://s.example/ds"
    for bad in ("security_mirror: true", "security_mirror: ftp://x", "security_mirror: 3",
                "security_mirror: 'http://x y'"):
        assert refused(f"name: a\n{bad}\n").path == "security_mirror"

"""Image recipes: a strict YAML description of a Debian root for network boot.

A recipe says which Debian to bootstrap (suite, architecture, components,
mirror, debootstrap variant, include/exclude lists), what to install on top
(packages, with or without their suggests), what to purge, and how to make the
root a *shared* root: locale, timezone, keyboard, site files copied in,
static resolv.conf, loopback-only interfaces, limits.conf, and an optional root
password hash (no password otherwise).  See config/recipes/example.yaml and
docs/images.md.

:func:`parse_recipe` is pure (no I/O) and strict: unknown keys, wrong types and
unsafe values raise :class:`sidusd.errors.ConfigError` whose ``path`` is the
dotted key path (``packages[3]``, ``keyboard.layout``).  :func:`mirror_from_sources`
picks the mirror out of the host's apt sources text (deb822 or one-line form),
so no host name is ever written in code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from sidusd.errors import ConfigError
from sidusd.yamlstrict import Section, check_line, check_name, load_yaml, parse_ipv4

VARIANTS = ("minbase", "buildd", "fakechroot", "standard")
ARCHITECTURES = ("amd64", "arm64", "i386", "armhf", "ppc64el", "riscv64", "s390x")
MAX_PACKAGES = 2000

_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]{1,100}$")      # Debian Policy §5.6.1
_SUITE = re.compile(r"^[a-z][a-z0-9-]{1,40}$")
_COMPONENT = re.compile(r"^[a-z][a-z0-9-]{0,40}$")
_MIRROR = re.compile(r"^(?:https?|file)://[A-Za-z0-9._~:/@%+-]+$")
_LOCALE = re.compile(r"^(?:C|POSIX|C\.UTF-8|[a-z]{2,3}_[A-Z]{2}(?:\.UTF-8)?(?:@[a-z]+)?)$")
_TIMEZONE = re.compile(r"^[A-Za-z][A-Za-z0-9_+-]*(?:/[A-Za-z0-9_+-]+){0,2}$")
_KBD = re.compile(r"^[A-Za-z0-9_,:()+-]{0,64}$")
_CRYPT = re.compile(r"^\$(?:y|gy|7|2[abxy]|5|6)\$[./A-Za-z0-9$=,-]{8,200}$")  # crypt(5) hashes
_UNIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:_.@-]{0,200}\.(?:service|socket|timer|target|path|mount)$")
_LIMIT_DOMAIN = re.compile(r"^(?:\*|@?[A-Za-z0-9_.-]{1,32}|%[A-Za-z0-9_.-]{0,32}|\d+:\d*)$")
_LIMIT_ITEMS = ("core", "data", "fsize", "memlock", "nofile", "rss", "stack", "cpu", "nproc", "as",
                "maxlogins", "maxsyslogins", "priority", "locks", "sigpending", "msgqueue", "nice",
                "rtprio", "chroot", "nonewprivs")


@dataclass(frozen=True)
class Keyboard:
    """``keyboard:`` values for /etc/default/keyboard (keyboard(5))."""
    layout: str = "us"
    model: str = "pc105"
    variant: str = ""
    options: str = ""


@dataclass(frozen=True)
class Limit:
    """One limits.conf(5) line: ``domain type item value``."""
    domain: str
    type: str
    item: str
    value: str

    def line(self) -> str:
        return f"{self.domain}\t{self.type}\t{self.item}\t{self.value}"


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe; ``site_files`` is absolute (relative paths follow the recipe's directory)."""
    name: str
    suite: str = "bookworm"
    architecture: str = "amd64"
    variant: str = "minbase"
    components: tuple[str, ...] = ("main",)
    mirror: str | None = None                # None: the host's apt sources
    security_mirror: str | bool | None = None   # None: the host's; False: no security archive
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    install_recommends: bool = False
    install_suggests: bool = False
    purge: tuple[str, ...] = ()
    locale: str = "C.UTF-8"
    timezone: str = "Etc/UTC"
    keyboard: Keyboard | None = None
    site_files: Path | None = None
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    limits: tuple[Limit, ...] = ()
    root_password_hash: str | None = None
    enable_units: tuple[str, ...] = ()
    source: str = field(default="<string>", compare=False)

    @property
    def has_kernel(self) -> bool:
        """True when the image installs a Debian kernel (then an initrd is built and published)."""
        return any(p.startswith("linux-image-") for p in self.packages + self.include)


def _packages(s: Section, key: str) -> tuple[str, ...]:
    names = s.list(key, str, [])
    if len(names) > MAX_PACKAGES:
        raise ConfigError(s.key(key), f"more than {MAX_PACKAGES} packages")
    for i, n in enumerate(names):
        if not _PACKAGE.fullmatch(n):
            raise ConfigError(f"{s.key(key)}[{i}]", f"{n!r} is not a Debian package name "
                              "(lower case letters, digits, '+', '-', '.'; at least 2 characters)")
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            raise ConfigError(f"{s.key(key)}[{i}]", f"{n!r} is listed twice")
        seen.add(n)
    return tuple(names)


def _match(where: str, value: str, rx: re.Pattern, what: str) -> str:
    check_line(where, value, 200)
    if not rx.fullmatch(value):
        raise ConfigError(where, f"{value!r} is not {what}")
    return value


def _limits(s: Section) -> tuple[Limit, ...]:
    out = []
    for i, item in enumerate(s.get("limits", list, [])):
        ls = Section(item, f"{s.key('limits')}[{i}]")
        ls.allow("domain", "type", "item", "value")
        ls.require("domain", "type", "item", "value")
        domain = _match(ls.key("domain"), ls.get("domain", str), _LIMIT_DOMAIN, "a limits.conf domain")
        typ = ls.enum("type", ("soft", "hard", "-"))
        name = ls.enum("item", _LIMIT_ITEMS)
        raw = ls.raw("value")
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise ConfigError(ls.key("value"), "expected an integer or 'unlimited'")
        value = str(raw)
        if not re.fullmatch(r"-?\d{1,19}|unlimited|infinity", value):
            raise ConfigError(ls.key("value"), f"{value!r} is not an integer, 'unlimited' or 'infinity'")
        out.append(Limit(domain, typ, name, value))
    return tuple(out)


def parse_recipe(text: str, source: str = "<string>", base_dir: Path | None = None) -> Recipe:
    """Parse and check a recipe (pure).  Raises ConfigError naming the dotted key path."""
    root = Section(load_yaml(text, source), "")
    root.allow("name", "suite", "architecture", "variant", "components", "mirror", "include", "exclude",
               "security_mirror", "packages", "install_recommends", "install_suggests", "purge", "locale", "timezone",
               "keyboard", "site_files", "resolv_conf", "limits", "root_password_hash", "enable_units")
    root.require("name")
    name = check_name("name", root.get("name", str), what="image name")
    suite = _match("suite", root.get("suite", str, "bookworm"), _SUITE, "a Debian suite name")
    arch = root.enum("architecture", ARCHITECTURES, "amd64")
    variant = root.enum("variant", VARIANTS, "minbase")
    components = root.list("components", str, ["main"])
    if not components:
        raise ConfigError("components", "at least one component is needed (e.g. main)")
    for i, c in enumerate(components):
        _match(f"components[{i}]", c, _COMPONENT, "an archive component like main or contrib")
    mirror = root.get("mirror", str, None)
    if mirror is not None:
        _match("mirror", mirror, _MIRROR, "an http://, https:// or file:// URL")
    security = root.raw("security_mirror") if root.has("security_mirror") else None
    if security is True or (security is not None and not isinstance(security, (bool, str))):
        raise ConfigError("security_mirror", "expected an http://, https:// or file:// URL, or false "
                          "(no security archive)")
    if isinstance(security, str):
        _match("security_mirror", security, _MIRROR, "an http://, https:// or file:// URL")
        security = security.rstrip("/")
    include, exclude = _packages(root, "include"), _packages(root, "exclude")
    both = sorted(set(include) & set(exclude))
    if both:
        raise ConfigError("exclude", f"{', '.join(both)} also in include")
    packages, purge = _packages(root, "packages"), _packages(root, "purge")
    both = sorted(set(packages + include) & set(purge))
    if both:
        raise ConfigError("purge", f"{', '.join(both)} also installed by packages/include")
    locale = _match("locale", root.get("locale", str, "C.UTF-8"), _LOCALE, "a locale like en_US.UTF-8")
    tz = root.get("timezone", str, "Etc/UTC")
    _match("timezone", tz, _TIMEZONE, "a timezone like Europe/Paris")
    if ".." in tz.split("/"):
        raise ConfigError("timezone", "'..' is not allowed")
    keyboard = None
    if root.has("keyboard"):
        ks = root.section("keyboard")
        ks.allow("layout", "model", "variant", "options")
        vals = {k: _match(ks.key(k), ks.get(k, str, d), _KBD, "a keyboard(5) value")
                for k, d in (("layout", "us"), ("model", "pc105"), ("variant", ""), ("options", ""))}
        keyboard = Keyboard(**vals)
    site = root.get("site_files", str, None)
    site_path = None
    if site is not None:
        check_line("site_files", site)
        site_path = Path(site)
        if not site_path.is_absolute():
            if base_dir is None:
                raise ConfigError("site_files", "a relative path needs the recipe's directory")
            site_path = base_dir / site_path
    rs = root.section("resolv_conf")
    rs.allow("nameservers", "search")
    nameservers = tuple(str(parse_ipv4(f"resolv_conf.nameservers[{i}]", n))
                        for i, n in enumerate(rs.list("nameservers", str, [])))
    if len(nameservers) > 3:
        raise ConfigError("resolv_conf.nameservers", "resolv.conf(5) uses at most 3 name servers")
    search = tuple(rs.list("search", str, []))
    for i, d in enumerate(search):
        _match(f"resolv_conf.search[{i}]", d, re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})$"),
               "a DNS domain")
    pw = root.get("root_password_hash", str, None)
    if pw is not None:
        _match("root_password_hash", pw, _CRYPT, "a crypt(5) hash (e.g. from `mkpasswd -m yescrypt`), "
               "never a clear-text password")
    units = tuple(root.list("enable_units", str, []))
    for i, u in enumerate(units):
        _match(f"enable_units[{i}]", u, _UNIT, "a systemd unit name like foo.service")
    return Recipe(name=name, suite=suite, architecture=arch, variant=variant, components=tuple(components),
                  mirror=mirror, security_mirror=security, include=include, exclude=exclude, packages=packages,
                  install_recommends=root.get("install_recommends", bool, False),
                  install_suggests=root.get("install_suggests", bool, False), purge=purge,
                  locale=locale, timezone=tz, keyboard=keyboard, site_files=site_path,
                  nameservers=nameservers, search=search, limits=_limits(root),
                  root_password_hash=pw, enable_units=units, source=source)


def read_recipe(path: Path) -> Recipe:
    """Read and parse a recipe file (I/O); relative paths in it follow its directory."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"cannot read: {e}") from None
    return parse_recipe(text, str(path), path.resolve().parent)


def _source_entries(text: str) -> list[tuple[str, list[str]]]:
    """(URI, suites) of every ``deb`` entry in apt sources text (deb822 or one-line form)."""
    entries: list[tuple[str, list[str]]] = []
    uris: list[str] = []
    suites: list[str] = []
    types_ok = True
    for raw in text.splitlines() + [""]:
        if raw.lstrip().startswith("#"):
            continue                     # a comment line does not end a deb822 stanza
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            if uris and types_ok:
                entries.extend((u, suites) for u in uris)
            uris, suites, types_ok = [], [], True
            continue
        if line.startswith(("deb ", "deb\t")):
            parts = line.split()[1:]
            if parts and parts[0].startswith("["):
                while parts and not parts[0].endswith("]"):
                    parts.pop(0)
                parts = parts[1:]
            if len(parts) >= 2:
                entries.append((parts[0], [parts[1]]))
            continue
        key, _, value = line.partition(":")
        if key.strip().lower() == "uris":
            uris = value.split()
        elif key.strip().lower() == "suites":
            suites = value.split()
        elif key.strip().lower() == "types":
            types_ok = "deb" in value.split()
    return [(u.rstrip("/"), s) for u, s in entries if _MIRROR.fullmatch(u)]


def mirror_from_sources(text: str, suite: str | None = None) -> str | None:
    """The first Debian archive URI in apt sources text (deb822 ``URIs:`` or ``deb URI suite ...``).

    Security archives (``*-security``) are skipped; with ``suite`` given, an entry
    listing that suite is preferred.  Pure; None when nothing fits.
    """
    good = [(u, s) for u, s in _source_entries(text)
            if not all(x.endswith("-security") for x in s or ["x"])]
    if suite is not None:
        for u, s in good:
            if suite in s:
                return u
    return good[0][0] if good else None


def security_from_sources(text: str, suite: str) -> str | None:
    """The URI of the security archive of ``suite`` (an entry listing ``<suite>-security``) in apt
    sources text; None when the host has none.  Pure; no host name is written in code."""
    for u, s in _source_entries(text):
        if f"{suite}-security" in s:
            return u
    return None

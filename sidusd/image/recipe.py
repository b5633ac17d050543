"""Image recipes: a strict YAML description of a Debian root for network boot.

A recipe says which Debian to bootstrap (suite, architecture, components,
mirror, debootstrap variant, include/exclude lists), what to install on top
(packages, with or without their suggests), what to purge, and how to make the
root a *shared* root: locale, timezone, keyboard, site files copied in,
static resolv.conf, loopback-only interfaces, limits.conf, and an optional root
password hash (no password otherwise).  See sidusd/data/recipes/example.yaml and
docs/images.md.

:func:`parse_recipe` is pure (no I/O) and strict: the file is declared once
(:class:`RecipeFile`, each key with its constraint) and checked by
:func:`sidusd.schema.convert`; unknown keys, wrong types and unsafe values raise
:class:`sidusd.errors.ConfigError` whose ``path`` is the dotted key path
(``packages[3]``, ``keyboard.layout``).  :func:`mirror_from_sources`
picks the mirror out of the host's apt sources text (deb822 or one-line form),
so no host name is ever written in code.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Annotated, Any, Literal

from msgspec import Meta

from sidusd.errors import ConfigError
from sidusd.schema import convert, describe
from sidusd.yamlstrict import check_line, decode_text, load_yaml

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


def _rx(pattern: re.Pattern, what: str, max_chars: int = 200) -> Meta:
    """The constraint of a string that must match ``pattern`` (one line, at most ``max_chars``)."""
    return Meta(max_length=max_chars, pattern=pattern.pattern, description="{value!r} is not " + what)


Package = Annotated[str, _rx(_PACKAGE, "a Debian package name (lower case letters, digits, '+', '-', '.'; "
                                       "at least 2 characters)")]
Packages = Annotated[tuple[Package, ...],
                     Meta(max_length=MAX_PACKAGES, description=f"more than {MAX_PACKAGES} packages")]
Url = Annotated[str, _rx(_MIRROR, "an http://, https:// or file:// URL")]
KbdValue = Annotated[str, _rx(_KBD, "a keyboard(5) value")]
LimitDomain = Annotated[str, _rx(_LIMIT_DOMAIN, "a limits.conf domain")]
LimitItem = Literal["core", "data", "fsize", "memlock", "nofile", "rss", "stack", "cpu", "nproc", "as",
                    "maxlogins", "maxsyslogins", "priority", "locks", "sigpending", "msgqueue", "nice",
                    "rtprio", "chroot", "nonewprivs"]
Domain = Annotated[str, _rx(re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})\Z"), "a DNS domain")]
Suite = Annotated[str, _rx(_SUITE, "a Debian suite name")]
Architecture = Literal["amd64", "arm64", "i386", "armhf", "ppc64el", "riscv64", "s390x"]
Variant = Literal["minbase", "buildd", "fakechroot", "standard"]
Component = Annotated[str, _rx(_COMPONENT, "an archive component like main or contrib")]
Locale = Annotated[str, _rx(_LOCALE, "a locale like en_US.UTF-8")]
Timezone = Annotated[str, _rx(_TIMEZONE, "a timezone like Europe/Paris")]
CryptHash = Annotated[str, _rx(_CRYPT, "a crypt(5) hash (e.g. from `mkpasswd -m yescrypt`), "
                                       "never a clear-text password", 300)]
Unit = Annotated[str, _rx(_UNIT, "a systemd unit name like foo.service")]
ImageName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z", description=(
    "{value!r} is not a valid image name: letters, digits, '_', '.', '-', 1-63 characters, "
    "starting with a letter or digit"))]


@dataclass(frozen=True)
class Keyboard:
    """``keyboard:`` values for /etc/default/keyboard (keyboard(5))."""
    layout: KbdValue = "us"
    model: KbdValue = "pc105"
    variant: KbdValue = ""
    options: KbdValue = ""


VARIANTS = typing.get_args(Variant)
ARCHITECTURES = typing.get_args(Architecture)


class LimitValue(str):
    """A limits.conf(5) value: an integer (YAML may write it as one), ``unlimited`` or ``infinity``."""


@dataclass(frozen=True)
class Limit:
    """One limits.conf(5) line: ``domain type item value``."""
    domain: LimitDomain
    type: Literal["soft", "hard", "-"]
    item: LimitItem
    value: LimitValue

    def line(self) -> str:
        return f"{self.domain}\t{self.type}\t{self.item}\t{self.value}"


@dataclass(frozen=True)
class ResolvConf:
    """``resolv_conf:``: a static resolv.conf(5)."""
    nameservers: Annotated[tuple[IPv4Address, ...],
                           Meta(max_length=3, description="resolv.conf(5) uses at most 3 name servers")] = ()
    search: tuple[Domain, ...] = ()


@dataclass(frozen=True)
class RecipeFile:
    """A recipe as written (sidusd/data/recipes/example.yaml): each key, its default and its constraint."""
    name: ImageName
    suite: Suite = "bookworm"
    architecture: Architecture = "amd64"
    variant: Variant = "minbase"
    components: Annotated[tuple[Component, ...],
                          Meta(min_length=1, description="at least one component is needed (e.g. main)")] = ("main",)
    mirror: Url | None = None
    security_mirror: Any = None                         # a URL, or false (no security archive): checked below
    include: Packages = ()
    exclude: Packages = ()
    packages: Packages = ()
    install_recommends: bool = False
    install_suggests: bool = False
    purge: Packages = ()
    locale: Locale = "C.UTF-8"
    timezone: Timezone = "Etc/UTC"
    keyboard: Keyboard | None = None
    site_files: str | None = None
    resolv_conf: ResolvConf = field(default_factory=ResolvConf)
    limits: tuple[Limit, ...] = ()
    root_password_hash: CryptHash | None = None
    enable_units: tuple[Unit, ...] = ()


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe; ``site_files`` is absolute (relative paths follow the recipe's directory).

    Built only by :func:`parse_recipe`, from a :class:`RecipeFile`: the defaults are declared there, once.
    """
    name: str
    suite: str
    architecture: str
    variant: str
    components: tuple[str, ...]
    mirror: str | None                # None: the host's apt sources
    security_mirror: str | bool | None   # None: the host's; False: no security archive
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    packages: tuple[str, ...]
    install_recommends: bool
    install_suggests: bool
    purge: tuple[str, ...]
    locale: str
    timezone: str
    keyboard: Keyboard | None
    site_files: Path | None
    nameservers: tuple[str, ...]
    search: tuple[str, ...]
    limits: tuple[Limit, ...]
    root_password_hash: str | None
    enable_units: tuple[str, ...]
    source: str = field(default="<string>", compare=False)

    @property
    def has_kernel(self) -> bool:
        """True when the image installs a Debian kernel (then an initrd is built and published)."""
        return any(p.startswith("linux-image-") for p in self.packages + self.include)


def _hook(tp: type, v: Any) -> Any:
    """Name servers from their dotted quads; limits.conf values from an integer or a word."""
    if tp is LimitValue:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise TypeError("expected an integer or 'unlimited'")
        if not re.fullmatch(r"-?\d{1,19}|unlimited|infinity", str(v)):
            raise ValueError(f"{str(v)[:40]!r} is not an integer, 'unlimited' or 'infinity'")
        return LimitValue(v)
    if tp is not IPv4Address:
        raise NotImplementedError(tp)
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {describe(v)}")
    try:
        return IPv4Address(v)
    except ValueError:
        raise ValueError(f"not an IPv4 address: {v!r}") from None


def parse_recipe(text: str, source: str = "<string>", base_dir: Path | None = None) -> Recipe:
    """Parse and check a recipe (pure).  Raises ConfigError naming the dotted key path."""
    f = convert(load_yaml(text, source), RecipeFile, dec_hook=_hook)
    for key in ("include", "exclude", "packages", "purge"):
        seen: set[str] = set()
        for i, n in enumerate(getattr(f, key)):
            if n in seen:
                raise ConfigError(f"{key}[{i}]", f"{n!r} is listed twice")
            seen.add(n)
    both = sorted(set(f.include) & set(f.exclude))
    if both:
        raise ConfigError("exclude", f"{', '.join(both)} also in include")
    both = sorted(set(f.packages + f.include) & set(f.purge))
    if both:
        raise ConfigError("purge", f"{', '.join(both)} also installed by packages/include")
    security = f.security_mirror
    if security is True or (security is not None and not isinstance(security, (bool, str))):
        raise ConfigError("security_mirror", "expected an http://, https:// or file:// URL, or false "
                          "(no security archive)")
    if isinstance(security, str):
        security = convert(security, Url, "security_mirror").rstrip("/")
    if ".." in f.timezone.split("/"):
        raise ConfigError("timezone", "'..' is not allowed")
    site_path = None
    if f.site_files is not None:
        check_line("site_files", f.site_files)
        site_path = Path(f.site_files)
        if not site_path.is_absolute():
            if base_dir is None:
                raise ConfigError("site_files", "a relative path needs the recipe's directory")
            site_path = base_dir / site_path
    return Recipe(name=f.name, suite=f.suite, architecture=f.architecture, variant=f.variant,
                  components=f.components, mirror=f.mirror, security_mirror=security, include=f.include,
                  exclude=f.exclude, packages=f.packages, install_recommends=f.install_recommends,
                  install_suggests=f.install_suggests, purge=f.purge, locale=f.locale, timezone=f.timezone,
                  keyboard=f.keyboard, site_files=site_path,
                  nameservers=tuple(str(n) for n in f.resolv_conf.nameservers), search=f.resolv_conf.search,
                  limits=f.limits, root_password_hash=f.root_password_hash, enable_units=f.enable_units,
                  source=source)


def read_recipe(path: Path) -> Recipe:
    """Read and parse a recipe file (I/O); relative paths in it follow its directory."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(str(path), f"cannot read: {e.strerror or e}") from None
    text = decode_text(data, str(path))
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

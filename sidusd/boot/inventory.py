"""Hosts and profiles: which machine boots which image, with which arguments (pure).

The inventory file (``config.inventory_file``)::

    profiles:
      default: {image: demo, overlay: tmpfs, append: ""}
    hosts:
      - {mac: "52:54:00:00:00:01", hostname: vm1, profile: default, image: null,
         ip: null, append: "sidus.marker=one"}

:func:`parse_inventory` is as strict as the config (unknown keys refused with
their path, e.g. ``hosts[3].profle``; duplicate MACs, hostnames and IPs
refused).  An :class:`Inventory` is immutable: :meth:`Inventory.with_host` and
:meth:`Inventory.without_host` return a new one, validated the same way, which
the runtime swaps in whole.  :func:`check_against` checks the references into a
:class:`~sidusd.config.Config` (images, default profile, pool).

Overlays: ``tmpfs`` (writable layer in RAM, lost at reboot) and ``iscsi`` (a
per-host disk on the boot server as the writable layer, kept across reboots;
:func:`check_against` accepts it only when ``iscsi.backend`` is not ``none``).
An iscsi profile may set ``disk_size_mib`` (default ``iscsi.default_size_mib``)
and ``fallback``: ``tmpfs`` (boot with a tmpfs overlay and a loud console
message when the disk cannot be reached) or ``stop`` (panic instead).
"""

from __future__ import annotations

import ipaddress
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from msgspec import Meta

from sidusd.boot.cmdline import check_append
from sidusd.config import Config, ImageConfig
from sidusd.errors import ConfigError, InventoryError
from sidusd.schema import convert, describe
from sidusd.yamlstrict import check_name, dump_yaml, load_yaml

Overlay = Literal["tmpfs", "iscsi"]
Fallback = Literal["tmpfs", "stop"]
OVERLAYS = typing.get_args(Overlay)
FALLBACKS = typing.get_args(Fallback)
MAX_DISK_MIB = 16 * 1024 * 1024     # 16 TiB
DiskMiB = Annotated[int, Meta(ge=16, le=MAX_DISK_MIB)]
MAX_HOSTS = 100_000
MAX_HOSTNAME_CHARS = 253            # RFC 1123 §2.1 / RFC 1035 §2.3.4
_MAC = re.compile(r"^[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(?:\1[0-9a-fA-F]{2}){4}$")


def normalize_mac(text: Any, where: str = "mac") -> str:
    """``52-54-00-AB-CD-EF`` or ``52:54:00:ab:cd:ef`` -> ``52:54:00:ab:cd:ef`` (IEEE 802 MAC-48).

    Anything else, a group or multicast address, or all zeros, raises InventoryError.
    """
    if not isinstance(text, str) or not _MAC.fullmatch(text):
        raise InventoryError(where, f"{text!r} is not a MAC address: six pairs of hex digits separated "
                             "by ':' or '-', e.g. 52:54:00:12:34:56")
    mac = text.lower().replace("-", ":")
    first = int(mac[:2], 16)
    if first & 1:
        raise InventoryError(where, f"{mac} is a multicast/broadcast address, not a network card")
    if mac == "00:00:00:00:00:00":
        raise InventoryError(where, "00:00:00:00:00:00 is not a network card")
    return mac


def _hostname(where: str, name: Any) -> str:
    if not isinstance(name, str):
        raise InventoryError(where, f"expected a host name as a string, got {name!r}")
    if len(name) > MAX_HOSTNAME_CHARS or not name:
        raise InventoryError(where, f"a host name has 1 to {MAX_HOSTNAME_CHARS} characters")
    for label in name.split("."):
        check_name(where, label, what="host name label", dns=True)
    return name


def _host_ip(where: str, ip: Any) -> ipaddress.IPv4Address:
    if isinstance(ip, str):
        try:
            ip = ipaddress.IPv4Address(ip)
        except ValueError:
            raise InventoryError(where, f"not an IPv4 address: {ip!r}") from None
    if not isinstance(ip, ipaddress.IPv4Address):
        raise InventoryError(where, f"expected an IPv4 address as a string, got {ip!r}")
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise InventoryError(where, f"{ip} cannot be given to a host")
    return ip


def _as_inventory_error(e: ConfigError) -> InventoryError:
    return e if isinstance(e, InventoryError) else InventoryError(e.path, e.reason)


@dataclass(frozen=True)
class Profile:
    """A named boot recipe: an image, an overlay kind and extra kernel arguments."""
    name: str
    image: str
    overlay: Overlay = "tmpfs"
    append: str = ""
    disk_size_mib: DiskMiB | None = None
    fallback: Fallback = "tmpfs"

    def __post_init__(self) -> None:
        if self.append is None:
            object.__setattr__(self, "append", "")
        if self.disk_size_mib is not None and (
                isinstance(self.disk_size_mib, bool) or not isinstance(self.disk_size_mib, int)
                or not 16 <= self.disk_size_mib <= MAX_DISK_MIB):
            raise InventoryError("profile.disk_size_mib",
                                 f"expected MiB between 16 and {MAX_DISK_MIB}, got {self.disk_size_mib!r}")
        if self.fallback not in FALLBACKS:
            raise InventoryError("profile.fallback", f"must be one of: {', '.join(FALLBACKS)} (got {self.fallback!r})")
        if self.overlay != "iscsi" and (self.disk_size_mib is not None or self.fallback != "tmpfs"):
            raise InventoryError("profile.disk_size_mib", "disk_size_mib and fallback apply to overlay: iscsi only")
        try:
            check_name("profile.name", self.name, what="profile name")
            check_name("profile.image", self.image, what="image name")
            check_append("profile.append", self.append)
        except ConfigError as e:
            raise _as_inventory_error(e) from None
        if self.overlay not in OVERLAYS:
            raise InventoryError("profile.overlay", f"must be one of: {', '.join(OVERLAYS)} (got {self.overlay!r})")


@dataclass(frozen=True)
class Host:
    """One machine, keyed by its MAC (normalized on construction)."""
    mac: str
    profile: str
    hostname: str | None = None
    image: str | None = None
    ip: ipaddress.IPv4Address | None = None
    append: str = ""

    def __post_init__(self) -> None:
        if self.append is None:
            object.__setattr__(self, "append", "")
        try:
            object.__setattr__(self, "mac", normalize_mac(self.mac, "host.mac"))
            check_name("host.profile", self.profile, what="profile name")
            if self.hostname is not None:
                _hostname("host.hostname", self.hostname)
            if self.image is not None:
                check_name("host.image", self.image, what="image name")
            if self.ip is not None:
                object.__setattr__(self, "ip", _host_ip("host.ip", self.ip))
            check_append("host.append", self.append)
        except ConfigError as e:
            raise _as_inventory_error(e) from None


@dataclass(frozen=True)
class BootTarget:
    """What one machine boots: host -> profile -> image merged (``mac`` None for the default profile)."""
    mac: str | None
    hostname: str | None
    profile: str
    image: str
    image_root: Path
    kernel: str
    initrd: str
    overlay: str
    append: str
    fallback: str = "tmpfs"


@dataclass(frozen=True)
class Inventory:
    """Profiles by name and hosts by normalized MAC; immutable and always consistent."""
    profiles: Mapping[str, Profile] = field(default_factory=lambda: types.MappingProxyType({}))
    hosts: Mapping[str, Host] = field(default_factory=lambda: types.MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "profiles", types.MappingProxyType(dict(self.profiles)))
        object.__setattr__(self, "hosts", types.MappingProxyType(dict(self.hosts)))
        for name, p in self.profiles.items():
            if p.name != name:
                raise InventoryError(f"profiles.{name}", f"keyed under a different name ({p.name!r})")
        _cross_check(self.profiles, [(f"hosts[{mac}]", h) for mac, h in self.hosts.items()])
        for mac, h in self.hosts.items():
            if h.mac != mac:
                raise InventoryError(f"hosts[{mac}]", f"keyed under a different MAC ({h.mac})")

    def with_host(self, host: Host) -> Inventory:
        """A new inventory with ``host`` added, or replacing the host with the same MAC."""
        hosts = dict(self.hosts)
        hosts[host.mac] = host
        if len(hosts) > MAX_HOSTS:
            raise InventoryError("hosts", f"more than {MAX_HOSTS} hosts")
        return Inventory(self.profiles, hosts)

    def without_host(self, mac: str) -> Inventory:
        """A new inventory without the host ``mac``; InventoryError if it is not there."""
        key = normalize_mac(mac)
        if key not in self.hosts:
            raise InventoryError(f"hosts[{key}]", "no such host")
        return Inventory(self.profiles, {m: h for m, h in self.hosts.items() if m != key})

    def resolve(self, mac: str | None, config: Config) -> BootTarget | None:
        """The :class:`BootTarget` of ``mac`` (any accepted MAC spelling), or None.

        ``mac=None`` asks for what an unknown machine boots (``pxelinux.cfg/default``).
        A listed host merges host -> profile -> image (append: image, profile,
        host in that order).  An unlisted MAC gets ``config.boot.default_profile``
        with ``mac=None`` when ``config.dhcp.unknown_hosts`` is ``default``,
        else None.  None also when the profile or image is missing (which
        :func:`check_against` refuses at load time).  Raises InventoryError only
        if ``mac`` itself is malformed.
        """
        host = self.hosts.get(normalize_mac(mac)) if mac is not None else None
        if host is None:
            if config.dhcp.unknown_hosts != "default":
                return None
            profile = self.profiles.get(config.boot.default_profile)
            image_name = profile.image if profile else None
        else:
            profile = self.profiles.get(host.profile)
            image_name = (host.image or profile.image) if profile else None
        image: ImageConfig | None = config.images.get(image_name) if image_name else None
        if profile is None or image is None or image_name is None:
            return None
        parts = [image.append, profile.append, host.append if host else ""]
        return BootTarget(mac=host.mac if host else None, hostname=host.hostname if host else None,
                          profile=profile.name, image=image_name,
                          image_root=image.root, kernel=image.kernel, initrd=image.initrd,
                          overlay=profile.overlay, append=" ".join(p.strip() for p in parts if p.strip()),
                          fallback=profile.fallback)


def _cross_check(profiles: Mapping[str, Profile], labelled: list[tuple[str, Host]]) -> None:
    """Profiles exist; MACs, hostnames (case-insensitive) and IPs are unique."""
    seen_mac: dict[str, str] = {}
    names: dict[str, str] = {}
    ips: dict[ipaddress.IPv4Address, str] = {}
    for where, h in labelled:
        if h.mac in seen_mac:
            raise InventoryError(f"{where}.mac", f"duplicate MAC {h.mac} (already in {seen_mac[h.mac]})")
        seen_mac[h.mac] = where
        if h.profile not in profiles:
            known = ", ".join(profiles) or "none defined"
            raise InventoryError(f"{where}.profile", f"unknown profile {h.profile!r} (profiles: {known})")
        if h.hostname is not None:
            key = h.hostname.lower().rstrip(".")
            if key in names:
                raise InventoryError(f"{where}.hostname",
                                     f"duplicate host name {h.hostname!r} (already in {names[key]})")
            names[key] = where
        if h.ip is not None:
            if h.ip in ips:
                raise InventoryError(f"{where}.ip", f"duplicate address {h.ip} (already in {ips[h.ip]})")
            ips[h.ip] = where


@dataclass(frozen=True)
class _InventoryFile:
    """The inventory file: ``profiles`` (name -> :class:`Profile` without its name) and ``hosts``
    (a list of :class:`Host`); each entry is converted on its own so that a refusal names it."""
    profiles: dict[str, Any] | None = None
    hosts: list[Any] | None = None            # ``hosts:`` with nothing under it: no hosts


def _ip_hook(tp: type, v: Any) -> Any:
    if tp is not ipaddress.IPv4Address:
        raise NotImplementedError(tp)
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {describe(v)}")
    try:
        return ipaddress.IPv4Address(v)
    except ValueError:
        raise ValueError(f"not an IPv4 address: {v!r}") from None


def _entry(raw: Any, tp: type, where: str, own: str, **extra: Any) -> Any:
    """One profile or host: the schema's refusals at ``where``, and the object's own checks
    (``profile.append`` ...) moved under ``where`` too."""
    try:
        return convert(raw, tp, where, error=InventoryError, dec_hook=_ip_hook, extra=extra or None)
    except ConfigError as e:
        if e.path.startswith(own + "."):
            raise InventoryError(where + e.path[len(own):], e.reason) from None
        raise _as_inventory_error(e) from None


def parse_inventory(text: str | bytes, source: str = "<string>") -> Inventory:
    """Parse inventory YAML (pure; bytes must be UTF-8); an empty document is an empty inventory."""
    try:
        raw = load_yaml(text, source)
    except ConfigError as e:
        raise _as_inventory_error(e) from None
    return inventory_from_doc(raw)


def inventory_from_doc(raw: Any) -> Inventory:
    """The inventory of an already decoded document (the shared state's JSON, sidusd/state), with
    every check and message of :func:`parse_inventory`."""
    try:
        doc = convert(raw, _InventoryFile, error=InventoryError)
    except ConfigError as e:
        raise _as_inventory_error(e) from None
    profiles: dict[str, Profile] = {}
    for name, entry in (doc.profiles or {}).items():
        where = f"profiles.{name}"
        try:
            check_name(where, name, what="profile name")
        except ConfigError as e:
            raise _as_inventory_error(e) from None
        if isinstance(entry, dict) and entry.get("overlay", "tmpfs") in OVERLAYS and entry.get("overlay") != "iscsi":
            for key in ("disk_size_mib", "fallback"):
                if key in entry:
                    raise InventoryError(f"{where}.{key}", "applies to overlay: iscsi only")
        profiles[name] = _entry(entry, Profile, where, "profile", name=name)
    hosts = doc.hosts or []
    if len(hosts) > MAX_HOSTS:
        raise InventoryError("hosts", f"more than {MAX_HOSTS} hosts")
    labelled = [(f"hosts[{i}]", _entry(item, Host, f"hosts[{i}]", "host")) for i, item in enumerate(hosts)]
    _cross_check(profiles, labelled)
    return Inventory(profiles, {h.mac: h for _, h in labelled})


def dump_inventory(inv: Inventory) -> str:
    """YAML text that :func:`parse_inventory` reads back to an equal inventory."""
    doc: dict[str, Any] = {
        "profiles": {p.name: _dump_profile(p) for p in inv.profiles.values()},
        "hosts": [host_doc(h) for h in inv.hosts.values()],
    }
    body = dump_yaml(doc)
    return "# sidus inventory: hosts and profiles (written by sidusd; see `sidusctl hosts`)\n" + body


def host_doc(h: Host) -> dict[str, Any]:
    """Host ``h`` as an inventory file entry (also one row of the shared state, sidusd/state)."""
    entry: dict[str, Any] = {"mac": h.mac, "profile": h.profile}
    if h.hostname is not None:
        entry["hostname"] = h.hostname
    if h.image is not None:
        entry["image"] = h.image
    if h.ip is not None:
        entry["ip"] = str(h.ip)
    if h.append:
        entry["append"] = h.append
    return entry


def _dump_profile(p: Profile) -> dict[str, Any]:
    out: dict[str, Any] = {"image": p.image, "overlay": p.overlay, "append": p.append}
    if p.overlay == "iscsi":
        out["fallback"] = p.fallback
        if p.disk_size_mib is not None:
            out["disk_size_mib"] = p.disk_size_mib
    return out


def check_against(inv: Inventory, config: Config) -> None:
    """Refuse references ``config`` cannot satisfy: images, the default profile, overlays, pool addresses."""
    for name, p in inv.profiles.items():
        if p.image not in config.images:
            raise InventoryError(f"profiles.{name}.image", _unknown_image(p.image, config))
        if p.overlay == "iscsi" and config.iscsi.backend == "none":
            raise InventoryError(f"profiles.{name}.overlay",
                                 "'iscsi' needs an iSCSI target: set iscsi.backend (tgt or lio) in the config")
        if p.overlay == "iscsi" and name == config.boot.default_profile and config.dhcp.unknown_hosts == "default":
            raise InventoryError(f"profiles.{name}.overlay", "'iscsi' gives each listed host its own disk: "
                                 "it cannot be boot.default_profile for unknown machines")
    for mac, h in inv.hosts.items():
        if h.image is not None and h.image not in config.images:
            raise InventoryError(f"hosts[{mac}].image", _unknown_image(h.image, config))
        pool = config.dhcp.pool
        if h.ip is not None and config.dhcp.mode == "full" and pool is not None and h.ip not in pool.network:
            raise InventoryError(f"hosts[{mac}].ip", f"{h.ip} is outside dhcp.pool.network {pool.network}")
    if config.dhcp.unknown_hosts == "default" and config.boot.default_profile not in inv.profiles:
        raise InventoryError(f"profiles.{config.boot.default_profile}",
                             "missing: it is boot.default_profile and dhcp.unknown_hosts is default")


def _unknown_image(name: str, config: Config) -> str:
    return f"unknown image {name!r} (images in the config: {', '.join(config.images) or 'none'})"

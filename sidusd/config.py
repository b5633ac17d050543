"""Strict YAML configuration of sidusd.

:func:`read` does the I/O (one file), :func:`parse` is pure and turns text into
frozen dataclasses.  Every refusal is a :class:`sidusd.errors.ConfigError` whose
``path`` is the dotted key path (``dhcp.pool.range_start``, ``images.demo.kernel``)
and whose ``reason`` says what is wrong and what is accepted.

YAML is read with YAML 1.2 booleans: only ``true``/``false`` are booleans, so
``mode: off`` is the word ``off`` and ``enabled: yes`` is refused, not guessed.
Duplicate keys are refused.  Relative paths resolve against the directory of
the config file (``base_dir``); with ``base_dir=None`` they stay relative.

The schema is documented in ``docs/architecture.md`` and, key by key with
units, in ``config/sidus.yaml``.
"""

from __future__ import annotations

import difflib
import ipaddress
import posixpath
import re
import types
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from sidusd.errors import ConfigError

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

DHCP_MODES = ("proxy", "full", "off")
UNKNOWN_HOSTS = ("default", "ignore")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
NFS_BACKENDS = ("ganesha", "kernel", "none")
MAX_LEASE_TIME_S = 0xFFFFFFFE        # RFC 2132 §9.2: 32-bit seconds, all ones = infinite
MAX_BOOT_FILE_BYTES = 127            # RFC 951 'file' field: 128 bytes including the NUL


@dataclass(frozen=True)
class LogConfig:
    """``log:`` section: output format and minimum level."""
    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True)
class ControlConfig:
    """``control:`` section: the unix socket of ``sidusctl`` (mode 0600)."""
    socket_path: Path = Path("/run/sidus/control.sock")


@dataclass(frozen=True)
class PoolConfig:
    """``dhcp.pool:`` addresses handed out in full-DHCP mode (RFC 2131 §4.3.1)."""
    network: IPv4Network
    range_start: IPv4Address
    range_end: IPv4Address
    router: IPv4Address | None = None
    dns_servers: tuple[IPv4Address, ...] = ()
    domain: str | None = None
    lease_time_s: int = 3600
    lease_file: Path = Path("/var/lib/sidus/leases.jsonl")


@dataclass(frozen=True)
class DhcpConfig:
    """``dhcp:`` section: proxyDHCP (PXE spec 2.1 §2.2.5), full DHCP, or off."""
    mode: str = "proxy"
    interfaces: tuple[str, ...] = ()
    port: int = 67
    pxe_port: int = 4011
    client_port: int = 68
    unknown_hosts: str = "default"
    pool: PoolConfig | None = None


@dataclass(frozen=True)
class BootFiles:
    """Network bootstrap program per client architecture (RFC 4578 §2.1, option 93)."""
    bios: str = "pxelinux.0"
    uefi_x64: str = "syslinux.efi"
    uefi_ia32: str | None = None
    arm64: str | None = None
    ipxe_bios: str = "undionly.kpxe"
    ipxe_efi: str = "snponly.efi"


@dataclass(frozen=True)
class BootConfig:
    """``boot:`` section."""
    default_profile: str = "default"
    boot_files: BootFiles = field(default_factory=BootFiles)
    ipxe_chain: bool = False


@dataclass(frozen=True)
class TftpConfig:
    """``tftp:`` section (RFC 1350; options RFC 2347/2348/2349/7440)."""
    root: Path
    enabled: bool = True
    address: IPv4Address = IPv4Address("0.0.0.0")
    port: int = 69
    max_transfers: int = 512
    max_transfers_per_client: int = 16
    intake_queue: int = 4096
    max_blksize: int = 65464
    max_windowsize: int = 64
    timeout_s: float = 1.0
    retries: int = 5


@dataclass(frozen=True)
class HttpConfig:
    """``http:`` section (iPXE / UEFI HTTP boot)."""
    enabled: bool = False
    address: IPv4Address = IPv4Address("0.0.0.0")
    port: int = 8080


@dataclass(frozen=True)
class NfsConfig:
    """``nfs:`` section: which NFS server exports the image roots."""
    backend: str = "none"
    server_address: IPv4Address | None = None
    mount_options: str = "tcp,vers=3"
    client_networks: tuple[IPv4Network, ...] = ()
    ganesha_config: Path = Path("/etc/ganesha/sidus.conf")
    ganesha_pid_file: Path = Path("/run/ganesha/ganesha.pid")
    exports_file: Path = Path("/etc/exports.d/sidus.exports")


@dataclass(frozen=True)
class ImageConfig:
    """One bootable image: NFS root directory, kernel and initrd (relative to tftp.root)."""
    root: Path
    kernel: str
    initrd: str
    append: str = ""


@dataclass(frozen=True)
class Config:
    """The whole configuration, one immutable snapshot (swapped whole on reload)."""
    tftp: TftpConfig
    state_dir: Path = Path("/var/lib/sidus")
    inventory_file: Path = Path("/var/lib/sidus/inventory.yaml")
    log: LogConfig = field(default_factory=LogConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    dhcp: DhcpConfig = field(default_factory=DhcpConfig)
    boot: BootConfig = field(default_factory=BootConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    nfs: NfsConfig = field(default_factory=NfsConfig)
    images: Mapping[str, ImageConfig] = field(default_factory=lambda: types.MappingProxyType({}))
    source: str = field(default="<string>", compare=False)

    def listener_key(self) -> tuple:
        """Values that only a restart can change (sockets, interfaces, control socket).

        Compare ``old.listener_key() != new.listener_key()`` on reload; see
        :func:`restart_needed` for the names of what changed.
        """
        return tuple(value for _, value in _listener_items(self))


def _listener_items(c: Config) -> list[tuple[str, object]]:
    return [
        ("dhcp.mode", c.dhcp.mode), ("dhcp.interfaces", c.dhcp.interfaces),
        ("dhcp.port", c.dhcp.port), ("dhcp.pxe_port", c.dhcp.pxe_port),
        ("dhcp.client_port", c.dhcp.client_port),
        ("tftp.enabled", c.tftp.enabled), ("tftp.address", c.tftp.address),
        ("tftp.port", c.tftp.port), ("tftp.intake_queue", c.tftp.intake_queue),
        ("http.enabled", c.http.enabled), ("http.address", c.http.address),
        ("http.port", c.http.port), ("control.socket_path", c.control.socket_path),
        ("log.format", c.log.format),
    ]


def restart_needed(old: Config, new: Config) -> list[str]:
    """Dotted names of the keys that changed between ``old`` and ``new`` and need a restart."""
    return [name for (name, a), (_, b) in zip(_listener_items(old), _listener_items(new)) if a != b]


# ---------------------------------------------------------------- I/O

def read(path: Path | str) -> Config:
    """Read and parse the config file ``path``; relative paths inside resolve against its directory."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), "no such file") from None
    except PermissionError:
        raise ConfigError(str(p), "permission denied (cannot read)") from None
    except IsADirectoryError:
        raise ConfigError(str(p), "is a directory, expected a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), f"not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(str(p), f"cannot read: {e.strerror or e}") from None
    return parse(text, source=str(p), base_dir=p.absolute().parent)


# ---------------------------------------------------------------- pure parsing

def parse(text: str, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """Parse configuration ``text`` (pure).  Raises :class:`ConfigError` on the first refusal."""
    root = Section(load_yaml(text, source), "")
    root.allow("state_dir", "inventory_file", "log", "control", "dhcp", "boot", "tftp",
               "http", "nfs", "images")

    def path_of(sec: Section, key: str, default: Path | None = None) -> Path | None:
        raw = sec.get(key, str, None)
        if raw is None:
            return default
        if not raw or "\x00" in raw or "\n" in raw:
            raise ConfigError(sec.key(key), "expected a non-empty path on one line")
        p = Path(posixpath.normpath(raw))
        if not p.is_absolute() and base_dir is not None:
            p = Path(posixpath.normpath(str(Path(base_dir) / p)))
        return p

    state_dir = path_of(root, "state_dir", Path("/var/lib/sidus"))
    inventory_file = path_of(root, "inventory_file", state_dir / "inventory.yaml")

    s = root.section("log")
    s.allow("format", "level")
    log = LogConfig(format=s.enum("format", LOG_FORMATS, "auto"),
                    level=s.enum("level", LOG_LEVELS, "info"))

    s = root.section("control")
    s.allow("socket_path")
    control = ControlConfig(socket_path=path_of(s, "socket_path", ControlConfig.socket_path))

    dhcp = _parse_dhcp(root.section("dhcp"), path_of, state_dir)
    boot = _parse_boot(root.section("boot"))

    s = root.section("tftp", required=True)
    s.allow("enabled", "address", "port", "root", "max_transfers", "max_transfers_per_client",
            "intake_queue", "max_blksize", "max_windowsize", "timeout_s", "retries")
    s.require("root")
    max_transfers = s.int("max_transfers", 512, 1, 1_000_000)
    tftp = TftpConfig(
        enabled=s.get("enabled", bool, True),
        address=s.ipv4("address", IPv4Address("0.0.0.0")),
        port=s.int("port", 69, 1, 65535),
        root=path_of(s, "root"),
        max_transfers=max_transfers,
        max_transfers_per_client=s.int("max_transfers_per_client", 16, 1, max_transfers),
        intake_queue=s.int("intake_queue", 4096, 1, 1_000_000),
        max_blksize=s.int("max_blksize", 65464, 8, 65464),          # RFC 2348 §2
        max_windowsize=s.int("max_windowsize", 64, 1, 65535),       # RFC 7440 §3
        # RFC 2349 §2 negotiates 1..255 s; a shorter local retransmission timer is allowed.
        timeout_s=s.float("timeout_s", 1.0, 0.001, 255.0),
        retries=s.int("retries", 5, 0, 100),
    )

    s = root.section("http")
    s.allow("enabled", "address", "port")
    http = HttpConfig(enabled=s.get("enabled", bool, False),
                      address=s.ipv4("address", IPv4Address("0.0.0.0")),
                      port=s.int("port", 8080, 1, 65535))

    nfs = _parse_nfs(root.section("nfs"), path_of)

    images: dict[str, ImageConfig] = {}
    img_sec = root.section("images")
    for name in img_sec.keys():
        check_name(img_sec.key(name), name, what="image name")
        s = img_sec.section(name, required=True)
        s.allow("root", "kernel", "initrd", "append")
        s.require("root", "kernel", "initrd")
        img_root = path_of(s, "root")
        _check_nfs_path(s.key("root"), img_root)
        images[name] = ImageConfig(root=img_root, kernel=_tftp_relative(s, "kernel"),
                                   initrd=_tftp_relative(s, "initrd"),
                                   append=check_kernel_args(s.key("append"), s.get("append", str, "")))

    return Config(state_dir=state_dir, inventory_file=inventory_file, log=log, control=control,
                  dhcp=dhcp, boot=boot, tftp=tftp, http=http, nfs=nfs,
                  images=types.MappingProxyType(images), source=source)


def _parse_dhcp(s: Section, path_of, state_dir: Path) -> DhcpConfig:
    s.allow("mode", "interfaces", "port", "pxe_port", "client_port", "unknown_hosts", "pool")
    mode = s.enum("mode", DHCP_MODES, "proxy")
    if mode != "off":
        s.require("interfaces")
    interfaces = tuple(s.list("interfaces", str, ()))
    for i, name in enumerate(interfaces):
        _check_ifname(f"{s.key('interfaces')}[{i}]", name)
    if len(set(interfaces)) != len(interfaces):
        raise ConfigError(s.key("interfaces"), "an interface is listed twice")
    if mode != "off" and not interfaces:
        raise ConfigError(s.key("interfaces"), f"empty: list at least one interface when mode is {mode}")
    if mode == "full":
        s.require("pool")
    pool = None
    if s.has("pool"):
        p = s.section("pool", required=True)
        p.allow("network", "range_start", "range_end", "router", "dns_servers", "domain",
                "lease_time_s", "lease_file")
        p.require("network", "range_start", "range_end")
        net = p.ipv4_network("network")
        start, end = p.ipv4("range_start"), p.ipv4("range_end")
        for key, addr in (("range_start", start), ("range_end", end)):
            if addr not in net or addr in (net.network_address, net.broadcast_address):
                raise ConfigError(p.key(key), f"{addr} is not a host address of network {net}")
        if start > end:
            raise ConfigError(p.key("range_start"), f"{start} is after range_end {end}")
        router = p.ipv4("router", None)
        if router is not None and router not in net:
            raise ConfigError(p.key("router"), f"{router} is outside network {net}")
        domain = p.get("domain", str, None)
        if domain is not None:
            for label in domain.rstrip(".").split("."):
                check_name(p.key("domain"), label, what="domain label", dns=True)
        dns = tuple(p.ipv4_list("dns_servers"))
        if len(dns) > 8:
            raise ConfigError(p.key("dns_servers"), "at most 8 servers")
        pool = PoolConfig(network=net, range_start=start, range_end=end, router=router,
                          dns_servers=dns, domain=domain,
                          lease_time_s=p.int("lease_time_s", 3600, 1, MAX_LEASE_TIME_S),
                          lease_file=path_of(p, "lease_file", state_dir / "leases.jsonl"))
    port = s.int("port", 67, 1, 65535)
    pxe_port = s.int("pxe_port", 4011, 1, 65535)
    if pxe_port == port:
        raise ConfigError(s.key("pxe_port"), f"same as dhcp.port ({port})")
    return DhcpConfig(mode=mode, interfaces=interfaces, port=port, pxe_port=pxe_port,
                      client_port=s.int("client_port", 68, 1, 65535),
                      unknown_hosts=s.enum("unknown_hosts", UNKNOWN_HOSTS, "default"), pool=pool)


def _parse_boot(s: Section) -> BootConfig:
    s.allow("default_profile", "boot_files", "ipxe_chain")
    default_profile = s.get("default_profile", str, "default")
    check_name(s.key("default_profile"), default_profile, what="profile name")
    f = s.section("boot_files")
    f.allow("bios", "uefi_x64", "uefi_ia32", "arm64", "ipxe_bios", "ipxe_efi")

    def bf(key: str, default: str | None) -> str | None:
        if f.has(key) and f.raw(key) is None:
            return None
        if not f.has(key):
            return default
        value = _tftp_relative(f, key)
        if len(value.encode()) > MAX_BOOT_FILE_BYTES:
            raise ConfigError(f.key(key), f"longer than {MAX_BOOT_FILE_BYTES} bytes (BOOTP file field)")
        return value

    files = BootFiles(bios=bf("bios", "pxelinux.0"), uefi_x64=bf("uefi_x64", "syslinux.efi"),
                      uefi_ia32=bf("uefi_ia32", None), arm64=bf("arm64", None),
                      ipxe_bios=bf("ipxe_bios", "undionly.kpxe"), ipxe_efi=bf("ipxe_efi", "snponly.efi"))
    for key in ("bios", "uefi_x64", "ipxe_bios", "ipxe_efi"):
        if getattr(files, key) is None:
            raise ConfigError(f.key(key), "cannot be null")
    return BootConfig(default_profile=default_profile, boot_files=files,
                      ipxe_chain=s.get("ipxe_chain", bool, False))


def _parse_nfs(s: Section, path_of) -> NfsConfig:
    s.allow("backend", "server_address", "mount_options", "client_networks", "ganesha_config",
            "ganesha_pid_file", "exports_file")
    backend = s.enum("backend", NFS_BACKENDS, "none")
    opts = s.get("mount_options", str, "tcp,vers=3")
    if not opts or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in opts):
        raise ConfigError(s.key("mount_options"), "expected comma-separated options without spaces")
    nets = tuple(s.list("client_networks", str, ()))
    networks = tuple(s.ipv4_network(f"client_networks[{i}]", value=v) for i, v in enumerate(nets))
    if backend != "none" and not networks:
        raise ConfigError(s.key("client_networks"), f"required when backend is {backend}: "
                          "list the networks allowed to mount the images")
    return NfsConfig(backend=backend, server_address=s.ipv4("server_address", None),
                     mount_options=opts, client_networks=networks,
                     ganesha_config=path_of(s, "ganesha_config", NfsConfig.ganesha_config),
                     ganesha_pid_file=path_of(s, "ganesha_pid_file", NfsConfig.ganesha_pid_file),
                     exports_file=path_of(s, "exports_file", NfsConfig.exports_file))


def _tftp_relative(s: Section, key: str) -> str:
    """A file name served over TFTP: relative, no '..', only ``A-Z a-z 0-9 . _ + ~ / @ = , -``.

    The name goes into DHCP replies, pxelinux files and iPXE scripts (URLs), so it
    stays in a character set that needs no quoting in any of them.
    """
    value = s.get(key, str)
    where = s.key(key)
    if not value:
        raise ConfigError(where, "empty file name")
    if value.startswith("/"):
        raise ConfigError(where, f"{value!r} is absolute; give a path relative to tftp.root")
    if ".." in value.split("/"):
        raise ConfigError(where, f"{value!r} contains '..'; give a path inside tftp.root")
    bad = sorted(set(value) - SAFE_FILE_CHARS)
    if bad:
        raise ConfigError(where, f"{value!r} contains {''.join(bad)!r}: allowed are letters, digits "
                          "and . _ + ~ / @ = , -")
    return posixpath.normpath(value)


SAFE_FILE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+~/@=,-")


def _check_nfs_path(where: str, p: Path) -> None:
    text = str(p)
    if not p.is_absolute():
        raise ConfigError(where, f"{text!r} must be absolute (or relative to the config file)")
    if text == "/":
        raise ConfigError(where, "refusing to export the whole file system '/'")
    bad = sorted(set(text) - (SAFE_FILE_CHARS - {","}))
    if bad:
        raise ConfigError(where, f"{text!r} contains {''.join(bad)!r}: allowed are letters, digits and "
                          ". _ + ~ / @ = - (it goes on the kernel command line as nfsroot=)")


def _check_ifname(where: str, name: str) -> None:
    # Linux dev_valid_name(): 1..15 bytes, no '/', ':' or whitespace, not '.' or '..'.
    if (not name or len(name.encode()) > 15 or name in (".", "..")
            or any(c in "/:" or c.isspace() or ord(c) < 32 for c in name)):
        raise ConfigError(where, f"{name!r} is not a network interface name (1-15 characters, "
                          "no '/', ':' or whitespace)")


# ---------------------------------------------------------------- strict YAML and checked sections
# Shared with sidusd.boot.inventory (same strictness, same error shape).

MAX_DOCUMENT_CHARS = 16 * 1024 * 1024
MAX_LINE_CHARS = 1024
_MISSING: Any = object()
_B = "tag:yaml.org,2002:"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: no yes/no/on/off booleans, no sexagesimal
    integers (a MAC address stays a string), no leading-zero octal, no dates; duplicate keys refused."""

    source = "<string>"

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:
                raise ConfigError(self.source, _mark(key_node.start_mark) + "a key must be a plain value") from None
            if dup:
                raise ConfigError(self.source, _mark(key_node.start_mark) + f"duplicate key {key!r}")
        return super().construct_mapping(node, deep=deep)


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in (_B + "bool", _B + "int", _B + "float", _B + "timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver(_B + "bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_StrictLoader.add_implicit_resolver(
    _B + "int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*|0x[0-9a-fA-F]+|0o[0-7]+)$"), list("-+0123456789"))
_StrictLoader.add_implicit_resolver(
    _B + "float", re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?"
                             r"|[-+]?[0-9]+[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
_StrictLoader.add_constructor(_B + "int", lambda loader, node: int(loader.construct_scalar(node), 0))
_StrictLoader.add_constructor(
    _B + "float", lambda loader, node: float(loader.construct_scalar(node).lower().replace(".inf", "inf")
                                             .replace(".nan", "nan")))


class _QuotingDumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.1 *or* :class:`_StrictLoader` would read as something else."""


for _first, _resolvers in _StrictLoader.yaml_implicit_resolvers.items():
    for _tag, _rx in _resolvers:
        _QuotingDumper.add_implicit_resolver(_tag, _rx, [_first])


def dump_yaml(doc: Any) -> str:
    """YAML text for plain data that reads back identically with :func:`load_yaml` and with yaml.safe_load."""
    return yaml.dump(doc, Dumper=_QuotingDumper, sort_keys=False, default_flow_style=False,
                     width=4096, allow_unicode=False)


def _mark(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def _codepoint(c: int | str) -> str:
    return f"U+{c if isinstance(c, int) else ord(c):04X}"


def load_yaml(text: str, source: str = "<string>") -> Any:
    """Parse one YAML document strictly (see :class:`_StrictLoader`); errors name ``source`` and line/column."""
    if len(text) > MAX_DOCUMENT_CHARS:
        raise ConfigError(source, f"larger than {MAX_DOCUMENT_CHARS} characters")
    loader = None
    try:
        loader = _StrictLoader(text)
        loader.source = source
        return loader.get_single_data()
    except yaml.reader.ReaderError as e:
        raise ConfigError(source, f"character {_codepoint(e.character)} at position {e.position} "
                          "is not allowed in YAML") from None
    except yaml.MarkedYAMLError as e:
        what = f"{e.context}, {e.problem}" if e.context else e.problem
        raise ConfigError(source, _mark(e.problem_mark) + f"YAML syntax error: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(source, f"YAML error: {e}") from None
    except RecursionError:
        raise ConfigError(source, "YAML nesting too deep") from None
    finally:
        if loader is not None:
            loader.dispose()


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean (true or false)",
               float: "a number", list: "a list", dict: "a mapping"}


def describe(value: Any) -> str:
    """How a YAML value reads in an error message: ``integer 5``, ``string 'x'``, ``null``."""
    if value is None:
        return "null"
    for t, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                    (list, "a list"), (dict, "a mapping")):
        if isinstance(value, t):
            return f"{name} {value!r}" if t in (bool, int, float, str) else name
    return type(value).__name__


def check_line(where: str, value: str, max_chars: int = MAX_LINE_CHARS) -> str:
    """Refuse text that is not one line (control, line or paragraph separator characters) or too long."""
    if len(value) > max_chars:
        raise ConfigError(where, f"longer than {max_chars} characters")
    for c in value:
        if unicodedata.category(c) in ("Cc", "Zl", "Zp") and c != " ":
            raise ConfigError(where, f"contains a control character {c!r} (must be one line of text)")
    return value


_KERNEL_ARGS_FORBIDDEN = "$|&\\"


def check_kernel_args(where: str, value: str, max_chars: int = 512) -> str:
    """Kernel arguments: one line of printable ASCII, without ``$ | & \\``.

    The same text goes into a pxelinux ``APPEND`` line and an iPXE ``kernel``
    command; iPXE expands ``${...}`` and treats ``||``/``&&`` as operators, so
    those characters could smuggle commands into the script.
    """
    check_line(where, value, max_chars)
    for c in value:
        if not " " <= c <= "~":
            raise ConfigError(where, f"contains {c!r}: only printable ASCII is allowed in kernel arguments")
        if c in _KERNEL_ARGS_FORBIDDEN:
            raise ConfigError(where, f"contains {c!r}: '$', '|', '&' and '\\' are not allowed in kernel "
                              "arguments (iPXE would interpret them)")
    return value


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DNS_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def check_name(where: str, name: Any, what: str = "name", dns: bool = False) -> str:
    """A name: ``[A-Za-z0-9][A-Za-z0-9_.-]{0,62}``, or an RFC 1123 §2.1 host label when ``dns``."""
    if not isinstance(name, str):
        raise ConfigError(where, f"expected {what} as a string, got {describe(name)}")
    if not (_DNS_LABEL if dns else _NAME).fullmatch(name):
        rule = ("letters, digits and '-', 1-63 characters, not starting or ending with '-' (RFC 1123)"
                if dns else "letters, digits, '_', '.', '-', 1-63 characters, starting with a letter or digit")
        raise ConfigError(where, f"{name!r} is not a valid {what}: {rule}")
    return name


def _osa_distance(a: str, b: str) -> int:
    """Edit distance counting an adjacent transposition as one edit (optimal string alignment)."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def suggest(word: str, choices: tuple[str, ...] | list[str]) -> str | None:
    """The choice closest to a mistyped ``word`` (typos and swapped letters), or None."""
    if not choices or len(word) > 64:
        return None
    best = min(choices, key=lambda c: (_osa_distance(word, c),
                                       -difflib.SequenceMatcher(None, word, c).ratio()))
    if _osa_distance(word, best) <= max(1, min(len(word), len(best)) // 3):
        return best
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.75)
    return close[0] if close else None


class Section:
    """One YAML mapping being checked; every refusal carries its dotted key path."""

    def __init__(self, data: Any, path: str):
        self.path = path
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(path or "<document>", f"expected a mapping, got {describe(data)}")
        for k in data:
            if not isinstance(k, str):
                raise ConfigError(self.key(str(k)), f"a key must be a string, got {describe(k)}")
        self.data: dict[str, Any] = data

    def key(self, k: str) -> str:
        """Dotted path of key ``k`` in this section."""
        return f"{self.path}.{k}" if self.path else k

    def keys(self) -> list[str]:
        return list(self.data)

    def has(self, k: str) -> bool:
        return k in self.data

    def raw(self, k: str) -> Any:
        return self.data.get(k)

    def allow(self, *allowed: str) -> None:
        """Refuse any key not in ``allowed``, suggesting the closest allowed one."""
        for k in self.data:
            if k not in allowed:
                close = suggest(k, allowed)
                hint = f"did you mean {close}?" if close else "allowed: " + ", ".join(allowed)
                raise ConfigError(self.key(k), f"unknown key ({hint})")

    def require(self, *keys: str) -> None:
        for k in keys:
            if k not in self.data:
                raise ConfigError(self.key(k), "required key is missing")

    def section(self, k: str, required: bool = False) -> "Section":
        if required:
            self.require(k)
        return Section(self.data.get(k), self.key(k))

    def get(self, k: str, kind: type, default: Any = _MISSING) -> Any:
        """Value of ``k`` checked against ``kind`` (bool is not int; int is accepted as float)."""
        if k not in self.data or (self.data[k] is None and default is None):
            if default is _MISSING:
                raise ConfigError(self.key(k), "required key is missing")
            return default
        return _typed(self.key(k), self.data[k], kind)

    def int(self, k: str, default: Any, lo: int, hi: int) -> int:
        v = self.get(k, int, default)
        if not lo <= v <= hi:
            raise ConfigError(self.key(k), f"out of range: must be between {lo} and {hi}, got {v}")
        return v

    def float(self, k: str, default: Any, lo: float, hi: float) -> float:
        v = self.get(k, float, default)
        if not lo <= v <= hi:
            raise ConfigError(self.key(k), f"out of range: must be between {lo} and {hi}, got {v}")
        return v

    def enum(self, k: str, allowed: tuple[str, ...], default: Any = _MISSING) -> str:
        v = self.get(k, str, default)
        if v not in allowed:
            raise ConfigError(self.key(k), f"must be one of: {', '.join(allowed)} (got {v!r})")
        return v

    def list(self, k: str, kind: type, default: Any = _MISSING) -> list:
        v = self.get(k, list, default)
        return [_typed(f"{self.key(k)}[{i}]", item, kind) for i, item in enumerate(v)]

    def ipv4(self, k: str, default: Any = _MISSING) -> Any:
        v = self.get(k, str, default)
        return v if v is None or isinstance(v, IPv4Address) else parse_ipv4(self.key(k), v)

    def ipv4_list(self, k: str) -> list[IPv4Address]:
        return [parse_ipv4(f"{self.key(k)}[{i}]", v) for i, v in enumerate(self.list(k, str, []))]

    def ipv4_network(self, k: str, value: Any = _MISSING) -> IPv4Network:
        where = self.key(k)
        v = self.get(k, str) if value is _MISSING else _typed(where, value, str)
        try:
            return IPv4Network(v, strict=True)
        except ValueError as e:
            raise ConfigError(where, f"not an IPv4 network like 192.168.1.0/24: {v!r} ({e})") from None


def parse_ipv4(where: str, text: str) -> IPv4Address:
    """Dotted-quad IPv4 address (RFC 791), or ConfigError naming ``where``."""
    try:
        return IPv4Address(text)
    except ValueError:
        raise ConfigError(where, f"not an IPv4 address: {text!r}") from None


def _typed(where: str, v: Any, kind: type) -> Any:
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, kind) and not (kind is int and isinstance(v, bool)):
        return v
    raise ConfigError(where, f"expected {_TYPE_NAMES.get(kind, kind.__name__)}, got {describe(v)}")

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

import dataclasses

import ipaddress
import posixpath
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from sidusd.errors import ConfigError
# dump_yaml is re-exported: tests/unit/test_config.py calls config.dump_yaml / config.load_yaml.
from sidusd.yamlstrict import Section, check_kernel_args, check_name, dump_yaml, load_yaml  # noqa: F401

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

DHCP_MODES = ("proxy", "full", "off")
UNKNOWN_HOSTS = ("default", "ignore")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
NFS_BACKENDS = ("ganesha", "kernel", "none")
ISCSI_BACKENDS = ("tgt", "lio", "none")
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
    """``http:`` section (iPXE / UEFI HTTP boot): listener and the server's limits.

    ``max_connections`` open at once, ``max_per_client`` from one client IP
    (over either: 503 + Retry-After), ``idle_timeout_s`` without progress before
    a connection is closed (no complete request, or a response not read).
    """
    enabled: bool = False
    address: IPv4Address = IPv4Address("0.0.0.0")
    port: int = 8080
    max_connections: int = 256
    max_per_client: int = 32
    idle_timeout_s: float = 30.0


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
class IscsiConfig:
    """``iscsi:`` section: per-host disks of persistent machines (RFC 3720 targets)."""
    backend: str = "none"
    state_dir: Path = Path("/var/lib/sidus/iscsi")
    secrets_file: Path = Path("/var/lib/sidus/iscsi/secrets.json")
    portal: IPv4Address | None = None
    port: int = 3260
    iqn_prefix: str = "iqn.2026-01.org.sidus"
    default_size_mib: int = 1024
    tgt_control_port: int = 0


@dataclass(frozen=True)
class ImageConfig:
    """One bootable image: NFS root directory, kernel and initrd (relative to tftp.root)."""
    root: Path
    kernel: str
    initrd: str
    append: str = ""


@dataclass(frozen=True)
class BootedConfig:
    """Which generation each machine was served (sidusd/boot/booted.py; docs/images.md).

    ``file`` None: not recorded.  Default: ``<state_dir>/booted.json`` when
    ``images_file`` is set (generations exist only with sidus-image), else None.
    ``ttl_s``: a record not served again for that long no longer protects its
    generation (0: forever).  ``max_hosts``: bound on the records kept."""
    file: Path | None = None
    ttl_s: int = 30 * 86400
    max_hosts: int = 10_000


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
    iscsi: IscsiConfig = field(default_factory=IscsiConfig)
    images: Mapping[str, ImageConfig] = field(default_factory=lambda: types.MappingProxyType({}))
    images_file: Path | None = None
    booted: BootedConfig = field(default_factory=BootedConfig)
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
    cfg = parse(text, source=str(p), base_dir=p.absolute().parent)
    if cfg.images_file is None:
        return cfg
    try:
        gen_text = cfg.images_file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return cfg                       # nothing built yet
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(cfg.images_file), f"cannot read the images file: {e}") from None
    return merge_images_file(cfg, gen_text, str(cfg.images_file))


def merge_images_file(config: Config, text: str, source: str) -> Config:
    """``config`` plus the images of the generated images file (``images_file:``, written by
    ``sidus-image``: one ``images:`` mapping, same schema).  Pure; a name defined in both is refused."""
    root = Section(load_yaml(text, source), "")
    root.allow("images")
    base = config.images_file.parent if config.images_file is not None else None
    extra = _parse_images(root.section("images"), _path_resolver(base))
    for name in extra:
        if name in config.images:
            raise ConfigError(f"images.{name}", f"defined both in {config.source} and in {source}")
    return dataclasses.replace(config, images=types.MappingProxyType({**config.images, **extra}))


# ---------------------------------------------------------------- pure parsing

def parse(text: str, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """Parse configuration ``text`` (pure).  Raises :class:`ConfigError` on the first refusal."""
    root = Section(load_yaml(text, source), "")
    root.allow("state_dir", "inventory_file", "log", "control", "dhcp", "boot", "tftp",
               "http", "nfs", "iscsi", "images", "images_file", "booted")
    path_of = _path_resolver(base_dir)

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
    s.allow("enabled", "address", "port", "max_connections", "max_per_client", "idle_timeout_s")
    max_connections = s.int("max_connections", 256, 1, 65535)
    http = HttpConfig(enabled=s.get("enabled", bool, False),
                      address=s.ipv4("address", IPv4Address("0.0.0.0")),
                      port=s.int("port", 8080, 1, 65535),
                      max_connections=max_connections,
                      max_per_client=s.int("max_per_client", min(32, max_connections), 1, max_connections),
                      idle_timeout_s=s.float("idle_timeout_s", 30.0, 0.1, 3600.0))

    nfs = _parse_nfs(root.section("nfs"), path_of)
    iscsi = _parse_iscsi(root.section("iscsi"), path_of, state_dir)

    images = _parse_images(root.section("images"), path_of)
    images_file = path_of(root, "images_file")
    s = root.section("booted")
    s.allow("file", "ttl_s", "max_hosts")
    booted = BootedConfig(
        file=path_of(s, "file", state_dir / "booted.json" if images_file is not None else None),
        ttl_s=s.int("ttl_s", BootedConfig.ttl_s, 0, 10 * 365 * 86400),
        max_hosts=s.int("max_hosts", BootedConfig.max_hosts, 1, 1_000_000))
    return Config(state_dir=state_dir, inventory_file=inventory_file, log=log, control=control,
                  dhcp=dhcp, boot=boot, tftp=tftp, http=http, nfs=nfs, iscsi=iscsi,
                  images=types.MappingProxyType(images), images_file=images_file,
                  booted=booted, source=source)


def _path_resolver(base_dir: Path | None):
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
    return path_of


def _parse_images(img_sec: Section, path_of) -> dict[str, ImageConfig]:
    images: dict[str, ImageConfig] = {}
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
    return images


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


def _parse_iscsi(s: Section, path_of, state_dir: Path) -> IscsiConfig:
    s.allow("backend", "state_dir", "secrets_file", "portal", "port", "iqn_prefix",
            "default_size_mib", "tgt_control_port")
    iscsi_dir = path_of(s, "state_dir", state_dir / "iscsi")
    prefix = s.get("iqn_prefix", str, IscsiConfig.iqn_prefix)
    # RFC 3720 §3.2.6.3.1: "iqn." date "." reversed domain, lower case; the host part is added by sidus
    if len(prefix) > 180 or not re.fullmatch(r"iqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9-]*[a-z0-9])?"
                                              r"(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", prefix):
        raise ConfigError(s.key("iqn_prefix"), f"{prefix!r} is not iqn.YYYY-MM.reversed.domain "
                          "(lower case, e.g. iqn.2026-01.org.example)")
    return IscsiConfig(backend=s.enum("backend", ISCSI_BACKENDS, "none"), state_dir=iscsi_dir,
                       secrets_file=path_of(s, "secrets_file", iscsi_dir / "secrets.json"),
                       portal=s.ipv4("portal", None), port=s.int("port", 3260, 1, 65535),
                       iqn_prefix=prefix,
                       default_size_mib=s.int("default_size_mib", 1024, 16, 16 * 1024 * 1024),
                       tgt_control_port=s.int("tgt_control_port", 0, 0, 32767))   # tgtd -C limit


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

"""The configuration schema of sidusd: frozen dataclasses, each key declared once.

Each field carries its type, its default and its constraint (``Annotated[int,
Meta(ge=1, le=65535)]``, ``Literal[...]``, ``Meta(pattern=...)``):
:func:`sidusd.schema.convert` checks the YAML against these declarations and
:mod:`sidusd.config` adds the rules that join two keys (a range inside its
network, a default that follows ``state_dir``).  The keys, with units, are
documented in ``sidusd/data/sidus.yaml``.

:func:`listener_items` is the one table of the keys that only a restart can
change; :meth:`Config.listener_key`, :func:`restart_needed` and the
supervisor's pinning of those keys are derived from it.
"""

from __future__ import annotations

import ipaddress
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from msgspec import Meta

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

Port = Annotated[int, Meta(ge=1, le=65535)]
Count = Annotated[int, Meta(ge=1, le=1_000_000)]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z"
NAME_RULE = "letters, digits, '_', '.', '-', 1-63 characters, starting with a letter or digit"
ProfileName = Annotated[str, Meta(pattern=NAME_PATTERN,
                                  description="{value!r} is not a valid profile name: " + NAME_RULE)]
WorkerUser = Annotated[str, Meta(
    pattern=r"^(?!root\Z)[a-z_][a-z0-9_-]{0,31}\Z",
    description="{value!r} is not an unprivileged user name (lower-case letters, digits, _ and -, "
                "at most 32, not root)")]
MountOptions = Annotated[str, Meta(pattern=r"^[^\s\x00-\x1f\x7f]+\Z",
                                   description="expected comma-separated options without spaces")]
# RFC 3720 §3.2.6.3.1: "iqn." date "." reversed domain, lower case; the host part is added by sidus
IqnPrefix = Annotated[str, Meta(
    max_length=180,
    pattern=r"^iqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\Z",
    description="{value!r} is not iqn.YYYY-MM.reversed.domain (lower case, e.g. iqn.2026-01.org.example)")]


@dataclass(frozen=True)
class LogConfig:
    """``log:`` section: output format and minimum level."""
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class ControlTcpConfig:
    """``control.tcp:`` the remote control listener, mutual TLS (docs/security.md "Remote control").

    ``admins`` / ``readers``: the client certificates' common names (CN) that may run every op /
    only the read-only ones (sidusd/control/remote_authz.py); any other certificate of
    ``client_ca`` is refused.  The files are checked when the listener starts
    (sidusd/control/tls.py: missing, unreadable, key not matching the certificate)."""
    listen: str
    tls_cert: Path
    tls_key: Path
    client_ca: Path
    admins: tuple[str, ...] = ()
    readers: tuple[str, ...] = ()
    max_connections: Annotated[int, Meta(ge=1, le=1024)] = 16
    handshake_timeout_s: Annotated[float, Meta(ge=0.1, le=300.0)] = 10.0
    read_timeout_s: Annotated[float, Meta(ge=0.1, le=3600.0)] = 60.0

    def __post_init__(self) -> None:
        from sidusd.control.remote_authz import listen_problem, names_problem
        problem = listen_problem(self.listen) or names_problem(self.admins, self.readers)
        if problem:
            raise ValueError(problem)


@dataclass(frozen=True)
class ControlClientConfig:
    """``control.client:`` the certificate ``sidusctl --server`` presents, and the CA it trusts."""
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class ControlConfig:
    """``control:`` section: the unix socket of ``sidusctl`` (mode 0600); optionally the TCP
    listener (``tcp``), the rack servers of ``sidusctl --all`` (``servers``, ``host:port``) and
    the client certificate of ``sidusctl`` (``client``)."""
    socket_path: Path = Path("/run/sidus/control.sock")
    tcp: ControlTcpConfig | None = None
    servers: tuple[str, ...] = ()
    client: ControlClientConfig | None = None


@dataclass(frozen=True)
class SecurityConfig:
    """``security:`` section: privilege separation (docs/security.md, "Least privilege").

    ``privsep: true``: a root supervisor binds the sockets and writes the state;
    the code that parses network input runs in a worker process as
    ``worker_user``, with no capabilities.
    """
    privsep: bool = True
    worker_user: WorkerUser = "sidus"


@dataclass(frozen=True)
class PoolConfig:
    """``dhcp.pool:`` addresses handed out in full-DHCP mode (RFC 2131 §4.3.1)."""
    network: IPv4Network
    range_start: IPv4Address
    range_end: IPv4Address
    router: IPv4Address | None = None
    dns_servers: Annotated[tuple[IPv4Address, ...], Meta(max_length=8, description="at most 8 servers")] = ()
    domain: str | None = None
    lease_time_s: Annotated[int, Meta(ge=1, le=MAX_LEASE_TIME_S)] = 3600
    lease_file: Path = Path("/var/lib/sidus/leases.jsonl")


@dataclass(frozen=True)
class DhcpConfig:
    """``dhcp:`` section: proxyDHCP (PXE spec 2.1 §2.2.5), full DHCP, or off."""
    mode: Literal["proxy", "full", "off"] = "proxy"
    interfaces: tuple[str, ...] = ()
    port: Port = 67
    pxe_port: Port = 4011
    client_port: Port = 68
    unknown_hosts: Literal["default", "ignore"] = "default"
    pool: PoolConfig | None = None
    # answer IPv6 router solicitations on `interfaces` with "no router here" (lifetime 0, no
    # prefix): ends iPXE's ~16 s IPv6 wait on IPv4-only segments (sidusd/net/ra.py)
    ipv6_no_router: bool = False


@dataclass(frozen=True)
class BootFiles:
    """Network bootstrap program per client architecture (RFC 4578 §2.1, option 93)."""
    bios: str = "pxelinux.0"
    uefi_x64: str = "syslinux.efi"
    uefi_ia32: str | None = None
    arm64: str | None = None
    ipxe_bios: str = "undionly.kpxe"
    ipxe_efi: str = "snponly.efi"


Loader = Literal["pxelinux", "grub", "ipxe"]
# UEFI HTTP Boot runs the downloaded file without PXE base code: only iPXE fetches on by itself
HttpLoader = Annotated[str, Meta(pattern=r"^ipxe\Z", description=(
    "{value!r} cannot boot after a UEFI HTTP Boot download (no PXE base code: syslinux.efi and "
    "GRUB's TFTP path find nothing); use ipxe, or null to leave HTTP Boot clients unanswered"))]


@dataclass(frozen=True)
class GrubFiles:
    """``boot.loader.grub:`` the first file of the grub loader per architecture (relative to
    tftp.root): x64 is shim (shim-signed), which loads ``grubx64.efi`` from its own directory."""
    uefi_x64: str | None = "shimx64.efi"
    arm64: str | None = None


@dataclass(frozen=True)
class LoaderConfig:
    """``boot.loader:`` which loader (pxelinux, grub, ipxe) each client gets (sidusd/boot/loaders.py):
    per profile first, then per architecture (null: ``boot_files.<arch>``, or iPXE with
    ``boot.ipxe_chain``); UEFI HTTP Boot clients get ``http`` unless their choice is ipxe."""
    bios: Loader | None = None
    uefi_x64: Loader | None = None
    uefi_ia32: Loader | None = None
    arm64: Loader | None = None
    profiles: Mapping[ProfileName, Loader] = field(default_factory=lambda: types.MappingProxyType({}))
    http: HttpLoader | None = "ipxe"
    grub: GrubFiles = field(default_factory=GrubFiles)
    # GRUB loads kernel and initrd from (http,<server>:<http.port>) when it can load its http
    # module (not Debian's signed GRUB under Secure Boot: TFTP then); needs http.enabled
    grub_http: bool = False


@dataclass(frozen=True)
class BootConfig:
    """``boot:`` section."""
    default_profile: ProfileName = "default"
    boot_files: BootFiles = field(default_factory=BootFiles)
    ipxe_chain: bool = False
    loader: LoaderConfig = field(default_factory=LoaderConfig)


@dataclass(frozen=True)
class TftpConfig:
    """``tftp:`` section (RFC 1350; options RFC 2347/2348/2349/7440)."""
    root: Path
    enabled: bool = True
    address: IPv4Address = IPv4Address("0.0.0.0")
    port: Port = 69
    max_transfers: Count = 512
    max_transfers_per_client: int = 16      # 1..max_transfers
    intake_queue: Count = 4096
    max_blksize: Annotated[int, Meta(ge=8, le=65464)] = 65464       # RFC 2348 §2
    fragment: bool = False      # grant blocks over the interface MTU - 32 (IP fragments them)
    max_windowsize: Annotated[int, Meta(ge=1, le=65535)] = 64       # RFC 7440 §3
    # RFC 2349 §2 negotiates 1..255 s; a shorter local retransmission timer is allowed.
    timeout_s: Annotated[float, Meta(ge=0.001, le=255.0)] = 1.0
    retries: Annotated[int, Meta(ge=0, le=100)] = 5
    # The longest a peer may make no progress, in all, whatever timeout it negotiated.
    max_silence_s: Annotated[float, Meta(ge=0.1, le=3600.0)] = 30.0
    # processes beside the worker that carry file transfers (net/tftp_pushers.py); auto: CPUs - 1, <= 4
    pushers: Literal["auto"] | Annotated[int, Meta(ge=0, le=16)] = 0


@dataclass(frozen=True)
class HttpConfig:
    """``http:`` section (iPXE / UEFI HTTP boot): listener and the server's limits.

    ``max_connections`` open at once, ``max_per_client`` from one client IP
    (over either: 503 + Retry-After), ``idle_timeout_s`` without progress before
    a connection is closed (no complete request, or a response not read),
    ``header_timeout_s`` for the first request headers of a new connection.
    """
    enabled: bool = False
    address: IPv4Address = IPv4Address("0.0.0.0")
    port: Port = 8080
    max_connections: Port = 256
    max_per_client: int = 32                # 1..max_connections; default min(32, max_connections)
    idle_timeout_s: Annotated[float, Meta(ge=0.1, le=3600.0)] = 30.0
    header_timeout_s: Annotated[float, Meta(ge=0.1, le=3600.0)] = 10.0   # first request headers of a connection


@dataclass(frozen=True)
class NfsConfig:
    """``nfs:`` section: which NFS server exports the image roots."""
    backend: Literal["ganesha", "kernel", "none"] = "none"
    server_address: IPv4Address | None = None
    mount_options: MountOptions = "tcp,vers=3"
    client_networks: tuple[IPv4Network, ...] = ()
    ganesha_config: Path = Path("/etc/ganesha/sidus.conf")
    ganesha_pid_file: Path = Path("/run/ganesha/ganesha.pid")
    exports_file: Path = Path("/etc/exports.d/sidus.exports")


@dataclass(frozen=True)
class IscsiConfig:
    """``iscsi:`` section: per-host disks of persistent machines (RFC 3720 targets)."""
    backend: Literal["tgt", "lio", "none"] = "none"
    state_dir: Path = Path("/var/lib/sidus/iscsi")
    secrets_file: Path = Path("/var/lib/sidus/iscsi/secrets.json")
    portal: IPv4Address | None = None
    port: Port = 3260
    iqn_prefix: IqnPrefix = "iqn.2026-01.org.sidus"
    default_size_mib: Annotated[int, Meta(ge=16, le=16 * 1024 * 1024)] = 1024
    tgt_control_port: Annotated[int, Meta(ge=0, le=32767)] = 0     # tgtd -C limit


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
    ttl_s: Annotated[int, Meta(ge=0, le=10 * 365 * 86400)] = 30 * 86400
    max_hosts: Count = 10_000


@dataclass(frozen=True)
class MetricsConfig:
    """``metrics:`` the Prometheus endpoint (sidusd/metrics.py; docs/operations.md "Monitoring").

    Off by default; when on, ``http://<address>:<port>/metrics`` (text
    exposition format), bound to the loopback address unless configured."""
    enabled: bool = False
    address: IPv4Address = IPv4Address("127.0.0.1")
    port: Port = 9743


@dataclass(frozen=True)
class WebConfig:
    """``web:`` the read-only web page of the room (sidusd/web.py; docs/operations.md "Monitoring"),
    served on the monitoring endpoint (``metrics.address:port``, loopback unless configured)."""
    enabled: bool = False


@dataclass(frozen=True)
class HistoryConfig:
    """``history:`` the boot history journal (sidusd/history.py): ``sidusctl clients`` survives a
    restart.  ``file`` None: ``<state_dir>/history.jsonl``."""
    enabled: bool = True
    file: Path | None = None


@dataclass(frozen=True)
class StateConfig:
    """``state:`` where hosts, profiles and images come from (sidusd/state; docs/scale.md).

    ``backend: yaml`` (default): ``inventory_file`` and ``images:``, no database.
    ``backend: postgresql``: the shared state at ``dsn`` (a libpq connection string), held in
    memory and in ``local_copy`` (None: ``<state_dir>/state-snapshot.json``), read from there at
    start when the database is down; boot events queued (at most ``queue_max``, the oldest
    dropped and counted) and written in batches of up to ``batch_max`` every ``flush_interval_s``.
    ``server_name``: this rack server's name in the events (None: the host name)."""
    backend: Literal["yaml", "postgresql"] = "yaml"
    dsn: str | None = None
    local_copy: Path | None = None
    queue_max: Count = 10_000
    batch_max: Annotated[int, Meta(ge=1, le=10_000)] = 500
    flush_interval_s: Annotated[float, Meta(ge=0.01, le=3600)] = 1.0
    poll_s: Annotated[float, Meta(ge=0.1, le=3600)] = 30.0
    connect_timeout_s: Annotated[float, Meta(ge=1, le=300)] = 5.0
    server_name: str | None = None

    def __post_init__(self) -> None:
        if self.backend == "postgresql" and not self.dsn:
            raise ValueError("state.dsn is required when state.backend is postgresql "
                             "(e.g. 'host=db.example dbname=sidus user=sidus')")


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
    security: SecurityConfig = field(default_factory=SecurityConfig)
    images: Mapping[str, ImageConfig] = field(default_factory=lambda: types.MappingProxyType({}))
    images_file: Path | None = None
    booted: BootedConfig = field(default_factory=BootedConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    web: WebConfig = field(default_factory=WebConfig)
    state: StateConfig = field(default_factory=StateConfig)
    source: str = field(default="<string>", compare=False)

    def listener_key(self) -> tuple:
        """Values that only a restart can change (sockets, interfaces, control socket).

        Compare ``old.listener_key() != new.listener_key()`` on reload; see
        :func:`restart_needed` for the names of what changed.
        """
        return tuple(value for _, value in listener_items(self))


def listener_items(c: Config) -> list[tuple[str, object]]:
    """(dotted key, value) of every key that only a restart can change, in a fixed order."""
    return [
        ("dhcp.mode", c.dhcp.mode), ("dhcp.interfaces", c.dhcp.interfaces),
        ("dhcp.port", c.dhcp.port), ("dhcp.pxe_port", c.dhcp.pxe_port),
        ("dhcp.client_port", c.dhcp.client_port), ("dhcp.ipv6_no_router", c.dhcp.ipv6_no_router),
        ("tftp.enabled", c.tftp.enabled), ("tftp.address", c.tftp.address),
        ("tftp.port", c.tftp.port), ("tftp.intake_queue", c.tftp.intake_queue),
        ("tftp.pushers", c.tftp.pushers),
        ("http.enabled", c.http.enabled), ("http.address", c.http.address),
        ("http.port", c.http.port), ("control.socket_path", c.control.socket_path),
        ("control.tcp", c.control.tcp), ("log.format", c.log.format),
        ("security.privsep", c.security.privsep), ("security.worker_user", c.security.worker_user),
        ("metrics.enabled", c.metrics.enabled), ("metrics.address", c.metrics.address),
        ("metrics.port", c.metrics.port), ("history.enabled", c.history.enabled),
        ("history.file", c.history.file), ("web.enabled", c.web.enabled),
        ("state.backend", c.state.backend), ("state.dsn", c.state.dsn),
    ]


_listener_items = listener_items         # the name before #21


def restart_needed(old: Config, new: Config) -> list[str]:
    """Dotted names of the keys that changed between ``old`` and ``new`` and need a restart."""
    return [name for (name, a), (_, b) in zip(listener_items(old), listener_items(new), strict=True) if a != b]

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
units, in ``sidusd/data/sidus.yaml``.
"""

from __future__ import annotations

import dataclasses
import posixpath
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidusd.boot.cmdline import check_append
from sidusd.boot.names import image_root_problem
from sidusd.config_schema import (  # noqa: F401  (the schema's names are this module's public names)
    DHCP_MODES,
    ISCSI_BACKENDS,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_BOOT_FILE_BYTES,
    MAX_LEASE_TIME_S,
    NFS_BACKENDS,
    UNKNOWN_HOSTS,
    BootConfig,
    BootedConfig,
    BootFiles,
    Config,
    ControlConfig,
    DhcpConfig,
    GrubFiles,
    HttpConfig,
    ImageConfig,
    IPv4Address,
    IPv4Network,
    IscsiConfig,
    LoaderConfig,
    LogConfig,
    NfsConfig,
    PoolConfig,
    SecurityConfig,
    TftpConfig,
    _listener_items,
    listener_items,
    restart_needed,
)
from sidusd.errors import ConfigError
from sidusd.schema import convert, describe

# dump_yaml is re-exported: tests/unit/test_config.py calls config.dump_yaml / config.load_yaml.
from sidusd.yamlstrict import check_kernel_args, check_name, decode_text, dump_yaml, load_yaml  # noqa: F401

__all__ = [
    "DHCP_MODES", "ISCSI_BACKENDS", "LOG_FORMATS", "LOG_LEVELS", "MAX_BOOT_FILE_BYTES", "MAX_LEASE_TIME_S",
    "NFS_BACKENDS", "UNKNOWN_HOSTS", "BootConfig", "BootedConfig", "BootFiles", "Config", "ControlConfig",
    "GrubFiles", "LoaderConfig",
    "DhcpConfig", "HttpConfig", "ImageConfig", "ImagesFile", "IPv4Address", "IPv4Network", "IscsiConfig",
    "LogConfig", "NfsConfig", "PoolConfig", "SecurityConfig", "TftpConfig", "dump_yaml", "listener_items",
    "load_yaml", "merge_images_file", "parse", "read", "restart_needed"]

SAFE_FILE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+~/@=,-")


# ---------------------------------------------------------------- I/O

def read(path: Path | str) -> Config:
    """Read and parse the config file ``path``; relative paths inside resolve against its directory."""
    p = Path(path)
    try:
        text = decode_text(p.read_bytes(), str(p))
    except FileNotFoundError:
        raise ConfigError(str(p), "no such file") from None
    except PermissionError:
        raise ConfigError(str(p), "permission denied (cannot read)") from None
    except IsADirectoryError:
        raise ConfigError(str(p), "is a directory, expected a YAML file") from None
    except OSError as e:
        raise ConfigError(str(p), f"cannot read: {e.strerror or e}") from None
    cfg = parse(text, source=str(p), base_dir=p.absolute().parent)
    if cfg.images_file is None:
        return cfg
    try:
        gen_bytes = cfg.images_file.read_bytes()
    except FileNotFoundError:
        return cfg                       # nothing built yet
    except OSError as e:
        raise ConfigError(str(cfg.images_file), f"cannot read the images file: {e}") from None
    return merge_images_file(cfg, decode_text(gen_bytes, str(cfg.images_file)), str(cfg.images_file))


@dataclass(frozen=True)
class ImagesFile:
    """The generated images file (``images_file:``, written by ``sidus-image``): one ``images:`` mapping."""
    images: dict[str, Any] | None = None


def merge_images_file(config: Config, text: str, source: str) -> Config:
    """``config`` plus the images of the generated images file (same schema as ``images:``).
    Pure; a name defined in both is refused."""
    raw = convert(load_yaml(text, source), ImagesFile).images
    base = config.images_file.parent if config.images_file is not None else None
    extra = _parse_images(raw, _dec_hook(base))
    for name in extra:
        if name in config.images:
            raise ConfigError(f"images.{name}", f"defined both in {config.source} and in {source}")
    return dataclasses.replace(config, images=types.MappingProxyType({**config.images, **extra}))


# ---------------------------------------------------------------- pure parsing

def parse(text: str, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """Parse configuration ``text`` (pure).  Raises :class:`ConfigError` on the first refusal."""
    raw = load_yaml(text, source)
    hook = _dec_hook(base_dir)
    raw_images = raw.get("images") if isinstance(raw, dict) else None
    if isinstance(raw, dict):
        raw = {k: v for k, v in raw.items() if k != "images"}
    cfg = convert(raw, Config, dec_hook=hook, skip=frozenset({"source"}))
    images = _parse_images(raw_images, hook)
    return _complete(cfg, raw, images, source)


def _given(raw: Any, dotted: str) -> bool:
    """Whether the document set ``dotted`` (a null is not a value: the key takes its default)."""
    for k in dotted.split("."):
        raw = raw.get(k) if isinstance(raw, dict) else None
    return raw is not None


def _dec_hook(base_dir: Path | None) -> Callable[[type, Any], Any]:
    """How the YAML strings become paths (resolved against ``base_dir``), addresses and networks."""
    def hook(tp: type, v: Any) -> Any:
        if tp not in (Path, IPv4Address, IPv4Network):
            raise NotImplementedError(tp)
        if not isinstance(v, str):
            raise TypeError(f"expected a string, got {describe(v)}")
        if tp is IPv4Address:
            try:
                return IPv4Address(v)
            except ValueError:
                raise ValueError(f"not an IPv4 address: {v!r}") from None
        if tp is IPv4Network:
            try:
                return IPv4Network(v, strict=True)
            except ValueError as e:
                raise ValueError(f"not an IPv4 network like 192.168.1.0/24: {v!r} ({e})") from None
        if not v or "\x00" in v or "\n" in v:
            raise ValueError("expected a non-empty path on one line")
        p = posixpath.normpath(v)
        if not p.startswith("/") and base_dir is not None:
            p = posixpath.normpath(str(Path(base_dir) / p))
        return Path(p)
    return hook


def _complete(c: Config, raw: dict[str, Any], images: dict[str, ImageConfig], source: str) -> Config:
    """The rules that join two keys, and the defaults that follow another key (a file keeps the
    name of its declared default, in the directory the document chose: ``state_dir: /data``
    moves ``inventory_file`` to ``/data/inventory.yaml``)."""
    state = c.state_dir
    t, h = c.tftp, c.http
    if not 1 <= t.max_transfers_per_client <= t.max_transfers:
        raise ConfigError("tftp.max_transfers_per_client", "out of range: must be between 1 and "
                          f"{t.max_transfers}, got {t.max_transfers_per_client}")
    per_client = (h.max_per_client if _given(raw, "http.max_per_client")
                  else min(HttpConfig.max_per_client, h.max_connections))
    if not 1 <= per_client <= h.max_connections:
        raise ConfigError("http.max_per_client", "out of range: must be between 1 and "
                          f"{h.max_connections}, got {per_client}")
    if c.boot.ipxe_chain and not c.http.enabled:
        raise ConfigError("boot.ipxe_chain", "needs http.enabled: true (a chained iPXE is given its script as "
                          "http://<server>:<http.port>/boot/<mac>.ipxe); enable http or set ipxe_chain: false")
    if c.boot.loader.grub_http and not c.http.enabled:
        raise ConfigError("boot.loader.grub_http", "needs http.enabled: true (GRUB is told to load the kernel "
                          "from (http,<server>:<http.port>)); enable http or set grub_http: false")
    if c.nfs.backend != "none" and not c.nfs.client_networks:
        raise ConfigError("nfs.client_networks", f"required when backend is {c.nfs.backend}: "
                          "list the networks allowed to mount the images")
    iscsi_dir = c.iscsi.state_dir if _given(raw, "iscsi.state_dir") else state / IscsiConfig.state_dir.name
    secrets = c.iscsi.secrets_file if _given(raw, "iscsi.secrets_file") else iscsi_dir / IscsiConfig.secrets_file.name
    booted_file = c.booted.file if _given(raw, "booted.file") else (
        state / "booted.json" if c.images_file is not None else None)
    return dataclasses.replace(
        c, inventory_file=c.inventory_file if _given(raw, "inventory_file") else state / Config.inventory_file.name,
        dhcp=_check_dhcp(c.dhcp, raw, state), boot=_check_boot(c.boot),
        http=dataclasses.replace(h, max_per_client=per_client),
        iscsi=dataclasses.replace(c.iscsi, state_dir=iscsi_dir, secrets_file=secrets),
        images=types.MappingProxyType(images), booted=dataclasses.replace(c.booted, file=booted_file),
        source=source)


def _parse_images(raw: Any, hook: Callable[[type, Any], Any]) -> dict[str, ImageConfig]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("images", f"expected a mapping, got {describe(raw)}")
    images: dict[str, ImageConfig] = {}
    for name, entry in raw.items():
        where = f"images.{name}"
        check_name(where, name, what="image name")
        img = convert(entry, ImageConfig, where, dec_hook=hook)
        problem = image_root_problem(str(img.root))
        if problem is not None:
            raise ConfigError(f"{where}.root", problem)
        images[name] = dataclasses.replace(
            img, kernel=_tftp_relative(f"{where}.kernel", img.kernel),
            initrd=_tftp_relative(f"{where}.initrd", img.initrd),
            append=check_append(f"{where}.append", img.append))
    return images


def _check_dhcp(d: DhcpConfig, raw: dict[str, Any], state_dir: Path) -> DhcpConfig:
    if d.mode != "off" and not _given(raw, "dhcp.interfaces"):
        raise ConfigError("dhcp.interfaces", "required key is missing")
    for i, name in enumerate(d.interfaces):
        _check_ifname(f"dhcp.interfaces[{i}]", name)
    if len(set(d.interfaces)) != len(d.interfaces):
        raise ConfigError("dhcp.interfaces", "an interface is listed twice")
    if d.mode != "off" and not d.interfaces:
        raise ConfigError("dhcp.interfaces", f"empty: list at least one interface when mode is {d.mode}")
    if d.mode == "full" and d.pool is None:
        raise ConfigError("dhcp.pool", "required key is missing")
    if d.pxe_port == d.port:
        raise ConfigError("dhcp.pxe_port", f"same as dhcp.port ({d.port})")
    p = d.pool
    if p is None:
        return d
    net = p.network
    for key, addr in (("range_start", p.range_start), ("range_end", p.range_end)):
        if addr not in net or addr in (net.network_address, net.broadcast_address):
            raise ConfigError(f"dhcp.pool.{key}", f"{addr} is not a host address of network {net}")
    if p.range_start > p.range_end:
        raise ConfigError("dhcp.pool.range_start", f"{p.range_start} is after range_end {p.range_end}")
    if p.router is not None and p.router not in net:
        raise ConfigError("dhcp.pool.router", f"{p.router} is outside network {net}")
    if p.domain is not None:
        for label in p.domain.rstrip(".").split("."):
            check_name("dhcp.pool.domain", label, what="domain label", dns=True)
    lease_file = p.lease_file if _given(raw, "dhcp.pool.lease_file") else state_dir / PoolConfig.lease_file.name
    return dataclasses.replace(d, pool=dataclasses.replace(p, lease_file=lease_file))


def _check_boot(b: BootConfig) -> BootConfig:
    files = {}
    for f in dataclasses.fields(BootFiles):
        value = getattr(b.boot_files, f.name)
        if value is not None:
            where = f"boot.boot_files.{f.name}"
            value = _tftp_relative(where, value)
            if len(value.encode()) > MAX_BOOT_FILE_BYTES:
                raise ConfigError(where, f"longer than {MAX_BOOT_FILE_BYTES} bytes (BOOTP file field)")
        files[f.name] = value
    grub = {}
    for f in dataclasses.fields(GrubFiles):         # boot.loader.grub: the same rules
        value = getattr(b.loader.grub, f.name)
        if value is not None:
            where = f"boot.loader.grub.{f.name}"
            value = _tftp_relative(where, value)
            if len(value.encode()) > MAX_BOOT_FILE_BYTES:
                raise ConfigError(where, f"longer than {MAX_BOOT_FILE_BYTES} bytes (BOOTP file field)")
        grub[f.name] = value
    loader = dataclasses.replace(b.loader, grub=GrubFiles(**grub))
    return dataclasses.replace(b, boot_files=BootFiles(**files), loader=loader)


def _tftp_relative(where: str, value: str) -> str:
    """A file name served over TFTP: relative, no '..', only ``A-Z a-z 0-9 . _ + ~ / @ = , -``.

    The name goes into DHCP replies, pxelinux files and iPXE scripts (URLs), so it
    stays in a character set that needs no quoting in any of them.
    """
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


def _check_ifname(where: str, name: str) -> None:
    # Linux dev_valid_name(): 1..15 bytes, no '/', ':' or whitespace, not '.' or '..'.
    if (not name or len(name.encode()) > 15 or name in (".", "..")
            or any(c in "/:" or c.isspace() or ord(c) < 32 for c in name)):
        raise ConfigError(where, f"{name!r} is not a network interface name (1-15 characters, "
                          "no '/', ':' or whitespace)")

"""The one configuration of the command-line tools: ``sidusctl`` and ``sidus-image`` read the
daemon's own config file for the control socket, the TFTP root, the images directory and the
images file, so that a documented install needs no other flag.

Which file: ``--config FILE``, else ``$SIDUS_CONFIG``, else ``/etc/sidus/sidus.yaml`` (the
daemon's default).  Each value: its own flag, else its environment variable where it has one
(``SIDUS_SOCKET``, ``SIDUS_TFTP_ROOT``, ``SIDUS_IMAGES_DIR``), else the config file.  The file is
read only when a value is taken from it; then a missing or bad file is an error that names the
file, where its name came from, and the way out (:class:`ToolConfigError`).

Only the file itself is parsed (:func:`sidusd.config.parse`): the generated images file and the
inventory are not needed to find a socket or a directory, and a broken one must not lock the
operator out of ``sidusctl status`` or ``sidus-image rollback``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sidusd.errors import ConfigError

if TYPE_CHECKING:
    from sidusd.config import Config

CONFIG_ENV = "SIDUS_CONFIG"
DEFAULT_CONFIG = Path("/etc/sidus/sidus.yaml")


class ToolConfigError(Exception):
    """The config file a tool needs cannot be used; the message says which, why and what to do."""


@dataclass(frozen=True)
class ConfigSource:
    """The config file a tool reads and where that name came from (for messages)."""
    path: Path
    origin: str             # "--config", "$SIDUS_CONFIG" or "default"

    def describe(self) -> str:
        return {"--config": f"{self.path} (--config)", "default": f"{self.path} (the default)"}.get(
            self.origin, f"{self.path} (${CONFIG_ENV})")


def config_source(flag: str | Path | None, environ: Mapping[str, str] | None = None) -> ConfigSource:
    """``--config`` > ``$SIDUS_CONFIG`` > /etc/sidus/sidus.yaml."""
    env = os.environ if environ is None else environ
    if flag:
        return ConfigSource(Path(flag), "--config")
    if env.get(CONFIG_ENV):
        return ConfigSource(Path(env[CONFIG_ENV]), CONFIG_ENV)
    return ConfigSource(DEFAULT_CONFIG, "default")


def read_config(src: ConfigSource, needed_for: str, instead: str) -> Config:
    """Parse the config file of ``src`` (the file only, not its images file).

    ``needed_for`` says what the tool wanted from it, ``instead`` the flags that would do without
    it; both go into the message of the :class:`ToolConfigError` raised for a missing, unreadable
    or invalid file."""
    from sidusd import config as config_mod
    p = src.path
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ToolConfigError(f"{src.describe()}: no such file; it gives {needed_for}. Install the daemon's "
                              f"config there, or give --config FILE / ${CONFIG_ENV}, or {instead}") from None
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise ToolConfigError(f"{src.describe()}: cannot read it ({why}); it gives {needed_for}") from None
    try:
        return config_mod.parse(text, source=str(p), base_dir=p.absolute().parent)
    except ConfigError as e:
        raise ToolConfigError(f"{src.describe()}: invalid: {e} (`sidusd --check --config {p}` shows the "
                              f"same; it gives {needed_for})") from None


def control_socket(flag: str | None, config_flag: str | Path | None,
                   environ: Mapping[str, str] | None = None) -> str:
    """sidusd's control socket: ``--socket`` > ``$SIDUS_SOCKET`` > ``control.socket_path`` of the
    config file (:func:`config_source`), which must then exist and be valid."""
    from sidusd.control import SOCKET_ENV
    env = os.environ if environ is None else environ
    if flag:
        return flag
    if env.get(SOCKET_ENV):
        return env[SOCKET_ENV]
    cfg = read_config(config_source(config_flag, env), "the control socket (control.socket_path)",
                      f"--socket PATH / ${SOCKET_ENV}")
    return str(cfg.control.socket_path)


@dataclass(frozen=True)
class ImagePaths:
    """Where ``sidus-image`` works; ``config`` is the config file it read (None: none needed)."""
    images_dir: Path
    tftp_root: Path
    images_file: Path
    control_socket: Path | None
    config: Path | None


def image_paths(*, images_dir: Path | None, tftp_root: Path | None, images_file: Path | None,
                control_socket: Path | None, config_flag: Path | None,
                environ: Mapping[str, str] | None = None) -> ImagePaths:
    """Each value: its flag, else its environment variable, else the daemon's config:

    * the images directory: ``$SIDUS_IMAGES_DIR``, else the directory of ``images_file``;
    * the TFTP root: ``$SIDUS_TFTP_ROOT``, else ``tftp.root``;
    * the images file: the config's ``images_file`` when the images directory is the config's
      too, else ``<images dir>/images.yaml``;
    * the control socket (``sidusctl reload`` after a switch): ``$SIDUS_SOCKET``, else
      ``control.socket_path`` when the config is read (the caller skips the reload while that
      socket does not exist: no sidusd runs, it reads the images file when it starts).

    The config is read when a value comes from it, or when it is named (``--config``,
    ``$SIDUS_CONFIG``: ``list`` and ``gc`` use its inventory and booted records)."""
    from sidusd.control import SOCKET_ENV
    env = os.environ if environ is None else environ
    images_dir = images_dir or (Path(env["SIDUS_IMAGES_DIR"]) if env.get("SIDUS_IMAGES_DIR") else None)
    tftp_root = tftp_root or (Path(env["SIDUS_TFTP_ROOT"]) if env.get("SIDUS_TFTP_ROOT") else None)
    control_socket = control_socket or (Path(env[SOCKET_ENV]) if env.get(SOCKET_ENV) else None)
    src = config_source(config_flag, env)
    if images_dir is not None and tftp_root is not None and src.origin == "default":
        return ImagePaths(images_dir, tftp_root, images_file or images_dir / "images.yaml", control_socket, None)
    cfg = read_config(src, "the images directory (beside images_file), tftp.root and control.socket_path",
                      "give --images-dir and --tftp-root")
    if images_dir is None:
        if cfg.images_file is None:
            raise ToolConfigError(f"{src.describe()}: images_file is not set; sidus-image publishes its images "
                                  "through it and keeps them beside it (e.g. images_file: "
                                  "/var/lib/sidus/images/images.yaml), or give --images-dir")
        images_dir = cfg.images_file.parent
        images_file = images_file or cfg.images_file
    return ImagePaths(images_dir, tftp_root or cfg.tftp.root, images_file or images_dir / "images.yaml",
                      control_socket or cfg.control.socket_path, src.path)


SERVER_ENV = "SIDUS_SERVER"         # host:port[,host:port...]: sidusctl talks TCP (mutual TLS) to these
CERT_ENV, KEY_ENV, CA_ENV = "SIDUS_CERT", "SIDUS_KEY", "SIDUS_CA"


@dataclass(frozen=True)
class ClientTls:
    """The certificate and key ``sidusctl`` presents to a remote sidusd, and the CA it trusts."""
    cert: Path
    key: Path
    ca: Path


def remote_servers(flags: list[str] | None, all_servers: bool, config_flag: str | Path | None,
                   environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The rack servers to talk to over TCP; () for the local unix socket.

    ``--all``: every server of ``control.servers`` in the config file; else each ``--server``,
    else ``$SIDUS_SERVER`` (comma-separated)."""
    env = os.environ if environ is None else environ
    if all_servers:
        if flags:
            raise ToolConfigError("--all and --server: give one of them (--all is every control.servers entry)")
        cfg = read_config(config_source(config_flag, env), "the rack servers of --all (control.servers)",
                          "name them with --server HOST:PORT (repeatable)")
        if not cfg.control.servers:
            raise ToolConfigError(f"{config_source(config_flag, env).describe()}: control.servers is empty; "
                                  "--all runs the command on each server listed there")
        return tuple(cfg.control.servers)
    if flags:
        return tuple(flags)
    return tuple(s.strip() for s in env.get(SERVER_ENV, "").split(",") if s.strip())


def client_tls(cert: str | None, key: str | None, ca: str | None, config_flag: str | Path | None,
               environ: Mapping[str, str] | None = None) -> ClientTls:
    """Each of ``--cert`` / ``--key`` / ``--ca``: the flag, else ``$SIDUS_CERT`` / ``$SIDUS_KEY`` /
    ``$SIDUS_CA``, else ``control.client`` of the config file (read only when one is missing)."""
    env = os.environ if environ is None else environ
    vals = [cert or env.get(CERT_ENV), key or env.get(KEY_ENV), ca or env.get(CA_ENV)]
    if all(vals):
        return ClientTls(*(Path(v) for v in vals if v))
    src = config_source(config_flag, env)
    cfg = read_config(src, "the client certificate of sidusctl (control.client: cert, key, ca)",
                      f"give --cert/--key/--ca or ${CERT_ENV}/${KEY_ENV}/${CA_ENV}")
    cc = cfg.control.client
    if cc is None:
        raise ToolConfigError(f"{src.describe()}: no control.client (cert, key, ca): sidusctl needs a client "
                              f"certificate for --server; give --cert/--key/--ca or ${CERT_ENV}/${KEY_ENV}/${CA_ENV}")
    return ClientTls(Path(vals[0] or cc.cert), Path(vals[1] or cc.key), Path(vals[2] or cc.ca))

"""TLS contexts of the remote control plane (stdlib :mod:`ssl`), and the checks of their files.

Server side (:func:`server_context`): TLS 1.2 at least, the certificate and key of
``control.tcp.tls_cert`` / ``tls_key``, a client certificate REQUIRED and verified against
``control.tcp.client_ca`` (mutual TLS).  Client side (:func:`client_context`): the server's
certificate verified against the CA, its name checked against the address dialled.
Every unusable file is a :class:`~sidusd.errors.ConfigError` naming the key and why: missing,
unreadable, not a certificate, a key that does not match the certificate.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from ..errors import ConfigError


def _readable(key: str, path: Path, what: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except FileNotFoundError:
        raise ConfigError(key, f"{path}: no such file (the {what}; sidusctl pki makes one)") from None
    except OSError as exc:
        raise ConfigError(key, f"{path}: cannot read it ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in head:
        raise ConfigError(key, f"{path}: not a PEM file (the {what})")


def _check_key_mode(key: str, path: Path) -> None:
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(key, f"{path}: open to group or others (mode {oct(mode)}); chmod 600 it")


def _base(protocol: ssl._SSLMethod) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)          # no system CA loaded: only the site's CA is trusted
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _load_chain(ctx: ssl.SSLContext, prefix: str, cert: Path, key: Path, cert_key: str, key_key: str) -> None:
    _readable(f"{prefix}.{cert_key}", cert, "certificate")
    _readable(f"{prefix}.{key_key}", key, "private key")
    _check_key_mode(f"{prefix}.{key_key}", key)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        text = str(exc)
        if "KEY_VALUES_MISMATCH" in text or "key values mismatch" in text:
            raise ConfigError(f"{prefix}.{key_key}", f"{key} is not the key of the certificate {cert}") from None
        raise ConfigError(f"{prefix}.{cert_key}", f"{cert} / {key}: not a certificate and its key "
                                                  f"({exc.reason or text})") from None


def _load_ca(ctx: ssl.SSLContext, key: str, ca: Path) -> None:
    _readable(key, ca, "CA certificate")
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as exc:
        raise ConfigError(key, f"{ca}: not a CA certificate ({exc.reason or exc})") from None


def server_context(tcp: object, prefix: str = "control.tcp") -> ssl.SSLContext:
    """The listener's context for a ``ControlTcpConfig``; ConfigError for an unusable file."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(ctx, prefix, tcp.tls_cert, tcp.tls_key, "tls_cert", "tls_key")  # type: ignore[attr-defined]
    _load_ca(ctx, f"{prefix}.client_ca", tcp.client_ca)                           # type: ignore[attr-defined]
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cert: Path, key: Path, ca: Path, prefix: str = "control.client") -> ssl.SSLContext:
    """sidusctl's context: its certificate, the site CA, the server's name checked."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    _load_ca(ctx, f"{prefix}.ca", ca)
    _load_chain(ctx, prefix, cert, key, "cert", "key")
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx

"""Wire format of the control socket: versioned JSON lines.

One request per line, one response line per request, UTF-8 JSON objects::

    request   {"v": 1, "op": "hosts.add", "args": {"mac": "52:54:00:00:00:01", "profile": "default"}}
    response  {"v": 1, "ok": true,  "result": ...}
              {"v": 1, "ok": false, "error": "human readable message"}

This module is shared by ``control/server.py`` and ``sidusctl`` (``sidusd/ctl.py``);
it imports only the standard library, :mod:`msgspec` and :mod:`sidusd.errors`.  It does
no I/O.  The arguments of each op are declared once, as a :class:`msgspec.Struct`
(:data:`OPS`); :func:`parse_args` checks them and words msgspec's refusal for the peer.
Decoders raise only :class:`~sidusd.errors.RemoteProtocolError` with a message
fit to be sent back to the peer (the server answers it as an error response).

The protocol is versioned as a whole: a request whose ``v`` is not
:data:`PROTOCOL_VERSION` is refused with an error naming both versions.
Requests are capped at :data:`MAX_REQUEST_BYTES` per line; responses (which can
carry the whole client history) at :data:`MAX_RESPONSE_BYTES`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from sidusd.control import SOCKET_ENV  # noqa: F401  (defined there: no msgspec for it)
from sidusd.errors import RemoteProtocolError

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024           # one request line, newline excluded
MAX_RESPONSE_BYTES = 32 * 1024 * 1024   # one response line (clients history can be large)
DEFAULT_SOCKET_PATH = "/run/sidus/control.sock"   # = config.control.socket_path default

OP_STATUS = "status"
OP_CLIENTS = "clients"
OP_HOSTS_LIST = "hosts.list"
OP_HOSTS_ADD = "hosts.add"
OP_HOSTS_REMOVE = "hosts.remove"
OP_RELOAD = "reload"
OP_HOSTS_DISK = "hosts.disk"
OP_HOSTS_RESET_DISK = "hosts.reset-disk"
OP_HOSTS_SHOW = "hosts.show"
OP_HOSTS_SET = "hosts.set"
OP_HOSTS_ADOPT = "hosts.adopt"
OP_IMAGES_STATUS = "images.status"
OP_HOSTS_IMPORT = "hosts.import"
OP_HOSTS_CLEAR_CONFLICT = "hosts.clear-conflict"    # forget who claimed a MAC (boot.claims)
OP_HOSTS_ROTATE_SECRET = "hosts.rotate-secret"      # a new CHAP secret for a persistent host

MAX_ARG_CHARS = 4096    # any single string argument
LIST_ARGS = frozenset({"unset"})     # the arguments that are lists of strings
Text = Annotated[str, Meta(max_length=MAX_ARG_CHARS)]


class Args(Struct, frozen=True, forbid_unknown_fields=True):
    """The arguments of an op that takes none; every op's arguments are a subclass."""


class ClientsArgs(Args, frozen=True):
    mac: Text | None = None


class HostsAddArgs(Args, frozen=True):
    mac: Text
    profile: Text
    hostname: Text | None = None
    image: Text | None = None
    ip: Text | None = None
    append: Text | None = None
    persistent: bool | None = None


class HostsRemoveArgs(Args, frozen=True):
    mac: Text
    delete_disk: bool | None = None


class HostsDiskArgs(Args, frozen=True):
    mac: Text
    show_secret: bool | None = None


class MacArgs(Args, frozen=True):
    mac: Text


class HostsSetArgs(Args, frozen=True):
    """Change the fields given, keep the others; ``unset`` clears hostname, image, ip or append."""
    mac: Text
    profile: Text | None = None
    hostname: Text | None = None
    image: Text | None = None
    ip: Text | None = None
    append: Text | None = None
    unset: Annotated[list[Text], Meta(max_length=8)] | None = None


class HostsAdoptArgs(Args, frozen=True):
    mac: Text
    profile: Text | None = None
    hostname: Text | None = None
    image: Text | None = None
    append: Text | None = None


class NameArgs(Args, frozen=True):
    name: Text


class ImportHost(Struct, frozen=True, forbid_unknown_fields=True):
    """One host of a ``hosts.import`` batch; ``source`` (``FILE:LINE``) is named in refusals."""
    mac: Text
    profile: Text
    hostname: Text | None = None
    image: Text | None = None
    ip: Text | None = None
    append: Text | None = None
    source: Text | None = None


class HostsImportArgs(Args, frozen=True):
    """``sidusctl hosts import``: every host in one inventory change (all or nothing)."""
    hosts: Annotated[list[ImportHost], Meta(min_length=1)]
    replace: bool | None = None


#: Every op and the declaration of the arguments it accepts.  Unknown args are refused.
OPS: dict[str, type[Args]] = {
    OP_STATUS: Args,
    OP_CLIENTS: ClientsArgs,
    OP_HOSTS_LIST: Args,
    OP_HOSTS_ADD: HostsAddArgs,
    OP_HOSTS_REMOVE: HostsRemoveArgs,
    OP_RELOAD: Args,
    OP_HOSTS_DISK: HostsDiskArgs,
    OP_HOSTS_RESET_DISK: MacArgs,
    OP_HOSTS_SHOW: MacArgs,
    OP_HOSTS_SET: HostsSetArgs,
    OP_HOSTS_ADOPT: HostsAdoptArgs,
    OP_IMAGES_STATUS: NameArgs,
    OP_HOSTS_IMPORT: HostsImportArgs,
    OP_HOSTS_CLEAR_CONFLICT: MacArgs,
    OP_HOSTS_ROTATE_SECRET: MacArgs,
}


@dataclass(frozen=True)
class Request:
    """A validated request: ``op`` is in :data:`OPS`, ``args`` match its declaration."""

    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Response:
    """A decoded response: ``result`` when ``ok``, else ``error``."""

    ok: bool
    result: Any = None
    error: str | None = None


# -- helpers ---------------------------------------------------------------

def _loads_object(line: bytes, cap: int, what: str) -> dict[str, Any]:
    if len(line) > cap:
        raise RemoteProtocolError(f"{what} line too long ({len(line)} bytes, limit {cap})")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    if not text.strip():
        raise RemoteProtocolError(f"empty {what}")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what} must be a JSON object, got {type(obj).__name__}")
    v = obj.get("v")
    if v != PROTOCOL_VERSION or isinstance(v, bool):
        raise RemoteProtocolError(
            f"unsupported protocol version {v!r} (this side speaks v{PROTOCOL_VERSION})")
    return obj


def parse_args(op: str, args: Any) -> Args:
    """``args`` of ``op`` as its typed :class:`Args` (checked by msgspec against the declaration).

    Raises :class:`RemoteProtocolError` naming the op and the offending argument.
    """
    if op not in OPS:
        raise RemoteProtocolError(f"unknown op {op!r} (known: {', '.join(OPS)})")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RemoteProtocolError(f"{op}: 'args' must be a JSON object")
    spec = OPS[op]
    names = msgspec.structs.fields(spec)
    unknown = sorted(str(k) for k in set(args) - {f.name for f in names})
    if unknown:
        allowed = ", ".join(f.name for f in names) or "none"
        raise RemoteProtocolError(f"{op}: unknown argument(s) {', '.join(unknown)} (allowed: {allowed})")
    try:
        return msgspec.convert(args, spec, strict=True)
    except msgspec.ValidationError as exc:
        text = str(exc)
        missing = re.match(r"Object missing required field `(.+)`", text)
        if missing:
            raise RemoteProtocolError(f"{op}: missing argument {missing[1]!r}") from None
        name = text.rpartition("$.")[2].rstrip("`")
        f = next((f for f in names if f.name == name), None)
        if f is None:                                    # not expected: msgspec said where
            raise RemoteProtocolError(f"{op}: {text[:200]}") from None
        if f.type in (bool, bool | None):
            raise RemoteProtocolError(f"{op}: argument {name!r} must be true or false") from None
        if name in LIST_ARGS:
            raise RemoteProtocolError(f"{op}: argument {name!r} must be a short list of short strings") from None
        if isinstance(args[name], str):
            raise RemoteProtocolError(f"{op}: argument {name!r} is too long (limit {MAX_ARG_CHARS})") from None
        raise RemoteProtocolError(f"{op}: argument {name!r} must be a string") from None


def validate_args(op: str, args: Any) -> dict[str, Any]:
    """Check ``args`` against the declaration of ``op``; return them as a new dict (the keys given)."""
    parse_args(op, args)
    return dict(args or {})


# -- requests ----------------------------------------------------------------

def encode_request(op: str, args: dict[str, Any] | None = None) -> bytes:
    """One request line (with its trailing newline).  Validates like the server does."""
    clean = validate_args(op, args or {})
    line = json.dumps({"v": PROTOCOL_VERSION, "op": op, "args": clean},
                      separators=(",", ":"), ensure_ascii=False).encode()
    if len(line) > MAX_REQUEST_BYTES:
        raise RemoteProtocolError(f"request too long ({len(line)} bytes, limit {MAX_REQUEST_BYTES})")
    return line + b"\n"


def decode_request(line: bytes) -> Request:
    """Parse and validate one request line (trailing newline optional)."""
    obj = _loads_object(line.rstrip(b"\r\n"), MAX_REQUEST_BYTES, "request")
    extra = sorted(set(obj) - {"v", "op", "args"})
    if extra:
        raise RemoteProtocolError(f"unknown request field(s): {', '.join(extra)}")
    op = obj.get("op")
    if not isinstance(op, str):
        raise RemoteProtocolError("request has no 'op' string")
    return Request(op=op, args=validate_args(op, obj.get("args")))


# -- responses ---------------------------------------------------------------

def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str).encode() + b"\n"


def encode_ok(result: Any) -> bytes:
    """A success response line.  Values JSON cannot carry are sent as strings."""
    return _dump({"v": PROTOCOL_VERSION, "ok": True, "result": result})


def encode_error(message: str) -> bytes:
    """An error response line carrying ``message`` (shown as is to the operator)."""
    return _dump({"v": PROTOCOL_VERSION, "ok": False, "error": str(message)})


def decode_response(line: bytes) -> Response:
    """Parse one response line; raise :class:`RemoteProtocolError` if it is not one."""
    obj = _loads_object(line.rstrip(b"\r\n"), MAX_RESPONSE_BYTES, "response")
    ok = obj.get("ok")
    if ok is True:
        return Response(ok=True, result=obj.get("result"))
    if ok is False:
        error = obj.get("error")
        if not isinstance(error, str):
            raise RemoteProtocolError("error response without an 'error' string")
        return Response(ok=False, error=error)
    raise RemoteProtocolError("response has no boolean 'ok'")

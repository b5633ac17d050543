"""The wire between the supervisor (root) and the worker (unprivileged).

Two ``AF_UNIX`` ``SOCK_SEQPACKET`` socketpairs: one datagram is one message,
so a message can neither be glued to another nor split, and a malformed one
is dropped alone.

* **ctl** (both ways, asynchronous).  Supervisor -> worker: pickled tuples
  (the worker trusts its parent; the config and inventory are frozen
  dataclasses): ``("snapshot", Snapshot, disks)``, ``("sync", id)``,
  ``("stop", grace_s)``, in chunks of at most ``CHUNK`` bytes (first byte
  ``M`` whole, ``P`` part, ``E`` last part).  Worker -> supervisor: one JSON
  object per datagram, at most ``MAX_MSG`` bytes, decoded by
  :func:`decode_worker` (strict: UTF-8, no duplicate keys, no NaN, known
  ``t`` only, every field typed and bounded).  The messages are declared once
  as :mod:`msgspec` Structs tagged by ``t`` (:class:`Hello` ... :class:`LeaseAppend`),
  their bounds on the fields; ``msgspec.convert`` checks them (docs/decisions.md).
* **rpc** (worker asks, supervisor answers; the worker waits): ``open``
  (a file below ``tftp.root``: the supervisor opens it with
  :func:`sidusd.net.files.open_confined` and passes the descriptor with
  ``SCM_RIGHTS``), ``lease.load`` (the lease journal, read-only descriptor),
  ``lease.append`` (the supervisor writes + fsyncs the lease, then answers:
  the DHCPACK leaves only after that answer).  JSON both ways.

Everything here is pure except :func:`send_parent` / :class:`Reassembler`
helpers that take bytes.
"""

from __future__ import annotations

import copyreg
import ipaddress
import json
import pickle
import sys
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

from ..errors import RemoteProtocolError

MAX_MSG = 64 * 1024                  # a worker message, in bytes (bigger: refused, counted)
CHUNK = 60 * 1024                    # supervisor -> worker pickles are cut in chunks this big
MAX_EVENTS = 2048                    # client events in one message
MAX_COUNTERS = 512                   # counter deltas in one message
MAX_FIELDS = 16                      # fields of one timeline entry
MAX_STR = 512                        # any string field
MAX_PARTS = 64                       # path components of an open request
MAX_ACTIVE = 32                      # transfers in flight listed in a stats answer (sidusctl watch)
MAX_ENTRY = 1024                     # one timeline entry's fields, as JSON (64 x 1024 clients kept)


Name = Annotated[str, Meta(pattern=r"^[a-z0-9_][a-z0-9_.\-]{0,79}\Z")]
FieldName = Annotated[str, Meta(pattern=r"^(?!(?:t|event)\Z)[a-z_][a-z0-9_]{0,31}\Z")]   # t, event: reserved
Mac = Annotated[str, Meta(pattern=r"^[0-9a-f]{2}(?::[0-9a-f]{2}){0,15}\Z")]      # chaddr[:hlen], 1..16 bytes
Arch = Annotated[str, Meta(pattern=r"^[a-z0-9_\-]{1,32}\Z")]
Str = Annotated[str, Meta(max_length=MAX_STR)]
Count = Annotated[int, Meta(ge=0, le=2**31)]
Id = Annotated[int, Meta(ge=0, le=2**53)]
Finite = Annotated[float, Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
Scalar = None | bool | Annotated[int, Meta(ge=-2**53, le=2**53)] | Finite | Str
Fields = Annotated[dict[FieldName, Scalar], Meta(max_length=MAX_FIELDS)]
Listeners = Annotated[dict[Name, Annotated[list[Fields], Meta(max_length=256)]], Meta(max_length=8)]

# Config and inventory hold read-only mappings; pickle them as plain dicts.
def _mappingproxy(d: dict) -> types.MappingProxyType:
    return types.MappingProxyType(d)


copyreg.pickle(types.MappingProxyType, lambda m: (_mappingproxy, (dict(m),)))


# -- supervisor -> worker (trusted direction) -------------------------------------

def encode_parent(obj: Any) -> list[bytes]:
    """``obj`` pickled and cut into datagrams of at most ``CHUNK + 1`` bytes."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) <= CHUNK:
        return [b"M" + data]
    parts = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    return [b"P" + p for p in parts[:-1]] + [b"E" + parts[-1]]


class Reassembler:
    """Worker side: datagrams from the supervisor back into objects."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def feed(self, datagram: bytes) -> Any | None:
        kind, body = datagram[:1], datagram[1:]
        if kind == b"P":
            self._parts.append(body)
            return None
        if kind == b"E":
            body, self._parts = b"".join(self._parts) + body, []
        elif kind != b"M":
            raise ValueError(f"bad supervisor frame {kind!r}")
        return pickle.loads(body)


# -- worker -> supervisor (hostile direction) ----------------------------------------

def encode_worker(msg: dict[str, Any]) -> bytes:
    """A worker message as one datagram (the worker keeps it under ``MAX_MSG``)."""
    return json.dumps(msg, separators=(",", ":"), default=str, allow_nan=False).encode()


def _no_dups(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _bad_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_strict(data: bytes) -> dict[str, Any]:
    """One JSON object from ``data``; RemoteProtocolError for anything else."""
    if len(data) > MAX_MSG:
        raise RemoteProtocolError("oversized", f"message of {len(data)} bytes (limit {MAX_MSG})")
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_dups,
                         parse_constant=_bad_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError("bad_json", f"not strict JSON: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("bad_json", "not a JSON object")
    return obj


@dataclass(frozen=True)
class WorkerMessage:
    t: str
    body: dict[str, Any]


class _Message(Struct, frozen=True, forbid_unknown_fields=True, tag_field="t"):
    pass


class Hello(_Message, tag="hello", frozen=True):
    pid: Annotated[int, Meta(ge=1, le=2**22)]


class Fatal(_Message, tag="fatal", frozen=True):
    error: Str


class Ready(_Message, tag="ready", frozen=True):
    listeners: Listeners


class Active(Struct, frozen=True, forbid_unknown_fields=True):
    """One transfer in flight (``TftpService.transfers()``), for ``sidusctl watch`` and the web page."""
    service: Name
    file: Str
    peer: Str
    bytes: Id
    size: Id | None = None
    duration_s: Annotated[float, Meta(ge=0.0, le=1e9)] = 0.0


class Stats(_Message, tag="stats", frozen=True):
    id: Id
    listeners: Listeners
    transfers: Annotated[dict[Name, Count], Meta(max_length=8)]
    active: Annotated[list[Active], Meta(max_length=MAX_ACTIVE)] = field(default_factory=list)


class _Event(Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    pass


class Seen(_Event, tag="seen", frozen=True):
    """``["seen", mac, ip|null, arch|null]``: a DHCP request was answered."""
    mac: Mac
    ip: ipaddress.IPv4Address | None
    arch: Arch | None


class Timeline(_Event, tag="tl", frozen=True):
    """``["tl", mac, t, event, {fields}]``: one boot-timeline entry."""
    mac: Mac
    t: Finite
    event: Name
    fields: Fields


class Booted(_Event, tag="booted", frozen=True):
    """``["booted", mac, image, hostname|null]``: a boot config was served (docs/images.md)."""
    mac: Mac
    image: Name
    hostname: Str | None


Event = Seen | Timeline | Booted


class Events(_Message, tag="events", frozen=True):
    counters: Annotated[dict[Name, Count], Meta(max_length=MAX_COUNTERS)] = field(default_factory=dict)
    events: Annotated[list[Event], Meta(max_length=MAX_EVENTS)] = field(default_factory=list)
    dropped: Count = 0


WORKER_MESSAGES: dict[str, type[_Message]] = {"hello": Hello, "ready": Ready, "fatal": Fatal,
                                               "events": Events, "stats": Stats}
WORKER_TYPES = tuple(WORKER_MESSAGES)


def _ipv4(tp: type, v: Any) -> Any:
    if tp is ipaddress.IPv4Address and isinstance(v, str) and len(v) <= MAX_STR:
        try:
            return ipaddress.IPv4Address(v)
        except ValueError:
            raise ValueError("not an IPv4 address") from None
    raise TypeError("expected an IPv4 address string")


def _convert(obj: Any, tp: Any, what: str) -> Any:
    try:
        return msgspec.convert(obj, tp, strict=True, dec_hook=_ipv4)
    except msgspec.ValidationError as exc:
        raise RemoteProtocolError("bad_field", f"{what}: {str(exc)[:200]}") from None


def decode_worker(data: bytes) -> WorkerMessage:
    """Check one worker message completely.  Raises RemoteProtocolError; returns clean values only."""
    obj = loads_strict(data)
    t = obj.get("t")
    if t not in WORKER_MESSAGES:
        raise RemoteProtocolError("unknown_type", f"unknown message type {str(t)[:40]!r}")
    msg = _convert(obj, WORKER_MESSAGES[t], t)
    if isinstance(msg, Events):
        events = [_event_tuple(e, f"events[{i}]") for i, e in enumerate(msg.events)]
        return WorkerMessage(t, {"counters": msg.counters, "events": events, "dropped": msg.dropped})
    if isinstance(msg, Stats):
        active = [msgspec.structs.asdict(a) for a in msg.active]
        return WorkerMessage(t, {**msgspec.structs.asdict(msg), "active": active})
    return WorkerMessage(t, msgspec.structs.asdict(msg))


def _event_tuple(e: Any, what: str) -> tuple:
    if isinstance(e, Seen):
        return ("seen", e.mac, None if e.ip is None else str(e.ip), e.arch)
    if isinstance(e, Booted):
        return ("booted", e.mac, e.image, e.hostname)
    if len(json.dumps(e.fields)) > MAX_ENTRY:
        raise RemoteProtocolError("bad_field", f"{what}.fields: more than {MAX_ENTRY} bytes")
    return ("tl", e.mac, e.t, e.event, e.fields)


def check_event(e: Any, what: str = "event") -> tuple:
    """One client event (:class:`Seen`, :class:`Timeline` or :class:`Booted`, as a list or tuple),
    checked and returned as a tuple."""
    if not isinstance(e, (list, tuple)) or not e:
        raise RemoteProtocolError("bad_field", f"{what}: expected a list")
    return _event_tuple(_convert(list(e), Event, what), what)


# -- rpc ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RpcRequest:
    t: str
    id: int
    body: dict[str, Any]


Part = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^(?!\.\.?\Z)[^/\x00]+\Z")]


class Open(_Message, tag="open", frozen=True):
    """A file below ``tftp.root``, as its plain path components."""
    id: Id
    parts: Annotated[list[Part], Meta(min_length=1, max_length=MAX_PARTS)]


class LeaseLoad(_Message, tag="lease.load", frozen=True):
    id: Id


class Lease(Struct, frozen=True, forbid_unknown_fields=True):
    ip: ipaddress.IPv4Address
    mac: Mac
    state: Literal["bound", "free", "declined"]
    expires: Finite


MAX_MORE_LEASES = 255           # leases after the first in one lease.append (one loop turn's group)


class LeaseAppend(_Message, tag="lease.append", frozen=True):
    """``lease`` and ``more`` written together, fsync'd once if ``sync`` (group commit)."""
    id: Id
    lease: Lease
    more: Annotated[list[Lease], Meta(max_length=MAX_MORE_LEASES)] = []
    sync: bool = True


def _lease_body(lease: Lease) -> dict[str, Any]:
    return {"ip": str(lease.ip), "mac": lease.mac, "state": lease.state, "expires": lease.expires}


RPC_REQUESTS: dict[str, type[_Message]] = {"open": Open, "lease.load": LeaseLoad, "lease.append": LeaseAppend}
RPC_TYPES = tuple(RPC_REQUESTS)


def decode_rpc(data: bytes) -> RpcRequest:
    """One worker request on the rpc channel, checked.  Raises RemoteProtocolError."""
    obj = loads_strict(data)
    t = obj.get("t")
    if t not in RPC_REQUESTS:
        raise RemoteProtocolError("unknown_type", f"unknown request type {str(t)[:40]!r}")
    req = _convert(obj, RPC_REQUESTS[t], t)
    if isinstance(req, Open):
        for p in req.parts:
            if len(p.encode()) > 255:
                raise RemoteProtocolError("bad_field", f"parts: {p[:40]!r} is not a plain file name")
        return RpcRequest(t, req.id, {"parts": tuple(req.parts)})
    if isinstance(req, LeaseAppend):
        body = _lease_body(req.lease)
        if req.more:
            body["more"] = [_lease_body(l) for l in req.more]
        if not req.sync:
            body["sync"] = False
        return RpcRequest(t, req.id, body)
    return RpcRequest(t, req.id, {})

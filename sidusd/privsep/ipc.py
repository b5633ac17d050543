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
  ``t`` only, every field typed and bounded).
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
import math
import pickle
import re
import types
from dataclasses import dataclass
from typing import Any

from ..errors import RemoteProtocolError

MAX_MSG = 64 * 1024                  # a worker message, in bytes (bigger: refused, counted)
CHUNK = 60 * 1024                    # supervisor -> worker pickles are cut in chunks this big
MAX_EVENTS = 2048                    # client events in one message
MAX_COUNTERS = 512                   # counter deltas in one message
MAX_FIELDS = 16                      # fields of one timeline entry
MAX_STR = 512                        # any string field
MAX_PARTS = 64                       # path components of an open request
MAX_ENTRY = 1024                     # one timeline entry's fields, as JSON (64 x 1024 clients kept)

WORKER_TYPES = ("hello", "ready", "fatal", "events", "stats")
RPC_TYPES = ("open", "lease.load", "lease.append")

_NAME = re.compile(r"[a-z0-9_][a-z0-9_.\-]{0,79}")
_FIELD = re.compile(r"[a-z_][a-z0-9_]{0,31}")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){0,15}")     # chaddr[:hlen], 1..16 bytes
_ARCH = re.compile(r"[a-z0-9_\-]{1,32}")

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


def _str(v: Any, what: str, pattern: re.Pattern | None = None, none: bool = False) -> str | None:
    if v is None and none:
        return None
    if not isinstance(v, str) or len(v) > MAX_STR:
        raise RemoteProtocolError(f"{what}: expected a string of at most {MAX_STR} characters")
    if pattern is not None and not pattern.fullmatch(v):
        raise RemoteProtocolError(f"{what}: {v[:40]!r} is not allowed")
    return v


def _int(v: Any, what: str, lo: int = 0, hi: int = 2**31) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise RemoteProtocolError(f"{what}: expected an integer in {lo}..{hi}")
    return v


def _num(v: Any, what: str) -> float:
    if type(v) not in (int, float) or not math.isfinite(v):
        raise RemoteProtocolError(f"{what}: expected a finite number")
    return float(v)


def _ip(v: Any, what: str) -> str | None:
    if v is None:
        return None
    s = _str(v, what)
    try:
        return str(ipaddress.IPv4Address(s))
    except ValueError:
        raise RemoteProtocolError(f"{what}: not an IPv4 address") from None


def _scalar(v: Any, what: str) -> Any:
    if v is None or type(v) is bool:
        return v
    if type(v) is int:
        return _int(v, what, -2**53, 2**53)
    if type(v) is float:
        return _num(v, what)
    return _str(v, what)


def _fields(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict) or len(v) > MAX_FIELDS:
        raise RemoteProtocolError(f"{what}: expected an object of at most {MAX_FIELDS} fields")
    out = {}
    for k, x in v.items():
        _str(k, f"{what} key", _FIELD)
        if k in ("t", "event"):
            raise RemoteProtocolError(f"{what}: field {k!r} is reserved")
        out[k] = _scalar(x, f"{what}.{k}")
    return out


def _listeners(v: Any, what: str) -> dict[str, list[dict[str, Any]]]:
    if not isinstance(v, dict) or len(v) > 8:
        raise RemoteProtocolError(f"{what}: expected an object of services")
    out: dict[str, list[dict[str, Any]]] = {}
    for svc, lst in v.items():
        _str(svc, f"{what} key", _NAME)
        if not isinstance(lst, list) or len(lst) > 256:
            raise RemoteProtocolError(f"{what}.{svc}: expected a list of at most 256")
        out[svc] = [_fields(x, f"{what}.{svc}[]") for x in lst]
    return out


def decode_worker(data: bytes) -> WorkerMessage:
    """Check one worker message completely.  Raises RemoteProtocolError; returns clean values only."""
    obj = loads_strict(data)
    t = obj.get("t")
    if t not in WORKER_TYPES:
        raise RemoteProtocolError("unknown_type", f"unknown message type {str(t)[:40]!r}")
    keys = set(obj) - {"t"}
    if t == "hello":
        _only(keys, {"pid"}, t)
        return WorkerMessage(t, {"pid": _int(obj.get("pid"), "pid", 1, 2**22)})
    if t == "fatal":
        _only(keys, {"error"}, t)
        return WorkerMessage(t, {"error": _str(obj.get("error"), "error")})
    if t == "ready":
        _only(keys, {"listeners"}, t)
        return WorkerMessage(t, {"listeners": _listeners(obj.get("listeners"), "listeners")})
    if t == "stats":
        _only(keys, {"id", "listeners", "transfers"}, t)
        tr = obj.get("transfers")
        if not isinstance(tr, dict) or len(tr) > 8:
            raise RemoteProtocolError("transfers: expected an object of services")
        return WorkerMessage(t, {"id": _int(obj.get("id"), "id", 0, 2**53),
                                 "listeners": _listeners(obj.get("listeners"), "listeners"),
                                 "transfers": {_str(k, "transfers key", _NAME): _int(n, f"transfers.{k}", 0, 2**31)
                                               for k, n in tr.items()}})
    # events
    _only(keys, {"counters", "events", "dropped"}, t)
    counters = obj.get("counters", {})
    if not isinstance(counters, dict) or len(counters) > MAX_COUNTERS:
        raise RemoteProtocolError(f"counters: expected an object of at most {MAX_COUNTERS}")
    clean_c = {_str(k, "counter name", _NAME): _int(n, f"counter {k}", 0, 2**31) for k, n in counters.items()}
    events = obj.get("events", [])
    if not isinstance(events, list) or len(events) > MAX_EVENTS:
        raise RemoteProtocolError(f"events: expected a list of at most {MAX_EVENTS}")
    clean_e = [check_event(e, f"events[{i}]") for i, e in enumerate(events)]
    dropped = _int(obj.get("dropped", 0), "dropped", 0, 2**31)
    return WorkerMessage(t, {"counters": clean_c, "events": clean_e, "dropped": dropped})


def check_event(e: Any, what: str = "event") -> tuple:
    """One client event: ``["seen", mac, ip|null, arch|null]``, ``["tl", mac, t, event, {fields}]``
    or ``["booted", mac, image, hostname|null]`` (a boot config was served: docs/images.md)."""
    if not isinstance(e, (list, tuple)) or not e:
        raise RemoteProtocolError(f"{what}: expected a list")
    if e[0] == "seen" and len(e) == 4:
        arch = _str(e[3], f"{what}.arch", _ARCH, none=True)
        return ("seen", _str(e[1], f"{what}.mac", _MAC), _ip(e[2], f"{what}.ip"), arch)
    if e[0] == "booted" and len(e) == 4:
        return ("booted", _str(e[1], f"{what}.mac", _MAC), _str(e[2], f"{what}.image", _NAME),
                _str(e[3], f"{what}.hostname", none=True))
    if e[0] == "tl" and len(e) == 5:
        fields = _fields(e[4], f"{what}.fields")
        if len(json.dumps(fields)) > MAX_ENTRY:
            raise RemoteProtocolError(f"{what}.fields: more than {MAX_ENTRY} bytes")
        return ("tl", _str(e[1], f"{what}.mac", _MAC), _num(e[2], f"{what}.t"),
                _str(e[3], f"{what}.event", _NAME), fields)
    raise RemoteProtocolError(f"{what}: unknown event")


def _only(keys: set[str], allowed: set[str], t: str) -> None:
    extra = keys - allowed
    if extra:
        raise RemoteProtocolError(f"{t}: unknown field {sorted(extra)[0][:40]!r}")


# -- rpc ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RpcRequest:
    t: str
    id: int
    body: dict[str, Any]


def decode_rpc(data: bytes) -> RpcRequest:
    """One worker request on the rpc channel, checked.  Raises RemoteProtocolError."""
    obj = loads_strict(data)
    t = obj.get("t")
    if t not in RPC_TYPES:
        raise RemoteProtocolError("unknown_type", f"unknown request type {str(t)[:40]!r}")
    rid = _int(obj.get("id"), "id", 0, 2**53)
    keys = set(obj) - {"t", "id"}
    if t == "open":
        _only(keys, {"parts"}, t)
        parts = obj.get("parts")
        if not isinstance(parts, list) or not 1 <= len(parts) <= MAX_PARTS:
            raise RemoteProtocolError(f"parts: expected 1..{MAX_PARTS} path components")
        clean = []
        for p in parts:
            s = _str(p, "parts[]")
            if not s or s in (".", "..") or "/" in s or "\0" in s or len(s.encode()) > 255:
                raise RemoteProtocolError(f"parts: {s[:40]!r} is not a plain file name")
            clean.append(s)
        return RpcRequest(t, rid, {"parts": tuple(clean)})
    if t == "lease.load":
        _only(keys, set(), t)
        return RpcRequest(t, rid, {})
    _only(keys, {"lease"}, t)
    lease = obj.get("lease")
    if not isinstance(lease, dict) or set(lease) != {"ip", "mac", "state", "expires"}:
        raise RemoteProtocolError("lease: expected {ip, mac, state, expires}")
    state = _str(lease["state"], "lease.state")
    if state not in ("bound", "free", "declined"):
        raise RemoteProtocolError(f"lease.state {state[:20]!r} is not journaled")
    return RpcRequest(t, rid, {"ip": _ip(lease["ip"], "lease.ip"), "mac": _str(lease["mac"], "lease.mac", _MAC),
                               "state": state, "expires": _num(lease["expires"], "lease.expires")})

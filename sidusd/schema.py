"""One schema mechanism: typed declarations checked by msgspec, refusals in our words.

A schema is declared once, as a frozen dataclass or a :class:`msgspec.Struct`
whose field types carry their constraints (``Annotated[int, Meta(ge=1,
le=65535)]``, ``Literal["proxy", "full", "off"]``, ``Meta(max_length=...)``,
``Meta(pattern=...)``).  :func:`convert` checks a decoded YAML/JSON object
against it with :func:`msgspec.convert` (strict: no bool for an int, no string
for a number) and turns a :class:`msgspec.ValidationError` (``... - at
`$.a.b[0]```) into ``error(path, reason)``: the dotted key path
(``dhcp.pool.range_start``) and a reason written from the declaration and the
refused value (``out of range: must be between 1 and 65535, got 0``,
``must be one of: proxy, full (got 'x')``, ``expected an integer, got string
'69'``).  A constraint may say its own reason in ``Meta(description=...)``,
where ``{value!r}`` stands for the refused value.

Before msgspec runs, :func:`convert` walks the mappings once, guided by the
declaration, for what msgspec does not say the way an operator needs it:
unknown keys get "did you mean ...?" (or the allowed keys), a missing key is
"required key is missing" at its own path, a key must be a string, and a
section or path given as YAML null (``log:`` with nothing under it) means its
default.  Cross-field rules (a range inside a network) are not here: each
schema's owner checks them after conversion, once.

Pure: no I/O; importable from the pure packages (``sidusd/boot``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union

import msgspec

from sidusd.errors import ConfigError

Meta = msgspec.Meta
_AT = re.compile(r"^(?P<msg>.*?)(?: - at (?:`(?P<key>key)` in )?`\$(?P<path>[^`]*)`)?$", re.S)
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean (true or false)",
               float: "a number", list: "a list", tuple: "a list", dict: "a mapping"}


def describe(value: Any) -> str:
    """How a decoded value reads in an error message: ``integer 5``, ``string 'x'``, ``null``."""
    if value is None:
        return "null"
    for t, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                    (list, "a list"), (dict, "a mapping")):
        if isinstance(value, t):
            return f"{name} {value!r}" if t in (bool, int, float, str) else name
    return type(value).__name__


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


def unknown_key_reason(key: str, allowed: tuple[str, ...] | list[str]) -> str:
    """``unknown key (did you mean X?)``, or the allowed keys when nothing is close."""
    close = suggest(key, allowed)
    return f"unknown key ({'did you mean ' + close + '?' if close else 'allowed: ' + ', '.join(allowed)})"


def join(path: str, key: str) -> str:
    """Dotted path of ``key`` under ``path`` (``[i]`` keys attach without a dot)."""
    if not path or not key:
        return path or key
    return path + key if key.startswith("[") else f"{path}.{key}"


# -- reading a declaration ----------------------------------------------------------------

def _strip(tp: Any) -> tuple[Any, list[msgspec.Meta]]:
    """``Annotated[T, Meta...]`` -> (T, metas), through nested Annotated."""
    metas: list[msgspec.Meta] = []
    while typing.get_origin(tp) is typing.Annotated:
        tp, *extra = typing.get_args(tp)
        metas.extend(m for m in extra if isinstance(m, msgspec.Meta))
    return tp, metas


@functools.lru_cache(maxsize=1024)
def _unwrap(tp: Any) -> tuple[Any, bool, list[msgspec.Meta]]:
    """(the type without ``None`` and ``Annotated``, whether None was allowed, the constraints)."""
    tp, metas = _strip(tp)
    optional = False
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            tp, more = _strip(args[0])
            metas = metas + more
        else:
            tp = Union[tuple(args)] if optional else tp  # noqa: UP007  (built from a runtime tuple)
    return tp, optional, metas


def _non_none(tp: Any) -> tuple[Any, bool]:
    """(the type without ``None`` and ``Annotated``, whether None was allowed)."""
    base, optional, _ = _unwrap(tp)
    return base, optional


def _is_record(tp: Any) -> bool:
    return isinstance(tp, type) and (dataclasses.is_dataclass(tp) or issubclass(tp, msgspec.Struct))


_HINTS: dict[type, dict[str, tuple[Any, bool]]] = {}


def record_fields(tp: type) -> dict[str, tuple[Any, bool]]:
    """Field name -> (declared type, required) of a dataclass or Struct, in declaration order."""
    got = _HINTS.get(tp)
    if got is None:
        hints = typing.get_type_hints(tp, include_extras=True)
        if dataclasses.is_dataclass(tp):
            got = {f.name: (hints[f.name], f.default is dataclasses.MISSING
                            and f.default_factory is dataclasses.MISSING)
                   for f in dataclasses.fields(tp) if f.init}
        else:
            got = {f.encode_name: (hints[f.name], f.required) for f in msgspec.structs.fields(tp)}
        _HINTS[tp] = got
    return got


# -- the walk before msgspec ----------------------------------------------------------------

def _prepare(raw: Any, tp: Any, path: str, error: Callable[[str, str], Exception],
             skip: frozenset[str]) -> Any:
    base, optional = _non_none(tp)
    if _is_record(base):
        if raw is None and optional:
            return None                      # an optional section given as null: absent (control.tcp: null)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise error(path or "<document>", f"expected a mapping, got {describe(raw)}")
        fields = record_fields(base)
        tag_field = base.__struct_config__.tag_field if issubclass(base, msgspec.Struct) else None
        out = {}
        for k, v in raw.items():
            if not isinstance(k, str):
                raise error(join(path, str(k)), f"a key must be a string, got {describe(k)}")
            if k == tag_field:
                out[k] = v
                continue
            if k not in fields or k in skip:
                raise error(join(path, k), unknown_key_reason(k, [f for f in fields if f not in skip]))
            ftp, _required = fields[k]
            fbase, optional = _non_none(ftp)
            if v is None and not optional and fbase is Path:
                continue                     # a path given as null: its default (a section: empty)
            out[k] = _prepare(v, ftp, join(path, k), error, frozenset())
        for k, (_, required) in fields.items():
            if required and k not in out and k not in skip:
                raise error(join(path, k), "required key is missing")
        return out
    origin = typing.get_origin(base)
    if origin is dict and isinstance(raw, dict):
        for k in raw:
            if not isinstance(k, str):
                raise error(join(path, str(k)), f"a key must be a string, got {describe(k)}")
    if origin in (list, tuple) and isinstance(raw, list):
        item = typing.get_args(base)[0]
        if _is_record(_non_none(item)[0]):
            return [_prepare(v, item, f"{path}[{i}]", error, frozenset()) for i, v in enumerate(raw)]
    return raw


# -- msgspec's refusal in our words --------------------------------------------------------

_UNKNOWN: Any = object()


def _locate(raw: Any, tp: Any, msgspec_path: str) -> tuple[str, Any, Any]:
    """Follow ``.a.b[0]`` in ``raw`` and in the declaration: (dotted path, value, declared type)."""
    steps = re.findall(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]", msgspec_path)
    dotted, value = "", raw
    for name, index in steps:
        base, _ = _non_none(tp)
        if name:
            dotted = join(dotted, name)
            value = value.get(name) if isinstance(value, dict) else None
            tp = record_fields(base)[name][0] if _is_record(base) else typing.get_args(base)[-1]
        else:
            dotted += f"[{index}]"
            if index != "...":
                value = value[int(index)] if isinstance(value, list) and int(index) < len(value) else None
                args = typing.get_args(base)
                if _is_record(base):          # array_like Struct: the fields in order, after the tag
                    names = list(record_fields(base))
                    tag = 1 if base.__struct_config__.tag is not None else 0
                    tp = record_fields(base)[names[int(index) - tag]][0]
                else:
                    tp = args[int(index)] if len(args) > 1 and args[-1] is not Ellipsis else args[0]
            else:
                tp, value = typing.get_args(base)[-1], _UNKNOWN     # msgspec does not say which key
    return dotted, value, tp


def _type_name(tp: Any) -> str:
    base, _ = _non_none(tp)
    origin = typing.get_origin(base) or base
    if _is_record(base) or origin in (dict, typing.Mapping):
        return "a mapping"
    if origin is Literal:
        return "a string"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(base))
    return _TYPE_NAMES.get(origin, f"a {getattr(origin, '__name__', origin)}")


def _matches(value: Any, tp: Any) -> bool:
    base, optional = _non_none(tp)
    if value is None:
        return optional
    origin = typing.get_origin(base) or base
    if origin is Literal:
        return isinstance(value, str)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(base))
    if _is_record(base) or origin in (dict, typing.Mapping):
        return isinstance(value, dict)
    if origin in (list, tuple):
        return isinstance(value, list)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base in (str, bool):
        return isinstance(value, base)
    return True                               # a custom type: its dec_hook said why


def reason_for(message: str, value: Any, tp: Any) -> str:
    """Our reason for msgspec's ``message`` about ``value`` declared as ``tp``."""
    base, _, metas = _unwrap(tp)
    if typing.get_origin(base) is Literal and isinstance(value, str):
        return f"must be one of: {', '.join(map(str, typing.get_args(base)))} (got {value!r})"
    if not _matches(value, tp):
        if value is None:
            return f"cannot be null (expected {_type_name(tp)})"
        return f"expected {_type_name(tp)}, got {describe(value)}"
    for m in metas:
        if isinstance(value, str) and m.max_length is not None and len(value) > m.max_length:
            return f"longer than {m.max_length} characters"
        if m.description:
            return m.description.replace("{value!r}", repr(value))
        lo = m.ge if m.ge is not None else m.gt
        hi = m.le if m.le is not None else m.lt
        if lo is not None and hi is not None:
            return f"out of range: must be between {lo} and {hi}, got {value}"
        if lo is not None or hi is not None:
            bound = f"at least {lo}" if lo is not None else f"at most {hi}"
            return f"out of range: must be {bound}, got {value}"
        if m.max_length is not None and m.min_length is not None:
            return f"expected {m.min_length} to {m.max_length} items or characters, got {len(value)}"
        if m.max_length is not None:
            return f"longer than {m.max_length} (items or characters)"
    return message[:1].lower() + message[1:]


def convert(raw: Any, tp: Any, path: str = "", *, error: Callable[[str, str], Exception] = ConfigError,
            dec_hook: Callable[[type, Any], Any] | None = None, skip: frozenset[str] = frozenset(),
            extra: dict[str, Any] | None = None) -> Any:
    """``raw`` (decoded YAML/JSON) checked against the declaration ``tp``, as ``tp``.

    Raises ``error(dotted_path, reason)`` on the first refusal.  ``skip``: fields
    of the top record that the document may not set (refused as unknown keys);
    ``extra``: values for some of them that the caller supplies (a profile's name
    is its key in the mapping).
    """
    prepared = _prepare(raw, tp, path, error, skip | frozenset(extra or ()))
    if extra:
        prepared = {**prepared, **extra}
    try:
        return msgspec.convert(prepared, tp, strict=True, dec_hook=dec_hook)
    except msgspec.ValidationError as e:
        m = _AT.match(str(e))
        assert m is not None
        said = m["msg"][:1].lower() + m["msg"][1:]
        try:
            where, value, ftp = _locate(prepared, tp, m["path"] or "")
        except (KeyError, IndexError, TypeError, AttributeError):    # a shape _locate does not follow
            where, value, ftp = (m["path"] or "").lstrip("."), _UNKNOWN, Any
        if m["key"]:
            raise error(join(path, where), f"a key: {said}") from None
        if e.__cause__ is not None or e.__context__ is not None:     # a dec_hook or __post_init__ said why
            raise error(join(path, where), m["msg"]) from None
        if value is _UNKNOWN:
            raise error(join(path, where), said) from None
        raise error(join(path, where), reason_for(m["msg"], value, ftp)) from None

"""Strict YAML reading and checked mappings, shared by the config and the inventory.

:func:`load_yaml` reads one document with YAML 1.2 scalars: only ``true``/``false``
are booleans, no sexagesimal integers (a MAC address stays a string), no
leading-zero octal, no dates, and duplicate keys are refused.  :func:`dump_yaml`
writes plain data that reads back identically.  :class:`Section` walks a mapping
and checks each key's type and range; the ``check_*`` and :func:`parse_ipv4`
helpers check single values.  Every refusal is a :class:`sidusd.errors.ConfigError`
whose ``path`` is the dotted key path (or the source name and line/column).

Pure: no I/O.  Used by :mod:`sidusd.config` and :mod:`sidusd.boot.inventory`.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import unicodedata
from typing import Any

import yaml

from sidusd.errors import ConfigError

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

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

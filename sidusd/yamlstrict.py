"""Strict YAML reading, and the checks of single values that several schemas share.

:func:`load_yaml` reads one document with YAML 1.2 scalars: only ``true``/``false``
are booleans, no sexagesimal integers (a MAC address stays a string), no
leading-zero octal, no dates, and duplicate keys are refused.  :func:`dump_yaml`
writes plain data that reads back identically.  The ``check_*`` and
:func:`parse_ipv4` helpers check single values that need more than one rule
(kernel arguments, names, one line of text).  The mappings themselves are
checked against their declarations by :mod:`sidusd.schema` (msgspec).  Every
refusal is a :class:`sidusd.errors.ConfigError` whose ``path`` is the dotted
key path (or the source name and line/column).

Pure: no I/O.  Used by :mod:`sidusd.config`, :mod:`sidusd.boot.inventory` and
:mod:`sidusd.image.recipe`.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import Any

import yaml

from sidusd.errors import ConfigError

IPv4Address = ipaddress.IPv4Address

MAX_DOCUMENT_CHARS = 16 * 1024 * 1024
MAX_LINE_CHARS = 1024
_B = "tag:yaml.org,2002:"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: no yes/no/on/off booleans, no sexagesimal
    integers (a MAC address stays a string), no leading-zero octal, no dates; duplicate keys refused."""

    source = "<string>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
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


def _int(loader: _StrictLoader, node: yaml.ScalarNode) -> int:
    return int(loader.construct_scalar(node), 0)


def _float(loader: _StrictLoader, node: yaml.ScalarNode) -> float:
    return float(loader.construct_scalar(node).lower().replace(".inf", "inf").replace(".nan", "nan"))


_StrictLoader.add_constructor(_B + "int", _int)
_StrictLoader.add_constructor(_B + "float", _float)


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


def decode_text(data: bytes, source: str) -> str:
    """``data`` as UTF-8 text, or a :class:`ConfigError` naming ``source``, the byte offset, line and column.

    Every file read as YAML (config, images file, inventory, recipes) goes
    through here, so a non-UTF-8 file is one clear refusal everywhere.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(source, f"not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                          f"(line {line}, column {column}): {e.reason}") from None


def load_yaml(text: str | bytes, source: str = "<string>") -> Any:
    """Parse one YAML document strictly (see :class:`_StrictLoader`); errors name ``source`` and line/column.

    ``bytes`` are decoded with :func:`decode_text` first."""
    if isinstance(text, bytes):
        if len(text) > 4 * MAX_DOCUMENT_CHARS:
            raise ConfigError(source, f"larger than {MAX_DOCUMENT_CHARS} characters")
        text = decode_text(text, source)
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
        from sidusd.schema import describe  # msgspec: only for this message (sidus-image's start-up)
        raise ConfigError(where, f"expected {what} as a string, got {describe(name)}")
    if not (_DNS_LABEL if dns else _NAME).fullmatch(name):
        rule = ("letters, digits and '-', 1-63 characters, not starting or ending with '-' (RFC 1123)"
                if dns else "letters, digits, '_', '.', '-', 1-63 characters, starting with a letter or digit")
        raise ConfigError(where, f"{name!r} is not a valid {what}: {rule}")
    return name


def parse_ipv4(where: str, text: str) -> IPv4Address:
    """Dotted-quad IPv4 address (RFC 791), or ConfigError naming ``where``."""
    try:
        return IPv4Address(text)
    except ValueError:
        raise ConfigError(where, f"not an IPv4 address: {text!r}") from None


def __getattr__(name: str) -> Any:
    """``describe`` and ``suggest`` lived here before #21 (sidusd.schema): imported on use."""
    if name in ("describe", "suggest"):
        from sidusd import schema
        return getattr(schema, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


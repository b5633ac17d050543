"""Hosts from a hand-made site's files, for ``sidusctl hosts import`` (pure: text in, hosts or errors out).

* ``csv``: a header line (``mac`` required; ``hostname``, ``profile``, ``ip``, ``image``, ``append``).
* ``ethers``: ``/etc/ethers``, ``MAC NAME-OR-ADDRESS`` a line.
* ``dhcpd``: every ``host NAME { hardware ethernet M; fixed-address IP; option host-name "N"; }`` of a
  dhcpd.conf, at any depth (groups, subnets), comments and quoted strings understood.
* ``pxelinux``: a ``pxelinux.cfg/`` directory; each ``01-<mac>`` file is a host whose ``append`` is the
  APPEND line of its DEFAULT label (else its first label, else the global one) without what sidusd
  renders itself (:data:`RENDERED_ARGS`); rootaufs's ``aufs=iscsi`` becomes ``overlay_hint``.

Every parser returns :class:`Parsed` (hosts, errors with file and line); :func:`merge` joins files
and refuses duplicates naming both places; :func:`sidusd.boot.hostbatch.apply_batch` makes the one new inventory.
All or nothing: the caller applies nothing when any error is left (docs/migration.md).
"""

from __future__ import annotations

import csv
import ipaddress
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from sidusd.errors import ConfigError
from sidusd.yamlstrict import check_kernel_args, check_name

from .inventory import MAX_HOSTNAME_CHARS, normalize_mac

FORMATS = ("csv", "ethers", "dhcpd", "pxelinux")
CSV_COLUMNS = ("mac", "hostname", "profile", "ip", "image", "append")
#: Kernel arguments of an old per-MAC pxelinux file that sidusd renders itself (from the image and
#: the profile), or that belonged to the rootaufs hook: dropped from the imported ``append``.
RENDERED_ARGS = frozenset({"initrd", "root", "nfsroot", "ip", "boot", "BOOTIF", "rootfstype",
                           "aufs", "ISCSI_TARGET_IP", "ISCSI_INITIATOR", "ISCSI_TARGET_NAME"})
RENDERED_WORDS = frozenset({"ro", "rw"})
_PXE_FILE = re.compile(r"^01-([0-9a-fA-F]{2}(?:-[0-9a-fA-F]{2}){5})$")


@dataclass(frozen=True)
class ImportedHost:
    """One host read from a file; ``source`` is ``FILE:LINE``."""
    mac: str
    source: str
    hostname: str | None = None
    profile: str | None = None
    ip: str | None = None
    image: str | None = None
    append: str = ""
    overlay_hint: str | None = None      # "iscsi" or "tmpfs" when the old set-up said so (aufs=)
    dropped: tuple[str, ...] = ()        # arguments removed from append (RENDERED_ARGS)


@dataclass(frozen=True)
class ImportIssue:
    """An error at ``source`` (``FILE:LINE``)."""
    source: str
    reason: str

    def __str__(self) -> str: return f"{self.source}: {self.reason}"


@dataclass(frozen=True)
class Parsed:
    hosts: tuple[ImportedHost, ...] = ()
    errors: tuple[ImportIssue, ...] = ()
    notes: tuple[str, ...] = ()


# -- field checks --------------------------------------------------------------

def _mac(text: str) -> str:
    """A MAC in any of the usual spellings (ethers allows ``8:0:20:1:2:3``)."""
    parts = re.split(r"[:-]", text.strip())
    if len(parts) == 6 and all(1 <= len(p) <= 2 for p in parts):
        text = ":".join(p.zfill(2) for p in parts)
    return normalize_mac(text)


def _hostname(text: str) -> str:
    if not text or len(text) > MAX_HOSTNAME_CHARS:
        raise ConfigError("hostname", f"{text!r} is not a host name")
    for label in text.rstrip(".").split("."):
        check_name("hostname", label, what="host name label", dns=True)
    return text.rstrip(".")


def _ip(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text.strip()))
    except ValueError:
        raise ConfigError("ip", f"{text!r} is not an IPv4 address") from None


def _reason(e: Exception) -> str:
    return str(getattr(e, "reason", None) or e)


def _host(source: str, mac: str, **fields: str | None) -> ImportedHost:
    """Checked host (ConfigError/InventoryError with the reason on a bad field)."""
    out: dict[str, str | None] = {}
    for k, v in fields.items():
        v = v.strip() if isinstance(v, str) else v
        if not v:
            continue
        out[k] = (_hostname(v) if k == "hostname" else _ip(v) if k == "ip"
                  else check_kernel_args("append", v) if k == "append" else check_name(k, v, what=f"{k} name"))
    return ImportedHost(mac=_mac(mac), source=source, hostname=out.get("hostname"), profile=out.get("profile"),
                        ip=out.get("ip"), image=out.get("image"), append=out.get("append") or "")


# -- csv ---------------------------------------------------------------------

def parse_csv(text: str, source: str) -> Parsed:
    """A CSV file with a header line (``mac,hostname,profile,ip,append``; any order, ``image`` too)."""
    rows = csv.reader(text.splitlines(), skipinitialspace=True)
    hosts: list[ImportedHost] = []
    errors: list[ImportIssue] = []
    header: list[str] | None = None
    for row in rows:
        where = f"{source}:{rows.line_num}"
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [c.strip().lower() for c in row]
            unknown = [c for c in header if c not in CSV_COLUMNS]
            if unknown or "mac" not in header or len(set(header)) != len(header):
                return Parsed(errors=(ImportIssue(where, f"bad header {','.join(row)!r}: the columns are "
                                                  f"{', '.join(CSV_COLUMNS)} (mac required, each once)"),))
            continue
        if len(row) > len(header):
            errors.append(ImportIssue(where, f"{len(row)} fields, the header has {len(header)}"))
            continue
        values = dict(zip(header, row, strict=False))
        try:
            hosts.append(_host(where, values.pop("mac"), **values))
        except ConfigError as e:
            errors.append(ImportIssue(where, _reason(e)))
    if header is None:
        errors.append(ImportIssue(f"{source}:1", "empty CSV file: no header line"))
    return Parsed(tuple(hosts), tuple(errors))


# -- /etc/ethers ---------------------------------------------------------------

def parse_ethers(text: str, source: str) -> Parsed:
    """``/etc/ethers`` (ethers(5)): a MAC and a host name or IPv4 address a line."""
    hosts: list[ImportedHost] = []
    errors: list[ImportIssue] = []
    for n, line in enumerate(text.splitlines(), 1):
        where = f"{source}:{n}"
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            errors.append(ImportIssue(where, f"expected 'MAC NAME' or 'MAC ADDRESS', got {line.strip()!r}"))
            continue
        mac, who = words
        is_ip = re.fullmatch(r"\d+\.\d+\.\d+\.\d+", who) is not None
        try:
            hosts.append(_host(where, mac, **({"ip": who} if is_ip else {"hostname": who})))
        except ConfigError as e:
            errors.append(ImportIssue(where, _reason(e)))
    return Parsed(tuple(hosts), tuple(errors))


# -- dhcpd.conf -------------------------------------------------------------------

_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\\n]|\\.)*"|[{};,]|[^\s{};,"#]+|"')


def _tokens(text: str) -> Iterator[tuple[str, int, bool]]:
    """(token, line, quoted) of dhcpd.conf; comments and blanks skipped."""
    line = 1
    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        start = line
        line += tok.count("\n")
        if tok.isspace() or tok.startswith("#"):
            continue
        if tok == '"':
            raise ValueError(f"{start}: unterminated string")
        if tok.startswith('"'):
            yield tok[1:-1].replace('\\"', '"'), start, True
        else:
            yield tok, start, False


def parse_dhcpd(text: str, source: str) -> Parsed:
    """Every ``host`` declaration of a dhcpd.conf, at any depth."""
    try:
        toks = list(_tokens(text))
    except ValueError as e:
        at, _, why = str(e).partition(": ")
        return Parsed(errors=(ImportIssue(f"{source}:{at}", why),))
    hosts: list[ImportedHost] = []
    errors: list[ImportIssue] = []
    depth_open: list[int] = []
    i = 0
    while i < len(toks):
        tok, line, quoted = toks[i]
        if tok == "{":
            depth_open.append(line)
        elif tok == "}":
            if not depth_open:
                errors.append(ImportIssue(f"{source}:{line}", "'}' without a matching '{'"))
                return Parsed(tuple(hosts), tuple(errors))
            depth_open.pop()
        elif tok.lower() == "host" and not quoted and i + 2 < len(toks) and toks[i + 2][0] == "{":
            end, host, issue = _dhcpd_host(toks, i, source)
            if issue is not None:
                errors.append(issue)
            elif host is not None:
                hosts.append(host)
            i = end
            continue
        i += 1
    if depth_open:
        errors.append(ImportIssue(f"{source}:{depth_open[-1]}", "'{' is never closed"))
    return Parsed(tuple(hosts), tuple(errors))


def _dhcpd_host(toks: Sequence[tuple[str, int, bool]], i: int,
                source: str) -> tuple[int, ImportedHost | None, ImportIssue | None]:
    """The host block starting at ``toks[i]`` (``host NAME {``): (index after it, host, error)."""
    name, line = toks[i + 1][0], toks[i][1]
    where = f"{source}:{line}"
    j, depth = i + 3, 1
    stmts: list[list[tuple[str, int, bool]]] = [[]]
    while j < len(toks) and depth:
        t = toks[j]
        if t[0] == "{":
            depth += 1
        elif t[0] == "}":
            depth -= 1
        elif t[0] == ";" and depth == 1:
            stmts.append([])
        elif depth == 1:
            stmts[-1].append(t)
        j += 1
    if depth:
        return j, None, ImportIssue(where, f"host {name} {{ is never closed")
    fields: dict[str, str] = {}
    mac = None
    for st in stmts:
        words = [w for w, _, _ in st if w != ","]
        low = [w.lower() for w in words]
        if low[:2] == ["hardware", "ethernet"] and len(words) == 3:
            mac = words[2]
        elif low[:1] == ["fixed-address"] and len(words) >= 2:
            fields["ip"] = words[1]
        elif low[:2] == ["option", "host-name"] and len(words) == 3:
            fields["hostname"] = words[2]
        elif low[:1] == ["hardware"]:
            return j, None, ImportIssue(f"{source}:{st[0][1]}", f"host {name}: only 'hardware ethernet' "
                                        "addresses can network-boot with sidus")
    if mac is None:
        return j, None, ImportIssue(where, f"host {name} has no 'hardware ethernet' address")
    fields.setdefault("hostname", name)
    try:
        return j, _host(where, mac, **fields), None
    except ConfigError as e:
        return j, None, ImportIssue(where, f"host {name}: {_reason(e)}")


# -- pxelinux.cfg/ -----------------------------------------------------------------

def split_append(append: str) -> tuple[str, tuple[str, ...], str | None]:
    """(the arguments sidusd does not render itself, those dropped, the ``aufs=`` value)."""
    kept: list[str] = []
    dropped: list[str] = []
    aufs = None
    for arg in append.split():
        key = arg.split("=", 1)[0]
        if key == "aufs" and "=" in arg:
            aufs = arg.split("=", 1)[1]
        if (key in RENDERED_ARGS and "=" in arg) or arg in RENDERED_WORDS:
            dropped.append(arg)
        else:
            kept.append(arg)
    return " ".join(kept), tuple(dropped), aufs


def pxelinux_append(text: str) -> tuple[str, int]:
    """The APPEND line a pxelinux config file boots with, and its line (0: none): the DEFAULT
    label's, else the first label's, else the global one."""
    default = None
    labels: dict[str, tuple[str, int]] = {}
    order: list[str] = []
    glob: tuple[str, int] = ("", 0)
    current: str | None = None
    for n, line in enumerate(text.splitlines(), 1):
        words = line.strip().split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        key, rest = words[0].lower(), (words[1] if len(words) > 1 else "")
        if key == "default":
            default = rest.split()[0] if rest.split() else None
        elif key == "label":
            current = rest.strip()
            order.append(current)
            labels.setdefault(current, ("", 0))
        elif key == "append":
            if current is None:
                glob = (rest.strip(), n)
            else:
                labels[current] = (rest.strip(), n)
    if default is not None and default in labels:
        return labels[default]
    if order:
        return labels[order[0]]
    return glob


def parse_pxelinux(files: Mapping[str, str], source: str) -> Parsed:
    """A ``pxelinux.cfg/`` directory given as file name -> text; ``01-<mac>`` files only."""
    hosts: list[ImportedHost] = []
    errors: list[ImportIssue] = []
    notes: list[str] = []
    for name in sorted(files):
        m = _PXE_FILE.fullmatch(name)
        if m is None:
            notes.append(f"{source}/{name}: not a per-MAC file (01-<mac>), ignored")
            continue
        append, line = pxelinux_append(files[name])
        where = f"{source}/{name}:{line or 1}"
        kept, dropped, aufs = split_append(append)
        try:
            h = _host(where, m.group(1), append=kept)
        except ConfigError as e:
            errors.append(ImportIssue(where, _reason(e)))
            continue
        hint = aufs if aufs in ("iscsi", "tmpfs") else None
        hosts.append(replace(h, dropped=dropped, overlay_hint=hint))
    return Parsed(tuple(hosts), tuple(errors), tuple(notes))


# -- detection and merge --------------------------------------------------------------

def detect_format(name: str, text: str) -> str:
    """``csv``, ``dhcpd`` or ``ethers`` for one file (a directory is ``pxelinux``)."""
    first = next((ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
    if name.lower().endswith(".csv") or ("," in first and "mac" in first.lower()):
        return "csv"
    if re.search(r"\bhardware\s+ethernet\b", text, re.IGNORECASE) or name.endswith("dhcpd.conf"):
        return "dhcpd"
    return "ethers"


def parse(fmt: str, text: str, source: str) -> Parsed:
    """One file in format ``fmt`` (not ``pxelinux``: see :func:`parse_pxelinux`)."""
    return {"csv": parse_csv, "ethers": parse_ethers, "dhcpd": parse_dhcpd}[fmt](text, source)


_FIELDS = ("hostname", "profile", "ip", "image", "append", "overlay_hint")


def merge(parsed: Sequence[Parsed], existing: Mapping[str, str], replace_existing: bool = False) -> Parsed:
    """All hosts of ``parsed`` (one :class:`Parsed` per file).  A MAC twice in one file, in two files
    with different values of one field, or in ``existing`` (MAC -> where, e.g. the inventory's host)
    without ``replace_existing``, is an error naming both places.  One MAC in two files that agree
    (dhcpd.conf: its name and address; pxelinux.cfg/: its APPEND) is one host with both."""
    errors = [e for p in parsed for e in p.errors]
    hosts: dict[str, ImportedHost] = {}
    for p in parsed:
        mine: set[str] = set()
        for h in p.hosts:
            old = hosts.get(h.mac)
            if h.mac in mine:
                where = old.source if old else "a line above"
                errors.append(ImportIssue(h.source, f"MAC {h.mac} is already at {where}"))
                continue
            mine.add(h.mac)
            if old is None:
                if h.mac in existing and not replace_existing:
                    errors.append(ImportIssue(h.source, f"MAC {h.mac} is already in the inventory "
                                              f"({existing[h.mac]}); --replace replaces it"))
                    continue
                hosts[h.mac] = h
                continue
            clash = [f for f in _FIELDS if getattr(h, f) and getattr(old, f) and getattr(h, f) != getattr(old, f)]
            if clash:
                errors.append(ImportIssue(h.source, f"MAC {h.mac}: {clash[0]} {getattr(h, clash[0])!r} differs "
                                          f"from {getattr(old, clash[0])!r} at {old.source}"))
                continue
            hosts[h.mac] = replace(old, source=f"{old.source} + {h.source}", dropped=old.dropped + h.dropped,
                                   **{f: getattr(h, f) for f in _FIELDS if getattr(h, f) and not getattr(old, f)})
    return Parsed(tuple(hosts.values()), tuple(errors), tuple(n for p in parsed for n in p.notes))


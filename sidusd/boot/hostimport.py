"""Hosts from a hand-made site's files, for ``sidusctl hosts import`` (pure: text in, hosts or errors out).

Four formats (docs/migration.md):

* ``csv``      a header line naming the columns (``mac`` required; ``hostname``, ``profile``,
               ``ip``, ``image``, ``append`` optional), then one host a line.
* ``ethers``   ``/etc/ethers``: ``MAC NAME-OR-ADDRESS`` a line, ``#`` comments.
* ``dhcpd``    isc-dhcp-server's dhcpd.conf: every ``host NAME { hardware ethernet M;
               fixed-address IP; option host-name "N"; }`` at any depth (groups, subnets,
               shared-networks), comments and quoted strings understood.
* ``pxelinux`` a tftpd-hpa ``pxelinux.cfg/`` directory: each ``01-<mac>`` file is a host whose
               extra kernel arguments are the APPEND line of its DEFAULT label (else its first
               label, else the global APPEND).  What sidus renders itself is dropped from it:
               see :data:`RENDERED_ARGS`.  The documentation's rootaufs ``aufs=iscsi`` is kept as
               :attr:`ImportedHost.overlay_hint` (the CLI picks ``--iscsi-profile`` for those).

Every parser returns :class:`Parsed` (hosts, errors with file and line).  :func:`merge` refuses a
MAC seen twice or already in the inventory (unless ``replace``), naming both places;
:func:`apply_batch` makes the one new inventory.  All or nothing: nothing applied on any error.
"""

from __future__ import annotations

import csv
import ipaddress
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from sidusd.errors import ConfigError, InventoryError
from sidusd.yamlstrict import check_kernel_args, check_name

from .inventory import MAX_HOSTNAME_CHARS, Host, Inventory, normalize_mac

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


def merge(parsed: Sequence[Parsed], existing: Mapping[str, str], replace_existing: bool = False) -> Parsed:
    """All hosts of ``parsed``; a MAC twice, or in ``existing`` (MAC -> where, e.g. the inventory's
    host name) without ``replace_existing``, is an error naming both places."""
    hosts: list[ImportedHost] = []
    errors = [e for p in parsed for e in p.errors]
    seen: dict[str, str] = {}
    for p in parsed:
        for h in p.hosts:
            if h.mac in seen:
                errors.append(ImportIssue(h.source, f"MAC {h.mac} is already at {seen[h.mac]}"))
                continue
            seen[h.mac] = h.source
            if h.mac in existing and not replace_existing:
                errors.append(ImportIssue(h.source, f"MAC {h.mac} is already in the inventory "
                                          f"({existing[h.mac]}); --replace replaces it"))
                continue
            hosts.append(h)
    return Parsed(tuple(hosts), tuple(errors), tuple(n for p in parsed for n in p.notes))


def apply_batch(inv: Inventory, hosts: Sequence[Host], sources: Sequence[str | None],
                replace_existing: bool = False) -> Inventory:
    """``inv`` with every host of the batch added (replacing the same MACs when
    ``replace_existing``), checked once as a whole; InventoryError names the batch entry's source."""
    where = {h.mac: (src or f"hosts[{i}]") for i, (h, src) in enumerate(zip(hosts, sources, strict=True))}
    if len(where) != len(hosts):
        dup = next(h.mac for i, h in enumerate(hosts) if h.mac in {x.mac for x in hosts[:i]})
        raise InventoryError("hosts", f"MAC {dup} is twice in the import")
    taken = [m for m in where if m in inv.hosts]
    if taken and not replace_existing:
        listed = ", ".join(f"{m} (from {where[m]})" for m in taken[:10]) + (" ..." if len(taken) > 10 else "")
        raise InventoryError("hosts", f"already in the inventory: {listed}; nothing imported (--replace "
                             "replaces them)")
    merged = dict(inv.hosts)
    merged.update({h.mac: h for h in hosts})
    try:
        return Inventory(inv.profiles, merged)
    except InventoryError as e:
        m = re.match(r"hosts\[([0-9a-f:]{17})\]", e.path)
        src = where.get(m.group(1)) if m else None
        raise InventoryError(e.path, e.reason + (f" (imported from {src})" if src else "")
                             + "; nothing imported") from None

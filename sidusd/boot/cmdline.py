"""What an ``append`` (extra kernel arguments) may contain, for every boot file we write (pure).

One append string is written verbatim into two formats, and each reads it
with its own rules.  An append is accepted only when both formats and the
Linux kernel see exactly the arguments the operator wrote; anything else is
refused (:func:`append_problem` says why), since neither format has a way
to quote.

iPXE scripts (``src/image/script.c`` ``process_script``; ``src/core/exec.c``
``system``, ``split_command``, ``command_terminator``; ``src/core/settings.c``
``expand_settings``; ``src/core/getopt.c``):

* the script is split into lines at ``\\n``; one trailing ``\\r`` is dropped;
  a line ending in ``\\`` is joined with the next one;
* a line is split into tokens at white space, with no quoting and no escape
  of any kind;
* a token that *starts* with ``#`` starts a comment: it and every token after
  it are dropped (``BOOTIF=`` after the append would be lost);
* a token that *is* ``||``, ``&&`` or ``;`` ends the command and starts a new
  one (``console=ttyS0 ; shell`` runs ``shell``);
* ``${name}`` anywhere in a token is replaced by a setting's value;
* ``kernel``'s getopt stops at the first token not starting with ``-`` (the
  URI), so later tokens are never options; the image's command line is the
  remaining tokens joined with one space (``concat_args``).

pxelinux (syslinux ``com32/elflink/ldlinux/readconfig.c``
``parse_config_file``): lines end at the first ``\\r`` or ``\\n``; ``APPEND``
takes the rest of the line verbatim, with no comment and no expansion; the
loader itself reads ``initrd=`` from that line and loads the file it names.

Linux (``lib/cmdline.c`` ``next_arg``): words are separated by white space
outside double quotes; an unclosed ``"`` makes everything after it one word.

GRUB (``sidusd.boot.grub`` renders ``grub.cfg``; GRUB 2.06
``grub-core/script/yylex.l``, ``grub-core/lib/cmdline.c``): the renderer puts
every Linux word of the command line in single quotes, inside which GRUB's
lexer takes every character literally up to the next ``'`` (so ``;``, ``#``,
``{``, ``<``, newlines... start nothing), and GRUB has no escape inside them.
What GRUB then hands to Linux is each argument joined with one space, but
``grub_create_loader_cmdline`` puts a backslash before every ``"``, ``'`` and
``\\`` and wraps an argument holding a space in double quotes: Linux
(which knows no backslash escapes) would not read ``a="b c"`` as written.
:func:`grub_append_problem` therefore refuses quotes of either kind in an
append that goes into a GRUB config.

The character rule (printable ASCII without ``$ | & \\``) is
``yamlstrict.check_kernel_args``; this module adds the rules above, which
need the tokens.
"""

from __future__ import annotations

import re

from sidusd.errors import ConfigError
from sidusd.yamlstrict import check_kernel_args

IPXE_TERMINATORS = ("||", "&&", ";")
RESERVED_PARAMS = ("initrd",)        # the renderer writes it; pxelinux and the EFI stub act on it
_CHARS = re.compile(r"^[ !-#%'-\[\]-{}~]*$")   # printable ASCII minus $ & \ |  (and no tab)


def linux_words(line: str) -> list[str]:
    """``line`` cut into words as Linux ``next_arg`` does (quotes kept in the words)."""
    words, i, n = [], 0, len(line)
    while i < n:
        while i < n and line[i].isspace():
            i += 1
        if i >= n:
            break
        start, in_quote = i, False
        while i < n and (in_quote or not line[i].isspace()):
            if line[i] == '"':
                in_quote = not in_quote
            i += 1
        words.append(line[start:i])
    return words


def _param(word: str) -> str:
    return word.lstrip('"').split("=", 1)[0]


def append_problem(value: str) -> str | None:
    """Why ``value`` cannot go into a pxelinux APPEND line and an iPXE ``kernel`` line as is, or None."""
    if not isinstance(value, str):
        return f"expected kernel arguments as a string, got {type(value).__name__}"
    if not _CHARS.fullmatch(value):
        bad = next(c for c in value if not _CHARS.fullmatch(c))
        return (f"contains {bad!r}: only printable ASCII without '$', '|', '&' and '\\' is allowed "
                "in kernel arguments")
    for token in value.split():                         # iPXE: white space only, no quoting
        if token.startswith("#"):
            return (f"the word {token!r} starts with '#': iPXE would take it and everything after it "
                    "on the kernel line as a comment")
        if token in IPXE_TERMINATORS:
            return f"the word {token!r} would end iPXE's kernel command and start another one"
    if value.count('"') % 2:
        return ("has an unclosed '\"': Linux would join every argument after it (sidusd's BOOTIF=, "
                "the next append) into one")
    in_quote = False
    for i, c in enumerate(value):
        if c == '"':
            in_quote = not in_quote
        elif in_quote and c == " " and value[i + 1:i + 2] == " ":
            return "has two spaces in a row inside quotes: iPXE joins its words with one space"
    for word in linux_words(value):
        if _param(word) in RESERVED_PARAMS:
            return (f"sets {_param(word)}= ({word!r}): sidusd writes it itself; pxelinux and the "
                    "kernel's EFI stub would load the file it names")
    return None


def grub_append_problem(value: str) -> str | None:
    """Why ``value`` cannot go into a GRUB ``linux`` line as single-quoted words, or None."""
    problem = append_problem(value)
    if problem is not None:
        return problem
    for q in ("'", '"'):
        if q in value:
            return (f"contains {q!r}: GRUB passes it to Linux as {chr(92) + q!r} (grub_create_loader_cmdline), "
                    "and a ' would end GRUB's single-quoted word")
    return None


def check_append(where: str, value: str, max_chars: int = 512) -> str:
    """``value`` as kernel arguments every rendered format reads the same, or ConfigError(where, why)."""
    check_kernel_args(where, value, max_chars)
    problem = append_problem(value)
    if problem is not None:
        raise ConfigError(where, problem)
    return value

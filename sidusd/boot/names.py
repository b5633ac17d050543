"""Names that several writers share, checked in one place (pure).

:func:`image_root_problem` is the one rule for an image root directory, used by
the config (``images.<name>.root``), the NFS exports (``storage/nfs.py``: the
path goes verbatim into exports(5) and into a quoted ganesha string) and the
boot files (``boot/render.py``: it goes on the kernel command line as
``nfsroot=<server>:<root>,<options>``, where ``,`` starts the mount options and
``:`` is the server separator).  One character set that needs no escaping in
any of the three: letters, digits and ``. _ + ~ / @ = -``.
"""

from __future__ import annotations

IMAGE_ROOT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+~/@=-")
IMAGE_ROOT_RULE = "letters, digits and . _ + ~ / @ = -"


def image_root_problem(text: str) -> str | None:
    """Why ``text`` cannot be an exported image root, or None when it can.

    Absolute, not ``/`` itself, no ``..`` component, only :data:`IMAGE_ROOT_CHARS`.
    """
    if not isinstance(text, str) or not text.startswith("/"):
        return f"{text!r} must be absolute (or relative to the config file)"
    if text.rstrip("/") == "":
        return "refusing to export the whole file system '/'"
    bad = sorted(set(text) - IMAGE_ROOT_CHARS)
    if bad:
        return (f"{text!r} contains {''.join(bad)!r}: allowed are {IMAGE_ROOT_RULE} "
                "(it goes on the kernel command line as nfsroot=)")
    if ".." in text.split("/"):
        return f"{text!r} contains '..'"
    return None

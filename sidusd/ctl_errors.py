"""sidusctl's exit codes and its one error, in a module of their own: ``sidusd.ctl`` runs as
``__main__`` (``python -m sidusd.ctl``), and a class defined there would not be the one its
helper modules (``sidusd.ctl_remote``) raise."""

from __future__ import annotations

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_PERMISSION, EXIT_PROTOCOL = range(6)


class CtlError(Exception):
    """A failure to report on stderr with exit status ``code``."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code

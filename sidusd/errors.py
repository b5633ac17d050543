"""One error hierarchy for sidus.

Decoders raise only :class:`RemoteProtocolError`; anything else escaping a
decoder is a bug.  Start-up errors (:class:`ConfigError`, :class:`StartupError`)
are the only fatal ones.
"""


class SidusError(Exception):
    """Base of every error sidus raises on purpose."""


class RemoteProtocolError(SidusError):
    """A peer sent bytes that do not decode (truncated, malformed, illegal).

    ``RemoteProtocolError(code, message)``: ``code`` is a fixed short name
    that callers count and branch on (the supervisor's
    ``privsep.refused.<code>``: ``oversized``, ``bad_json``, ``unknown_type``,
    ``bad_field``); ``str(exc)`` is the message alone.  With one argument it
    is the message and the code is :attr:`DEFAULT_CODE`.
    """

    DEFAULT_CODE = "malformed"

    def __init__(self, code_or_message: str, message: str | None = None):
        if message is None:
            code, message = self.DEFAULT_CODE, code_or_message
        else:
            code = code_or_message
        self.code = code
        super().__init__(message)


class ConfigError(SidusError):
    """A configuration value is refused.  ``path`` is the dotted key path."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)


class InventoryError(ConfigError):
    """The hosts/profiles inventory is refused (same shape as ConfigError)."""


class StartupError(SidusError):
    """The daemon cannot start (port busy, interface missing...)."""


class BackendError(SidusError):
    """An external server (NFS, iSCSI, ...) failed; ``detail`` is its own message."""

    def __init__(self, message: str, detail: str = ""):
        self.detail = detail
        super().__init__(f"{message}: {detail}" if detail else message)


class ControlError(SidusError):
    """A control request is refused (bad arguments, unknown host...)."""

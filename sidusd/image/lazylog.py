"""Loggers for the image modules that import structlog only when an event is to be written.

``sidus-image`` is a command: its start-up counts in every generation it makes
(docs/performance.md "Image generations (issue 16)").  :mod:`sidusd.observability` imports
structlog, and structlog imports asyncio: tens of milliseconds before the first line of work,
for events that, at the command's default level (warning), are never written.  So the image
modules (build, shell, chroot, generations) take their logger from here:

* in a process that called :func:`defer_setup` (``sidus-image``), an event below the level
  given there is dropped without importing anything; the first event at or above it calls
  :func:`sidusd.observability.setup_logging` with the deferred arguments, then goes to structlog;
* anywhere else (sidusd, the tests, the bench: whoever configures structlog), every call goes
  to :func:`sidusd.observability.get_logger`'s logger, as if that had been used directly.
"""

from __future__ import annotations

from typing import Any

LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "exception": 40,
          "critical": 50, "fatal": 50}


class _Deferred:
    """The arguments of ``setup_logging`` kept by :func:`defer_setup` until the first event that
    passes their level (``args`` is None once done, or when nothing was deferred)."""

    def __init__(self) -> None:
        self.args: tuple[str, str] | None = None
        self.threshold = 0


_DEFERRED = _Deferred()


def defer_setup(fmt: str, level: str) -> None:
    """``setup_logging(fmt, level)``, done at the first event at or above ``level``."""
    _DEFERRED.threshold = LEVELS[level.lower()]
    _DEFERRED.args = (fmt, level)


def setup_now() -> None:
    """Do the deferred ``setup_logging`` now (before code that logs through structlog itself)."""
    args, _DEFERRED.args = _DEFERRED.args, None
    if args is not None:
        from sidusd.observability import setup_logging
        setup_logging(*args)


def end_deferral() -> None:
    """Forget a deferred setup not done (no event passed its level): from here on every event goes
    to structlog as whoever else configured it (a process that goes on after ``main``: tests)."""
    _DEFERRED.args = None


def dropped(method: str) -> bool:
    """Whether an event of ``method`` (info, warning...) is dropped here, before structlog."""
    return _DEFERRED.args is not None and LEVELS.get(method, 0) < _DEFERRED.threshold


class LazyLogger:
    """What :func:`sidusd.observability.get_logger` returns, made on first use (see the module)."""

    def __init__(self, name: str, ctx: dict[str, Any]):
        self._name = name
        self._ctx = ctx
        self._real: Any = None

    def _logger(self) -> Any:
        setup_now()
        if self._real is None:
            from sidusd.observability import get_logger as real_get_logger
            self._real = real_get_logger(self._name, **self._ctx)
        return self._real

    def _emit(self, method: str, event: str, args: tuple, kw: dict[str, Any]) -> Any:
        if dropped(method):
            return None
        return getattr(self._logger(), method)(event, *args, **kw)

    def debug(self, event: str, *args: Any, **kw: Any) -> Any:
        return self._emit("debug", event, args, kw)

    def info(self, event: str, *args: Any, **kw: Any) -> Any:
        return self._emit("info", event, args, kw)

    def warning(self, event: str, *args: Any, **kw: Any) -> Any:
        return self._emit("warning", event, args, kw)

    warn = warning

    def error(self, event: str, *args: Any, **kw: Any) -> Any:
        return self._emit("error", event, args, kw)

    def exception(self, event: str, *args: Any, **kw: Any) -> Any:
        return self._emit("exception", event, args, kw)

    def critical(self, event: str, *args: Any, **kw: Any) -> Any:
        return self._emit("critical", event, args, kw)

    def bind(self, **kw: Any) -> LazyLogger:
        return LazyLogger(self._name, {**self._ctx, **kw})

    def __getattr__(self, attr: str) -> Any:        # anything else: the real logger's
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self._logger(), attr)


def get_logger(name: str = "sidusd", **ctx: Any) -> Any:
    """A logger with ``component=name`` and ``ctx`` bound (see the module)."""
    return LazyLogger(name, ctx)

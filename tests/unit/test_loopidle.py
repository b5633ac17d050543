"""loopidle.idle_budget: how long Engine.pump may keep a real asyncio loop's thread."""

from __future__ import annotations

import asyncio
import selectors
from types import SimpleNamespace

from sidusd.net.loopidle import idle_budget


def with_loop(fn):
    loop = asyncio.SelectorEventLoop(selectors.EpollSelector())
    try:
        return loop.run_until_complete(fn(loop))
    finally:
        loop.close()


def test_an_idle_loop_gets_the_long_wait_and_its_epoll_descriptor() -> None:
    async def main(loop):
        return idle_budget(loop, loop.time(), 50_000, 5000), loop._selector.fileno()
    (wait_us, fd), epoll_fd = with_loop(main)
    assert (wait_us, fd) == (50_000, epoll_fd) and fd >= 0


def test_the_wait_ends_before_the_next_timer() -> None:
    async def main(loop):
        now = loop.time()
        loop.call_at(now + 0.020, lambda: None)
        loop.call_at(now + 0.200, lambda: None)
        return idle_budget(loop, now, 50_000, 5000)
    wait_us, _ = with_loop(main)
    assert 19_000 <= wait_us <= 20_000, wait_us


def test_a_timer_already_due_allows_no_wait() -> None:
    async def main(loop):
        now = loop.time()
        loop.call_at(now - 1.0, lambda: None)
        return idle_budget(loop, now, 50_000, 5000)
    assert with_loop(main)[0] == 0


def test_a_queued_callback_gets_the_short_wait() -> None:
    async def main(loop):
        loop.call_soon(lambda: None)
        return idle_budget(loop, loop.time(), 50_000, 5000)
    wait_us, fd = with_loop(main)
    assert wait_us == 5000 and fd >= 0


def test_a_loop_without_those_internals_gets_the_short_wait_and_no_descriptor() -> None:
    assert idle_budget(SimpleNamespace(), 0.0, 50_000, 5000) == (5000, -1)
    closed = SimpleNamespace(_selector=SimpleNamespace(fileno=lambda: (_ for _ in ()).throw(ValueError())),
                             _ready=[], _scheduled=[])
    assert idle_budget(closed, 0.0, 50_000, 5000) == (5000, -1)

"""The body of `async with connection:` as an async generator. It lives apart
from `connection.py` because mypyc cannot compile async generators, and
`connection.py` is on the list `dev.py compile` builds. It takes the
connection's two methods it calls, not the connection, so that it needs
nothing from `connection.py`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def hosted(
    run: Callable[..., Awaitable[None]], shutdown: Callable[[], None]
) -> AsyncIterator[None]:
    """Start `run` (a connection's `run`, which reports when it is started) in
    a nursery around the body of `async with`, and call `shutdown` when the
    body ends. The body's exception is carried out of the nursery and
    re-raised as is, so callers see their own error rather than an
    ExceptionGroup wrapping it."""
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        try:
            yield
        except BaseException as exc:
            body_error = exc
        finally:
            shutdown()
    if body_error is not None:
        raise body_error

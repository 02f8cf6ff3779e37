"""The body of `async with connection:` as an async generator. It lives apart
from `connection.py` because mypyc cannot compile async generators, and
`connection.py` is on the list `dev.py compile` builds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from kvsvr.net.connection import RpcConnection


@asynccontextmanager
async def hosted(connection: RpcConnection) -> AsyncIterator[None]:
    """Run `connection` in a nursery around the body of `async with`. The
    body's exception is carried out of the nursery and re-raised as is, so
    callers see their own error rather than an ExceptionGroup wrapping it."""
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(connection.run)
        try:
            yield
        except BaseException as exc:
            body_error = exc
        finally:
            connection._shutdown("closed by its owner")
    if body_error is not None:
        raise body_error

"""The blocking kvsvr client (`SyncClient`): an async `Client` run by trio in
a background thread of its own, called into from the caller's threads."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final, ParamSpec, TypeVar

import trio

from kvsvr.api import DEFAULT_TABLE, SCAN_LIMIT_DEFAULT, PartitionMap
from kvsvr.client_async import Client, Item, connect
from kvsvr.client_watch import StartVersion, SyncWatch
from kvsvr.errors import KvsvrError
from kvsvr.keys import KeyPart, UserKey
from kvsvr.net.tls import TLSOptions

# Time `SyncClient.close` waits for its trio thread to finish closing connections.
SYNC_CLOSE_TIMEOUT_S: Final = 10.0

_P = ParamSpec("_P")
_T = TypeVar("_T")


class SyncClient:
    """A blocking kvsvr client for scripts, with the methods of `Client`.

        with SyncClient(["127.0.0.1:7101"], secret="s") as client:
            client.put("greeting", b"hello")

    It runs trio and an async `Client` in a background thread of its own and
    calls into it; several threads may share one SyncClient. `close()` (or
    leaving the `with` block) closes the connections and ends the thread.
    """

    def __init__(
        self,
        addresses: list[str] | str,
        *,
        secret: str | bytes | None = None,
        timeout_s: float = 5.0,
        near_cache_bytes: int | None = None,
        tls: TLSOptions | None = None,
    ) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._client: Client | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=trio.run,
            args=(self._main, addresses, secret, timeout_s, near_cache_bytes, tls),
            name="kvsvr-sync-client",
            daemon=True,  # a forgotten close() must not keep the interpreter alive
        )
        self._thread.start()
        self._ready.wait()  # connect() is bounded by timeout_s, so this ends
        if self._client is None:
            self._thread.join()
            self._closed = True
            assert self._error is not None
            error, self._error = self._error, None
            raise error

    async def _main(
        self,
        addresses: list[str] | str,
        secret: str | bytes | None,
        timeout_s: float,
        near_cache_bytes: int | None,
        tls: TLSOptions | None,
    ) -> None:
        try:
            async with connect(
                addresses,
                secret=secret,
                timeout_s=timeout_s,
                near_cache_bytes=near_cache_bytes,
                tls=tls,
            ) as client:
                self._stop = trio.Event()
                self._token = trio.lowlevel.current_trio_token()
                self._client = client
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            # Carried to the caller's thread: by __init__ or by close().
            self._error = exc
        finally:
            self._ready.set()

    def _run(self, method: Callable[_P, Awaitable[_T]], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if self._closed:
            raise RuntimeError("the kvsvr SyncClient is closed")

        async def call() -> _T:
            return await method(*args, **kwargs)

        return trio.from_thread.run(call, trio_token=self._token)

    @property
    def _async(self) -> Client:
        if self._client is None:
            raise RuntimeError("the kvsvr SyncClient is closed")
        return self._client

    def get(
        self,
        key: UserKey,
        *,
        table: str = DEFAULT_TABLE,
        consistency: str = "strong",
        max_age_s: float | None = None,
    ) -> Item | None:
        return self._run(
            self._async.get, key, table=table, consistency=consistency, max_age_s=max_age_s
        )

    def put(
        self,
        key: UserKey,
        value: bytes,
        *,
        table: str = DEFAULT_TABLE,
        if_version: int | None = None,
        if_absent: bool = False,
    ) -> int:
        return self._run(
            self._async.put, key, value, table=table, if_version=if_version, if_absent=if_absent
        )

    def delete(
        self, key: UserKey, *, table: str = DEFAULT_TABLE, if_version: int | None = None
    ) -> int:
        return self._run(self._async.delete, key, table=table, if_version=if_version)

    def cas(
        self, key: UserKey, value: bytes, *, if_version: int, table: str = DEFAULT_TABLE
    ) -> int:
        return self._run(self._async.cas, key, value, if_version=if_version, table=table)

    def scan(
        self,
        partition_key: KeyPart,
        *,
        table: str = DEFAULT_TABLE,
        start: KeyPart | None = None,
        end: KeyPart | None = None,
        limit: int = SCAN_LIMIT_DEFAULT,
    ) -> list[Item]:
        return self._run(
            self._async.scan, partition_key, table=table, start=start, end=end, limit=limit
        )

    def watch(
        self,
        key: UserKey,
        *,
        table: str = DEFAULT_TABLE,
        start_version: StartVersion = None,
        partition: bool = False,
        start: KeyPart | None = None,
        end: KeyPart | None = None,
    ) -> SyncWatch:
        """`Client.watch` as an iterator: `with client.watch(key) as events:
        for event in events: ...`."""
        watch = self._async.watch(
            key,
            table=table,
            start_version=start_version,
            partition=partition,
            start=start,
            end=end,
        )
        return SyncWatch(watch, self._run)

    def status(self, node: str | None = None) -> dict[str, Any]:
        return self._run(self._async.status, node)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        self._run(self._async.wait_ready, timeout_s)

    def recover(
        self, node: str, *, accept_data_loss: bool, timeout_s: float = 300.0
    ) -> dict[str, Any]:
        return self._run(
            self._async.recover, node, accept_data_loss=accept_data_loss, timeout_s=timeout_s
        )

    def partition_map(self, *, refresh: bool = False) -> PartitionMap:
        return self._run(self._async.partition_map, refresh=refresh)

    def close(self) -> None:
        """Close the connections and stop the background thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        stop, token = self._stop, self._token
        assert stop is not None and token is not None
        try:
            trio.from_thread.run_sync(stop.set, trio_token=token)
        except trio.RunFinishedError:
            pass  # the thread already ended (its error, if any, is raised below)
        self._thread.join(SYNC_CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            raise KvsvrError(f"the client thread did not stop within {SYNC_CLOSE_TIMEOUT_S} s")
        self._client = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

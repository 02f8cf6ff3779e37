"""Watches, the client side: `Client.watch` returns a `Watch`.

A watch asks a replica of the key for the changes after its cursors and
holds one request open there; the node answers the moment a change is
chosen (see `kvsvr.node.watch`). The client asks again only once the
events of the last answer were consumed, so a slow reader keeps nothing
growing anywhere. If the node is lost, the next replica is asked from the
same cursors: no event is missed that the cluster's logs still hold, none is
delivered twice; when the history is gone the watch raises `WatchCompacted`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Protocol, TypeAlias

import trio

from kvsvr.api import (
    DEFAULT_TABLE,
    WATCH_CURSORS_MAX,
    Method,
    WatchEvent,
    WatchRequest,
    watch_reply_from_wire,
)
from kvsvr.errors import InvalidRequest, Unavailable
from kvsvr.keys import KeyPart, UserKey, encode_key, split_user_key, to_bytes


class _Versioned(Protocol):
    """What a watch reads of `Client.get`'s and `Client.scan`'s items."""

    @property
    def version(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...


class WatchingClient(Protocol):
    """The parts of `kvsvr.Client` a watch uses (named here, not imported,
    so that the client module and this one do not import each other)."""

    @property
    def timeout_s(self) -> float: ...

    async def get(self, key: UserKey, *, table: str = ...) -> _Versioned | None: ...

    async def scan(
        self,
        partition_key: KeyPart,
        *,
        table: str = ...,
        start: KeyPart | None = ...,
        end: KeyPart | None = ...,
        limit: int = ...,
    ) -> Sequence[_Versioned]: ...

    async def _call(
        self,
        table: str,
        partition_key: bytes,
        method: str,
        body: object,
        *,
        repeatable: bool,
        deadline: float,
    ) -> object: ...


# How long the node may hold one watch request with nothing to say. Shorter
# than the node's WATCH_WAIT_MAX_S; each empty answer costs one round trip.
WATCH_HOLD_S: Final = 20.0
# Pause between two attempts when no replica of the key can be reached.
WATCH_RETRY_S: Final = 0.2

StartVersion: TypeAlias = int | Mapping[KeyPart, int] | None


class Watch:
    """`async with client.watch(key) as events: async for event in events`.

    Events are `WatchEvent`s: `key` (the sort key, b"" for a key without
    one), `version`, `previous_version` and `value` (None: deleted), in
    version order per key. `version` (one key) or `versions` (a partition)
    is where to resume from after a disconnect (`start_version=`)."""

    def __init__(
        self,
        client: WatchingClient,
        key: UserKey,
        table: str,
        start_version: StartVersion,
        partition: bool,
        start: KeyPart | None = None,
        end: KeyPart | None = None,
    ) -> None:
        self._sort_key: bytes | None
        if partition:
            if isinstance(key, tuple):
                raise InvalidRequest("a partition watch takes a partition key, not a tuple")
            self._partition_key, self._sort_key = to_bytes(key), None
        else:
            self._partition_key, self._sort_key = split_user_key(key)
        encode_key(self._partition_key, self._sort_key or b"")  # checks sizes
        if not partition and (start is not None or end is not None):
            raise InvalidRequest("start and end bound a partition watch (partition=True)")
        self._start_key = None if start is None else to_bytes(start)
        self._end_key = None if end is None else to_bytes(end)
        self._client = client
        self._table = table
        self._cursors: dict[bytes, int] = {}
        self._start = _check_start(start_version, partition, self._sort_key)
        self._buffer: deque[WatchEvent] = deque()
        self._entered = False

    @property
    def version(self) -> int:
        """The last version delivered of a one-key watch."""
        if self._sort_key is None:
            raise InvalidRequest("a partition watch has one version per key: see `versions`")
        return self._cursors.get(self._sort_key, 0)

    @property
    def versions(self) -> dict[bytes, int]:
        """The last version delivered of each key (sort key) seen."""
        return dict(self._cursors)

    async def __aenter__(self) -> Watch:
        if self._entered:
            raise RuntimeError("a Watch is entered once")
        self._entered = True
        if self._start is not None:
            self._cursors = dict(self._start)
        elif self._sort_key is not None:
            item = await self._client.get((self._partition_key, self._sort_key), table=self._table)
            self._cursors = {self._sort_key: 0 if item is None else item.version}
        else:
            items = await self._client.scan(
                self._partition_key,
                table=self._table,
                start=self._start_key,
                end=self._end_key,
                limit=WATCH_CURSORS_MAX,
            )
            if len(items) >= WATCH_CURSORS_MAX:
                raise InvalidRequest(
                    f"a partition watch covers at most {WATCH_CURSORS_MAX} keys (WATCH_CURSORS_MAX)"
                )
            self._cursors = {item.key or b"": item.version for item in items}
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._buffer.clear()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        if not self._entered:
            raise RuntimeError("use `async with client.watch(...) as events`")
        while not self._buffer:
            self._buffer.extend(await self._ask())
        event = self._buffer.popleft()
        assert event.version > self._cursors.get(event.key, 0), "events move forward"
        self._cursors[event.key] = event.version
        return event

    async def _ask(self) -> list[WatchEvent]:
        """One answer from a replica: the events after the cursors (maybe none)."""
        if len(self._cursors) > WATCH_CURSORS_MAX:
            raise InvalidRequest(
                f"a partition watch covers at most {WATCH_CURSORS_MAX} keys (WATCH_CURSORS_MAX)"
            )
        body = WatchRequest(
            self._table,
            self._partition_key,
            self._sort_key,
            dict(self._cursors),
            WATCH_HOLD_S,
            self._start_key,
            self._end_key,
        ).to_wire()
        give_up_at = trio.current_time() + self._client.timeout_s
        while True:
            deadline = trio.current_time() + WATCH_HOLD_S + self._client.timeout_s
            try:
                reply = await self._client._call(
                    self._table,
                    self._partition_key,
                    Method.WATCH,
                    body,
                    repeatable=True,
                    deadline=deadline,
                )
                return watch_reply_from_wire(reply)
            except (Unavailable, trio.TooSlowError):
                # Every replica lost or slow: try again from the same cursors
                # until the client's timeout, then let the caller decide.
                if trio.current_time() >= give_up_at:
                    raise
            await trio.sleep(WATCH_RETRY_S)


def _check_start(
    start_version: StartVersion, partition: bool, sort_key: bytes | None
) -> dict[bytes, int] | None:
    if start_version is None:
        return None
    if partition:
        if not isinstance(start_version, Mapping):
            raise InvalidRequest("a partition watch resumes from a map of sort key to version")
        cursors = {to_bytes(key): version for key, version in start_version.items()}
    else:
        if not isinstance(start_version, int) or isinstance(start_version, bool):
            raise InvalidRequest("start_version must be an int (the last version seen)")
        assert sort_key is not None
        cursors = {sort_key: start_version}
    for version in cursors.values():
        if not isinstance(version, int) or version < 0:
            raise InvalidRequest("a start version must be an int >= 0")
    if len(cursors) > WATCH_CURSORS_MAX:
        raise InvalidRequest(f"at most {WATCH_CURSORS_MAX} start versions (WATCH_CURSORS_MAX)")
    return cursors


class SyncWatch:
    """`with sync_client.watch(key) as events: for event in events:` — a
    `Watch` driven from the `SyncClient`'s thread through `run`."""

    def __init__(self, watch: Watch, run: Callable[..., Any]) -> None:
        self._watch = watch
        self._run = run

    @property
    def version(self) -> int:
        return self._watch.version

    @property
    def versions(self) -> dict[bytes, int]:
        return self._watch.versions

    def __enter__(self) -> SyncWatch:
        self._run(self._watch.__aenter__)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._run(self._watch.__aexit__, None, None, None)

    def __iter__(self) -> Iterator[WatchEvent]:
        return self

    def __next__(self) -> WatchEvent:
        event: WatchEvent = self._run(self._watch.__anext__)
        return event


__all__ = ["DEFAULT_TABLE", "StartVersion", "SyncWatch", "Watch", "WatchEvent"]

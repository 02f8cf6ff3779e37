"""The node's watch hub (`kvsvr.node.watch`) in one trio process, without
sockets: a held request wakes on a chosen version of its key, limits hold,
bad requests change nothing, and the config's switch for the change log."""

from __future__ import annotations

import tomllib

import pytest
import trio
import trio.lowlevel
import trio.testing

from kvsvr.api import WATCH_CURSORS_MAX, WatchRequest, watch_reply_from_wire
from kvsvr.config import ConfigError, TableConfig, local_cluster, parse_config, render_config
from kvsvr.errors import InvalidRequest, Unavailable, WatchCompacted
from kvsvr.keys import encode_key
from kvsvr.node import watch as watch_module
from kvsvr.node.watch import WatchHub
from kvsvr.protocol.changes import ANSWER_BYTES_MAX, ChangeLog
from kvsvr.protocol.state import Row
from kvsvr.storage.environment import table_db_names

TABLES = {"default": TableConfig("default")}
DB = table_db_names(TABLES)["default"]


def _hub(rows: dict[bytes, int] | None = None, *, bytes_max: int = 1 << 20) -> WatchHub:
    known = rows if rows is not None else {}
    return WatchHub(
        TABLES,
        lambda table, key: known.get(key, 0),
        lambda table, partition_key: True,
        ChangeLog(bytes_max=bytes_max),
    )


def _row(version: int, value: bytes | None) -> Row:
    return Row(version=version, value=value)


def _request(sort_key: bytes | None, cursors: dict[bytes, int], wait_s: float = 5.0) -> object:
    return WatchRequest("default", b"p", sort_key, cursors, wait_s).to_wire()


async def test_a_held_watch_wakes_on_its_key_only(autojump_clock: trio.testing.MockClock) -> None:
    hub = _hub()
    key = encode_key(b"p", b"a")
    answers: list[object] = []

    async def ask() -> None:
        answers.append(await hub.watch("client", _request(b"a", {b"a": 0}, wait_s=10.0)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await trio.sleep(1.0)
        assert hub.held == 1
        hub.row_placed(DB, encode_key(b"p", b"other"), _row(1, b"x"))  # not its key
        await trio.sleep(1.0)
        assert not answers
        hub.row_placed(DB, key, _row(1, b"v1"))
        await trio.lowlevel.checkpoint()  # wakes without the clock moving: pushed, not polled
    assert hub.held == 0
    events = watch_reply_from_wire(answers[0])
    assert [(e.key, e.version, e.previous_version, e.value) for e in events] == [
        (b"a", 1, 0, b"v1")
    ]


async def test_a_partition_watch_wakes_on_any_row_in_its_range(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = _hub()
    answers: list[object] = []
    request = WatchRequest("default", b"p", None, {}, 10.0, b"m/", b"m0").to_wire()

    async def ask() -> None:
        answers.append(await hub.watch("client", request))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await trio.sleep(1.0)
        hub.row_placed(DB, encode_key(b"p", b"id/1"), _row(1, b"index"))  # out of range
        hub.row_placed(DB, encode_key(b"q", b"m/1"), _row(1, b"other partition"))
        hub.row_placed(DB, encode_key(b"p", b"m/1"), _row(1, b"hello"))
    events = watch_reply_from_wire(answers[0])
    assert [(e.key, e.value) for e in events] == [(b"m/1", b"hello")]


async def test_nothing_to_say_answers_empty_after_wait_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = _hub()
    started = trio.current_time()
    answer = await hub.watch("client", _request(b"a", {b"a": 0}, wait_s=3.0))
    assert watch_reply_from_wire(answer) == []
    assert trio.current_time() - started == pytest.approx(3.0)
    assert hub.held == 0


async def test_a_partition_answer_is_bounded_in_bytes_and_the_rest_follows() -> None:
    hub = _hub(bytes_max=64 << 20)
    value = b"x" * (1 << 20)
    for i in range(12):
        hub.row_placed(DB, encode_key(b"p", b"k%02d" % i), _row(1, value))
    cursors: dict[bytes, int] = {}
    answers = 0
    while len(cursors) < 12:
        events = watch_reply_from_wire(await hub.watch("client", _request(None, cursors)))
        assert events and sum(len(e.value or b"") for e in events) <= ANSWER_BYTES_MAX + len(value)
        cursors.update((e.key, e.version) for e in events)
        answers += 1
    assert answers >= 3  # 12 MiB of values never go in one answer


async def test_lost_history_is_watch_compacted() -> None:
    hub = _hub({encode_key(b"p", b"a"): 7})
    with pytest.raises(WatchCompacted, match="after version 3"):
        await hub.watch("client", _request(b"a", {b"a": 3}))


async def test_the_per_connection_limit_refuses_one_more(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch_module, "WATCHES_PER_CONNECTION_MAX", 2)
    hub = _hub()
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(hub.watch, "client", _request(b"a", {b"a": 0}, 5.0))
        await trio.sleep(1.0)
        with pytest.raises(Unavailable, match="WATCHES_PER_CONNECTION_MAX"):
            await hub.watch("client", _request(b"a", {b"a": 0}, 5.0))
        # Another connection is not refused.
        nursery.start_soon(hub.watch, "other", _request(b"a", {b"a": 0}, 5.0))
        await trio.sleep(1.0)
        assert hub.held == 3
        nursery.cancel_scope.cancel()
    assert hub.held == 0 and not hub._waiting and not hub._held_by_peer


@pytest.mark.parametrize(
    "body",
    [
        {"table": "default", "partition_key": b"", "cursors": {}, "wait_s": 1},
        {"table": "default", "partition_key": b"p", "cursors": [], "wait_s": 1},
        {"table": "default", "partition_key": b"p", "cursors": {b"a": -1}, "wait_s": 1},
        {
            "table": "default",
            "partition_key": b"p",
            "sort_key": b"a",
            "cursors": {b"b": 1},
            "wait_s": 1,
        },
        {"table": "default", "partition_key": b"p", "cursors": {}, "wait_s": 31},
        {
            "table": "default",
            "partition_key": b"p",
            "cursors": {},
            "wait_s": 1,
            "start": b"m",
            "sort_key": b"a",
        },
        {
            "table": "default",
            "partition_key": b"p",
            "cursors": {b"a": 1},
            "wait_s": 1,
            "start": b"m",
        },
        {
            "table": "default",
            "partition_key": b"p",
            "cursors": {b"%d" % i: 1 for i in range(WATCH_CURSORS_MAX + 1)},
            "wait_s": 1,
        },
        {"table": "nope", "partition_key": b"p", "cursors": {}, "wait_s": 1},
        "not a map",
    ],
)
async def test_a_malformed_watch_is_refused_and_holds_nothing(body: object) -> None:
    hub = _hub()
    with pytest.raises(InvalidRequest):
        await hub.watch("client", body)
    assert hub.held == 0 and not hub._waiting


async def test_watches_are_refused_when_the_log_is_off() -> None:
    hub = _hub(bytes_max=0)
    with pytest.raises(Unavailable, match="watches are off"):
        await hub.watch("client", _request(b"a", {b"a": 0}))


def test_the_change_log_bound_is_a_config_setting() -> None:
    config = local_cluster(1, 7100)
    assert "watch_history_bytes_max" not in render_config(config)  # the default
    text = render_config(config).replace(
        "[cluster]\n", "[cluster]\nwatch_history_bytes_max = 0\n", 1
    )
    off = parse_config(tomllib.loads(text))
    assert off.watch_history_bytes_max == 0
    assert parse_config(tomllib.loads(render_config(off))) == off
    for bad in ("-1", '"big"', "true"):
        text = render_config(config).replace(
            "[cluster]\n", f"[cluster]\nwatch_history_bytes_max = {bad}\n", 1
        )
        with pytest.raises(ConfigError, match="watch_history_bytes_max"):
            parse_config(tomllib.loads(text))


async def test_a_skip_is_settled_by_the_peers_before_the_watch_passes_it() -> None:
    asked: list[tuple[str, bytes, int, int]] = []

    async def ask_peers(
        table: str, key: bytes, low: int, high: int
    ) -> list[tuple[int, bytes | None]]:
        asked.append((table, key, low, high))
        return [(2, b"v2")]  # a peer learned version 2; 3 was folded into 4

    hub = WatchHub(TABLES, lambda t, k: 0, lambda t, p: True, ChangeLog(), ask_peers)
    key = encode_key(b"p", b"a")
    hub.row_placed(DB, key, _row(1, b"v1"))
    hub.row_placed(DB, key, _row(4, b"v4"))
    events = watch_reply_from_wire(await hub.watch("client", _request(b"a", {b"a": 1})))
    assert asked == [("default", key, 1, 4)]
    assert [(e.version, e.previous_version, e.value) for e in events] == [
        (2, 1, b"v2"),
        (4, 2, b"v4"),
    ]
    # Settled once for every later watcher.
    await hub.watch("client", _request(b"a", {b"a": 1}))
    assert len(asked) == 1 and hub.fills == 1


async def test_a_skip_the_peers_cannot_settle_is_not_passed() -> None:
    async def ask_peers(
        table: str, key: bytes, low: int, high: int
    ) -> list[tuple[int, bytes | None]]:
        raise Unavailable("only 0 of the 1 peers needed")

    hub = WatchHub(TABLES, lambda t, k: 0, lambda t, p: True, ChangeLog(), ask_peers)
    key = encode_key(b"p", b"a")
    hub.row_placed(DB, key, _row(1, b"v1"))
    hub.row_placed(DB, key, _row(3, b"v3"))
    with pytest.raises(Unavailable, match="peers needed"):
        await hub.watch("client", _request(b"a", {b"a": 1}))
    # Before the skip, what the node has is delivered as usual.
    events = watch_reply_from_wire(await hub.watch("client", _request(b"a", {b"a": 0})))
    assert [e.version for e in events] == [1]


async def test_peer_history_needs_a_majority_that_vouches() -> None:
    replies: dict[int, object] = {
        2: {"vouch": True, "changes": [[5, b"five"]]},
        3: {"vouch": False, "changes": []},
        4: {"vouch": True, "changes": [[6, None]]},
        5: "malformed",
    }

    async def call_peer(target: int, method: str, body: object) -> object:
        assert method == watch_module.HISTORY_METHOD and body == ["default", b"\x00\x01p", 4, 7]
        if target not in replies:
            raise Unavailable("down")
        return replies[target]

    five = watch_module.PeerHistory(1, lambda t, p: [1, 2, 3, 4, 5], call_peer)
    assert sorted(await five.ask("default", b"\x00\x01p", 4, 7)) == [(5, b"five"), (6, None)]
    del replies[4]
    with pytest.raises(Unavailable, match="only 1 of the 2 peers needed"):
        await five.ask("default", b"\x00\x01p", 4, 7)
    alone = watch_module.PeerHistory(1, lambda t, p: [1], call_peer)
    assert await alone.ask("default", b"\x00\x01p", 4, 7) == []


def test_serve_history_answers_from_the_log_and_refuses_bad_bodies() -> None:
    hub = _hub()
    key = encode_key(b"p", b"a")
    for version in (1, 2, 5):
        hub.row_placed(DB, key, _row(version, b"v%d" % version))
    assert hub.serve_history(["default", key, 0, 5]) == {
        "vouch": True,
        "changes": [[1, b"v1"], [2, b"v2"]],
    }
    assert hub.serve_history(["default", b"\x00\x01q", 0, 5])["vouch"] is False
    for bad in (None, ["default", key, 0], ["nope", key, 0, 5], ["default", key, -1, 5]):
        with pytest.raises(InvalidRequest):
            hub.serve_history(bad)


async def test_an_eventual_table_delivers_what_its_replica_applies_without_asking_peers() -> None:
    async def ask_peers(
        table: str, key: bytes, low: int, high: int
    ) -> list[tuple[int, bytes | None]]:
        raise AssertionError("an eventual table has no skips to settle")

    tables = {"default": TableConfig("default"), "feed": TableConfig("feed", "eventual")}
    hub = WatchHub(tables, lambda t, k: 0, lambda t, p: True, ChangeLog(), ask_peers)
    feed = table_db_names(tables)["feed"]
    key = encode_key(b"p", b"a")
    stamps = [(5 << 22) | 1, (9 << 22) | 2]  # hybrid clock stamps, far apart
    for stamp in stamps:
        hub.row_placed(feed, key, _row(stamp, b"s%d" % stamp))
    body = WatchRequest("feed", b"p", b"a", {b"a": 0}, 1.0).to_wire()
    events = watch_reply_from_wire(await hub.watch("client", body))
    assert [e.version for e in events] == stamps

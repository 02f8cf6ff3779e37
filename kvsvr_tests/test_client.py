"""The client: validation, routing, session versions, and the async and blocking
clients against fake nodes (real sockets, see test_client_fakes)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import trio

import kvsvr
import kvsvr.net
from kvsvr.api import GetReply
from kvsvr.client import (
    NODE_DOWN_S,
    SCAN_LIMIT_MAX,
    VALUE_BYTES_MAX,
    Client,
    Item,
    NodeInfo,
    PartitionMap,
    SessionVersions,
    parse_address,
    route,
)
from kvsvr.client_item import item_of
from kvsvr.errors import (
    AuthenticationFailed,
    Conflict,
    InvalidRequest,
    KvsvrError,
    Timeout,
    Unavailable,
)
from kvsvr.keys import KEY_BYTES_MAX
from kvsvr.protocol.placement import partition_of
from kvsvr_tests.test_client_fakes import (
    PARTITIONS,
    SECRET,
    encoded,
    fake_cluster,
    fake_cluster_in_thread,
    unused_port,
)

# --- the public API -------------------------------------------------------------------


def test_package_exports_the_public_api() -> None:
    for name in [
        "connect",
        "Client",
        "SyncClient",
        "Item",
        "KvsvrError",
        "Conflict",
        "Unavailable",
        "Timeout",
        "InvalidRequest",
        "AuthenticationFailed",
        "CorruptRow",
        "ClusterConfig",
        "load_config",
    ]:
        assert name in kvsvr.__all__
        assert getattr(kvsvr, name) is not None
    assert kvsvr.__version__
    assert issubclass(kvsvr.Timeout, kvsvr.Unavailable)


# --- partition map and routing (pure) ---------------------------------------------------


def map_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "partitions": 4,
        "replication": 3,
        "nodes": [
            {"id": f"n{i}", "index": i, "host": "10.0.0.1", "port": 7100 + i, "zone": f"z{i}"}
            for i in (1, 2, 3)
        ],
        "replica_sets": [[1, 2, 3], [2, 3, 1], [3, 1, 2], [1, 2, 3]],
        "tables": [{"name": "default", "consistency": "strong", "ttl_s": 0.0}],
    }
    body.update(changes)
    return body


def test_partition_map_parses_the_wire_form() -> None:
    partition_map = PartitionMap.from_wire(map_body())
    assert partition_map.partitions == 4
    assert partition_map.node_by_index(2) == NodeInfo("n2", 2, "10.0.0.1", 7102, "z2")
    assert partition_map.find_node("n3") == partition_map.find_node("10.0.0.1:7103")
    assert partition_map.find_node("n9") is None
    assert partition_map.table("default") is not None
    assert partition_map.table("nope") is None


@pytest.mark.parametrize(
    "changes",
    [
        {"partitions": 3},
        {"partitions": "4"},
        {"nodes": []},
        {"replica_sets": [[1, 2, 3]]},
        {"replica_sets": [[1, 2, 9], [2], [3], [1]]},
        {"replica_sets": [[1], [], [3], [1]]},
        {"nodes": [{"id": "n1"}]},
    ],
)
def test_a_malformed_partition_map_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(KvsvrError, match="malformed partition map"):
        PartitionMap.from_wire(map_body(**changes))
    with pytest.raises(KvsvrError, match="malformed partition map"):
        PartitionMap.from_wire(["not", "a", "dict"])


def test_route_follows_the_replica_set_preferred_first() -> None:
    partition_map = PartitionMap.from_wire(map_body())
    for number in range(50):
        key = f"user-{number}".encode()
        expected = map_body()["replica_sets"][partition_of("default", key, 4)]
        nodes = route(partition_map, "default", key, down_until={}, now=0.0)
        assert [node.index for node in nodes] == expected


def test_route_moves_nodes_marked_down_to_the_end_until_their_time_passes() -> None:
    partition_map = PartitionMap.from_wire(map_body())
    key = next(
        k for k in (f"k{i}".encode() for i in range(100)) if partition_of("default", k, 4) == 1
    )
    down = {"10.0.0.1:7102": 10.0}
    assert [n.index for n in route(partition_map, "default", key, down_until=down, now=5.0)] == [
        3,
        1,
        2,
    ]
    assert [n.index for n in route(partition_map, "default", key, down_until=down, now=10.0)] == [
        2,
        3,
        1,
    ]
    every = {f"10.0.0.1:{7100 + i}": 10.0 for i in (1, 2, 3)}
    # All down: still all tried, in the preferred order.
    assert [n.index for n in route(partition_map, "default", key, down_until=every, now=0.0)] == [
        2,
        3,
        1,
    ]


def test_the_client_routes_every_key_as_partition_of_does() -> None:
    # The client hashes a key's partition incrementally (`_partition_hash_seed`);
    # it must pick the partitions `partition_of` (and so the nodes) pick.
    partitions = 64
    sets = [[1 + (p + i) % 3 for i in range(3)] for p in range(partitions)]
    tables = [{"name": name, "consistency": "strong", "ttl_s": 0.0} for name in ("default", "ev")]
    for body in (
        map_body(partitions=partitions, replica_sets=sets, tables=tables),
        map_body(partitions=partitions, replica_sets=sets, tables=[]),  # any table name goes
    ):
        partition_map = PartitionMap.from_wire(body)
        client = Client(None, partition_map, secret=None, timeout_s=1.0)  # type: ignore[arg-type]
        # The map's tables and "default" take the shortcut; others (a map
        # without tables accepts any name) call partition_of.
        assert set(client._hash_seeds) == {"default", *(t["name"] for t in body["tables"])}
        for table in ("default", "ev", "t\u00e9", ""):
            for number in range(300):
                key = f"user-{number}".encode() + bytes([number % 256])
                expected = sets[partition_of(table, key, partitions)]
                nodes = [node for node, _ in client._candidates(table, key)]
                assert [node.index for node in nodes] == expected
                assert nodes == route(partition_map, table, key, down_until={}, now=0.0)


def test_items_made_on_the_hot_path_are_plain_items() -> None:
    item = item_of(b"v", 3)
    assert type(item) is Item
    assert item == Item(b"v", 3) and hash(item) == hash(Item(b"v", 3))
    assert repr(item) == repr(Item(value=b"v", version=3, key=None))
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.version = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ([1, b"v"], "expected a dict"),
        ({"version": 1, "value": "text"}, "value is a str"),
        ({"version": -1, "value": b"v"}, "bad version"),
        ({"version": True, "value": b"v"}, "bad version"),
        ({"value": None}, "bad version"),
    ],
)
def test_malformed_get_replies_are_refused(reply: object, message: str) -> None:
    with pytest.raises(KvsvrError, match=message):
        GetReply.from_wire(reply)


def test_well_formed_get_replies() -> None:
    assert GetReply.from_wire({"version": 0}) == GetReply(0, None)
    reply = GetReply.from_wire({"version": 7, "value": b"v", "expires_at_ms": 5})
    assert (reply.version, reply.value) == (7, b"v")


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:7101") == ("127.0.0.1", 7101)
    assert parse_address(" node-1.example:80 ") == ("node-1.example", 80)
    assert parse_address("[::1]:7101") == ("::1", 7101)
    for bad in ["", "host", "host:", ":7101", "host:0", "host:65536", "host:x"]:
        with pytest.raises(InvalidRequest, match="HOST:PORT"):
            parse_address(bad)


# --- session versions (pure) -----------------------------------------------------------


def test_session_versions_keep_the_highest_version_seen() -> None:
    session = SessionVersions()
    assert session.version("default", b"k") == 0
    session.observe("default", b"k", 5)
    session.observe("default", b"k", 3)  # an older read does not lower it
    assert session.version("default", b"k") == 5
    session.observe("default", b"k", 7)
    assert session.version("default", b"k") == 7
    assert session.version("events", b"k") == 0  # per table


def test_session_versions_forget_the_least_recently_used_keys() -> None:
    session = SessionVersions(capacity=3)
    for key in (b"a", b"b", b"c"):
        session.observe("t", key, 1)
    session.version("t", b"a")  # a read counts as a use
    session.observe("t", b"d", 1)
    assert len(session) == 3
    assert session.version("t", b"b") == 0  # forgotten
    assert [session.version("t", key) for key in (b"a", b"c", b"d")] == [1, 1, 1]
    session.observe("t", b"a", 0)  # a write or read counts as a use, whatever its version
    session.observe("t", b"e", 2)
    assert [session.version("t", key) for key in (b"a", b"c", b"d", b"e")] == [1, 0, 1, 2]


# --- validation before any network ---------------------------------------------------------


@pytest.fixture
def offline_client(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A Client over a map whose nodes are never contacted: connecting fails the test."""

    async def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the client went to the network")

    monkeypatch.setattr(kvsvr.net, "connect", no_network)

    def make(nursery: trio.Nursery) -> Client:
        return Client(nursery, PartitionMap.from_wire(map_body()), secret=None, timeout_s=1.0)

    return make


BAD_CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = [
    ("put", ("k", "text"), {}, "must be bytes"),
    ("put", ("k", 42), {}, "must be bytes"),
    ("put", ("k", bytearray(b"x")), {}, "must be bytes"),
    ("put", ("k", b"x" * (VALUE_BYTES_MAX + 1)), {}, "limit"),
    ("put", ("k" * KEY_BYTES_MAX, b"v"), {}, "limit"),
    ("put", (("p", "s" * KEY_BYTES_MAX), b"v"), {}, "limit"),
    ("put", ("", b"v"), {}, "must not be empty"),
    ("put", (42, b"v"), {}, "bytes or str"),
    ("put", (("a", "b", "c"), b"v"), {}, "tuple key"),
    ("put", ("k", b"v"), {"table": "nope"}, "no table 'nope'"),
    ("put", ("k", b"v"), {"if_version": -1}, "if_version"),
    ("put", ("k", b"v"), {"if_version": "3"}, "if_version"),
    ("put", ("k", b"v"), {"if_version": 2, "if_absent": True}, "not both"),
    ("cas", ("k", b"v"), {"if_version": None}, "if_version"),
    ("delete", ("k",), {"if_version": -2}, "if_version"),
    ("get", ("k",), {"consistency": "eventual"}, "consistency"),
    ("get", ("k",), {"consistency": "stale", "max_age_s": -1}, "max_age_s"),
    ("get", ("k",), {"consistency": "stale", "max_age_s": math.inf}, "max_age_s"),
    ("get", ("k",), {"table": "nope"}, "no table"),
    ("scan", ("p",), {"limit": 0}, "limit"),
    ("scan", ("p",), {"limit": SCAN_LIMIT_MAX + 1}, "limit"),
    ("scan", ("",), {}, "must not be empty"),
    ("scan", ("p",), {"start": 3}, "bytes or str"),
]


@pytest.mark.parametrize(("method", "args", "kwargs", "message"), BAD_CALLS)
async def test_bad_requests_are_refused_before_sending(
    offline_client: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    async with trio.open_nursery() as nursery:
        client = offline_client(nursery)
        with pytest.raises(InvalidRequest, match=message):
            await getattr(client, method)(*args, **kwargs)
        await client.aclose()


async def test_connect_refuses_bad_arguments() -> None:
    with pytest.raises(InvalidRequest, match="HOST:PORT"):
        async with kvsvr.connect("not an address"):
            pass
    with pytest.raises(InvalidRequest, match="at least one"):
        async with kvsvr.connect([]):
            pass
    with pytest.raises(InvalidRequest, match="timeout_s"):
        async with kvsvr.connect("127.0.0.1:1", timeout_s=0):
            pass


# --- the async client against fake nodes ------------------------------------------------------


async def test_put_get_cas_delete_scan_round_trip() -> None:
    async with fake_cluster() as cluster, kvsvr.connect(cluster.addresses, secret=SECRET) as client:
        assert await client.get("greeting") is None
        first = await client.put("greeting", b"hello")
        assert await client.get("greeting") == Item(b"hello", first)
        assert await client.get(b"greeting") == Item(b"hello", first)  # str keys are UTF-8
        second = await client.cas("greeting", b"hi", if_version=first)
        assert second == first + 1
        with pytest.raises(Conflict):
            await client.cas("greeting", b"late", if_version=first)
        with pytest.raises(Conflict):
            await client.put("greeting", b"again", if_absent=True)
        assert await client.get("greeting") == Item(b"hi", second)
        deleted = await client.delete("greeting", if_version=second)
        assert deleted == second + 1
        assert await client.get("greeting") is None
        assert await client.put("greeting", b"back", if_absent=True) == deleted + 1

        big = b"x" * VALUE_BYTES_MAX  # exactly the limit is fine
        assert await client.put("big", big) == 1

        for sort_key in ("c", "a", "b"):
            await client.put(("inbox", sort_key), sort_key.encode() * 2)
        await client.put(("inboxes", "a"), b"other partition key")
        await client.put(("inbox", "z"), b"in another table", table="events")
        rows = await client.scan("inbox")
        assert rows == [Item(b"aa", 1, b"a"), Item(b"bb", 1, b"b"), Item(b"cc", 1, b"c")]
        assert [row.key for row in await client.scan("inbox", start="b")] == [b"b", b"c"]
        assert [row.key for row in await client.scan("inbox", end=b"b")] == [b"a"]
        assert [row.key for row in await client.scan("inbox", limit=2)] == [b"a", b"b"]
        assert [row.key for row in await client.scan("inbox", table="events")] == [b"z"]
        assert await client.get(("inbox", "b")) == Item(b"bb", 1)


async def test_each_key_goes_to_its_preferred_coordinator() -> None:
    async with (
        fake_cluster() as cluster,
        kvsvr.connect(cluster.addresses[0], secret=SECRET) as client,
    ):
        for index in (1, 2, 3):
            key = cluster.key_preferring(index)
            await client.put(key, b"v")
            await client.get(key)
            assert cluster.node(index).methods()[-2:] == ["put", "get"]
            others = [node for node in cluster.nodes if node.index != index]
            for node in others:
                assert [body["key"] for _, body in node.requests if "key" in body].count(
                    encoded(key)
                ) == 0
        # Connections were opened lazily, one per node.
        assert len(client._connections) == 3


async def test_a_node_that_cannot_be_connected_to_is_skipped_for_a_while() -> None:
    async with (
        fake_cluster(dead=(2,)) as cluster,
        kvsvr.connect(cluster.addresses, secret=SECRET) as client,
    ):
        key = cluster.key_preferring(2)
        fallback = cluster.preferred_order("default", key)[1]
        version = await client.put(key, b"v")
        assert cluster.node(fallback).methods()[-1] == "put"
        dead_address = f"127.0.0.1:{cluster.dead_ports[2]}"
        marked_until = client._down_until[dead_address]
        assert marked_until == pytest.approx(trio.current_time() + NODE_DOWN_S, abs=1.0)
        assert await client.get(key) == Item(b"v", version)


async def test_a_write_whose_connection_is_lost_is_unavailable_and_not_retried() -> None:
    async with fake_cluster() as cluster, kvsvr.connect(cluster.addresses, secret=SECRET) as client:
        key = cluster.key_preferring(1)
        cluster.node(1).drop_on.add("put")
        with pytest.raises(Unavailable, match="lost"):
            await client.put(key, b"v")
        for index in (2, 3):
            assert "put" not in cluster.node(index).methods()


async def test_a_read_whose_connection_is_lost_is_retried_on_the_next_replica() -> None:
    async with fake_cluster() as cluster, kvsvr.connect(cluster.addresses, secret=SECRET) as client:
        key = cluster.key_preferring(1)
        await client.put(key, b"v")
        cluster.node(1).drop_on.add("get")
        assert await client.get(key) == Item(b"v", 1)
        assert cluster.node(cluster.preferred_order("default", key)[1]).methods()[-1] == "get"
        assert cluster.node(1).address in client._down_until  # skipped for a while
        assert await client.get(key, consistency="stale") == Item(b"v", 1)
        assert cluster.node(1).methods().count("get") == 1


async def test_every_operation_is_bounded_by_timeout_s() -> None:
    async with (
        fake_cluster() as cluster,
        kvsvr.connect(cluster.addresses, secret=SECRET, timeout_s=0.3) as client,
    ):
        key = cluster.key_preferring(1)
        cluster.node(1).hang_on.update({"get", "put"})
        with pytest.raises(Timeout, match=r"0\.3 s"):
            await client.get(key)
        with pytest.raises(Timeout, match="outcome is unknown"):
            await client.put(key, b"v")


async def test_wrong_or_missing_secret_is_refused() -> None:
    async with fake_cluster() as cluster:
        with pytest.raises(AuthenticationFailed):
            async with kvsvr.connect(cluster.addresses, secret="wrong"):
                pass
        with pytest.raises(AuthenticationFailed):
            async with kvsvr.connect(cluster.addresses):
                pass


async def test_connect_fails_cleanly_when_no_node_answers() -> None:
    with pytest.raises(Unavailable, match="no node"):
        async with kvsvr.connect([f"127.0.0.1:{unused_port()}", f"127.0.0.1:{unused_port()}"]):
            pass


async def test_connect_skips_seeds_that_do_not_answer() -> None:
    async with (
        fake_cluster() as cluster,
        kvsvr.connect([f"127.0.0.1:{unused_port()}", *cluster.addresses], secret=SECRET) as client,
    ):
        assert (await client.partition_map()).partitions == PARTITIONS


async def test_errors_inside_the_block_come_out_unwrapped() -> None:
    async with fake_cluster() as cluster:
        with pytest.raises(Conflict):
            async with kvsvr.connect(cluster.addresses, secret=SECRET) as client:
                await client.put("k", b"v")
                await client.put("k", b"v", if_absent=True)


async def test_stale_reads_carry_the_session_version() -> None:
    async with fake_cluster() as cluster, kvsvr.connect(cluster.addresses, secret=SECRET) as client:
        key = cluster.key_preferring(1)
        node = cluster.node(1)
        await client.put(key, b"one")
        version = await client.put(key, b"two")
        await client.get(key, consistency="stale", max_age_s=2)
        assert node.requests[-1][1]["min_version"] == version
        assert node.requests[-1][1]["max_age_s"] == 2.0
        await client.get(key)
        assert node.requests[-1][1]["min_version"] == 0  # strong reads need no floor
        other = cluster.key_preferring(1).decode() + "-never-seen"
        await client.get(other, consistency="local")
        assert node.requests[-1][1]["min_version"] == 0


async def test_a_stale_read_below_the_session_version_falls_back_to_strong() -> None:
    async with fake_cluster() as cluster, kvsvr.connect(cluster.addresses, secret=SECRET) as client:
        key = cluster.key_preferring(1)
        version = await client.put(key, b"mine")
        cluster.node(1).stale_version_lag = True  # answers stale reads with version 0
        assert await client.get(key, consistency="stale") == Item(b"mine", version)
        assert [body["consistency"] for _, body in cluster.node(1).requests[-2:]] == [
            "stale",
            "strong",
        ]


async def test_status_and_partition_map() -> None:
    async with fake_cluster() as cluster, kvsvr.connect(cluster.addresses, secret=SECRET) as client:
        assert (await client.status())["node"] == "n1"
        assert (await client.status("n3"))["node"] == "n3"
        assert (await client.status(cluster.node(2).address))["node"] == "n2"
        with pytest.raises(InvalidRequest, match="no node 'n9'"):
            await client.status("n9")
        partition_map = await client.partition_map(refresh=True)
        assert [node.id for node in partition_map.nodes] == ["n1", "n2", "n3"]


async def test_a_closed_client_refuses_operations() -> None:
    async with fake_cluster() as cluster, kvsvr.connect(cluster.addresses, secret=SECRET) as client:
        await client.aclose()
        with pytest.raises(RuntimeError, match="closed"):
            await client.get("k")


# --- the blocking client ------------------------------------------------------------------


def test_sync_client_round_trip() -> None:
    with fake_cluster_in_thread() as cluster:
        with kvsvr.SyncClient(",".join(cluster.addresses), secret=SECRET) as client:
            version = client.put("greeting", b"hello")
            assert client.get("greeting") == Item(b"hello", version)
            assert client.cas("greeting", b"hi", if_version=version) == version + 1
            with pytest.raises(Conflict):
                client.cas("greeting", b"late", if_version=version)
            with pytest.raises(InvalidRequest):
                client.put("greeting", "not bytes")  # type: ignore[arg-type]
            client.put(("p", "a"), b"1")
            client.put(("p", "b"), b"2")
            assert [item.key for item in client.scan("p")] == [b"a", b"b"]
            assert client.delete("greeting") == version + 2
            assert client.get("greeting", consistency="stale") is None
            assert client.status("n2")["node"] == "n2"
            assert client.partition_map().partitions == PARTITIONS
        client.close()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            client.get("greeting")


def test_sync_client_reports_connection_errors_from_its_constructor() -> None:
    with pytest.raises(Unavailable):
        kvsvr.SyncClient([f"127.0.0.1:{unused_port()}"], timeout_s=1.0)
    with fake_cluster_in_thread() as cluster, pytest.raises(AuthenticationFailed):
        kvsvr.SyncClient(cluster.addresses, secret=b"wrong")


def test_sync_client_times_out() -> None:
    with fake_cluster_in_thread() as cluster:
        key = cluster.key_preferring(2)
        cluster.node(2).hang_on.add("get")
        with kvsvr.SyncClient(cluster.addresses, secret=SECRET, timeout_s=0.3) as client:
            with pytest.raises(Timeout):
                client.get(key)

"""The client <-> node messages of `kvsvr.api`: every message survives its
own wire form, every malformed body is refused with the error and message
the node answers, and the wire form is the one clients and nodes already
exchange (old and new ends must talk)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvsvr import api
from kvsvr.api import (
    DEFAULT_TABLE,
    SCAN_LIMIT_DEFAULT,
    SCAN_LIMIT_MAX,
    VALUE_BYTES_MAX,
    GetReply,
    GetRequest,
    MapRequest,
    Method,
    NodeInfo,
    PartitionMap,
    PutReply,
    PutRequest,
    ReadConsistency,
    RecoverRequest,
    ScanReply,
    ScanRequest,
    StatusRequest,
    TableConsistency,
    TableInfo,
)
from kvsvr.errors import InvalidRequest, KvsvrError
from kvsvr.keys import KEY_BYTES_MAX, decode_key, encode_key

KEY = encode_key(b"alice", b"inbox/1")

tables = st.sampled_from(["default", "events", "t\u00e9"])
encoded_keys = st.builds(
    encode_key, st.binary(min_size=1, max_size=40), st.binary(min_size=0, max_size=40)
)
versions = st.integers(0, 2**63 - 1)
values = st.none() | st.binary(max_size=64)
timeouts = st.none() | st.floats(0.001, api.OPERATION_TIMEOUT_MAX_S)
get_requests = st.builds(
    GetRequest,
    tables,
    encoded_keys,
    st.sampled_from(ReadConsistency),
    st.none() | st.floats(0, 1e6),
    versions,
    st.none() | st.integers(1, 2**63 - 1),
    timeouts,
)
put_requests = st.builds(
    PutRequest, tables, encoded_keys, values, st.none() | versions, st.booleans(), timeouts
)
scan_requests = st.builds(
    ScanRequest,
    tables,
    st.binary(min_size=1, max_size=40),
    st.none() | st.binary(max_size=20),
    st.none() | st.binary(max_size=20),
    st.integers(1, SCAN_LIMIT_MAX),
    timeouts,
)
get_replies = st.one_of(
    st.builds(GetReply, versions, values, st.none() | versions),
    st.builds(GetReply, versions, st.none(), st.none(), st.just(True)),
)
scan_replies = st.builds(
    ScanReply,
    st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=20), versions)).map(tuple),
)


def over_the_wire(body: Any) -> Any:
    """What the other end gets: the body through msgpack, as `net` sends it."""
    return msgpack.unpackb(msgpack.packb(body, use_bin_type=True), raw=False)


# --- round trips -------------------------------------------------------------------


@given(get_requests)
def test_get_requests_round_trip(request: GetRequest) -> None:
    assert GetRequest.from_wire(over_the_wire(request.to_wire())) == request


@given(put_requests)
def test_put_requests_round_trip(request: PutRequest) -> None:
    assert PutRequest.from_wire(over_the_wire(request.to_wire())) == request


@given(scan_requests)
def test_scan_requests_round_trip(request: ScanRequest) -> None:
    assert ScanRequest.from_wire(over_the_wire(request.to_wire())) == request


@given(st.booleans())
def test_bodiless_and_recover_requests_round_trip(accept: bool) -> None:
    assert MapRequest.from_wire(over_the_wire(MapRequest().to_wire())) == MapRequest()
    assert StatusRequest.from_wire(over_the_wire(StatusRequest().to_wire())) == StatusRequest()
    recover = RecoverRequest(accept)
    assert RecoverRequest.from_wire(over_the_wire(recover.to_wire())) == recover


@given(get_replies)
def test_get_replies_round_trip(reply: GetReply) -> None:
    assert GetReply.from_wire(over_the_wire(reply.to_wire())) == reply


@given(versions)
def test_put_replies_round_trip(version: int) -> None:
    assert PutReply.from_wire(over_the_wire(PutReply(version).to_wire())) == PutReply(version)


@given(scan_replies)
def test_scan_replies_round_trip(reply: ScanReply) -> None:
    assert ScanReply.from_wire(over_the_wire(reply.to_wire())) == reply


def a_map() -> PartitionMap:
    return PartitionMap(
        partitions=2,
        replication=2,
        nodes=(NodeInfo("n1", 1, "10.0.0.1", 7101, "z1"), NodeInfo("n2", 2, "::1", 7102, "z2")),
        replica_sets=((1, 2), (2, 1)),
        tables=(
            TableInfo("default", TableConsistency.STRONG, 0.0),
            TableInfo("events", TableConsistency.EVENTUAL, 30.0),
        ),
    )


def test_the_partition_map_round_trips() -> None:
    assert PartitionMap.from_wire(over_the_wire(a_map().to_wire())) == a_map()
    assert a_map().node_by_index(2).address == "[::1]:7102"


# --- wire compatibility: the dicts both ends exchanged before these classes --------


def test_requests_are_the_dicts_the_client_sends() -> None:
    get = GetRequest("default", KEY, ReadConsistency.STALE, 2.5, 7)
    assert get.to_wire() == {
        "table": "default",
        "key": KEY,
        "consistency": "stale",
        "max_age_s": 2.5,
        "min_version": 7,
    }
    near = GetRequest("default", KEY, ReadConsistency.STRONG, None, 0, cached_version=4)
    assert near.to_wire() == {
        "table": "default",
        "key": KEY,
        "consistency": "strong",
        "max_age_s": None,
        "min_version": 0,
        "cached_version": 4,
    }
    put = PutRequest("events", KEY, b"v", if_version=3)
    assert put.to_wire() == {
        "table": "events",
        "key": KEY,
        "value": b"v",
        "if_version": 3,
        "if_absent": False,
    }
    delete = PutRequest("default", KEY, None)
    assert delete.to_wire()["value"] is None
    scan = ScanRequest("default", b"alice", None, b"inbox0", 50)
    assert scan.to_wire() == {
        "table": "default",
        "partition_key": b"alice",
        "start": None,
        "end": b"inbox0",
        "limit": 50,
    }
    assert MapRequest().to_wire() == {} and StatusRequest().to_wire() == {}
    assert RecoverRequest(True).to_wire() == {"accept_data_loss": True}


def test_enums_travel_as_their_names() -> None:
    # msgpack packs a StrEnum member exactly as the plain string: an old node
    # reads "stale", a new one gets ReadConsistency.STALE back.
    body = GetRequest("default", KEY, ReadConsistency.STALE).to_wire()
    assert msgpack.packb(body) == msgpack.packb({**body, "consistency": "stale"})
    assert over_the_wire(body)["consistency"] == "stale"
    assert Method.GET == "get" and TableConsistency.EVENTUAL == "eventual"


def test_requests_the_harness_sends_parse() -> None:
    # Older or leaner senders leave optional fields out and add timeout_s.
    get = GetRequest.from_wire({"table": "kv", "key": KEY, "consistency": "local", "timeout_s": 3})
    assert get == GetRequest("kv", KEY, ReadConsistency.LOCAL, timeout_s=3.0)
    assert GetRequest.from_wire({"key": KEY}) == GetRequest(DEFAULT_TABLE, KEY)
    assert GetRequest.from_wire({"key": KEY, "min_version": None}).min_version == 0
    put = PutRequest.from_wire({"key": KEY})
    assert put == PutRequest(DEFAULT_TABLE, KEY, None, None, False)
    scan = ScanRequest.from_wire({"partition_key": b"p"})
    assert scan == ScanRequest(DEFAULT_TABLE, b"p", None, None, SCAN_LIMIT_DEFAULT)


def test_unknown_fields_are_ignored() -> None:
    extra = {"key": KEY, "future_field": [1, 2], "value": b"v"}
    assert PutRequest.from_wire(extra) == PutRequest(DEFAULT_TABLE, KEY, b"v")
    assert GetRequest.from_wire(extra) == GetRequest(DEFAULT_TABLE, KEY)
    assert MapRequest.from_wire(["anything"]) == MapRequest()
    reply = GetReply.from_wire({"version": 3, "value": b"v", "future_field": 1})
    assert reply == GetReply(3, b"v")


def test_replies_are_the_dicts_the_node_sends() -> None:
    assert GetReply(5, b"v").to_wire() == {"version": 5, "value": b"v"}
    assert GetReply(5, None).to_wire() == {"version": 5, "value": None}
    assert GetReply(5, None, unchanged=True).to_wire() == {"version": 5, "unchanged": True}
    assert GetReply(5, b"v", expires_at_ms=9).to_wire() == {
        "version": 5,
        "value": b"v",
        "expires_at_ms": 9,
    }
    assert PutReply(8).to_wire() == {"version": 8}
    assert ScanReply(((b"s", b"v", 2),)).to_wire() == {"items": [[b"s", b"v", 2]]}
    assert a_map().to_wire() == {
        "partitions": 2,
        "replication": 2,
        "nodes": [
            {"id": "n1", "index": 1, "host": "10.0.0.1", "port": 7101, "zone": "z1"},
            {"id": "n2", "index": 2, "host": "::1", "port": 7102, "zone": "z2"},
        ],
        "replica_sets": [[1, 2], [2, 1]],
        "tables": [
            {"name": "default", "consistency": "strong", "ttl_s": 0.0},
            {"name": "events", "consistency": "eventual", "ttl_s": 30.0},
        ],
    }


def test_a_near_cache_reply_without_expiry_reads_as_before() -> None:
    # The node answered a near-cache get with "expires_at_ms": None; the
    # field is left out now, which every reader takes for the same thing.
    old = {"version": 5, "value": b"v", "expires_at_ms": None}
    assert GetReply.from_wire(old) == GetReply.from_wire(GetReply(5, b"v").to_wire())


# --- rejections: the node's errors and messages ---------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (["not", "a", "map"], "get: the body must be a map"),
        ({"table": 3, "key": KEY}, "table must be a str"),
        ({"key": "text"}, "key must be bytes"),
        ({}, "key must be bytes"),
        ({"key": b"\x00"}, "encoded key too short"),
        ({"key": b"\x00\x09ab"}, "encoded key truncated"),
        ({"key": b"\x00\x00sort"}, "the partition key must not be empty"),
        ({"key": KEY, "consistency": "eventual"}, "consistency must be"),
        ({"key": KEY, "consistency": ["strong"]}, "consistency must be"),
        ({"key": KEY, "min_version": "7"}, "min_version must be an int"),
        ({"key": KEY, "max_age_s": -1}, "max_age_s must be a number >= 0"),
        ({"key": KEY, "max_age_s": True}, "max_age_s must be a number >= 0"),
        ({"key": KEY, "max_age_s": "1"}, "max_age_s must be a number >= 0"),
        ({"key": KEY, "cached_version": "7"}, "cached_version must be an int >= 1"),
        ({"key": KEY, "cached_version": 0}, "cached_version must be an int >= 1"),
        ({"key": KEY, "cached_version": True}, "cached_version must be an int >= 1"),
        ({"key": KEY, "timeout_s": 0}, r"timeout_s must be in \(0, 60.0\]"),
        ({"key": KEY, "timeout_s": 61}, "timeout_s must be in"),
        ({"key": KEY, "timeout_s": "1"}, "timeout_s must be in"),
    ],
)
def test_malformed_gets_are_refused(body: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        GetRequest.from_wire(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (None, "put: the body must be a map"),
        ({"table": None, "key": KEY}, "table must be a str"),
        ({"key": 5}, "key must be bytes"),
        ({"key": KEY, "value": "text"}, r"value must be bytes \(or None to delete\)"),
        (
            {"key": KEY, "value": b"x" * (VALUE_BYTES_MAX + 1)},
            f"value is {VALUE_BYTES_MAX + 1} bytes; the limit is {VALUE_BYTES_MAX}",
        ),
        ({"key": KEY, "if_version": -1}, "if_version must be an int >= 0"),
        ({"key": KEY, "if_version": "3"}, "if_version must be an int >= 0"),
        ({"key": KEY, "if_absent": 1}, "if_absent must be a bool"),
        ({"key": KEY, "timeout_s": -1.0}, "timeout_s must be in"),
    ],
)
def test_malformed_puts_are_refused(body: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        PutRequest.from_wire(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"scan", "scan: the body must be a map"),
        ({"table": 1, "partition_key": b"p"}, "table must be a str"),
        ({}, "partition_key must be non-empty bytes"),
        ({"partition_key": b""}, "partition_key must be non-empty bytes"),
        ({"partition_key": "p"}, "partition_key must be non-empty bytes"),
        ({"partition_key": b"p", "start": "a"}, "start and end must be bytes"),
        ({"partition_key": b"p", "end": 1}, "start and end must be bytes"),
        ({"partition_key": b"p", "limit": 0}, f"limit must be between 1 and {SCAN_LIMIT_MAX}"),
        ({"partition_key": b"p", "limit": SCAN_LIMIT_MAX + 1}, "limit must be between"),
        ({"partition_key": b"p", "limit": "5"}, "limit must be between"),
        ({"partition_key": b"p", "timeout_s": 100}, "timeout_s must be in"),
    ],
)
def test_malformed_scans_are_refused(body: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        ScanRequest.from_wire(body)


def test_limits_are_accepted_up_to_the_bound() -> None:
    value = b"x" * VALUE_BYTES_MAX
    assert PutRequest.from_wire({"key": KEY, "value": value}).value == value
    assert ScanRequest.from_wire({"partition_key": b"p", "limit": SCAN_LIMIT_MAX}).limit == (
        SCAN_LIMIT_MAX
    )
    assert GetRequest.from_wire({"key": KEY, "timeout_s": 60}).timeout_s == 60.0
    assert api.KEY_BYTES_MAX == KEY_BYTES_MAX


def test_recover_needs_a_map_and_an_explicit_true() -> None:
    with pytest.raises(InvalidRequest, match="recover: the body must be a map"):
        RecoverRequest.from_wire([True])
    assert RecoverRequest.from_wire({}) == RecoverRequest(False)
    assert RecoverRequest.from_wire({"accept_data_loss": 1}) == RecoverRequest(False)
    assert RecoverRequest.from_wire({"accept_data_loss": True}) == RecoverRequest(True)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ([1, b"v"], "malformed 'get' reply: expected a dict"),
        ({"version": 1, "value": "text"}, "malformed 'get' reply: value is a str"),
        ({"version": -1, "value": b"v"}, "malformed 'get' reply: bad version"),
        ({"version": True}, "malformed 'get' reply: bad version"),
    ],
)
def test_malformed_get_replies_are_refused(reply: object, message: str) -> None:
    with pytest.raises(KvsvrError, match=message):
        GetReply.from_wire(reply)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ("ok", "malformed 'put' reply: expected a dict"),
        ({"version": "1"}, "malformed 'put' reply: bad version"),
        ({}, "malformed 'put' reply: bad version None"),
    ],
)
def test_malformed_put_replies_are_refused(reply: object, message: str) -> None:
    with pytest.raises(KvsvrError, match=message):
        PutReply.from_wire(reply)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ([], "malformed 'scan' reply: expected a dict"),
        ({}, "malformed 'scan' reply: no list of items"),
        ({"items": [[b"s", b"v"]]}, "malformed 'scan' reply: bad row"),
        ({"items": [[b"s", None, 1]]}, "malformed 'scan' reply: bad row"),
        ({"items": [["s", b"v", 1]]}, "malformed 'scan' reply: bad row"),
    ],
)
def test_malformed_scan_replies_are_refused(reply: object, message: str) -> None:
    with pytest.raises(KvsvrError, match=message):
        ScanReply.from_wire(reply)


def test_a_map_with_an_unknown_table_consistency_is_refused() -> None:
    body = a_map().to_wire()
    body["tables"][0]["consistency"] = "bounded"
    with pytest.raises(KvsvrError, match="malformed partition map"):
        PartitionMap.from_wire(body)


def test_reports_must_be_maps() -> None:
    assert api.report_from_wire({"node": "n1"}, Method.STATUS) == {"node": "n1"}
    with pytest.raises(KvsvrError, match="malformed 'recover' reply"):
        api.report_from_wire([], Method.RECOVER)


# --- a reference: the node's checks written out by hand, field by field -------------
# What a node accepts of a get, put or scan body, spelled out as plain code
# (less the checks that need the node: is the table known, is it eventual);
# `from_wire` must decide every body as this does.


def reference_table_and_key(body: dict[str, Any]) -> tuple[str, bytes]:
    table = body.get("table", "default")
    if not isinstance(table, str):
        raise InvalidRequest("table must be a str")
    key = body.get("key")
    if not isinstance(key, bytes):
        raise InvalidRequest("key must be bytes (an encoded key)")
    partition_key, _ = decode_key(key)
    if not partition_key:
        raise InvalidRequest("the partition key must not be empty")
    return table, key


def reference_timeout(body: dict[str, Any]) -> float:
    timeout = body.get("timeout_s", api.OPERATION_TIMEOUT_S)
    if not isinstance(timeout, int | float) or not 0 < timeout <= api.OPERATION_TIMEOUT_MAX_S:
        raise InvalidRequest(f"timeout_s must be in (0, {api.OPERATION_TIMEOUT_MAX_S}]")
    return float(timeout)


def reference_get(body: dict[str, Any]) -> tuple[Any, ...]:
    table, key = reference_table_and_key(body)
    consistency = body.get("consistency", "strong")
    if consistency not in ("strong", "stale", "local"):
        raise InvalidRequest("consistency must be 'strong', 'stale' or 'local'")
    min_version = body.get("min_version") or 0
    if not isinstance(min_version, int):
        raise InvalidRequest("min_version must be an int")
    max_age_s = body.get("max_age_s")
    if max_age_s is not None and (
        not isinstance(max_age_s, int | float) or isinstance(max_age_s, bool) or max_age_s < 0
    ):
        raise InvalidRequest("max_age_s must be a number >= 0 or None")
    cached = body.get("cached_version")
    if cached is not None and (
        not isinstance(cached, int) or isinstance(cached, bool) or cached < 1
    ):
        raise InvalidRequest("cached_version must be an int >= 1 or None")
    return (table, key, consistency, max_age_s, min_version, cached, reference_timeout(body))


def reference_put(body: dict[str, Any]) -> tuple[Any, ...]:
    table, key = reference_table_and_key(body)
    value = body.get("value")
    if value is not None and not isinstance(value, bytes):
        raise InvalidRequest("value must be bytes (or None to delete)")
    if value is not None and len(value) > VALUE_BYTES_MAX:
        raise InvalidRequest(f"value is {len(value)} bytes; the limit is {VALUE_BYTES_MAX}")
    if_version = body.get("if_version")
    if if_version is not None and (not isinstance(if_version, int) or if_version < 0):
        raise InvalidRequest("if_version must be an int >= 0")
    if_absent = body.get("if_absent", False)
    if not isinstance(if_absent, bool):
        raise InvalidRequest("if_absent must be a bool")
    return (table, key, value, if_version, if_absent, reference_timeout(body))


def reference_scan(body: dict[str, Any]) -> tuple[Any, ...]:
    table = body.get("table", "default")
    if not isinstance(table, str):
        raise InvalidRequest("table must be a str")
    partition_key = body.get("partition_key")
    if not isinstance(partition_key, bytes) or not partition_key:
        raise InvalidRequest("partition_key must be non-empty bytes")
    start = body.get("start") or b""
    end = body.get("end") or b""
    if not isinstance(start, bytes) or not isinstance(end, bytes):
        raise InvalidRequest("start and end must be bytes")
    limit = body.get("limit", 1000)
    if not isinstance(limit, int) or not 1 <= limit <= SCAN_LIMIT_MAX:
        raise InvalidRequest(f"limit must be between 1 and {SCAN_LIMIT_MAX}")
    return (table, partition_key, start, end, limit, reference_timeout(body))


def outcome(parse: Any, body: dict[str, Any]) -> tuple[str, Any]:
    try:
        return "ok", parse(body)
    except InvalidRequest as error:
        return "refused", str(error)


# Field values a sender may put in a body: right and wrong types, edge values.
# (Not falsy non-bytes for scan bounds: the node took `0` or `""` for b"" there,
# which `ScanRequest.from_wire` refuses as the wrong type it is.)
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(SCAN_LIMIT_MAX - 1, SCAN_LIMIT_MAX + 1),
    st.sampled_from([0.0, 0.5, 60.0, 60.5, -1.0, float("inf")]),
    st.sampled_from(["strong", "stale", "local", "eventual", "default", "x"]),
    st.sampled_from([KEY, b"\x00", b"\x00\x00s", b"", b"p", b"x" * (VALUE_BYTES_MAX + 1)]),
    st.lists(st.integers(), max_size=2),
)


def bodies(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(fields), anything)


GET_FIELDS = ["table", "key", "consistency", "min_version", "max_age_s", "cached_version"]


@given(bodies([*GET_FIELDS, "timeout_s", "other"]))
def test_get_from_wire_decides_as_the_node_did(body: dict[str, Any]) -> None:
    def parse(body: dict[str, Any]) -> tuple[Any, ...]:
        request = GetRequest.from_wire(body)
        timeout_s = request.timeout_s
        return (
            request.table,
            request.key,
            request.consistency,
            request.max_age_s,
            request.min_version,
            request.cached_version,
            api.OPERATION_TIMEOUT_S if timeout_s is None else timeout_s,
        )

    assert outcome(parse, body) == outcome(reference_get, body)


@given(bodies(["table", "key", "value", "if_version", "if_absent", "timeout_s", "other"]))
def test_put_from_wire_decides_as_the_node_did(body: dict[str, Any]) -> None:
    def parse(body: dict[str, Any]) -> tuple[Any, ...]:
        request = PutRequest.from_wire(body)
        timeout_s = request.timeout_s
        return (
            request.table,
            request.key,
            request.value,
            request.if_version,
            request.if_absent,
            api.OPERATION_TIMEOUT_S if timeout_s is None else timeout_s,
        )

    assert outcome(parse, body) == outcome(reference_put, body)


@given(bodies(["table", "partition_key", "start", "end", "limit", "timeout_s", "other"]))
def test_scan_from_wire_decides_as_the_node_did(body: dict[str, Any]) -> None:
    for bound in ("start", "end"):
        if bound in body and not body[bound] and not isinstance(body[bound], bytes | None):
            body[bound] = None

    def parse(body: dict[str, Any]) -> tuple[Any, ...]:
        request = ScanRequest.from_wire(body)
        timeout_s = request.timeout_s
        return (
            request.table,
            request.partition_key,
            request.start or b"",
            request.end or b"",
            request.limit,
            api.OPERATION_TIMEOUT_S if timeout_s is None else timeout_s,
        )

    assert outcome(parse, body) == outcome(reference_scan, body)

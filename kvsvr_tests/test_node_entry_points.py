"""Every way into a node runs the same operation and answers the same.

A node takes a client request through `handle_request_nowait` (the
connection's callback path, no task) or `handle_request` (awaited in a task),
and its own callers use `client_get`/`client_put`/`client_scan` and
`strong_read`. They all start the one engine (`kvsvr.node.engine`); here
each operation (strong, stale and local gets, put, compare-and-set that
succeeds or conflicts, if_absent, delete, scan, an eventual table's get and
put, and requests refused for an unknown table, an oversized value or bad
arguments) runs through every entry point on a real three-node cluster (one
process, real LMDB, real TCP between the nodes), each on keys of its own,
and the answers (reply, or error type and message) must be equal.

Then sequences of operations on one key, drawn by hypothesis, run through
each entry point and through a mix of them, and must answer alike step by
step."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsvr.api import VALUE_BYTES_MAX
from kvsvr.config import TableConfig, local_cluster
from kvsvr.errors import KvsvrError
from kvsvr.keys import encode_key
from kvsvr.node.server import Node, serve_node
from kvsvr_tests.cluster_util import free_base_port

PEER = "127.0.0.1:1"
TABLES = (TableConfig("default"), TableConfig("loose", consistency="eventual", write_quorum=3))

# (reply, None) or (None, (error type, message))
Answer = tuple[object, tuple[str, str] | None]
# How a request reaches the node: (node, method, body) -> answer.
EntryPoint = Callable[[Node, str, dict[str, Any]], Awaitable[Answer]]


async def _caught(call: Awaitable[object]) -> Answer:
    try:
        return await call, None
    except KvsvrError as error:
        return None, (type(error).__name__, str(error))


async def via_nowait(node: Node, method: str, body: Any) -> Answer:
    answered = trio.Event()
    answers: list[Answer] = []

    def respond(reply: object, error: KvsvrError | None) -> None:
        answers.append((reply, None if error is None else (type(error).__name__, str(error))))
        answered.set()

    assert node.handle_request_nowait(PEER, method, body, respond), method
    await answered.wait()
    (answer,) = answers
    return answer


async def via_handle_request(node: Node, method: str, body: Any) -> Answer:
    return await _caught(node.handle_request(PEER, method, body))


async def via_client_methods(node: Node, method: str, body: dict[str, Any]) -> Answer:
    call = {"get": node.client_get, "put": node.client_put, "scan": node.client_scan}[method]
    return await _caught(call(body))


ENTRY_POINTS: dict[str, EntryPoint] = {
    "nowait": via_nowait,
    "handle_request": via_handle_request,
    "client_methods": via_client_methods,
}


def _key(name: str) -> bytes:
    return encode_key(name.encode())


# A scenario: requests in order, each (method, body) with "{k}" standing for
# the scenario's own key (and "{p}" for its own partition key) per entry point.
SCENARIOS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "put then strong get": [
        ("put", {"key": "{k}", "value": b"v1"}),
        ("get", {"key": "{k}"}),
    ],
    "get of a missing key": [("get", {"key": "{k}"})],
    "stale and local gets": [
        ("put", {"key": "{k}", "value": b"v1"}),
        ("get", {"key": "{k}", "consistency": "stale"}),
        ("get", {"key": "{k}", "consistency": "stale", "max_age_s": 30.0}),
        ("get", {"key": "{k}", "consistency": "stale", "min_version": 5}),
        ("get", {"key": "{k}", "consistency": "local"}),
    ],
    "cas that succeeds and one that conflicts": [
        ("put", {"key": "{k}", "value": b"v1"}),
        ("put", {"key": "{k}", "value": b"v2", "if_version": 1}),
        ("put", {"key": "{k}", "value": b"v3", "if_version": 1}),
        ("get", {"key": "{k}"}),
    ],
    "if_absent": [
        ("put", {"key": "{k}", "value": b"first", "if_absent": True}),
        ("put", {"key": "{k}", "value": b"second", "if_absent": True}),
        ("get", {"key": "{k}"}),
    ],
    "delete": [
        ("put", {"key": "{k}", "value": b"v1"}),
        ("put", {"key": "{k}", "value": None}),
        ("get", {"key": "{k}"}),
        ("get", {"key": "{k}", "cached_version": 2}),
    ],
    "near cache: unchanged and changed": [
        ("put", {"key": "{k}", "value": b"v1"}),
        ("get", {"key": "{k}", "cached_version": 1}),
        ("put", {"key": "{k}", "value": b"v2"}),
        ("get", {"key": "{k}", "cached_version": 1}),
    ],
    "scan": [
        ("put", {"key": "{p}a", "value": b"1"}),
        ("put", {"key": "{p}b", "value": b"2"}),
        ("put", {"key": "{p}c", "value": b"3"}),
        ("scan", {"partition_key": "{p}"}),
        ("scan", {"partition_key": "{p}", "start": b"b", "limit": 1}),
        ("scan", {"partition_key": "{p}", "end": b"c"}),
    ],
    "eventual table": [
        ("put", {"table": "loose", "key": "{k}", "value": b"e1"}),
        ("get", {"table": "loose", "key": "{k}"}),
        ("put", {"table": "loose", "key": "{k}", "value": b"e2", "if_version": 1}),
    ],
    "refused requests": [
        ("get", {"table": "nope", "key": "{k}"}),
        ("put", {"table": "nope", "key": "{k}", "value": b"v"}),
        ("scan", {"table": "nope", "partition_key": "{p}"}),
        ("put", {"key": "{k}", "value": b"x" * (VALUE_BYTES_MAX + 1)}),
        ("put", {"key": "{k}", "value": "text"}),
        ("put", {"key": "{k}", "value": b"v", "if_version": -1}),
        ("put", {"key": "{k}", "value": b"v", "if_absent": "yes"}),
        ("put", {"key": "{k}", "value": b"v", "timeout_s": 0}),
        ("get", {"key": "{k}", "consistency": "sometimes"}),
        ("get", {"key": "{k}", "min_version": "3"}),
        ("get", {"key": "{k}", "max_age_s": -1}),
        ("get", {"key": "{k}", "cached_version": 0}),
        ("get", {"key": "not bytes"}),
        ("get", {"key": b"\x00\x00sort"}),
        ("get", {"key": b"\x00"}),
        ("scan", {"partition_key": b""}),
        ("scan", {"partition_key": "{p}", "limit": 0}),
        ("scan", {"partition_key": "{p}", "start": "a"}),
    ],
}


def _fill(value: object, key: bytes, partition: bytes) -> object:
    if value == "{k}":
        return key
    if value == "{p}":
        return partition
    if isinstance(value, str) and value.startswith("{p}"):
        return encode_key(partition, value[3:].encode())
    return value


def _body(template: dict[str, Any], key: bytes, partition: bytes) -> dict[str, Any]:
    return {name: _fill(value, key, partition) for name, value in template.items()}


def _eventual_relative(answers: list[Answer]) -> list[Answer]:
    """An eventual table's versions are hybrid-clock stamps: compare each to
    the first one seen rather than as numbers."""
    first: int | None = None
    relative: list[Answer] = []
    for reply, error in answers:
        if isinstance(reply, dict) and "version" in reply:
            first = reply["version"] if first is None else first
            reply = {**reply, "version": "first" if reply["version"] == first else "other"}
        relative.append((reply, error))
    return relative


async def _run_scenario(
    node: Node, entry: EntryPoint, name: str, steps: list[tuple[str, dict[str, Any]]], tag: str
) -> list[Answer]:
    key = _key(f"{name}/{tag}")
    partition = f"p/{name}/{tag}".encode()
    answers = [await entry(node, method, _body(body, key, partition)) for method, body in steps]
    return _eventual_relative(answers) if name == "eventual table" else answers


async def _with_cluster(tmp_path: Path, test: Callable[[Node], Awaitable[None]]) -> None:
    base = free_base_port(3)
    config = dataclasses.replace(
        local_cluster(3, base, secret="s", tables=TABLES), data_dir=tmp_path
    )
    async with trio.open_nursery() as nursery:
        nodes = [await nursery.start(serve_node, config, f"n{i}") for i in (1, 2, 3)]
        for node in nodes:
            with trio.fail_after(30):
                await node.replication.ready_event.wait()
        await test(nodes[0])
        nursery.cancel_scope.cancel()


def test_every_entry_point_answers_every_operation_alike(tmp_path: Path) -> None:
    async def test(node: Node) -> None:
        for name, steps in SCENARIOS.items():
            answers = {
                tag: await _run_scenario(node, entry, name, steps, tag)
                for tag, entry in ENTRY_POINTS.items()
            }
            reference = answers["nowait"]
            for tag, got in answers.items():
                assert got == reference, (name, tag, got, reference)
            assert any(error is None for _, error in reference) or name == "refused requests"
        # The node's own strong read (catch-up uses it) agrees with a client get.
        key = _key("strong_read")
        await via_nowait(node, "put", {"key": key, "value": b"settled"})
        reply, error = await via_handle_request(node, "get", {"key": key})
        assert error is None and isinstance(reply, dict)
        assert await node.strong_read("default", key) == (reply["version"], reply["value"])
        # A body that is not a map, and an unknown method, are refused the same way.
        refused = []
        for method, body in (("get", [1]), ("put", None), ("scan", "x")):
            answer = await via_nowait(node, method, body)
            assert answer[1] is not None
            assert await via_handle_request(node, method, body) == answer
            refused.append(answer[1][1])
        assert refused == [f"{m}: the body must be a map" for m in ("get", "put", "scan")]
        assert not node.handle_request_nowait(PEER, "nope", {}, lambda *_: None)
        assert await _caught(node.handle_request(PEER, "nope", {})) == (
            None,
            ("InvalidRequest", "unknown method 'nope'"),
        )

    trio.run(_with_cluster, tmp_path, test)


# One step of a random sequence on one key (and its partition, for scans).
STEPS = st.one_of(
    st.builds(lambda value: ("put", {"key": "{p}k", "value": value}), st.binary(max_size=8)),
    st.builds(
        lambda value, version: ("put", {"key": "{p}k", "value": value, "if_version": version}),
        st.binary(max_size=8),
        st.integers(0, 5),
    ),
    st.builds(
        lambda value: ("put", {"key": "{p}k", "value": value, "if_absent": True}),
        st.binary(max_size=8),
    ),
    st.just(("put", {"key": "{p}k", "value": None})),
    st.just(("get", {"key": "{p}k"})),
    st.just(("get", {"key": "{p}k", "consistency": "stale"})),
    st.builds(
        lambda version: ("get", {"key": "{p}k", "cached_version": version}), st.integers(1, 5)
    ),
    st.just(("scan", {"partition_key": "{p}"})),
)


async def via_any(node: Node, method: str, body: dict[str, Any], rng: random.Random) -> Answer:
    return await rng.choice(list(ENTRY_POINTS.values()))(node, method, body)


def test_random_sequences_answer_alike_through_every_entry_point(tmp_path: Path) -> None:
    """Hypothesis draws sequences of operations on one key; each runs, on keys
    of its own, through every entry point and through a random mix of them."""

    async def test(node: Node) -> None:
        examples = itertools.count()

        @settings(max_examples=30, deadline=None, database=None)
        @given(st.lists(STEPS, min_size=1, max_size=12), st.randoms(use_true_random=False))
        def sequences_answer_alike(
            steps: list[tuple[str, dict[str, Any]]], mixer: random.Random
        ) -> None:
            name = f"random {next(examples)}"
            runs: dict[str, EntryPoint] = {**ENTRY_POINTS, "mixed": partial(via_any, rng=mixer)}
            answers = {
                tag: trio.from_thread.run(_run_scenario, node, entry, name, steps, tag)
                for tag, entry in runs.items()
            }
            for tag, got in answers.items():
                assert got == answers["nowait"], tag

        # Hypothesis runs its examples in a thread; each runs on this trio loop.
        await trio.to_thread.run_sync(sequences_answer_alike)

    trio.run(_with_cluster, tmp_path, test)

"""Watch streams against the history of a run.

A watcher (kvsvr's `watch`) reports, per key, events `(version, previous,
value)`: `previous` is the version the watcher held before (its cursor). A
stream may restart after `WatchCompacted` from a version the watcher read
again (a *reset* to a base version). What must hold, per watcher and key:

- **in order, no duplicate**: versions strictly increase within a stream
  segment (from one reset to the next), and each event's `previous` is the
  version before it (the segment's base for its first event);
- **true values**: an event at a version some ok operation of the history
  saw (a read, or a write's or a cas's reply) carries that operation's value,
  and every event's value is one that some write or cas sent;
- **no gap**: versions an event skips (between `previous` and its version)
  may only be versions whose value was never visible, the members of a folded
  group of blind puts that a later member overwrote at once. A skipped
  version that an ok read returned, or that an ok cas took (a cas is never
  folded), was chosen with a visible value: the watcher missed it.

Events are dicts: `watcher`, `key`, `version`, `previous`, `value`, and
`reset: True` with `version` the base for a reset.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class WatchProblem:
    watcher: Any
    key: Any
    index: int  # the event's position in the watcher's stream of that key
    what: str

    def __str__(self) -> str:
        return f"watcher {self.watcher} key {self.key!r} event {self.index}: {self.what}"


@dataclass(slots=True)
class _KeyFacts:
    """What the history says about one key."""

    seen: dict[int, Any]  # version -> value, from ok operations
    must_deliver: set[int]  # versions chosen with a visible value
    written: list[Any]  # values sent by writes and cas (any outcome)


def history_facts(events: Iterable[Mapping[str, Any]]) -> dict[Any, _KeyFacts]:
    """Per key, from a register history's client events (kvsvr's JSONL)."""
    facts: dict[Any, _KeyFacts] = {}
    for event in events:
        if not isinstance(event.get("process"), int):
            continue
        key = event.get("key")
        fact = facts.setdefault(key, _KeyFacts({}, set(), []))
        f, kind, version = event.get("f"), event.get("type"), event.get("version")
        if kind == "invoke" and f in ("write", "cas"):
            fact.written.append(event["value"] if f == "write" else event["value"][1])
        if kind != "ok" or not isinstance(version, int) or version == 0:
            continue
        if event.get("consistency") == "stale" or event.get("unchanged"):
            continue  # the checker of stale reads and the near cache cover these
        value = event["value"][1] if f == "cas" else event["value"]
        fact.seen.setdefault(version, value)
        if f in ("read", "cas"):
            fact.must_deliver.add(version)
    return facts


def check_watch_streams(
    history_events: Iterable[Mapping[str, Any]], watch_events: Iterable[Mapping[str, Any]]
) -> list[WatchProblem]:
    """Every problem of every watcher's stream of every key (empty: all hold)."""
    facts = history_facts(history_events)
    streams: dict[tuple[Any, Any], list[Mapping[str, Any]]] = {}
    for event in watch_events:
        streams.setdefault((event["watcher"], event["key"]), []).append(event)
    problems: list[WatchProblem] = []
    for (watcher, key), stream in streams.items():
        fact = facts.get(key, _KeyFacts({}, set(), []))
        problems.extend(_check_stream(watcher, key, stream, fact))
    return problems


def _check_stream(
    watcher: Any, key: Any, stream: list[Mapping[str, Any]], fact: _KeyFacts
) -> list[WatchProblem]:
    problems: list[WatchProblem] = []
    last = 0
    for index, event in enumerate(stream):
        version = event["version"]

        def problem(what: str, index: int = index) -> None:
            problems.append(WatchProblem(watcher, key, index, what))

        if event.get("reset"):
            if version < last:
                problem(f"reset to version {version}, below {last} already delivered")
            last = version
            continue
        previous, value = event["previous"], event["value"]
        if version <= last:
            problem(f"version {version} after {last}: a duplicate or out of order")
            continue
        if previous != last:
            problem(f"says it follows version {previous}, but {last} came before it")
        if version in fact.seen and fact.seen[version] != value:
            problem(
                f"version {version} has value {value!r}; the history saw {fact.seen[version]!r}"
            )
        elif value not in fact.written:
            problem(f"value {value!r} at version {version} was never written")
        missed = sorted(v for v in fact.must_deliver if last < v < version)
        if missed:
            problem(f"skipped from {last} to {version} past visible versions {missed}")
        last = version
    return problems

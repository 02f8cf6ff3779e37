"""The history of a run: Jepsen-style events, streamed to JSON Lines.

Client events carry an integer `process`; nemesis events carry the process
"nemesis" and type "info", one when a fault action starts and one when it is
done, as Jepsen records them. Fields of every line: process, type, f, key,
value, time_ns (monotonic, from the start of the run), index; client events
add `node` (the node the client talked to), completions add `version` (ok) or
`error` (fail / info).

`checker_ops` turns the client events into the checker's `Op`s (the nemesis
events are for people and plots; the checker has no use for them).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, Final

from jepsen_like.checker import Op

NEMESIS_PROCESS: Final = "nemesis"
CLIENT_TYPES: Final = frozenset({"invoke", "ok", "fail", "info"})
# Lines written between flushes of the history file: a crash loses at most these.
FLUSH_EVERY_EVENTS: Final = 256


class History:
    """Records events in order, in memory and (optionally) to a JSONL file."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self._start_ns = time.monotonic_ns()
        self._file: IO[str] | None = None
        if path is not None:
            self._file = Path(path).open("w", encoding="utf-8")

    def now_ns(self) -> int:
        """Nanoseconds since the history began (the `time_ns` of an event made now)."""
        return time.monotonic_ns() - self._start_ns

    def now_s(self) -> float:
        return self.now_ns() / 1e9

    def record(
        self,
        process: int | str,
        type_: str,
        f: str,
        key: str | None = None,
        value: Any = None,
        **extra: Any,
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "process": process,
            "type": type_,
            "f": f,
            "key": key,
            "value": value,
            "time_ns": self.now_ns(),
            "index": len(self.events),
        }
        for name, field_value in extra.items():
            if name in event:
                raise ValueError(f"extra field {name!r} shadows a standard one")
            if field_value is not None:
                event[name] = field_value
        self.events.append(event)
        if self._file is not None:
            self._file.write(json.dumps(event, separators=(",", ":")) + "\n")
            if len(self.events) % FLUSH_EVERY_EVENTS == 0:
                self._file.flush()
        return event

    def nemesis(self, f: str, value: Any = None, **extra: Any) -> dict[str, Any]:
        """Record a nemesis action (type info, process "nemesis")."""
        return self.record(NEMESIS_PROCESS, "info", f, None, value, **extra)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def client_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if isinstance(e["process"], int)]

    def nemesis_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["process"] == NEMESIS_PROCESS]


def checker_ops(events: Iterable[dict[str, Any]]) -> list[Op]:
    """The checker's view of a history: client events only, extras kept."""
    standard = {"process", "type", "f", "key", "value", "time_ns", "index"}
    ops: list[Op] = []
    for event in events:
        process = event["process"]
        if not isinstance(process, int) or isinstance(process, bool):
            continue
        ops.append(
            Op(
                process=process,
                type=event["type"],
                f=event["f"],
                key=event["key"],
                value=event["value"],
                time_ns=event["time_ns"],
                index=event["index"],
                extra={k: v for k, v in event.items() if k not in standard},
            )
        )
    return ops


def read_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every event of a history file written by `History`, nemesis ones included."""
    events: list[dict[str, Any]] = []
    with Path(path).open(encoding="utf-8") as file:
        for line in file:
            if line.strip():
                events.append(json.loads(line))
    return events

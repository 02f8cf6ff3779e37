"""History model: Jepsen-style events and the completed operations built from them.

A history is a list of :class:`Op` events, one per line of a history file: an
``invoke`` when a client starts an operation and, usually, a completion
(``ok``, ``fail`` or ``info``) from the same process when it ends.  The checker
does not search over events but over *operations* (:class:`Operation`), each an
interval from invoke to completion; :func:`pair_history` builds them, applying
the meaning of the completion types:

* ``ok``: the operation took effect, somewhere inside its interval;
* ``fail``: it definitely did not take effect, so it is dropped; except a
  cas that failed with a Conflict (see below);
* ``info``, or an invoke that never completes: the outcome is unknown, it may
  take effect at any point after its invoke or never, so its interval stays
  open to the end of the history (``return_ns is None``).

A ``Conflict`` is an answer, not a non-event: it claims the condition was
false at some moment during the call, and kvsvr adds the version that was
current then.  Under the ``conflict`` convention (the default, for kvsvr's own
histories) a cas whose ``fail`` completion is a Conflict (its ``error`` starts
with ``Conflict`` or it carries ``current_version``) becomes a completed
operation ``cas-conflict`` with value ``(expected, reported)``: it happened,
changed nothing, and the register did not hold ``expected`` then.
``reported`` is the value that the history's own ``ok`` operations tie to the
reported version (a read or write that returned that version), so the claim
"this was the current version" is checked too; it is :data:`UNREPORTED` when
no operation names that version.  A Conflict that reports the very version it
was conditioned on (``if_version`` on the invoke) contradicts itself; its
``reported`` is then ``expected``, which no state satisfies.  Any other failed
cas (never sent, invalid) did not happen.  The ``knossos`` convention reads
every ``fail`` as "did not happen": only for outside histories (Jepsen's etcd
logs), where a failed cas carries no such claim.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

#: Event types of a history, as Jepsen names them.
EVENT_TYPES = frozenset({"invoke", "ok", "fail", "info"})

#: Functions whose result is the value read: their completion, not their invoke,
#: carries the value that matters.
READ_FS = frozenset({"read", "get"})

#: The function of a cas that failed with a Conflict: a check that happened.
CAS_CONFLICT = "cas-conflict"
#: How ``fail`` completions are read (see the module docstring).
FAIL_CONFLICT = "conflict"
FAIL_KNOSSOS = "knossos"
FAIL_CONVENTIONS = (FAIL_CONFLICT, FAIL_KNOSSOS)


class _Unreported:
    """The value of a Conflict whose reported version no operation names."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<unreported>"

    def __reduce__(self) -> str:
        return "UNREPORTED"


UNREPORTED = _Unreported()


@dataclass(slots=True)
class Op:
    """One event of a history (one line of a history file).

    ``time_ns`` is a monotonic clock reading; histories without clocks (the
    Jepsen etcd logs and the ``kv`` files) use the line number instead, which
    keeps the real-time order that linearizability is about.  ``extra`` holds
    any other fields (for instance ``consistency`` or ``version``) so that they
    survive a read/write round trip.
    """

    process: int
    type: str
    f: str
    key: str | None
    value: Any
    time_ns: int
    index: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Operation:
    """A completed (or still open) operation: an invoke paired with its completion.

    ``value`` is frozen (lists become tuples, dicts become sorted item tuples) so
    that model states built from it are hashable, which the search's memo
    needs.  ``return_ns`` is ``None`` when the outcome is unknown: such an
    operation may be linearized anywhere after ``call_ns``, or not at all.
    """

    id: int
    process: int
    f: str
    key: str | None
    value: Any
    call_ns: int
    return_ns: int | None
    status: str
    invoke_index: int
    complete_index: int | None

    @property
    def unknown(self) -> bool:
        """True when the outcome is unknown (``info`` or never completed)."""
        return self.return_ns is None


def freeze(value: Any) -> Hashable:
    """Turn JSON/EDN values into hashable ones (lists to tuples, dicts to item tuples).

    Model states must be hashable for the (linearized set, state) memo, and a
    state is often built straight from a written value.
    """
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted(((freeze(k), freeze(v)) for k, v in value.items()), key=repr))
    if isinstance(value, set | frozenset):
        return frozenset(freeze(v) for v in value)
    return value  # type: ignore[no-any-return]


def _merged_value(invoke: Op, completion: Op | None) -> Any:
    """The value the model should see for an operation.

    A read's result is on its ``ok`` completion (its invoke carries nil); for
    anything else the invoke says what was asked, and an ``ok`` completion that
    repeats a value (Jepsen's habit) wins if it has one.
    """
    if completion is None or completion.type != "ok":
        return invoke.value
    if invoke.f in READ_FS or completion.value is not None:
        return completion.value
    return invoke.value


def _is_conflict(invoke: Op, completion: Op) -> bool:
    return (
        invoke.f == "cas"
        and completion.type == "fail"
        and (
            "current_version" in completion.extra
            or str(completion.extra.get("error", "")).startswith("Conflict")
        )
    )


def _written_value(invoke: Op, completion: Op) -> tuple[bool, Any]:
    """(known, value) that an ``ok`` operation ties to its reported version."""
    f = invoke.f
    if f in READ_FS:
        return True, completion.value
    if f in ("write", "put"):
        return True, _merged_value(invoke, completion)
    if f == "cas":
        value = _merged_value(invoke, completion)
        return isinstance(value, list | tuple) and len(value) == 2, value[1]
    if f == "delete":
        return True, None
    return False, None


def _version_values(pairs: list[tuple[Op, Op | None]]) -> dict[tuple[Any, int], set[Hashable]]:
    """(key, version) -> the values the history's strong ``ok`` operations tie
    to it. Version 0 is the absent key every key starts as."""
    values: dict[tuple[Any, int], set[Hashable]] = {}
    for invoke, completion in pairs:
        if completion is None or completion.type != "ok":
            continue
        version = completion.extra.get("version")
        strong = completion.extra.get("consistency", "strong") == "strong"
        if not isinstance(version, int) or not strong:
            continue
        known, value = _written_value(invoke, completion)
        if known:
            values.setdefault((invoke.key, version), set()).add(freeze(value))
    return values


def _conflict_value(
    invoke: Op, completion: Op, versions: dict[tuple[Any, int], set[Hashable]]
) -> Hashable:
    """``(expected, reported)`` for a Conflict (see the module docstring)."""
    expected = freeze(invoke.value[0]) if isinstance(invoke.value, list | tuple) else None
    current = completion.extra.get("current_version")
    if not isinstance(current, int):
        return (expected, UNREPORTED)
    if current == invoke.extra.get("if_version"):
        return (expected, expected)
    named = versions.get((invoke.key, current), {None} if current == 0 else set())
    if len(named) != 1:
        return (expected, UNREPORTED)
    return (expected, next(iter(named)))


def pair_history(history: Iterable[Op], fail_convention: str = FAIL_CONFLICT) -> list[Operation]:
    """Pair invokes with completions by process, in history order.

    ``fail`` operations are dropped (they did not happen), but for Conflicts
    under the ``conflict`` convention, which become ``cas-conflict``.  ``info``
    completions, invokes left open at the end, and invokes superseded by a new
    invoke from the same process (a malformed history, but the earlier one may
    still have taken effect) become operations of unknown outcome.  Completions
    with no pending invoke (nemesis chatter, truncated logs) are ignored.
    Operation ids are positions in the returned list, which is in invoke order.
    """
    if fail_convention not in FAIL_CONVENTIONS:
        raise ValueError(f"fail_convention must be one of {FAIL_CONVENTIONS}")
    pending: dict[int, Op] = {}
    pairs: list[tuple[Op, Op | None]] = []
    for op in history:
        if op.type not in EVENT_TYPES:
            raise ValueError(f"event {op.index}: unknown type {op.type!r}")
        if op.type == "invoke":
            previous = pending.pop(op.process, None)
            if previous is not None:
                pairs.append((previous, None))
            pending[op.process] = op
            continue
        invoke = pending.pop(op.process, None)
        if invoke is None:
            continue
        if invoke.f != op.f:
            raise ValueError(
                f"event {op.index}: process {op.process} completes {op.f!r} "
                f"but invoked {invoke.f!r} (event {invoke.index})"
            )
        if op.type == "fail" and not (
            fail_convention == FAIL_CONFLICT and _is_conflict(invoke, op)
        ):
            continue
        pairs.append((invoke, op))
    pairs.extend((invoke, None) for invoke in pending.values())
    pairs.sort(key=lambda pair: (pair[0].time_ns, pair[0].index))
    versions = _version_values(pairs) if fail_convention == FAIL_CONFLICT else {}
    result: list[Operation] = []
    for invoke, completion in pairs:
        conflict = completion is not None and completion.type == "fail"
        known = completion is not None and completion.type in ("ok", "fail")
        if conflict:
            assert completion is not None
            f = CAS_CONFLICT
            value = _conflict_value(invoke, completion, versions)
        else:
            f = invoke.f
            value = freeze(_merged_value(invoke, completion))
        result.append(
            Operation(
                id=len(result),
                process=invoke.process,
                f=f,
                key=invoke.key,
                value=value,
                call_ns=invoke.time_ns,
                return_ns=completion.time_ns if known and completion is not None else None,
                status=("fail" if conflict else "ok") if known else "info",
                invoke_index=invoke.index,
                complete_index=completion.index if completion is not None else None,
            )
        )
    return result

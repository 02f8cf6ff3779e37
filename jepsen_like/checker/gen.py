"""Generated histories with a known answer, for tests and benchmarks.

:func:`sequential_history` runs random operations through a model one at a
time, so the result is linearizable by construction, then gives each
operation an invoke/complete interval around its place in that sequence,
overlapping with others but never with the previous or next operation of
its own process.  :func:`corrupt_read` then changes one read's result to a
value never written, which no linearization can explain.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .history import Op, freeze
from .models import Model, RegisterModel

#: A value no generated operation writes; a read returning it is impossible.
NEVER_WRITTEN = "never-written"
#: What ghost writes (``info``, never took effect) write.
GHOST = "ghost"


def _random_op(
    rng: random.Random, model: Model, state: Any, values: Sequence[Any], serial: int | None
) -> tuple[str, Any]:
    """A random (f, value) for the model; cas usually expects the current value.

    With ``serial`` every value written is new (as kvsvr's harness does:
    ``serial`` itself, or ``"v<serial>"`` for key-value histories).
    """
    kv = not isinstance(model, RegisterModel)
    if kv:
        f = rng.choice(("get", "get", "put", "append", "delete", "cas"))
    else:
        f = rng.choice(("read", "read", "write", "cas"))
    if f in ("read", "get", "delete"):
        return f, None
    new: Any = rng.choice(values) if serial is None else f"v{serial}" if kv else serial
    if f == "cas":
        current = getattr(model, "missing", None) if state is None else _thaw(state)
        expected = current if rng.random() < 0.6 or serial is not None else rng.choice(values)
        return f, [expected, new]
    if f == "append":
        return f, f"{new};"
    return f, new


def sequential_history(
    rng: random.Random,
    n_ops: int,
    *,
    model: Model | None = None,
    keys: int = 1,
    processes: int = 5,
    values: Sequence[Any] = (0, 1, 2, 3, 4),
    width: int = 20,
    info_rate: float = 0.0,
    ghost_rate: float = 0.0,
    unique_values: bool = False,
) -> list[Op]:
    """A linearizable history of ``n_ops`` operations over ``keys`` keys.

    Operation ``i`` takes effect at time ``10 * i + 5``; its interval reaches up
    to ``width`` operations either way, clipped so that a process never has
    two operations at once.  With ``info_rate`` a state-changing operation's
    completion is ``info`` (or missing) although it took effect; with
    ``ghost_rate`` extra ``info`` writes that never took effect are added.
    ``unique_values`` makes every written value new (``values`` is then
    unused), as in kvsvr's harness; otherwise values repeat, as in Jepsen's
    etcd test, which makes the search harder.
    Unsuccessful cas operations complete as ``fail``.  As in Jepsen, a
    process whose operation ends in doubt continues under a new number.
    """
    model = model or RegisterModel()
    states: dict[str, Any] = {}
    # (lin time, process, key, f, value, completion type)
    planned: list[tuple[int, int, str, str, Any, str]] = []
    for i in range(n_ops):
        key = f"k{rng.randrange(keys)}"
        state = states.get(key, model.init())
        f, value = _random_op(rng, model, state, values, i + 1 if unique_values else None)
        op = Op(0, "ok", f, key, value, 0, 0)
        ok, new_state = model.step(state, _Frozen(op))
        if f in model.read_fs:
            value = getattr(model, "missing", None) if state is None else _thaw(state)
            completion = "ok"
        elif not ok:
            completion = "fail"
        else:
            states[key] = new_state
            completion = "info" if rng.random() < info_rate else "ok"
        planned.append((10 * i + 5, rng.randrange(processes), key, f, value, completion))
        if rng.random() < ghost_rate:
            f_ghost = "write" if isinstance(model, RegisterModel) else "put"
            ghost = (10 * i + 6, rng.randrange(processes), key, f_ghost, GHOST, "ghost")
            planned.append(ghost)
    events: list[tuple[int, int, Op]] = []
    by_process: dict[int, list[tuple[int, int, str, str, Any, str]]] = {}
    for item in planned:
        by_process.setdefault(item[1], []).append(item)
    span = 10 * width
    for process, items in by_process.items():
        previous_end = -1
        incarnation = process
        for j, (t, _, key, f, value, completion) in enumerate(items):
            next_t = items[j + 1][0] if j + 1 < len(items) else t + span + 1
            start = rng.randint(max(previous_end + 1, t - span), t)
            end = rng.randint(t, min(next_t - 1, t + span))
            previous_end = end
            invoke_value = None if f in model.read_fs else value
            events.append((start, 0, Op(incarnation, "invoke", f, key, invoke_value, 0, 0)))
            if completion in ("info", "ghost"):
                if rng.random() < 0.5:  # else it never completes at all
                    events.append((end, 1, Op(incarnation, "info", f, key, value, 0, 0)))
                incarnation += processes
            else:
                events.append((end, 1, Op(incarnation, completion, f, key, value, 0, 0)))
    events.sort(key=lambda e: (e[0], e[1]))
    history: list[Op] = []
    for index, (t, _, op) in enumerate(events):
        history.append(replace(op, time_ns=t * 1000, index=index))
    return history


class _Frozen:
    """An op view with a frozen value, as the checker hands it to models."""

    __slots__ = ("f", "value")

    def __init__(self, op: Op) -> None:
        self.f = op.f
        self.value = freeze(op.value)


def _thaw(value: Any) -> Any:
    """Model states hold tuples; histories hold JSON-style lists."""
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def corrupt_read(rng: random.Random, history: list[Op]) -> list[Op] | None:
    """The history with one ``ok`` read's result replaced by :data:`NEVER_WRITTEN`.

    Returns ``None`` when the history has no ``ok`` read.
    """
    reads = [i for i, op in enumerate(history) if op.type == "ok" and op.f in ("read", "get")]
    if not reads:
        return None
    i = rng.choice(reads)
    corrupted = list(history)
    corrupted[i] = replace(history[i], value=NEVER_WRITTEN)
    return corrupted


__all__ = ["GHOST", "NEVER_WRITTEN", "corrupt_read", "sequential_history"]

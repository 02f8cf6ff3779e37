"""Checking a whole history: split per key, search each key, combine.

Linearizability is compositional (Herlihy & Wing; P-compositionality in
Horn & Kroening's terms): a history over independent keys is linearizable
iff each key's sub-history is.  Splitting turns one exponential search into
many small ones, which can run in parallel processes.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from .history import FAIL_CONFLICT, Op, Operation, pair_history
from .models import Model, model_for_fs
from .search import LINEARIZABLE as LINEARIZABLE
from .search import NOT_LINEARIZABLE as NOT_LINEARIZABLE
from .search import UNKNOWN as UNKNOWN
from .search import SearchOutcome, search

#: How long a key is tried in-process before it is deemed worth a worker
#: process, and the most time spent trying keys that way in one check.
PROBE_S = 0.05
PROBE_TOTAL_S = 1.0
#: Longest rendering of a model state kept in a result.
STATE_CHARS = 300


@dataclass(slots=True)
class KeyResult:
    """The verdict for one key, with what a report needs to explain it.

    ``ops`` are the key's operations (ids ``0..n-1``).  ``prefix`` is the
    longest linearizable prefix found, as operation ids in linearization order
    (for a linearizable key: a whole linearization).  For keys that are not
    linearizable or undecided, ``states`` holds the model state after each
    prefix operation, rendered by the model (cut to ``STATE_CHARS``); for
    linearizable keys it is left empty, nobody needs it.  ``failed_op`` is the
    operation the prefix could not be extended past; ``note`` says why a key
    is undecided.
    """

    key: str | None
    verdict: str
    ops: list[Operation]
    prefix: list[int]
    states: list[str]
    initial_state: str
    failed_op: int | None
    elapsed_s: float
    iterations: int
    memo_size: int
    note: str = ""


@dataclass(slots=True)
class CheckResult:
    """The verdict for a history: per-key results and their combination.

    Any non-linearizable key makes the history not linearizable; otherwise any
    key left undecided (time budget spent) makes it ``unknown``.
    """

    verdict: str
    model: str
    keys: dict[str | None, KeyResult] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def bad_keys(self) -> list[str | None]:
        """Keys whose sub-history is not linearizable."""
        return [k for k, r in self.keys.items() if r.verdict == NOT_LINEARIZABLE]

    @property
    def unknown_keys(self) -> list[str | None]:
        """Keys the time budget did not suffice for."""
        return [k for k, r in self.keys.items() if r.verdict == UNKNOWN]

    @property
    def ok(self) -> bool:
        return self.verdict == LINEARIZABLE


def combine_verdicts(verdicts: Iterable[str]) -> str:
    """``not linearizable`` beats ``unknown``, which beats ``linearizable``."""
    seen = set(verdicts)
    if NOT_LINEARIZABLE in seen:
        return NOT_LINEARIZABLE
    if UNKNOWN in seen:
        return UNKNOWN
    return LINEARIZABLE


def prepare(
    history: Iterable[Op], model: Model, fail_convention: str = FAIL_CONFLICT
) -> dict[str | None, list[Operation]]:
    """Pair events into operations, drop what constrains nothing, split per key.

    Reads of unknown outcome are dropped: whatever they returned is not known,
    and a read changes no state.  Functions the model does not know are an
    error rather than a violation.  ``fail_convention`` says what a ``fail``
    means (:func:`pair_history`).
    """
    per_key: dict[str | None, list[Operation]] = {}
    for op in pair_history(history, fail_convention):
        if op.f not in model.fs:
            raise ValueError(f"{model.name} model cannot check {op.f!r} (event {op.invoke_index})")
        if op.return_ns is None and op.f in model.read_fs:
            continue
        if op.return_ns is not None and op.return_ns < op.call_ns:
            raise ValueError(
                f"event {op.complete_index}: completes before its invoke (event {op.invoke_index})"
            )
        ops = per_key.setdefault(op.key, [])
        ops.append(replace(op, id=len(ops)))
    return per_key


def check_key(
    key: str | None, ops: list[Operation], model: Model, deadline: float | None
) -> KeyResult:
    """Search one key's operations and package the answer."""
    start = time.monotonic()
    if deadline is not None and start > deadline:
        outcome = SearchOutcome(UNKNOWN, [], None, 0, 0, "time budget spent")
    else:
        outcome = search(ops, model, deadline)
    states: list[str] = []
    if outcome.verdict != LINEARIZABLE:
        state: Any = model.init()
        for op_id in outcome.prefix:
            _, state = model.step(state, ops[op_id])
            text = model.describe(state)
            states.append(text if len(text) <= STATE_CHARS else text[: STATE_CHARS - 1] + "…")
    return KeyResult(
        key=key,
        verdict=outcome.verdict,
        ops=ops,
        prefix=outcome.prefix,
        states=states,
        initial_state=model.describe(model.init()),
        failed_op=outcome.failed_op,
        elapsed_s=time.monotonic() - start,
        iterations=outcome.iterations,
        memo_size=outcome.memo_size,
        note=outcome.note,
    )


def _check_batch(
    batch: list[tuple[str | None, list[Operation]]], model: Model, deadline: float | None
) -> list[KeyResult]:
    """Check several keys in turn (a worker's unit of work)."""
    return [check_key(key, ops, model, deadline) for key, ops in batch]


def _check_batch_remote(
    batch: list[tuple[str | None, list[Operation]]], model: Model, deadline: float | None
) -> list[KeyResult]:
    """Worker entry point: as :func:`_check_batch`, but without sending the
    operations back (the parent has them; pickling them again is waste)."""
    results = _check_batch(batch, model, deadline)
    for result in results:
        result.ops = []
    return results


def _pool_context() -> multiprocessing.context.BaseContext:
    """Fork when it is safe (no other threads), else spawn.

    Forking starts workers in milliseconds and needs no importable
    ``__main__``; but forking a process with other threads (trio's thread
    cache, say) can leave a lock held forever in the child, so then spawn.
    """
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _run_pool(
    items: list[tuple[str | None, list[Operation]]],
    model: Model,
    deadline: float | None,
    workers: int,
) -> list[KeyResult]:
    """Check keys in a process pool, one task per key, largest first."""
    items = sorted(items, key=lambda kv: len(kv[1]), reverse=True)
    results: list[KeyResult] = []
    n_workers = min(workers, len(items))
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=_pool_context()) as pool:
        futures = [pool.submit(_check_batch_remote, [item], model, deadline) for item in items]
        for future in futures:
            results.extend(future.result())
    ops_of = dict(items)
    for result in results:
        result.ops = ops_of[result.key]
    return results


def check(
    history: Iterable[Op],
    model: Model | None = None,
    *,
    timeout_s: float | None = 60.0,
    workers: int = 2,
    probe_s: float = PROBE_S,
    fail_convention: str = FAIL_CONFLICT,
) -> CheckResult:
    """Check that ``history`` is linearizable with respect to ``model``, per key.

    ``model`` defaults to a register when only read/write/cas occur, else the
    key-value model.  ``timeout_s`` bounds the whole check (``None``: no
    bound); keys not decided by then are ``unknown``.

    Most keys are decided in milliseconds, far less than starting worker
    processes costs, so every key is first tried in-process for up to
    ``probe_s`` seconds (and all of them together for at most
    ``PROBE_TOTAL_S``).  The keys left over are checked afresh in a pool of
    ``workers`` processes when there are several, in-process otherwise.
    ``probe_s=0`` sends every key to the pool.

    ``fail_convention`` is ``"conflict"`` for kvsvr's histories (a cas that
    failed with a Conflict happened, and its claim is checked) and
    ``"knossos"`` for outside ones, where every ``fail`` did not happen.
    """
    start = time.monotonic()
    history = list(history)
    if model is None:
        model = model_for_fs({op.f for op in history})
    deadline = None if timeout_s is None else start + timeout_s
    per_key = prepare(history, model, fail_convention)
    items = list(per_key.items())
    parallel = workers > 1 and len(items) > 1
    results: list[KeyResult] = []
    leftover: list[tuple[str | None, list[Operation]]] = []
    if not parallel:
        results = _check_batch(items, model, deadline)
    else:
        probe_end = start + PROBE_TOTAL_S
        for key, ops in items:
            now = time.monotonic()
            if probe_s <= 0 or now >= probe_end:
                leftover.append((key, ops))
                continue
            probe_deadline = now + probe_s
            if deadline is not None and deadline <= probe_deadline:
                results.append(check_key(key, ops, model, deadline))
                continue
            result = check_key(key, ops, model, probe_deadline)
            if result.verdict == UNKNOWN:
                leftover.append((key, ops))
            else:
                results.append(result)
        if len(leftover) > 1:
            results.extend(_run_pool(leftover, model, deadline, workers))
        else:
            results.extend(_check_batch(leftover, model, deadline))
    order = {key: i for i, (key, _) in enumerate(items)}
    results.sort(key=lambda r: order[r.key])
    return CheckResult(
        verdict=combine_verdicts(r.verdict for r in results),
        model=model.name,
        keys={r.key: r for r in results},
        elapsed_s=time.monotonic() - start,
    )


def check_operations(
    ops: Sequence[Operation], model: Model, timeout_s: float | None = 60.0
) -> KeyResult:
    """Check one key's already-paired operations (ids are renumbered)."""
    renumbered = [replace(op, id=i) for i, op in enumerate(ops)]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    return check_key(renumbered[0].key if renumbered else None, renumbered, model, deadline)

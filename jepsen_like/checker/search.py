"""The linearizability search for one key: Wing & Gong with Lowe's memo.

This is the algorithm Porcupine implements.  Call and return events of the
operations are threaded on a doubly linked list in time order.  Walking the
list from its head, every call met before the first return belongs to an
operation that may be linearized next (its invoke precedes every pending
return).  Linearizing one "lifts" its call and return out of the list and
pushes (operation, previous state) on a stack; reaching a return means that
operation can no longer be put off, so the search pops the stack, "unlifts"
the entries and tries the next candidate.  A configuration is the pair (bitset
of linearized operations as a Python int, model state); a set of those already
seen (Lowe's memo) keeps the search from redoing equivalent work, which is
what makes it practical.

Operations of unknown outcome get no return entry (a return at +infinity):
they never force a backtrack, may be linearized after their invoke whenever
the model allows, and need not be linearized at all.  The search succeeds as
soon as every ``ok`` operation is linearized; leaving the rest out is the
same as linearizing them, in any order, after everything else, where nothing
observes them.

On top of that, four prunings keep the search small; each only drops
configurations that some kept configuration is at least as good as, so the
verdict is unchanged (a randomized test compares with brute force):

* dominance for optional operations: a configuration that linearized a
  superset of the optional operations of a seen configuration with the same
  required set and state can do nothing the seen one could not;
* symmetry: unknown-outcome operations of one class (equal (f, value), or
  what ``Model.symmetry_class`` says acts alike) are interchangeable, so
  only the earliest-invoked remaining one is tried;
* eager reads: a read that fits the current state is linearized at once and
  nothing else is tried there (moving a read earlier to where it fits never
  breaks a linearization);
* dead reads: if the operation whose return comes first is a read the
  candidates cannot bring the state to (``Model.read_reachable``), the
  configuration is abandoned without trying orders of the candidates.

Finally ``Model.specialize`` merges states no operation of the key can tell
apart (values never read), so e.g. every order of blind appends that a put
later overwrites is one memo entry, not k! of them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .history import Operation
from .models import Model

LINEARIZABLE = "linearizable"
NOT_LINEARIZABLE = "not linearizable"
UNKNOWN = "unknown"

#: How many loop iterations between two looks at the clock.
DEADLINE_CHECK_EVERY = 1024
#: Most memo entries one search may hold (a few hundred bytes each) before it
#: gives up with ``unknown``: a bound on memory as the deadline is on time.
MAX_MEMO = 4_000_000


@dataclass(slots=True)
class SearchOutcome:
    """What the search found for one key.

    ``prefix`` is a linearization (in order, by operation id) of the longest
    linearizable prefix found: for a linearizable key, a full linearization of
    its ``ok`` operations (plus any unknown-outcome operations that had to take
    effect).  ``failed_op`` is the operation the longest prefix could not be
    extended past: its return came while it could not be linearized.
    """

    verdict: str
    prefix: list[int]
    failed_op: int | None
    iterations: int
    memo_size: int
    note: str = ""


def search(
    ops: Sequence[Operation],
    model: Model,
    deadline: float | None = None,
    max_memo: int = MAX_MEMO,
) -> SearchOutcome:
    """Decide whether ``ops`` (one key, ids ``0..len-1``) is linearizable.

    ``deadline`` is a :func:`time.monotonic` reading; once past it, or once
    the memo holds ``max_memo`` entries, the answer is ``unknown``, never a
    guess.
    """
    n = len(ops)
    for i, op in enumerate(ops):
        if op.id != i:
            raise ValueError("operation ids must be 0..n-1 in order")
    required = [op.return_ns is not None for op in ops]
    remaining = sum(required)
    if remaining == 0:
        return SearchOutcome(LINEARIZABLE, [], None, 0, 0)

    model = model.specialize(ops)
    # Events sorted by time, calls before returns at equal times: operations
    # that touch in time are treated as concurrent, the permissive reading.
    # Unknown-outcome operations the model calls irrelevant get no events.
    events: list[tuple[int, int, int]] = []
    for op in ops:
        if op.return_ns is None and model.irrelevant(op):
            continue
        events.append((op.call_ns, 0, op.id))
        if op.return_ns is not None:
            if op.return_ns < op.call_ns:
                raise ValueError(f"operation {op.id} returns before it is invoked")
            events.append((op.return_ns, 1, op.id))
    events.sort()

    # Node 0 is the head sentinel, node k (k >= 1) is events[k - 1].
    size = len(events) + 1
    nxt = [*range(1, size), -1]
    prv = [-1, *range(0, size - 1)]
    node_op = [-1] * size
    is_call = [False] * size
    match = [-1] * size  # call node -> its return node, -1 if none
    call_node = [0] * n
    for k, (_, kind, op_id) in enumerate(events, start=1):
        node_op[k] = op_id
        if kind == 0:
            is_call[k] = True
            call_node[op_id] = k
        else:
            match[call_node[op_id]] = k

    step = model.step
    reachable = model.read_reachable
    is_read = [op.f in model.read_fs for op in ops]
    bits = [1 << i for i in range(n)]
    req_mask = 0
    for i in range(n):
        if required[i]:
            req_mask |= bits[i]
    # Symmetry: unknown-outcome operations with the same function and value
    # are interchangeable, and the one invoked first is available whenever a
    # later one is, so only ever linearize the earliest remaining of a class.
    gate = [0] * n
    last_of_class: dict[Any, int] = {}
    symmetry_class = model.symmetry_class
    for op in sorted((o for o in ops if o.return_ns is None), key=lambda o: (o.call_ns, o.id)):
        cls = symmetry_class(op)
        previous = last_of_class.get(cls)
        if previous is not None:
            gate[op.id] = bits[previous]
        last_of_class[cls] = op.id

    # Memo: (required bits, state) -> optional-bit sets seen with it.
    memo: dict[tuple[int, Any], list[int]] = {}
    memo_size = 0
    # (call node, state before, linearized before, forced)
    stack: list[tuple[int, Any, int, bool]] = []
    changers: list[Operation] = []
    state: Any = model.init()
    linearized = 0
    best_prefix: list[int] = []
    failed_op: int | None = None
    iterations = 0
    monotonic = time.monotonic

    entry = nxt[0]
    fresh_config = True
    while True:
        iterations += 1
        if (
            deadline is not None
            and iterations % DEADLINE_CHECK_EVERY == 0
            and monotonic() > deadline
        ):
            return SearchOutcome(
                UNKNOWN, best_prefix, failed_op, iterations, memo_size, "time budget spent"
            )
        candidate = -1
        forced = False
        dead = False
        if fresh_config:
            fresh_config = False
            # Two prunings at a newly reached configuration, from one walk
            # over its candidates (the calls before the first pending return):
            # 1. A read that can be linearized now may as well be: moving a
            #    read to the earliest point it fits never invalidates a
            #    linearization (it changes no state, and every pending
            #    operation returns after its invoke), so it is the only child
            #    worth trying.
            # 2. The operation owning the first pending return must come
            #    before anything that is not yet a candidate.  If it is a
            #    read, the model can tell whether the candidates could still
            #    bring the state to what it read; if not, this configuration
            #    is dead.
            e = entry
            changers.clear()
            while e != -1 and is_call[e]:
                op_id = node_op[e]
                if is_read[op_id]:
                    if step(state, ops[op_id])[0]:
                        candidate = e
                        forced = True
                        break
                else:
                    changers.append(ops[op_id])
                e = nxt[e]
            if not forced and e != -1:
                first = node_op[e]
                if is_read[first] and not reachable(state, ops[first], changers):
                    dead = True
                    entry = e
        if not dead and not forced:
            # Next candidate in list order; reads were ruled out by the walk
            # above (state is unchanged since), and an unknown-outcome
            # operation waits for the earlier ones of its class.
            while entry != -1 and is_call[entry]:
                op_id = node_op[entry]
                if is_read[op_id] or (gate[op_id] and not linearized & gate[op_id]):
                    entry = nxt[entry]
                    continue
                candidate = entry
                break
        if candidate != -1:
            op_id = node_op[candidate]
            ok, new_state = step(state, ops[op_id])
            if ok:
                new_linearized = linearized | bits[op_id]
                memo_key = (new_linearized & req_mask, new_state)
                optional = new_linearized & ~req_mask
                seen = memo.get(memo_key)
                fresh = True
                if seen is None:
                    memo[memo_key] = [optional]
                else:
                    for other in seen:
                        if other & ~optional == 0:  # other is a subset: dominated
                            fresh = False
                            break
                    if fresh:
                        seen.append(optional)
                if fresh:
                    memo_size += 1
                    if memo_size > max_memo:
                        return SearchOutcome(
                            UNKNOWN, best_prefix, failed_op, iterations, memo_size, "memo full"
                        )
                    stack.append((candidate, state, linearized, forced))
                    state = new_state
                    linearized = new_linearized
                    # lift the call entry and its return entry out of the list
                    p, q = prv[candidate], nxt[candidate]
                    nxt[p] = q
                    if q != -1:
                        prv[q] = p
                    ret = match[candidate]
                    if ret != -1:
                        p, q = prv[ret], nxt[ret]
                        nxt[p] = q
                        if q != -1:
                            prv[q] = p
                        remaining -= 1
                        if remaining == 0:
                            prefix = [node_op[s[0]] for s in stack]
                            return SearchOutcome(LINEARIZABLE, prefix, None, iterations, memo_size)
                    entry = nxt[0]
                    fresh_config = True
                    continue
            if not forced:
                entry = nxt[candidate]
                continue
            # The forced read leads to an explored configuration: this one
            # fails too, so fall through to backtracking.
        elif len(stack) > len(best_prefix) or failed_op is None:
            # At a return entry (or a dead configuration): the operation it
            # ends can no longer be put off, and cannot be linearized.
            best_prefix = [node_op[s[0]] for s in stack]
            failed_op = node_op[entry] if entry != -1 else None
        while True:
            if not stack:
                return SearchOutcome(
                    NOT_LINEARIZABLE, best_prefix, failed_op, iterations, memo_size
                )
            entry, state, linearized, was_forced = stack.pop()
            # unlift: return entry first, then the call entry (reverse of lift)
            ret = match[entry]
            if ret != -1:
                p, q = prv[ret], nxt[ret]
                nxt[p] = ret
                if q != -1:
                    prv[q] = ret
                remaining += 1
            p, q = prv[entry], nxt[entry]
            nxt[p] = entry
            if q != -1:
                prv[q] = entry
            if not was_forced:
                break
        entry = nxt[entry]

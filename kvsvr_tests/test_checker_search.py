"""The linearizability search: semantics of the history model, prunings, budget.

The search prunes aggressively (eager reads, dead reads, symmetry, merged
unobserved states, dominance), so besides hand-made cases a randomized test
compares it with a brute-force enumeration of every order.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jepsen_like.checker import (
    LINEARIZABLE,
    NOT_LINEARIZABLE,
    UNKNOWN,
    KvModel,
    Model,
    Op,
    Operation,
    RegisterModel,
    check,
    pair_history,
    prepare,
)
from jepsen_like.checker.gen import corrupt_read, sequential_history
from jepsen_like.checker.search import search


def h(*events: tuple[int, str, str, Any] | tuple[int, str, str, Any, str]) -> list[Op]:
    """A history from (process, type, f, value[, key]) tuples; time = position."""
    ops = []
    for i, event in enumerate(events):
        process, type_, f, value = event[:4]
        key = event[4] if len(event) > 4 else None
        ops.append(Op(process, type_, f, key, value, i, i))
    return ops


def verdict(history: list[Op], model: Model | None = None) -> str:
    return check(history, model or RegisterModel(), timeout_s=10).verdict


# ----------------------------------------------------------------------------- semantics


def test_sequential_register() -> None:
    history = h(
        (0, "invoke", "write", 1), (0, "ok", "write", 1),
        (1, "invoke", "read", None), (1, "ok", "read", 1),
        (0, "invoke", "cas", [1, 2]), (0, "ok", "cas", [1, 2]),
        (1, "invoke", "read", None), (1, "ok", "read", 2),
    )  # fmt: skip
    assert verdict(history) == LINEARIZABLE


def test_initial_value_is_nil() -> None:
    assert verdict(h((0, "invoke", "read", None), (0, "ok", "read", None))) == LINEARIZABLE
    assert verdict(h((0, "invoke", "read", None), (0, "ok", "read", 0))) == NOT_LINEARIZABLE


def test_stale_read_after_write_completed() -> None:
    history = h(
        (0, "invoke", "write", 1), (0, "ok", "write", 1),
        (1, "invoke", "read", None), (1, "ok", "read", None),
    )  # fmt: skip
    assert verdict(history) == NOT_LINEARIZABLE


def test_concurrent_read_may_see_either() -> None:
    for seen in (None, 1):
        history = h(
            (0, "invoke", "write", 1),
            (1, "invoke", "read", None), (1, "ok", "read", seen),
            (0, "ok", "write", 1),
        )  # fmt: skip
        assert verdict(history) == LINEARIZABLE


def test_fail_did_not_happen() -> None:
    history = h(
        (0, "invoke", "write", 1), (0, "fail", "write", 1),
        (1, "invoke", "read", None), (1, "ok", "read", 1),
    )  # fmt: skip
    assert verdict(history) == NOT_LINEARIZABLE


def test_info_write_may_or_may_not_happen() -> None:
    for seen in (None, 1):
        history = h(
            (0, "invoke", "write", 1), (0, "info", "write", None),
            (1, "invoke", "read", None), (1, "ok", "read", seen),
        )  # fmt: skip
        assert verdict(history) == LINEARIZABLE
    # ... and never completing means the same.
    history = h((0, "invoke", "write", 1), (1, "invoke", "read", None), (1, "ok", "read", 1))
    assert verdict(history) == LINEARIZABLE


def test_info_write_only_after_its_invoke() -> None:
    history = h(
        (1, "invoke", "read", None), (1, "ok", "read", 1),
        (0, "invoke", "write", 1), (0, "info", "write", None),
    )  # fmt: skip
    assert verdict(history) == NOT_LINEARIZABLE


def test_info_write_takes_effect_once() -> None:
    """Seen once, an unknown write stays done: nil cannot come back."""
    history = h(
        (0, "invoke", "write", 1), (0, "info", "write", None),
        (1, "invoke", "read", None), (1, "ok", "read", 1),
        (1, "invoke", "read", None), (1, "ok", "read", None),
    )  # fmt: skip
    assert verdict(history) == NOT_LINEARIZABLE


def test_info_writes_of_same_value_are_each_usable() -> None:
    """Symmetry pruning must still allow both identical unknown writes."""
    history = h(
        (0, "invoke", "write", 1), (0, "info", "write", None),
        (1, "invoke", "write", 1), (1, "info", "write", None),
        (2, "invoke", "read", None), (2, "ok", "read", 1),
        (3, "invoke", "write", 2), (3, "ok", "write", 2),
        (2, "invoke", "read", None), (2, "ok", "read", 1),
    )  # fmt: skip
    assert verdict(history) == LINEARIZABLE


def test_info_cas_that_cannot_apply_is_harmless() -> None:
    history = h(
        (0, "invoke", "cas", [5, 6]), (0, "info", "cas", None),
        (1, "invoke", "read", None), (1, "ok", "read", None),
    )  # fmt: skip
    assert verdict(history) == LINEARIZABLE


def test_unknown_read_constrains_nothing() -> None:
    history = h((0, "invoke", "read", None), (0, "info", "read", None))
    assert verdict(history) == LINEARIZABLE
    assert prepare(history, RegisterModel()) == {}


def test_pairing_builds_intervals() -> None:
    history = h(
        (0, "invoke", "write", 1), (1, "invoke", "read", None),
        (1, "ok", "read", 1), (0, "ok", "write", 1),
        (2, "invoke", "cas", [1, 2]), (2, "fail", "cas", [1, 2]),
        (3, "invoke", "write", 3),
    )  # fmt: skip
    ops = pair_history(history)
    assert [(o.f, o.value, o.call_ns, o.return_ns) for o in ops] == [
        ("write", 1, 0, 3),
        ("read", 1, 1, 2),
        ("write", 3, 6, None),
    ]
    assert ops[2].unknown and ops[2].status == "info"


def test_kv_model() -> None:
    model = KvModel()
    history = h(
        (0, "invoke", "get", None, "a"), (0, "ok", "get", None, "a"),
        (0, "invoke", "put", "x", "a"), (0, "ok", "put", "x", "a"),
        (0, "invoke", "append", "y", "a"), (0, "ok", "append", "y", "a"),
        (1, "invoke", "get", None, "a"), (1, "ok", "get", "xy", "a"),
        (1, "invoke", "delete", None, "a"), (1, "ok", "delete", None, "a"),
        (1, "invoke", "get", None, "a"), (1, "ok", "get", None, "a"),
        (0, "invoke", "get", None, "b"), (0, "ok", "get", None, "b"),
    )  # fmt: skip
    assert verdict(history, model) == LINEARIZABLE
    bad = [*history[:-1], Op(0, "ok", "get", "b", "xy", 13, 13)]
    result = check(bad, model)
    assert result.verdict == NOT_LINEARIZABLE and result.bad_keys == ["b"]


def test_kv_model_missing_value_and_list_append() -> None:
    corpus_model = KvModel(missing="")
    assert verdict(h((0, "invoke", "get", None, "k"), (0, "ok", "get", "", "k")), corpus_model) == (
        LINEARIZABLE
    )
    history = h(
        (0, "invoke", "append", 1, "k"), (0, "ok", "append", 1, "k"),
        (0, "invoke", "append", 2, "k"), (0, "ok", "append", 2, "k"),
        (0, "invoke", "get", None, "k"), (0, "ok", "get", [1, 2], "k"),
    )  # fmt: skip
    assert verdict(history, KvModel()) == LINEARIZABLE


def test_kv_model_accepts_register_functions() -> None:
    history = h(
        (0, "invoke", "cas", [None, 1], "k"), (0, "ok", "cas", [None, 1], "k"),
        (0, "invoke", "read", None, "k"), (0, "ok", "read", 1, "k"),
        (0, "invoke", "delete", None, "k"), (0, "ok", "delete", None, "k"),
        (0, "invoke", "get", None, "k"), (0, "ok", "get", None, "k"),
    )  # fmt: skip
    assert verdict(history, KvModel()) == LINEARIZABLE
    # the default model for a history using delete is the key-value one
    assert check(history).model == "kv"


def test_unknown_function_is_an_error() -> None:
    import pytest

    with pytest.raises(ValueError, match="cannot check"):
        check(h((0, "invoke", "append", "x"), (0, "ok", "append", "x")), RegisterModel())


def test_result_reports_prefix_and_break() -> None:
    history = h(
        (0, "invoke", "write", 1), (0, "ok", "write", 1),
        (0, "invoke", "write", 2), (0, "ok", "write", 2),
        (1, "invoke", "read", None), (1, "ok", "read", 1),
    )  # fmt: skip
    result = check(history, RegisterModel())
    key = result.keys[None]
    assert result.bad_keys == [None]
    assert key.prefix == [0, 1]
    assert key.states == ["1", "2"]
    assert key.failed_op == 2


# ----------------------------------------------------------------------------- budget


def test_zero_budget_is_unknown_not_a_guess() -> None:
    history = sequential_history(random.Random(3), 200, processes=6)
    assert check(history, RegisterModel(), timeout_s=0).verdict == UNKNOWN


def test_deadline_inside_search() -> None:
    history = sequential_history(random.Random(4), 3000, processes=10, width=10)
    ops = prepare(history, RegisterModel())["k0"]
    outcome = search(ops, RegisterModel(), deadline=time.monotonic() - 1)
    assert outcome.verdict == UNKNOWN


def test_pool_and_in_process_agree() -> None:
    rng = random.Random(5)
    history = sequential_history(rng, 600, keys=6, processes=8)
    bad = corrupt_read(rng, history)
    assert bad is not None
    for hist in (history, bad):
        inline = check(hist, RegisterModel(), workers=1)
        pooled = check(hist, RegisterModel(), workers=2, probe_s=0)
        assert inline.verdict == pooled.verdict
        assert {k: r.verdict for k, r in inline.keys.items()} == {
            k: r.verdict for k, r in pooled.keys.items()
        }
        assert all(r.ops for r in pooled.keys.values())


# ----------------------------------------------------------------------------- brute force


def brute_force(ops: Sequence[Operation], model: Model) -> bool:
    """Linearizable iff some order of all ok ops plus some unknown ones works.

    Uses the plain model (no pruning hints), trying every subset of the
    unknown-outcome operations and every order consistent with real time.
    """
    required = [o for o in ops if o.return_ns is not None]
    optional = [o for o in ops if o.return_ns is None]
    for k in range(len(optional) + 1):
        for chosen in itertools.combinations(optional, k):
            for order in itertools.permutations([*required, *chosen]):
                if any(
                    later.return_ns is not None and later.return_ns < earlier.call_ns
                    for i, earlier in enumerate(order)
                    for later in order[i + 1 :]
                ):
                    continue
                state = model.init()
                for op in order:
                    ok, state = model.step(state, op)
                    if not ok:
                        break
                else:
                    return True
    return False


REGISTER_READS = [None, 0, 1, 2]
KV_READS = [None, "", "a", "b", "ab", "ba", "aa", [3], ["a", 3]]


@st.composite
def small_histories(draw: st.DrawFn) -> tuple[list[Op], Model]:
    kind = draw(st.sampled_from(["register", "kv"]))
    processes = draw(st.integers(1, 4))
    n_ops = draw(st.integers(1, 6))
    events: list[Op] = []
    pending: dict[int, Op] = {}
    invoked = 0
    t = 0
    value: Any
    while invoked < n_ops or pending:
        process = draw(st.integers(0, processes - 1))
        t += draw(st.integers(0, 2))
        if process in pending:
            invoke = pending.pop(process)
            type_ = draw(st.sampled_from(["ok", "ok", "ok", "info", "fail"]))
            value = invoke.value
            if invoke.f in ("read", "get"):
                choices = REGISTER_READS if kind == "register" else KV_READS
                value = draw(st.sampled_from(choices))
            # Versions on ok operations tie values to versions; a failed cas
            # is often a Conflict claiming one (see pair_history).
            extra: dict[str, Any] = {}
            if type_ == "ok":
                extra["version"] = draw(st.integers(0, 3))
            elif type_ == "fail" and invoke.f == "cas" and draw(st.booleans()):
                extra["error"] = "Conflict: condition failed"
                claimed = draw(st.sampled_from([None, 0, 1, 2, 3]))
                if claimed is not None:
                    extra["current_version"] = claimed
            events.append(Op(process, type_, invoke.f, "k", value, t, len(events), extra))
        elif invoked < n_ops:
            if kind == "register":
                f = draw(st.sampled_from(["read", "write", "cas"]))
                vals = st.sampled_from([0, 1, 2, 7])  # 7 is never read
                value = {
                    "read": None,
                    "write": draw(vals),
                    "cas": [draw(st.sampled_from([None, 0, 1, 2])), draw(vals)],
                }[f]
            else:
                f = draw(st.sampled_from(["get", "put", "append", "append", "delete", "cas"]))
                vals = st.sampled_from(["a", "b"])
                value = {
                    "get": None,
                    "delete": None,
                    "put": draw(st.sampled_from(["a", "b", "zz", 5])),  # zz, 5: never read
                    "append": draw(
                        st.sampled_from(["a", "b", "c", "a", "b", 3])
                    ),  # c: unread, 3: list
                    "cas": [draw(st.sampled_from([None, "a", "b"])), draw(vals)],
                }[f]
            invoke_extra = {"if_version": draw(st.integers(0, 3))} if f == "cas" else {}
            invoke = Op(process, "invoke", f, "k", value, t, len(events), invoke_extra)
            pending[process] = invoke
            events.append(invoke)
            invoked += 1
    missing = draw(st.sampled_from([None, ""]))
    model: Model = RegisterModel() if kind == "register" else KvModel(missing=missing)
    return events, model


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_histories())
def test_search_agrees_with_brute_force(case: tuple[list[Op], Model]) -> None:
    history, model = case
    ops = prepare(history, model).get("k", [])
    expected = brute_force(ops, model)
    got = search(ops, model).verdict
    assert got == (LINEARIZABLE if expected else NOT_LINEARIZABLE)

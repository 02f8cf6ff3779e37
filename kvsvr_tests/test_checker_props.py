"""Property tests on generated histories with a known answer.

A history produced by running random operations through the model one at a
time, then stretched into overlapping invoke/complete intervals around that
order, is linearizable by construction; changing one read's result to a
value never written makes it non-linearizable whatever the timing.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jepsen_like.checker import (
    LINEARIZABLE,
    NOT_LINEARIZABLE,
    KvModel,
    Model,
    Op,
    RegisterModel,
    check,
)
from jepsen_like.checker.gen import corrupt_read, sequential_history

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def generated(draw: st.DrawFn) -> tuple[list[Op], Model, random.Random]:
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    kv = draw(st.booleans())
    model: Model = KvModel() if kv else RegisterModel()
    values: tuple[object, ...] = ("a", "b", "c") if kv else (0, 1, 2, 3, 4)
    # Unique values (kvsvr's harness) keep unknown outcomes cheap; with
    # repeated values (Jepsen's etcd test) many of them make the search
    # exponential, so fewer are drawn to keep the test quick.
    unique = draw(st.booleans())
    info_rates = [0.0, 0.1, 0.3] if unique else [0.0, 0.05, 0.1]
    history = sequential_history(
        rng,
        draw(st.integers(1, 120)),
        model=model,
        keys=draw(st.integers(1, 4)),
        processes=draw(st.integers(1, 10)),
        values=values,
        width=draw(st.integers(0, 8)),
        info_rate=draw(st.sampled_from(info_rates)),
        ghost_rate=draw(st.sampled_from([0.0, 0.1])),
        unique_values=unique,
    )
    return history, model, rng


@SETTINGS
@given(generated())
def test_sequentially_generated_histories_are_linearizable(
    case: tuple[list[Op], Model, random.Random],
) -> None:
    history, model, _ = case
    result = check(history, model, timeout_s=20, workers=1)
    assert result.verdict == LINEARIZABLE, result.bad_keys


@SETTINGS
@given(generated())
def test_a_read_of_a_never_written_value_is_caught(
    case: tuple[list[Op], Model, random.Random],
) -> None:
    history, model, rng = case
    corrupted = corrupt_read(rng, history)
    if corrupted is None:
        return  # no ok read to corrupt
    result = check(corrupted, model, timeout_s=20, workers=1)
    assert result.verdict == NOT_LINEARIZABLE
    (bad_key,) = result.bad_keys
    changed = next(op for op, orig in zip(corrupted, history, strict=True) if op != orig)
    assert bad_key == changed.key

"""A Conflict is an answer: the checker holds a failed cas to its claim.

kvsvr's compare-and-set fails with `Conflict` only when the condition was
false at some moment during the call, and reports the version that was
current then. Reading a failed cas as "did not happen" (Knossos's convention)
accepts any spurious Conflict; these tests show the checker does not, and
that the outside corpus keeps its convention.
"""

from __future__ import annotations

from typing import Any

from jepsen_like.checker import (
    CAS_CONFLICT,
    FAIL_KNOSSOS,
    LINEARIZABLE,
    NOT_LINEARIZABLE,
    UNREPORTED,
    KvModel,
    Model,
    Op,
    RegisterModel,
    check,
    pair_history,
)


class History:
    """Events with increasing times; `extra` fields as the harness records them."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def add(self, process: int, type_: str, f: str, value: Any, **extra: Any) -> History:
        index = len(self.ops)
        self.ops.append(Op(process, type_, f, "k", value, index, index, extra))
        return self

    def write(self, process: int, value: int, version: int) -> History:
        self.add(process, "invoke", "write", value)
        return self.add(process, "ok", "write", value, version=version)

    def read(self, process: int, value: int | None, version: int) -> History:
        self.add(process, "invoke", "read", None)
        return self.add(process, "ok", "read", value, version=version)

    def conflict(
        self, process: int, expected: int | None, new: int, if_version: int, current: int | None
    ) -> History:
        self.add(process, "invoke", "cas", [expected, new], if_version=if_version)
        extra = {} if current is None else {"current_version": current}
        return self.add(
            process, "fail", "cas", [expected, new], error="Conflict: condition failed", **extra
        )


def verdict(history: History, model: Model | None = None, **options: Any) -> str:
    return check(history.ops, model or RegisterModel(), timeout_s=10, **options).verdict


def test_the_issues_history_is_caught() -> None:
    """write 648 ok; read 648; cas [648, 655] answered Conflict with an older
    version; a read after it still sees 648. No order explains it."""
    history = (
        History()
        .write(0, 647, version=11)
        .write(0, 648, version=12)
        .read(1, 648, version=12)
        .conflict(1, 648, 655, if_version=12, current=11)
        .read(1, 648, version=12)
    )
    assert verdict(history) == NOT_LINEARIZABLE
    assert verdict(history, fail_convention=FAIL_KNOSSOS) == LINEARIZABLE


def test_a_true_conflict_is_linearizable() -> None:
    history = (
        History()
        .write(0, 1, version=1)
        .read(1, 1, version=1)
        .write(0, 2, version=2)
        .conflict(1, 1, 9, if_version=1, current=2)
        .read(1, 2, version=2)
    )
    assert verdict(history) == LINEARIZABLE


def test_a_conflict_must_report_a_version_current_during_the_call() -> None:
    # The condition was false (2 had replaced 1), but version 1 was no longer
    # current when the cas ran: the report is untrue.
    history = (
        History()
        .write(0, 1, version=1)
        .write(0, 2, version=2)
        .write(0, 3, version=3)
        .conflict(1, 2, 9, if_version=2, current=1)
    )
    assert verdict(history) == NOT_LINEARIZABLE


def test_a_conflict_reporting_its_own_condition_contradicts_itself() -> None:
    history = History().write(0, 1, version=1).conflict(1, 1, 9, if_version=1, current=1)
    assert verdict(history) == NOT_LINEARIZABLE


def test_an_unreported_conflict_still_claims_the_condition_false() -> None:
    steady = History().write(0, 1, version=1).conflict(1, 1, 9, if_version=1, current=None)
    assert verdict(steady) == NOT_LINEARIZABLE
    # A concurrent write of unknown outcome may have made it false.
    racing = History().write(0, 1, version=1)
    racing.add(2, "invoke", "write", 5)
    racing.conflict(1, 1, 9, if_version=1, current=None)
    assert verdict(racing) == LINEARIZABLE


def test_a_conflict_naming_a_version_no_operation_returned_checks_the_condition_only() -> None:
    history = History().write(0, 1, version=1)
    history.add(2, "invoke", "write", 5)  # outcome unknown: may be version 2
    history.conflict(1, 1, 9, if_version=1, current=2)
    ops = pair_history(history.ops)
    conflict = next(op for op in ops if op.f == CAS_CONFLICT)
    assert conflict.value == (1, UNREPORTED)
    assert verdict(history) == LINEARIZABLE


def test_failures_that_are_not_conflicts_did_not_happen() -> None:
    history = History().write(0, 1, version=1)
    history.add(1, "invoke", "cas", [1, 9], if_version=1)
    history.add(1, "fail", "cas", [1, 9], error="NotSent: no connection to n2")
    history.read(1, 1, version=1)
    ops = pair_history(history.ops)
    assert [op.f for op in ops] == ["write", "read"]
    assert verdict(history) == LINEARIZABLE


def test_stale_reads_name_no_version() -> None:
    """A stale read's (value, version) is not a linearizable claim, so it
    never names what a Conflict's version stood for."""
    history = History().write(0, 1, version=1)
    history.add(2, "invoke", "write", 2)  # outcome unknown: may be version 2
    history.add(3, "invoke", "read", None, consistency="stale")
    history.add(3, "ok", "read", 2, version=2, consistency="stale")
    history.conflict(1, 1, 9, if_version=1, current=2)
    conflict = next(op for op in pair_history(history.ops) if op.f == CAS_CONFLICT)
    assert conflict.value == (1, UNREPORTED)


def test_the_kv_model_checks_conflicts_too() -> None:
    absent = History()
    absent.add(0, "invoke", "put", "a")
    absent.add(0, "ok", "put", "a", version=1)
    absent.conflict(1, None, 9, if_version=0, current=0)  # claims the key was absent
    assert verdict(absent, KvModel()) == NOT_LINEARIZABLE
    present = History()
    present.add(0, "invoke", "put", "a")
    present.add(0, "ok", "put", "a", version=1)
    present.conflict(1, None, 9, if_version=0, current=1)
    assert verdict(present, KvModel()) == LINEARIZABLE

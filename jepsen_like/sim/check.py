"""Run a seed and check its history with the linearizability checker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from jepsen_like.checker import LINEARIZABLE, CheckResult, Op, RegisterModel, check
from jepsen_like.sim.run import SimConfig, SimResult, simulate

# One seed's history is small (hundreds of operations on a few keys); a check
# that takes longer than this is reported as unknown, never as a pass.
CHECK_TIMEOUT_S = 30.0


@dataclass
class SeedVerdict:
    seed: int
    verdict: str
    result: CheckResult
    sim: SimResult

    @property
    def ok(self) -> bool:
        return self.verdict == LINEARIZABLE


_STANDARD_FIELDS = frozenset({"process", "type", "f", "key", "value", "time", "index"})


def to_ops(history: list[dict[str, object]]) -> list[Op]:
    """The checker's events; the other fields (versions, a Conflict's claim)
    go in `extra`, where the checker reads them."""
    ops = []
    for event in history:
        ops.append(
            Op(
                process=int(event["process"]),  # type: ignore[call-overload]
                type=str(event["type"]),
                f=str(event["f"]),
                key=str(event["key"]),
                value=event["value"],
                time_ns=int(event["time"]),  # type: ignore[call-overload]
                index=int(event["index"]),  # type: ignore[call-overload]
                extra={k: v for k, v in event.items() if k not in _STANDARD_FIELDS},
            )
        )
    return ops


def check_seed(
    seed: int, config: SimConfig | None = None, trace: Callable[[str], None] | None = None
) -> SeedVerdict:
    sim = simulate(seed, config, trace)
    result = check(to_ops(sim.history), RegisterModel(), timeout_s=CHECK_TIMEOUT_S, workers=1)
    return SeedVerdict(seed, result.verdict, result, sim)


def run_seed_summary(arguments: tuple[int, SimConfig]) -> tuple[int, str, int, int, dict[str, int]]:
    """A picklable summary of one seed, for worker pools."""
    seed, config = arguments
    verdict = check_seed(seed, config)
    return (
        seed,
        verdict.verdict,
        sum(verdict.sim.counts.values()),
        len(verdict.sim.faults),
        verdict.sim.counts,
    )

"""The load generator of `bench.single_node` / `bench.cluster` (`bench.common`):
the paced (open-loop) schedule and how a paced phase measures latency. A fake
client stands in for kvsvr; no cluster is started."""

from __future__ import annotations

import itertools
import time

import pytest
import trio

from bench.load import PhaseSpec, _run_phase, paced_start


def _phase(
    start_at: float, duration_s: float, rate_per_s: float, warmup_s: float = 0.0
) -> PhaseSpec:
    measure_from = start_at + warmup_s
    return PhaseSpec("put", start_at, measure_from, measure_from + duration_s, 0, rate_per_s)


def test_paced_starts_spread_the_clients_evenly_over_the_rate() -> None:
    phase = _phase(100.0, 10.0, rate_per_s=400.0)
    clients = 4
    starts = sorted(
        paced_start(phase, clients, client, number)
        for client in range(clients)
        for number in range(50)
    )
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert starts[0] == 100.0
    # 400/s over all clients: one start every 2.5 ms, whichever client.
    assert all(gap == pytest.approx(0.0025) for gap in gaps)
    # Each client alone: one every 4 / 400 = 10 ms.
    assert paced_start(phase, clients, 3, 7) - paced_start(phase, clients, 3, 6) == pytest.approx(
        0.01
    )


class _SlowClient:
    """Every put takes `service_s`."""

    def __init__(self, service_s: float) -> None:
        self.service_s = service_s
        self.puts = 0

    async def put(self, key: bytes, value: bytes) -> int:
        await trio.sleep(self.service_s)
        self.puts += 1
        return self.puts


async def test_a_paced_phase_counts_the_wait_of_operations_issued_late() -> None:
    # One client, offered 64/s (one every 15.625 ms) over 0.5 s: 32 scheduled
    # puts. Each takes 50 ms, so the client falls further behind with each
    # one: the last starts about 1.5 s after its scheduled time. Latency runs
    # from the schedule, so that wait is in it, and every put scheduled in
    # the window counts, however late it finished.
    service_s = 0.05
    client = _SlowClient(service_s)
    phase = _phase(time.monotonic() + 0.05, 0.5, rate_per_s=64.0)
    result = await _run_phase(
        client, phase, 0, [[b"k1", b"k2"]], {}, b"v", first_client=0, clients=1
    )
    assert result.ops == 32 and client.puts == 32
    assert not result.errors
    latencies = sorted(result.latencies_ms)
    assert latencies[0] >= service_s * 1000 * 0.9
    # Measured from the actual start, every latency would be about 50 ms.
    assert latencies[-1] >= 1000.0, latencies[-5:]


async def test_a_closed_loop_phase_measures_each_operation_from_its_issue() -> None:
    service_s = 0.05
    client = _SlowClient(service_s)
    phase = _phase(time.monotonic() + 0.05, 0.5, rate_per_s=0.0)
    result = await _run_phase(client, phase, 0, [[b"k1", b"k2"]], {}, b"v")
    # Back to back, 50 ms each: at most 10 fit wholly in the window.
    assert 1 <= result.ops <= 10
    assert all(latency >= service_s * 1000 * 0.9 for latency in result.latencies_ms)

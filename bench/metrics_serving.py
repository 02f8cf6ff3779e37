"""What a node's metrics cost it: node CPU per 1000 puts while scraped often.

    python -m bench.metrics_serving [--time-s 8] [--clients 32] [--scrape-every-s 0.1] [--rounds 2]

In one run, on one 3-node cluster configuration (fresh data each time), the
same closed-loop put load (`--clients` tasks, each on its own keys) runs
`--rounds` times in each of three modes, interleaved so that the machine's
other load falls on all of them alike:

- `off`: no metrics_address (no request timing, no endpoint);
- `loop`: the node's endpoint as shipped (`kvsvr.node.http_endpoint`: h11 on
  the node's trio loop, the figures taken on the loop, the text rendered on
  a worker thread), every node scraped every `--scrape-every-s`;
- `thread`: prometheus_client's own `start_http_server` (a WSGI server in a
  thread of the node) on the same registry, scraped alike. The node is run
  through a launcher that swaps `serve_http` for it; nothing else differs
  (run it on the pure-Python build: compiled code would not see the swap).

Prints, per mode: puts/s, node CPU seconds per 1000 puts (all three nodes,
from /proc), and the scrape time p50/p99 as the scraper saw it. Before the
load, with the cluster idle, it scrapes one node `--scrapes` times back to
back and prints that node's CPU-ms per scrape (its CPU over the scrapes less
its idle rate over the same time): the endpoint's own cost, which the load
figures, noisy on a shared machine, bury.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Final

import trio

import kvsvr
from bench.output import terminate_on_sigterm
from bench.proc import cpu_seconds
from kvsvr.local import LocalCluster, free_ports, local_config

MODES: Final = ("off", "loop", "thread")
SECRET: Final = "bench-metrics"

# Runs a node with prometheus_client's thread server in place of the
# endpoint on the trio loop (argv after `-c CODE` is `-m kvsvr node ...`).
_THREAD_LAUNCHER: Final = """
import sys, trio, prometheus_client
import kvsvr.node.server as server

async def serve_in_thread(host, port, endpoint, *, task_status=trio.TASK_STATUS_IGNORED):
    prometheus_client.start_http_server(port, host, registry=endpoint.metrics.registry)
    task_status.started([])
    await trio.sleep_forever()

server.serve_http = serve_in_thread
from kvsvr.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _cluster(directory: Path, mode: str) -> LocalCluster:
    config = local_config(3, secret=SECRET, partitions=16)
    if mode != "off":
        ports = free_ports(3)
        nodes = tuple(
            dataclasses.replace(node, metrics_address=("127.0.0.1", port))
            for node, port in zip(config.nodes, ports, strict=True)
        )
        config = dataclasses.replace(config, nodes=nodes)
    python_args = (lambda _: ("-c", _THREAD_LAUNCHER)) if mode == "thread" else None
    return LocalCluster.create(directory, config, python_args=python_args)


def _scraper(urls: list[str], every_s: float, stop: threading.Event, times: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        for url in urls:
            t0 = time.perf_counter()
            with urllib.request.urlopen(url, timeout=10) as answer:
                answer.read()
            times.append(time.perf_counter() - t0)
        stop.wait(max(0.0, every_s - (time.perf_counter() - started)))


async def _load(addresses: list[str], clients: int, time_s: float) -> int:
    done = 0
    async with kvsvr.connect(addresses, secret=SECRET) as client:
        deadline = trio.current_time() + time_s

        async def one(worker: int) -> None:
            nonlocal done
            i = 0
            while trio.current_time() < deadline:
                await client.put(f"w{worker}-{i % 100}", b"x" * 100)
                i += 1
                done += 1

        async with trio.open_nursery() as nursery:
            for worker in range(clients):
                nursery.start_soon(one, worker)
    return done


def _scrape_cost_ms(cluster: LocalCluster, scrapes: int) -> float:
    """CPU-ms of node n1 per scrape of its /metrics, less its idle CPU."""
    address = cluster.config.nodes[0].metrics_address
    if address is None:
        return 0.0
    pid = cluster.pids["n1"]
    cpu, started = cpu_seconds(pid), time.perf_counter()
    time.sleep(2.0)
    idle_per_s = (cpu_seconds(pid) - cpu) / (time.perf_counter() - started)
    cpu, started = cpu_seconds(pid), time.perf_counter()
    for _ in range(scrapes):
        with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics") as answer:
            answer.read()
    spent = cpu_seconds(pid) - cpu - idle_per_s * (time.perf_counter() - started)
    return spent / scrapes * 1000


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch, _cluster(Path(scratch), mode) as cluster:
        cluster.start_all()
        scrape_cost_ms = _scrape_cost_ms(cluster, args.scrapes)
        trio.run(_load, cluster.addresses, args.clients, 1.0)  # warm-up
        urls = []
        for node in cluster.config.nodes:
            if node.metrics_address is not None:
                urls.append(f"http://{node.metrics_address[0]}:{node.metrics_address[1]}/metrics")
        pids = list(cluster.pids.values())
        stop = threading.Event()
        times: list[float] = []
        scraper = threading.Thread(
            target=_scraper, args=(urls, args.scrape_every_s, stop, times), daemon=True
        )
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        scraper.start()
        ops = trio.run(_load, cluster.addresses, args.clients, args.time_s)
        stop.set()
        scraper.join()
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    times.sort()
    return {
        "scrape_cpu_ms": scrape_cost_ms,
        "puts_per_s": ops / args.time_s,
        "cpu_s_per_1k": cpu / ops * 1000,
        "scrapes": len(times),
        "scrape_p50_ms": statistics.median(times) * 1000 if times else 0.0,
        "scrape_p99_ms": times[int(len(times) * 0.99)] * 1000 if times else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-s", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--scrape-every-s", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scrapes", type=int, default=300)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for round_number in range(args.rounds):
        for mode in MODES:
            with terminate_on_sigterm():
                result = run_mode(mode, args)
            results[mode].append(result)
            print(
                f"round {round_number + 1} {mode:>6}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in result.items()),
                flush=True,
            )
    print()
    print(
        "| mode | idle node CPU-ms / scrape | puts/s | node CPU-s / 1k puts | scrapes "
        "| scrape p50 ms | scrape p99 ms |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode in MODES:
        runs = results[mode]
        mean = {key: statistics.mean(r[key] for r in runs) for key in runs[0]}
        print(
            f"| {mode} | {mean['scrape_cpu_ms']:.2f} | {mean['puts_per_s']:,.0f} | "
            f"{mean['cpu_s_per_1k']:.3f} | "
            f"{mean['scrapes']:.0f} | {mean['scrape_p50_ms']:.2f} | {mean['scrape_p99_ms']:.2f} |"
        )


if __name__ == "__main__":
    main()

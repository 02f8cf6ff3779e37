"""Chat delivery latency and idle cost: receivers woken by a watch against
receivers that poll, in one run on one cluster.

    python -m bench.watch [--receivers 1000] [--messages 100] [--gap-ms 100]
                          [--idle-s 10] [--out bench-results]

Starts its own 3-node cluster (the app tables declared, data in a temporary
directory). `--receivers` users wait for mail with `Chat.wait_for_messages`,
`RECEIVERS_PER_CLIENT` per client connection; one sender then sends
`--messages` one-to-one messages, `--gap-ms` apart, each to a random
receiver. A message's latency is the time from the start of its `send` to
the moment its receiver's wait returned with it (the wait fetches it, so the
receiver has the message in hand); "after send" is the same from the moment
the `send` returned (the message stored; negative when the receiver woke
before the sender had its reply). Two modes, one after the other:

- `watch`: `wait_for_messages` as the chat app has it: a watch of the
  mailbox rows after the cursor (`Client.watch`), woken by the node.
- `poll`: the long-poll the chat app had before watches: one strong read of
  the mailbox counter per poll, backing off POLL_FIRST_S -> POLL_MAX_S, then
  a fetch.

Before the messages, the receivers wait `--idle-s` with nothing sent: the
nodes' CPU over that window, less their CPU over `--idle-s` with no receiver
at all (measured once, first), divided by the receivers, is what one idle
waiting receiver costs the nodes (CPU-us per second).

Prints a table and writes `--out/watch-<time>.json`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import Any, Final

import trio

import kvsvr
from bench.output import print_table, write_results
from bench.phases import percentile
from bench.proc import cpu_seconds
from kvsvr.apps import app_tables
from kvsvr.apps._store import read_counter
from kvsvr.apps._tables import CHAT_META
from kvsvr.apps.chat import Chat, Fetched
from kvsvr.config import TableConfig
from kvsvr.local import local_config, temporary_cluster

MODES: Final = ("watch", "poll")
# Receivers sharing one client (one connection per node): a node holds at
# most WATCHES_PER_CONNECTION_MAX (128) watches of one connection.
RECEIVERS_PER_CLIENT: Final = 100
# The polling baseline's back-off (what the chat app polled with).
POLL_FIRST_S: Final = 0.02
POLL_MAX_S: Final = 0.5
CLIENT_TIMEOUT_S: Final = 30.0
# A receiver's one wait; the run ends long before it on a healthy cluster.
WAIT_TIMEOUT_S: Final = 600.0
# Receivers still setting up (first fetch, watch) after this: the run fails.
SETTLE_TIMEOUT_S: Final = 300.0
SECRET: Final = "bench-watch-secret"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.watch", description=__doc__)
    parser.add_argument("--receivers", type=int, default=1000, help="waiting receivers")
    parser.add_argument("--messages", type=int, default=100, help="messages sent per mode")
    parser.add_argument("--gap-ms", type=float, default=100.0, help="time between sends")
    parser.add_argument("--idle-s", type=float, default=10.0, help="idle window for CPU")
    parser.add_argument("--modes", default=",".join(MODES), help="watch,poll (in this order)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    return parser


async def _wait_polling(chat: Chat, user: int, after_seq: int) -> Fetched:
    """The chat app's long-poll before watches: the baseline."""
    delay = POLL_FIRST_S
    counter_key = (f"u{user}", "seq/msg")  # the mailbox counter (`_chat._user`)
    while True:
        if await read_counter(chat.client, counter_key, table=CHAT_META) > after_seq:
            fetched = await chat.fetch(user, after_seq)
            if fetched.cursor > after_seq:
                return fetched
        await trio.sleep(delay)
        delay = min(POLL_MAX_S, delay * 2)


class _Run:
    """One mode's receivers and what they saw."""

    def __init__(self, mode: str, receivers: int) -> None:
        self.mode = mode
        self.receivers = receivers
        self.sent_at: dict[str, float] = {}  # message id -> its send's start
        self.stored_at: dict[str, float] = {}  # message id -> its send's return
        self.woke_at: dict[str, float] = {}
        self.waiting = 0
        self.all_waiting = trio.Event()
        self.expected = 0
        self.done = trio.Event()

    async def receive(self, chat: Chat, user: int) -> None:
        cursor = (await chat.fetch(user, 0)).cursor
        first = True
        while True:
            if first:
                self.waiting += 1
                if self.waiting == self.receivers:
                    self.all_waiting.set()
                first = False
            with trio.fail_after(WAIT_TIMEOUT_S):
                if self.mode == "watch":
                    fetched = await chat.wait_for_messages(user, cursor, timeout_s=WAIT_TIMEOUT_S)
                else:
                    fetched = await _wait_polling(chat, user, cursor)
            now = trio.current_time()
            for message in fetched.messages:
                assert message.message_id not in self.woke_at, "delivered once"
                self.woke_at[message.message_id] = now
            cursor = fetched.cursor
            if len(self.woke_at) >= self.expected and len(self.stored_at) >= self.expected:
                self.done.set()


async def _node_cpu_s(pids: dict[str, int], window_s: float) -> float:
    """The nodes' CPU seconds per second over `window_s`."""
    before = sum(cpu_seconds(pid) for pid in pids.values())
    started = trio.current_time()
    await trio.sleep(window_s)
    return (sum(cpu_seconds(pid) for pid in pids.values()) - before) / (
        trio.current_time() - started
    )


async def _run_mode(
    mode: str,
    addresses: list[str],
    pids: dict[str, int],
    args: argparse.Namespace,
    prefix: int,
    baseline_cpu: float,
) -> dict[str, Any]:
    run = _Run(mode, args.receivers)
    run.expected = args.messages
    rng = random.Random(args.seed)
    users = [prefix + i for i in range(args.receivers)]
    async with trio.open_nursery() as nursery:
        clients = []
        for start in range(0, len(users), RECEIVERS_PER_CLIENT):
            client = await nursery.start(_hosted_client, addresses)
            clients.append(client)
            chat = Chat(client)
            for user in users[start : start + RECEIVERS_PER_CLIENT]:
                nursery.start_soon(run.receive, chat, user)
        with trio.fail_after(SETTLE_TIMEOUT_S):
            await run.all_waiting.wait()
        await trio.sleep(2.0)  # the last receivers' first wait reaches its node
        idle_cpu = await _node_cpu_s(pids, args.idle_s)
        sender = Chat(clients[0])
        send_s: list[float] = []
        for i in range(args.messages):
            message_id = f"{mode}-{i}"
            started = trio.current_time()
            run.sent_at[message_id] = started
            await sender.send(1, rng.choice(users), f"message {i}", message_id=message_id)
            run.stored_at[message_id] = trio.current_time()
            send_s.append(run.stored_at[message_id] - started)
            if len(run.woke_at) >= run.expected and len(run.stored_at) >= run.expected:
                run.done.set()
            await trio.sleep(max(0.0, args.gap_ms / 1000 - send_s[-1]))
        with trio.fail_after(WAIT_TIMEOUT_S):
            await run.done.wait()
        nursery.cancel_scope.cancel()
    woke = run.woke_at.items()
    latency_ms = sorted((at - run.sent_at[message]) * 1000 for message, at in woke)
    # After the send returned: how long the stored message took to wake its
    # receiver (negative when the wake-up came before the sender's reply).
    after_ms = sorted((at - run.stored_at[message]) * 1000 for message, at in woke)
    return {
        "mode": mode,
        "receivers": args.receivers,
        "messages": len(latency_ms),
        "p50_ms": percentile(latency_ms, 0.50),
        "p99_ms": percentile(latency_ms, 0.99),
        "max_ms": latency_ms[-1],
        "after_send_p50_ms": percentile(after_ms, 0.50),
        "after_send_p99_ms": percentile(after_ms, 0.99),
        "send_p50_ms": statistics.median(send_s) * 1000,
        "idle_node_cpu_ms_per_s": idle_cpu * 1000,
        "baseline_node_cpu_ms_per_s": baseline_cpu * 1000,
        "idle_node_cpu_us_per_s_per_receiver": (idle_cpu - baseline_cpu) / args.receivers * 1e6,
    }


async def _hosted_client(
    addresses: list[str], *, task_status: trio.TaskStatus[kvsvr.Client] = trio.TASK_STATUS_IGNORED
) -> None:
    async with kvsvr.connect(addresses, secret=SECRET, timeout_s=CLIENT_TIMEOUT_S) as client:
        task_status.started(client)
        await trio.sleep_forever()


async def run(addresses: list[str], pids: dict[str, int], args: argparse.Namespace) -> list[Any]:
    results = []
    print(f"the nodes' own idle CPU over {args.idle_s:g} s ...", flush=True)
    baseline_cpu = await _node_cpu_s(pids, args.idle_s)
    for index, mode in enumerate(args.modes.split(",")):
        print(f"{mode}: {args.receivers} receivers waiting ...", flush=True)
        # Each mode has receivers of its own, so no mailbox carries over.
        prefix = 1_000_000 * (index + 1)
        results.append(await _run_mode(mode, addresses, pids, args, prefix, baseline_cpu))
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.receivers < 1 or args.messages < 1 or args.idle_s <= 0:
        raise SystemExit("--receivers and --messages must be >= 1, --idle-s > 0")
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; modes are {', '.join(MODES)}")
    tables = (TableConfig("default"), *app_tables())
    config = local_config(3, secret=SECRET, partitions=16, tables=tables)
    print("starting a 3-node cluster", flush=True)
    with temporary_cluster(config, prefix="kvsvr-bench-watch-") as cluster:
        results = trio.run(run, cluster.addresses, cluster.pids, args)
    print_table(
        f"chat delivery, {args.receivers} waiting receivers, one sender "
        f"({args.messages} messages {args.gap_ms:g} ms apart)",
        [
            "mode",
            "p50 ms",
            "p99 ms",
            "max ms",
            "after send p50",
            "after send p99",
            "send p50 ms",
            "idle node CPU us/s per receiver",
        ],
        [
            [
                r["mode"],
                r["p50_ms"],
                r["p99_ms"],
                r["max_ms"],
                r["after_send_p50_ms"],
                r["after_send_p99_ms"],
                r["send_p50_ms"],
                r["idle_node_cpu_us_per_s_per_receiver"],
            ]
            for r in results
        ],
    )
    write_results(args, "watch", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

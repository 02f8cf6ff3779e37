"""CPU per wake-up: what one message costs a process that sleeps until it comes.

    python -m bench.wakeup                     # 1,000 messages 5 ms apart, 3 repeats
    python -m bench.wakeup --messages 2000 --gap-ms 2 --repeat 5

A sender process sends `--messages` small messages over TCP on 127.0.0.1,
`--gap-ms` apart, so the receiver is asleep in `epoll_wait` when each one
arrives. The receiver measures its own CPU time per message (its thread's
`time.thread_time`, user and system, in nanoseconds), for three receivers:

- `epoll`: a bare `select.epoll` loop that reads the byte. The floor for any
  Python process on this machine: the kernel's wake-up, a context switch back
  into a cold process, two system calls.
- `trio`: `trio.SocketStream.receive_some` under `trio.run`, the event loop a
  kvsvr node runs on.
- `kvsvr-rpc`: a `kvsvr.net` server with a handler that answers at once, and
  a `kvsvr.net` client that waits for each reply: frame decode, dispatch
  (without a task, as a node answers puts), reply encode and send. What a
  node's trio thread pays for one lone request, before any work of its own.

A kvsvr put at a light load wakes each node several times (the request, the
peer's accept and its reply, the commit thread's hand-back, the commits), so
these figures bound what a put costs the nodes when nothing shares their
wake-ups; `bench/README.md` relates them to `bench.cluster`'s paced phases.
Each receiver is measured `--repeat` times, in turn; the median is quoted.
With `--gap-ms 0` the receiver may get several messages per read (epoll, trio)
and is woken less often than once per message.
"""

from __future__ import annotations

import argparse
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Final

import trio

from kvsvr.net.connection import connect, serve

RECEIVERS: Final = ("epoll", "trio", "kvsvr-rpc")
SECRET: Final = b"bench.wakeup secret"
# How long the receiver waits for the sender to connect, and for each message:
# generous, since the machine may be loaded.
CONNECT_TIMEOUT_S: Final = 30.0
MESSAGE_TIMEOUT_S: Final = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.wakeup",
        description="CPU per wake-up of a receiver that sleeps between messages.",
    )
    parser.add_argument("--messages", type=int, default=1000, help="messages per run (1000)")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="time between messages (5)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per receiver (3)")
    parser.add_argument("--send", nargs=2, metavar=("RECEIVER", "PORT"), help=argparse.SUPPRESS)
    return parser


@contextmanager
def _sender(
    receiver: str, port: int, args: argparse.Namespace
) -> Iterator[subprocess.Popen[bytes]]:
    """The sender process, for the block's duration; waited for on the way
    out (a trio receiver that must keep serving until the sender is done
    waits for it in a thread first), and killed first if the block failed."""
    command = [sys.executable, "-m", "bench.wakeup", "--send", receiver, str(port)]
    command += ["--messages", str(args.messages), "--gap-ms", str(args.gap_ms)]
    process = subprocess.Popen(command)
    try:
        yield process
    except BaseException:
        process.kill()
        raise
    finally:
        process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"the sender process failed (exit code {process.returncode})")


def _send(receiver: str, port: int, messages: int, gap_s: float) -> None:
    """The sender's side: one message per gap (each waits for its reply in rpc)."""
    if receiver == "kvsvr-rpc":

        async def requests() -> None:
            connection = await connect(
                "127.0.0.1", port, secret=SECRET, connect_timeout_s=CONNECT_TIMEOUT_S
            )
            async with connection:
                for index in range(messages):
                    await trio.sleep(gap_s)
                    await connection.request("ping", index)

        trio.run(requests)
        return
    with socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S) as sock:
        for _ in range(messages):
            time.sleep(gap_s)
            sock.sendall(b"x")


def _run_timeout_s(args: argparse.Namespace) -> float:
    return CONNECT_TIMEOUT_S + MESSAGE_TIMEOUT_S + args.messages * (args.gap_ms / 1000 + 0.1)


class _Tally:
    """Counts the bytes (one per message) a receiver got, and its thread's CPU
    time from the first read on: the first wake-up is not counted."""

    def __init__(self, messages: int) -> None:
        self.messages = messages
        self.received = 0
        self.started = 0.0

    def wanted(self) -> bool:
        return self.received < self.messages

    def add(self, data: bytes) -> None:
        if not data:
            raise ConnectionError("the sender closed early")
        if self.received == 0:
            self.started = time.thread_time()
        self.received += len(data)

    def per_message_s(self) -> float:
        return (time.thread_time() - self.started) / (self.messages - 1)


def _receive_epoll(args: argparse.Namespace) -> float:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with _sender("epoll", listener.getsockname()[1], args):
            listener.settimeout(CONNECT_TIMEOUT_S)
            connection, _ = listener.accept()
            tally = _Tally(args.messages)
            with connection, select.epoll() as poller:
                connection.setblocking(False)
                poller.register(connection.fileno(), select.EPOLLIN)
                while tally.wanted():
                    if not poller.poll(MESSAGE_TIMEOUT_S):
                        raise TimeoutError("the sender stopped sending")
                    tally.add(connection.recv(4096))
                return tally.per_message_s()


def _receive_trio(args: argparse.Namespace) -> float:
    async def main() -> float:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        with _sender("trio", port, args):
            with trio.fail_after(CONNECT_TIMEOUT_S):
                stream = await listeners[0].accept()
            await listeners[0].aclose()
            tally = _Tally(args.messages)
            # One deadline for the whole run: a scope per message would add
            # its own cost to what is measured.
            with trio.fail_after(_run_timeout_s(args)):
                async with stream:
                    while tally.wanted():
                        tally.add(await stream.receive_some(4096))
                    return tally.per_message_s()

    return trio.run(main)


class _Answering:
    """A `kvsvr.net` handler that answers every request at once, without a
    task of its own (as a node answers puts and peers' Paxos messages), and
    notes the CPU time of the first and the last."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.done = trio.Event()

    def handle_request_nowait(
        self, peer: str, method: str, body: object, respond: Callable[[object, None], None]
    ) -> bool:
        self.count += 1
        if self.count == 1:
            self.first = time.thread_time()
        if self.count == self.expected:
            self.last = time.thread_time()
            self.done.set()
        respond(body, None)
        return True

    async def handle_request(self, peer: str, method: str, body: object) -> object:
        raise AssertionError("every request is answered by handle_request_nowait")

    def handle_oneway(self, peer: str, method: str, body: object) -> None:
        pass


def _receive_rpc(args: argparse.Namespace) -> float:
    async def main() -> float:
        handler = _Answering(args.messages)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve, "127.0.0.1", 0, handler, secret=SECRET))
            with _sender("kvsvr-rpc", port, args) as sender:
                with trio.fail_after(_run_timeout_s(args)):
                    await handler.done.wait()
                    # The last reply still has to go out: serve until the
                    # sender, which waits for it, is gone.
                    await trio.to_thread.run_sync(sender.wait, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()
        # The last reply's send is not counted; every other request's is.
        return (handler.last - handler.first) / (args.messages - 1)

    return trio.run(main)


MEASURE: Final = {"epoll": _receive_epoll, "trio": _receive_trio, "kvsvr-rpc": _receive_rpc}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.send is not None:
        receiver, port = args.send
        _send(receiver, int(port), args.messages, args.gap_ms / 1000)
        return 0
    if not 2 <= args.messages <= 1_000_000:
        parser.error(f"--messages must be 2 to 1,000,000, not {args.messages}")
    if not 0 <= args.gap_ms <= 10_000:
        parser.error(f"--gap-ms must be 0 to 10,000, not {args.gap_ms}")
    if not 1 <= args.repeat <= 100:
        parser.error(f"--repeat must be 1 to 100, not {args.repeat}")
    print(
        f"CPU per wake-up: {args.messages} messages {args.gap_ms:g} ms apart from another "
        f"process, each receiver {args.repeat}x in turn (median, [min, max])"
    )
    results: dict[str, list[float]] = {receiver: [] for receiver in RECEIVERS}
    for _ in range(args.repeat):
        for receiver in RECEIVERS:
            results[receiver].append(MEASURE[receiver](args) * 1e6)
    floor = statistics.median(results["epoll"])
    for receiver in RECEIVERS:
        values = results[receiver]
        median = statistics.median(values)
        print(
            f"  {receiver:10s} {median:7.1f} us  [{min(values):.1f}, {max(values):.1f}]"
            f"  {median / floor if floor > 0 else float('nan'):5.2f}x epoll"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

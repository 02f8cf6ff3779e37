"""The node's HTTP endpoint for monitoring: `/metrics`, `/healthz`, `/readyz`.

It runs on the node's trio loop, in the node's nursery: h11 parses the
requests (it holds no socket), trio moves the bytes. A scrape takes the
node's figures on the loop, the thread that changes them, so they are never
read mid-update (`NodeMetrics.snapshot`: a status report and copies of the
counters, a fraction of a scrape's cost), then renders the text on a worker
thread, so that the loop goes on serving requests meanwhile (GIL
permitting). bench/RESULTS.md compares it with rendering on the loop and
with prometheus_client's thread server.

- `GET /metrics`: the Prometheus text exposition of the node's registry.
- `GET /healthz`: 200 while the process serves at all.
- `GET /readyz`: 200 when the node's lifecycle state is "ready" (it votes
  and serves), else 503 with the state (starting, waiting_for_peers,
  rebuilding, needs_operator): what an orchestrator's readiness probe wants.

`HEAD` is answered like `GET` without the body; other methods get 405,
other paths 404, a malformed request 400. Connections are bounded in count,
request size and time (the named limits below), so a misbehaving scraper
cannot take the node's memory or tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Final

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvsvr.node.metrics import NodeMetrics
from kvsvr.protocol.lifecycle import READY

log = logging.getLogger("kvsvr.node.http")

# Scrapers open one connection each (Prometheus keeps it alive); a few
# scrapers, probes and a `kvsvr top` fit many times over. Past this a new
# connection is closed at once.
CONNECTIONS_MAX: Final = 32
# A request is one line and a few headers; h11 refuses anything larger.
REQUEST_BYTES_MAX: Final = 16 * 1024
# A connection that sends no complete request in this time is closed (a
# Prometheus scrape interval is 15 s by default; keep-alive waits beyond it).
IDLE_TIMEOUT_S: Final = 60.0
# Read size from the socket.
RECEIVE_BYTES: Final = 4096

_TEXT: Final = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str
    body: bytes


class Endpoint:
    """Answers the endpoint's paths from `metrics` and `state`."""

    def __init__(self, metrics: NodeMetrics, state: Callable[[], str]) -> None:
        self.metrics = metrics
        self.state = state

    async def answer(self, method: bytes, target: bytes) -> Answer:
        path = target.split(b"?", 1)[0]
        if path not in (b"/metrics", b"/healthz", b"/readyz"):
            return Answer(404, _TEXT, b"not found: try /metrics, /healthz or /readyz\n")
        if method not in (b"GET", b"HEAD"):
            return Answer(405, _TEXT, b"method not allowed: use GET\n")
        if path == b"/metrics":
            snapshot = self.metrics.snapshot()
            body = await trio.to_thread.run_sync(generate_latest, snapshot)
            return Answer(200, CONTENT_TYPE_LATEST, body)
        if path == b"/healthz":
            return Answer(200, _TEXT, b"ok\n")
        state = str(self.state())
        if state == READY:
            return Answer(200, _TEXT, b"ready\n")
        return Answer(503, _TEXT, f"not ready: {state}\n".encode())


async def serve_http(
    host: str,
    port: int,
    endpoint: Endpoint,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `endpoint` on host:port until cancelled; `started` with the listeners."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as error:
        reason = f"metrics_address {host}:{port}: cannot listen ({error.strerror})"
        raise OSError(error.errno, reason) from error
    connections = trio.Semaphore(CONNECTIONS_MAX)
    async with trio.open_nursery() as nursery:
        handler = partial(_connection, endpoint, connections)
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(listeners)


async def _connection(
    endpoint: Endpoint, connections: trio.Semaphore, stream: trio.SocketStream
) -> None:
    async with stream:
        try:
            connections.acquire_nowait()
        except trio.WouldBlock:
            log.warning("metrics endpoint: %d connections open; refusing one", CONNECTIONS_MAX)
            return
        try:
            await _serve_requests(endpoint, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        finally:
            connections.release()


async def _serve_requests(endpoint: Endpoint, stream: trio.SocketStream) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=REQUEST_BYTES_MAX)
    while True:
        with trio.move_on_after(IDLE_TIMEOUT_S):
            request = await _next_request(connection, stream)
            if request is None:
                return
            if isinstance(request, Answer):
                await _send(connection, stream, request, head_only=False)
                return
            answer = await endpoint.answer(request.method, request.target)
            await _send(connection, stream, answer, head_only=request.method == b"HEAD")
            if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                return
            connection.start_next_cycle()
            continue
        return  # idle too long


async def _next_request(
    connection: h11.Connection, stream: trio.SocketStream
) -> h11.Request | Answer | None:
    """The next request whose body (if any) was read; an `Answer` (400) for
    a malformed one; None when the client closed."""
    request: h11.Request | None = None
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as error:
            return Answer(error.error_status_hint, _TEXT, f"bad request: {error}\n".encode())
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_BYTES)
            connection.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None
        elif event is h11.PAUSED:
            return None


async def _send(
    connection: h11.Connection, stream: trio.SocketStream, answer: Answer, *, head_only: bool
) -> None:
    # IDLE: the request was refused before h11 read all of its head (a 400).
    if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return  # h11 cannot answer in this state
    headers = [
        ("Content-Type", answer.content_type),
        ("Content-Length", str(len(answer.body))),
    ]
    data = connection.send(h11.Response(status_code=answer.status, headers=headers))
    if not head_only and answer.body:
        data += connection.send(h11.Data(data=answer.body))
    data += connection.send(h11.EndOfMessage())
    await stream.send_all(data)

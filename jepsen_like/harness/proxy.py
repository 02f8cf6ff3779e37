"""Network faults without root: one small TCP proxy per directed node link.

Node a reaches node b through the proxy of link ``(a, b)`` (its config's
``peer_addresses[b]`` points there), which forwards to b's real port. The
proxy can pass bytes, blackhole them (hold: stop reading, so TCP flow control
stalls the sender and everything arrives after the heal, as after a short
real partition; drop: read and discard, and reset the damaged connections at
the heal, as after a long one), delay them, close a fraction of connections
(flaky) or reset every connection at once.

Each proxied connection runs two directions, each a reader and a writer joined
by a bounded channel: the reader applies the mode when bytes arrive (drop,
flaky, the delivery time of a delay), the writer waits for the delivery time
and for the link to flow.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

import trio

from jepsen_like.harness.partitions import Cut, Link

# --- limits -------------------------------------------------------------------

# Bytes asked of a socket per read: a few frames of node traffic.
CHUNK_BYTES_MAX: Final = 64 * 1024
# Chunks read but not yet delivered, per direction of a connection. A delayed
# link holds up to this many (at most 16 MiB); past it the reader waits, which
# pushes back on the sender as a slow real link would.
CHUNKS_IN_FLIGHT_MAX: Final = 256
# Connections one link proxy carries at once. Nodes keep one per peer; the rest
# are reconnect attempts held during a blackhole, which time out on the node's
# side within a second, so this is never reached unless something leaks.
CONNECTIONS_MAX: Final = 64
# Connecting to the target node: a live node on loopback accepts at once; a
# paused one accepts in the kernel too, so only a dead one fails, fast.
UPSTREAM_CONNECT_TIMEOUT_S: Final = 5.0
# Largest delay one chunk may be given: a typo should not stall a run for hours.
DELAY_MAX_S: Final = 30.0

LISTEN_HOST: Final = "127.0.0.1"

Blackhole = Literal["hold", "drop"]


@dataclass(frozen=True, slots=True)
class LinkMode:
    """What a link does to the bytes it carries."""

    blackhole: Blackhole | None = None
    delay_s: float = 0.0
    jitter_s: float = 0.0
    # Chance, per chunk carried, that the proxy closes the connection instead.
    close_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.delay_s <= DELAY_MAX_S or not 0.0 <= self.jitter_s <= DELAY_MAX_S:
            raise ValueError(f"delays must be within [0, {DELAY_MAX_S}] s")
        if not 0.0 <= self.close_fraction <= 1.0:
            raise ValueError("close_fraction must be within [0, 1]")

    def describe(self) -> str:
        parts = []
        if self.blackhole is not None:
            parts.append(f"blackhole-{self.blackhole}")
        if self.delay_s or self.jitter_s:
            parts.append(f"delay {self.delay_s * 1000:.0f}+/-{self.jitter_s * 1000:.0f} ms")
        if self.close_fraction:
            parts.append(f"close {self.close_fraction:.0%}")
        return ", ".join(parts) or "pass"


PASS: Final = LinkMode()


@dataclass(slots=True)
class LinkStats:
    connections_accepted: int = 0
    connections_refused: int = 0
    connections_reset: int = 0
    bytes_forwarded: int = 0
    bytes_dropped: int = 0


def _set_nodelay(stream: trio.SocketStream) -> None:
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _set_reset_on_close(stream: trio.SocketStream) -> None:
    # Linger on with a zero timeout: close() sends RST instead of FIN.
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, trio.ClosedResourceError):
        pass


class _Connection:
    """One proxied connection: its streams and the scope that ends it."""

    def __init__(self, downstream: trio.SocketStream) -> None:
        self.downstream = downstream
        self.upstream: trio.SocketStream | None = None
        self.scope = trio.CancelScope()
        self.damaged = False  # bytes were dropped: the stream is no longer whole
        self.reset_requested = False

    def reset(self) -> None:
        self.reset_requested = True
        self.scope.cancel()


class LinkProxy:
    """A TCP proxy for one directed link; listens on a free loopback port."""

    def __init__(self, link: Link, target: tuple[str, int], rng: random.Random) -> None:
        self.link = link
        self.target = target
        self.rng = rng
        self.mode: LinkMode = PASS
        self.stats = LinkStats()
        self.port = 0  # known once `run` has started
        self._changed = trio.Event()
        self._connections: set[_Connection] = set()

    @property
    def address(self) -> tuple[str, int]:
        assert self.port, "the proxy is not listening yet"
        return LISTEN_HOST, self.port

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and proxy until cancelled; reports the listening port."""
        listeners = await trio.open_tcp_listeners(0, host=LISTEN_HOST)
        self.port = int(listeners[0].socket.getsockname()[1])
        task_status.started(self.port)
        await trio.serve_listeners(self._serve, listeners)

    # --- control (plain functions: they never block) ----------------------------

    def set_mode(self, mode: LinkMode) -> None:
        previous, self.mode = self.mode, mode
        if previous.blackhole == "drop" and mode.blackhole != "drop":
            # Bytes vanished mid-stream: the receiver would only find garbage.
            for connection in list(self._connections):
                if connection.damaged:
                    connection.reset()
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def reset(self) -> int:
        """Reset (RST) every open connection; returns how many."""
        connections = list(self._connections)
        for connection in connections:
            connection.reset()
        return len(connections)

    # --- data path ----------------------------------------------------------------

    async def _wait_flowing(self) -> None:
        await trio.lowlevel.checkpoint()
        while self.mode.blackhole == "hold":
            await self._changed.wait()

    async def _wait_open(self) -> None:
        await trio.lowlevel.checkpoint()
        while self.mode.blackhole is not None:
            await self._changed.wait()

    async def _serve(self, downstream: trio.SocketStream) -> None:
        if len(self._connections) >= CONNECTIONS_MAX:
            self.stats.connections_refused += 1
            await trio.aclose_forcefully(downstream)
            return
        self.stats.connections_accepted += 1
        connection = _Connection(downstream)
        self._connections.add(connection)
        try:
            with connection.scope:
                # No new connection gets through a blackhole in either mode.
                await self._wait_open()
                with trio.fail_after(UPSTREAM_CONNECT_TIMEOUT_S):
                    upstream = await trio.open_tcp_stream(*self.target)
                connection.upstream = upstream
                _set_nodelay(downstream)
                _set_nodelay(upstream)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._direction, connection, downstream, upstream)
                    nursery.start_soon(self._direction, connection, upstream, downstream)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the target is down or a side went away: the connection just ends
        finally:
            self._connections.discard(connection)
            streams = [s for s in (connection.downstream, connection.upstream) if s is not None]
            if connection.reset_requested:
                self.stats.connections_reset += 1
                for stream in streams:
                    _set_reset_on_close(stream)
            for stream in streams:
                await trio.aclose_forcefully(stream)

    async def _direction(
        self, connection: _Connection, source: trio.SocketStream, sink: trio.SocketStream
    ) -> None:
        send_channel, receive_channel = trio.open_memory_channel[tuple[float, bytes]](
            CHUNKS_IN_FLIGHT_MAX
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, connection, receive_channel, sink)
                await self._read(connection, source, send_channel)
        except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # a side went away
        # One side closed: the whole connection ends, as a TCP proxy's would.
        connection.scope.cancel()

    async def _read(
        self,
        connection: _Connection,
        source: trio.SocketStream,
        chunks: trio.MemorySendChannel[tuple[float, bytes]],
    ) -> None:
        last_due = 0.0
        async with chunks:
            while True:
                await self._wait_flowing()
                data = await source.receive_some(CHUNK_BYTES_MAX)
                if not data:
                    return
                mode = self.mode
                if mode.blackhole == "drop":
                    connection.damaged = True
                    self.stats.bytes_dropped += len(data)
                    continue
                if mode.close_fraction and self.rng.random() < mode.close_fraction:
                    connection.reset()
                    return
                delay = mode.delay_s
                if mode.jitter_s:
                    delay += self.rng.uniform(-mode.jitter_s, mode.jitter_s)
                # Never reorder: a TCP stream's bytes arrive in order, however late.
                last_due = max(last_due, trio.current_time() + max(0.0, delay))
                await chunks.send((last_due, data))

    async def _write(
        self,
        connection: _Connection,
        chunks: trio.MemoryReceiveChannel[tuple[float, bytes]],
        sink: trio.SocketStream,
    ) -> None:
        async with chunks:
            async for due, data in chunks:
                await trio.sleep_until(due)
                await self._wait_flowing()
                if self.mode.blackhole == "drop":
                    connection.damaged = True
                    self.stats.bytes_dropped += len(data)
                    continue
                await sink.send_all(data)
                self.stats.bytes_forwarded += len(data)


class Network:
    """The proxies of every directed link between `nodes` (id -> real address).

    `cut(links)` blackholes the given links, `heal()` sets every link back to
    pass; `delay`, `flaky` and `reset` act on the given links (default: all).
    """

    def __init__(
        self, nodes: Mapping[str, tuple[str, int]], rng: random.Random | None = None
    ) -> None:
        self.nodes = dict(nodes)
        self.rng = rng if rng is not None else random.Random(0)
        self.links: dict[Link, LinkProxy] = {
            (a, b): LinkProxy((a, b), self.nodes[b], random.Random(self.rng.random()))
            for a in self.nodes
            for b in self.nodes
            if a != b
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every proxy until cancelled; started once all of them listen."""
        async with trio.open_nursery() as nursery:
            for proxy in self.links.values():
                await nursery.start(proxy.run)
            task_status.started()

    def peer_addresses(self, node: str) -> dict[str, tuple[str, int]]:
        """How `node` reaches each peer: through the proxy of that link."""
        return {b: proxy.address for (a, b), proxy in self.links.items() if a == node}

    def _select(self, links: Iterable[Link] | None) -> list[LinkProxy]:
        if links is None:
            return list(self.links.values())
        return [self.links[link] for link in links]

    def set_mode(self, mode: LinkMode, links: Iterable[Link] | None = None) -> None:
        for proxy in self._select(links):
            proxy.set_mode(mode)

    def cut(self, links: Cut, blackhole: Blackhole = "hold") -> None:
        """Blackhole `links`; the others keep their mode."""
        self.set_mode(LinkMode(blackhole=blackhole), links)

    def heal(self) -> None:
        """Every link back to pass (drop-blackholed connections are reset)."""
        self.set_mode(PASS)

    def delay(self, delay_s: float, jitter_s: float, links: Iterable[Link] | None = None) -> None:
        self.set_mode(LinkMode(delay_s=delay_s, jitter_s=jitter_s), links)

    def flaky(self, close_fraction: float, links: Iterable[Link] | None = None) -> None:
        self.set_mode(LinkMode(close_fraction=close_fraction), links)

    def reset(self, links: Iterable[Link] | None = None) -> int:
        """Reset every open connection of `links`; returns how many."""
        return sum(proxy.reset() for proxy in self._select(links))

    def cut_links(self) -> Cut:
        """The links currently blackholed."""
        return frozenset(link for link, p in self.links.items() if p.mode.blackhole is not None)

    def stats(self) -> dict[str, LinkStats]:
        return {f"{a}->{b}": proxy.stats for (a, b), proxy in self.links.items()}

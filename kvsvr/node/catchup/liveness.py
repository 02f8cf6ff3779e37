"""Failure detection and hellos.

Every node says hello to each peer every HEARTBEAT_S (its cluster, its id,
its replica state); the answer says the same of the peer and whether it knows
the sender as a member. The answers feed a phi accrual detector per peer
(`kvsvr.protocol.failure`), which hinted handoff and anti-entropy ask before
talking to a peer, and the start decisions of `rebuild` (which peers are
ready, which know this node). A peer seen ready is remembered in `meta` as a
member: should it come back empty, it was wiped and must rebuild.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

import msgpack
import trio

from kvsvr.errors import CorruptRow, FrameError, InvalidRequest, KvsvrError
from kvsvr.node.catchup.context import Collaborators, Readiness
from kvsvr.protocol.catchup_messages import PING
from kvsvr.protocol.failure import HEARTBEAT_S, PhiDetector
from kvsvr.protocol.lifecycle import READY, Hello, HelloReply

log = logging.getLogger("kvsvr.replication")

HEARTBEAT_DOWN_S: Final = 0.1
HEARTBEAT_TIMEOUT_S: Final = 2.0
# A node deciding how to start, or waiting for rebuild sources, looks again
# when a peer's hello changes what it knows, and at least this often.
DECIDE_AGAIN_S: Final = 0.25
MEMBERS_MAX: Final = 256  # node ids remembered as members: more than a cluster has
MEMBERS_KEY: Final = b"members"  # in `meta`: the node ids seen ready


class Liveness:
    """Which peers are up, what each said last, and who is a member."""

    def __init__(
        self,
        context: Collaborators,
        readiness: Readiness,
        on_peer_up: Callable[[int], None],
    ) -> None:
        self.context = context
        self.readiness = readiness
        self.on_peer_up = on_peer_up
        config = context.config
        assert config.cluster_id is not None, "a node needs the cluster id"
        self.cluster_id: str = config.cluster_id
        self.me = context.me.index
        self.names = {n.index: n.id for n in config.nodes}
        self.indexes = {n.id: n.index for n in config.nodes}
        self.detectors = {n.index: PhiDetector() for n in config.nodes if n.index != self.me}
        # What each peer said last: its hello reply (state, whether it knows us).
        self.peer_replies: dict[int, HelloReply] = {}
        self.members: set[str] = _read_members(context.storage.read_meta(MEMBERS_KEY))
        self._foreign_logged: set[str] = set()
        self._changed = trio.Event()  # a peer's reply changed what we know

    def is_up(self, peer: int) -> bool:
        return self.detectors[peer].is_up(self.context.clock.monotonic())

    def changed(self) -> None:
        """Wake whoever waits in `decide_again`."""
        self._changed.set()

    async def decide_again(self) -> None:
        """Sleep until a peer's reply changes what we know (or a while)."""
        with trio.move_on_after(DECIDE_AGAIN_S):
            await self._changed.wait()
        self._changed = trio.Event()

    async def heartbeat(self, peer: int) -> None:
        """Say hello to the peer every beat: who we are and our state; its
        reply says the same of it, and whether it knows us as a member."""
        detector = self.detectors[peer]
        while True:
            started = trio.current_time()
            try:
                hello = Hello(self.cluster_id, self.names[self.me], self.readiness.state)
                with trio.fail_after(HEARTBEAT_TIMEOUT_S):
                    raw = await self.context.peers[peer].call(PING, hello.to_wire())
                reply = HelloReply.from_wire(raw)
                if not self._heard(peer, reply):
                    raise FrameError(f"peer {self.names[peer]} is of another cluster")
                if detector.arrived(self.context.clock.monotonic()):
                    log.info("peer %d is up", peer)
                    self.on_peer_up(peer)
            except (KvsvrError, trio.TooSlowError):
                if not detector.failed:
                    log.info("peer %d is down", peer)
                detector.fail()
            # A peer that is down is asked again sooner, so that its link (and
            # the first rounds after it comes back) do not wait a whole beat.
            beat = HEARTBEAT_S if not detector.failed else HEARTBEAT_DOWN_S
            with trio.move_on_at(started + beat):
                await self.readiness.announce.wait()

    def answer_hello(self, body: object) -> list[Any]:
        hello = Hello.from_wire(body)
        if hello.node_id not in self.indexes or hello.node_id == self.names[self.me]:
            raise InvalidRequest(f"hello from unknown node {hello.node_id!r}")
        if hello.cluster_id != self.cluster_id:
            self._log_foreign(hello.node_id, hello.cluster_id)
        elif hello.state == READY:
            self._remember_member(hello.node_id)
        knows = hello.node_id in self.members and hello.cluster_id == self.cluster_id
        return HelloReply(self.cluster_id, self.readiness.state, knows).to_wire()

    def _heard(self, peer: int, reply: HelloReply) -> bool:
        """Take in a peer's hello reply; False if it is of another cluster."""
        if reply.cluster_id != self.cluster_id:
            self._log_foreign(self.names[peer], reply.cluster_id)
        elif reply.state == READY:
            self._remember_member(self.names[peer])
        previous = self.peer_replies.get(peer)
        self.peer_replies[peer] = reply
        if previous != reply:
            self._changed.set()
        return reply.cluster_id == self.cluster_id

    def _log_foreign(self, peer: str, cluster_id: str) -> None:
        if peer not in self._foreign_logged:
            self._foreign_logged.add(peer)
            log.error(
                "peer %s belongs to cluster %s, not %s: it is not talked to",
                peer,
                cluster_id,
                self.cluster_id,
            )

    def _remember_member(self, node_id: str) -> None:
        """A peer seen voting is a member: should it come back empty, it was
        wiped and must rebuild (see `lifecycle.decide_new`)."""
        if node_id in self.members or len(self.members) >= MEMBERS_MAX:
            return
        self.members.add(node_id)
        self.context.storage.stage_meta(MEMBERS_KEY, msgpack.packb(sorted(self.members)))

    def status(self) -> dict[str, Any]:
        now = self.context.clock.monotonic()
        return {
            self.names[p]: {
                "up": d.is_up(now),
                "phi": None if d.last_arrival is None else round(d.phi(now), 2),
            }
            for p, d in self.detectors.items()
        }


def _read_members(raw: bytes | None) -> set[str]:
    if raw is None:
        return set()
    try:
        members = msgpack.unpackb(raw, raw=False)
    except ValueError:
        members = None
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise CorruptRow("unreadable member list in meta")
    return set(members)

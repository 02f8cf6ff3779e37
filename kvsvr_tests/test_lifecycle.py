"""The cluster lifecycle decisions (`kvsvr.protocol.lifecycle`), pure: how a
node starts, founds or rebuilds, and a model of whole clusters run over
hypothesis-chosen schedules of starts, writes, crashes, wipes and restarts,
with the real decision functions: no schedule leaves nodes waiting on each
other, and a node its peers know as a member never founds again."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvsvr.config import local_cluster
from kvsvr.errors import FrameError
from kvsvr.protocol import lifecycle
from kvsvr.protocol.lifecycle import (
    EXISTING,
    FOUNDING_WAIT_S,
    NEEDS_OPERATOR,
    NEW,
    READY,
    REBUILDING,
    STARTING,
    WAITING_FOR_PEERS,
    Hello,
    HelloReply,
    Identity,
    ReplicaState,
    decide_new,
    decide_start,
    plan_rebuild,
)
from kvsvr.protocol.replica import peers_needed_to_rebuild

CLUSTER = "c-1"


# --------------------------------------------------------------------- start


def test_a_directory_of_another_cluster_or_node_is_refused() -> None:
    other = decide_start(Identity("c-2", "n1"), True, CLUSTER, "n1", NEW)
    assert other.kind == "refuse" and "c-2" in other.reason and CLUSTER in other.reason
    swapped = decide_start(Identity(CLUSTER, "n2"), True, CLUSTER, "n1", EXISTING)
    assert swapped.kind == "refuse" and "n2" in swapped.reason


@pytest.mark.parametrize("state", [NEW, EXISTING])
def test_a_directory_with_its_identity_restarts_ready(state: str) -> None:
    assert decide_start(Identity(CLUSTER, "n1"), True, CLUSTER, "n1", state).kind == "ready"
    assert decide_start(Identity(CLUSTER, "n1"), False, CLUSTER, "n1", state).kind == "ready"


def test_a_rebuild_cut_short_is_taken_up_again() -> None:
    for stored in (None, Identity(CLUSTER, "n1")):
        decision = decide_start(stored, True, CLUSTER, "n1", NEW, rebuild_pending=True)
        assert decision.kind == "replacement"


def test_rows_without_an_identity_are_adopted_and_an_empty_directory_asks_or_rebuilds() -> None:
    assert decide_start(None, True, CLUSTER, "n1", NEW).kind == "adopt"
    assert decide_start(None, False, CLUSTER, "n1", NEW).kind == "ask_peers"
    assert decide_start(None, False, CLUSTER, "n1", EXISTING).kind == "replacement"


def test_wire_forms_round_trip_and_reject_garbage() -> None:
    hello = Hello(CLUSTER, "n1", READY)
    assert Hello.from_wire(hello.to_wire()) == hello
    reply = HelloReply(CLUSTER, REBUILDING, True)
    assert HelloReply.from_wire(reply.to_wire()) == reply
    assert Identity.from_bytes(Identity(CLUSTER, "n1").to_bytes()) == Identity(CLUSTER, "n1")
    for bad in (None, [], [CLUSTER, "n1"], [1, "n1", READY], [CLUSTER, "n1", READY, 4]):
        with pytest.raises(FrameError):
            Hello.from_wire(bad)
    with pytest.raises(FrameError):
        HelloReply.from_wire([CLUSTER, READY, 1])
    with pytest.raises(FrameError):
        Identity.from_bytes(b"\xc1")


# --------------------------------------------------------------------- founding


def _reply(state: str = READY, knows: bool = False, cluster: str = CLUSTER) -> HelloReply:
    return HelloReply(cluster, state, knows)


def test_a_peer_that_knows_the_node_makes_it_a_replacement() -> None:
    decision = decide_new({"n2": _reply(knows=True)}, ["n2", "n3"], CLUSTER, 0.0)
    assert decision.kind == "replacement" and "n2" in decision.reason


def test_a_peer_of_another_cluster_is_refused() -> None:
    decision = decide_new({"n2": _reply(cluster="c-9")}, ["n2", "n3"], CLUSTER, 99.0)
    assert decision.kind == "refuse" and "c-9" in decision.reason


def test_founding_needs_every_peer_or_a_majority_and_the_wait() -> None:
    peers = ["n2", "n3"]
    everyone = {"n2": _reply(), "n3": _reply(state=WAITING_FOR_PEERS)}
    assert decide_new(everyone, peers, CLUSTER, 0.0).kind == "found"
    one = {"n2": _reply(state=STARTING)}
    assert decide_new(one, peers, CLUSTER, 0.0).kind == "wait"
    assert decide_new(one, peers, CLUSTER, FOUNDING_WAIT_S).kind == "found"
    assert decide_new({}, peers, CLUSTER, 1e9).kind == "wait"
    # Five nodes: itself and one peer are not a majority.
    five = ["n2", "n3", "n4", "n5"]
    assert decide_new(one, five, CLUSTER, 1e9).kind == "wait"
    assert decide_new({**one, "n3": _reply()}, five, CLUSTER, 1e9).kind == "found"


def test_rows_a_failed_write_left_on_a_peer_do_not_count() -> None:
    """A wedge seen once: a peer that founded and took a (failed) write
    is ready and holds rows; that says nothing about this node."""
    replies = {"n2": _reply(state=READY), "n3": _reply(state=WAITING_FOR_PEERS)}
    assert decide_new(replies, ["n2", "n3"], CLUSTER, 0.0).kind == "found"


# --------------------------------------------------------------------- rebuild

THREE = [[1, 2, 3], [2, 3, 1], [3, 1, 2]]


def test_a_replacement_rebuilds_from_ready_peers_only() -> None:
    plan = plan_rebuild(THREE, 1, {2: READY, 3: READY})
    assert plan.sources == frozenset({2, 3}) and not plan.needs_operator
    waiting = plan_rebuild(THREE, 1, {2: READY, 3: STARTING})
    assert waiting.sources is None and waiting.waiting_for == (3,)
    unheard = plan_rebuild(THREE, 1, {2: READY})
    assert unheard.sources is None and unheard.waiting_for == (3,)


@pytest.mark.parametrize("other", [REBUILDING, NEEDS_OPERATOR])
def test_two_of_three_lost_needs_an_operator_never_a_wait(other: str) -> None:
    plan = plan_rebuild(THREE, 1, {2: READY, 3: other})
    assert plan.sources is None and plan.needs_operator
    assert plan.lost == {0: (1, 3), 1: (1, 3), 2: (1, 3)}
    message = lifecycle.needs_operator_message({p: ["n1", "n3"] for p in plan.lost})
    assert message == "needs operator: n1, n3 lost data for partitions 0-2"


def test_with_the_loss_accepted_it_rebuilds_from_what_is_left() -> None:
    plan = plan_rebuild(THREE, 1, {2: READY, 3: REBUILDING}, accept_data_loss=True)
    assert plan.sources == frozenset({2}) and plan.short == {0: (2,), 1: (2,), 2: (2,)}
    alone = plan_rebuild(THREE, 1, {2: NEEDS_OPERATOR, 3: REBUILDING}, accept_data_loss=True)
    assert alone.sources == frozenset() and alone.short == {0: (), 1: (), 2: ()}


def test_five_replicas_rebuild_from_any_majority() -> None:
    five = [[1, 2, 3, 4, 5]]
    plan = plan_rebuild(five, 1, {2: READY, 3: READY, 4: READY, 5: REBUILDING})
    assert plan.sources == frozenset({2, 3, 4})
    lost = plan_rebuild(five, 1, {2: READY, 3: READY, 4: REBUILDING, 5: REBUILDING})
    assert lost.needs_operator


def test_partition_ranges() -> None:
    assert lifecycle.partition_ranges([7, 0, 1, 2, 3, 9, 10]) == "0-3, 7, 9-10"
    assert lifecycle.partition_ranges([]) == ""


# --------------------------------------------------------------------- schedules


@dataclass
class Disk:
    identity: bool = False
    pending: bool = False
    rows: bool = False
    members: set[str] = field(default_factory=set)
    established: bool = False  # ground truth: this directory has voted


@dataclass
class ModelNode:
    id: str
    index: int
    disk: Disk = field(default_factory=Disk)
    running: bool = False
    state: str = STARTING
    kind: str = ""
    asked_s: float = 0.0
    accept_loss: bool = False


class ClusterModel:
    """Nodes running the real decisions, one step per `tick` of TICK_S: hellos
    exchanged among running nodes (members recorded), then each decides."""

    TICK_S = 1.0

    def __init__(self, node_count: int, initial_state: str) -> None:
        config = local_cluster(node_count, 7100, partitions=8)
        self.replica_sets = config.replica_sets()
        self.nodes = [ModelNode(n.id, n.index) for n in config.nodes]
        self.initial_state = initial_state
        self.now = 0.0

    def start(self, node: ModelNode) -> None:
        if node.running:
            return
        decision = decide_start(
            Identity(CLUSTER, node.id) if node.disk.identity else None,
            node.disk.rows,
            CLUSTER,
            node.id,
            self.initial_state,
            rebuild_pending=node.disk.pending,
        )
        assert decision.kind != "refuse"
        node.running, node.kind, node.accept_loss = True, decision.kind, False
        node.asked_s = self.now
        if decision.kind == "ready":
            node.state = READY
        elif decision.kind == "replacement":
            self._begin_rebuild(node)
        else:
            assert decision.kind == "ask_peers"
            node.state = WAITING_FOR_PEERS

    def crash(self, node: ModelNode, wipe: bool) -> None:
        node.running = False
        node.state = STARTING
        if wipe:
            node.disk = Disk()

    def write(self) -> None:
        """A client write: it leaves rows on whichever nodes vote (a failed one too)."""
        for node in self.nodes:
            if node.running and node.state == READY:
                node.disk.rows = True

    def _begin_rebuild(self, node: ModelNode) -> None:
        node.state = REBUILDING
        node.disk.pending = True
        node.disk.identity = True

    def _running_peers(self, node: ModelNode) -> list[ModelNode]:
        return [p for p in self.nodes if p is not node and p.running]

    def tick(self) -> None:
        self.now += self.TICK_S
        for node in self.nodes:
            if not node.running:
                continue
            for peer in self._running_peers(node):
                if peer.state == READY:
                    node.disk.members.add(peer.id)
        for node in self.nodes:
            if node.running:
                self._decide(node)

    def _decide(self, node: ModelNode) -> None:
        peers = self._running_peers(node)
        if node.state == WAITING_FOR_PEERS:
            replies = {p.id: HelloReply(CLUSTER, p.state, node.id in p.disk.members) for p in peers}
            everyone = [p.id for p in self.nodes if p is not node]
            decision = decide_new(replies, everyone, CLUSTER, self.now - node.asked_s)
            if decision.kind == "found":
                # The safety half: a node a running peer knows as a member never founds.
                assert not any(node.id in p.disk.members for p in peers), decision
                node.disk.identity = node.disk.established = True
                node.state = READY
            elif decision.kind == "replacement":
                self._begin_rebuild(node)
            return
        if node.state in (REBUILDING, NEEDS_OPERATOR):
            plan = plan_rebuild(
                self.replica_sets,
                node.index,
                {p.index: p.state for p in peers},
                accept_data_loss=node.accept_loss,
            )
            if plan.needs_operator:
                node.state = NEEDS_OPERATOR
            elif plan.sources is not None:
                node.state = READY
                node.disk.pending = False
                node.disk.established = True
            else:
                node.state = REBUILDING

    def settle(self, ticks: int) -> None:
        for _ in range(ticks):
            self.tick()


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["start", "crash", "wipe", "write", "tick"]),
        st.integers(min_value=0, max_value=4),
    ),
    max_size=40,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    node_count=st.sampled_from([3, 5]),
    initial_state=st.sampled_from([NEW, EXISTING]),
    events=EVENTS,
)
def test_no_schedule_leaves_nodes_waiting_on_each_other(
    node_count: int, initial_state: str, events: list[tuple[str, int]]
) -> None:
    """Any schedule of starts, writes, crashes, wipes and restarts; then every
    node is started and the cluster left alone. Every node ends ready, or
    (only when too few replicas of one of its partitions kept their data)
    waiting for an operator, after which recovery makes it ready. Nobody
    stays waiting for peers or rebuilding."""
    model = ClusterModel(node_count, initial_state)
    for event, which in events:
        node = model.nodes[which % node_count]
        if event == "start":
            model.start(node)
        elif event in ("crash", "wipe"):
            model.crash(node, wipe=event == "wipe")
        elif event == "write":
            model.write()
        else:
            model.tick()
    for node in model.nodes:
        model.start(node)
    model.settle(int(FOUNDING_WAIT_S / model.TICK_S) + 2 * node_count + 4)
    states = {node.id: node.state for node in model.nodes}
    assert set(states.values()) <= {READY, NEEDS_OPERATOR}, states
    established = {node.index for node in model.nodes if node.disk.established}
    for node in model.nodes:
        if node.state != NEEDS_OPERATOR:
            continue
        # Truthful: some partition of it really has too few replicas with their data.
        short = [
            p
            for p, replicas in enumerate(model.replica_sets)
            if node.index in replicas
            and sum(1 for r in replicas if r != node.index and r in established)
            < peers_needed_to_rebuild(len(replicas))
        ]
        assert short, (node.id, states, established)
    if NEEDS_OPERATOR in states.values():
        for node in model.nodes:
            node.accept_loss = node.state == NEEDS_OPERATOR
        model.settle(2 * node_count + 2)
        assert {node.state for node in model.nodes} == {READY}


def test_the_issue_23_schedule_founds_at_once() -> None:
    """All three start together; the first to decide founds and takes a
    write before the others decide. Every node is ready within one step."""
    model = ClusterModel(3, NEW)
    for node in model.nodes:
        model.start(node)
    model.tick()
    model.write()
    model.tick()
    assert [node.state for node in model.nodes] == [READY] * 3


def test_a_wiped_node_restarted_as_new_is_recognised_and_rebuilds() -> None:
    model = ClusterModel(3, NEW)
    for node in model.nodes:
        model.start(node)
    model.settle(3)
    n2 = model.nodes[1]
    model.crash(n2, wipe=True)
    model.start(n2)
    model.settle(2)
    assert n2.kind == "ask_peers" and n2.state == READY and n2.disk.pending is False
    assert n2.disk.established and not n2.disk.rows


def test_two_wiped_of_three_need_an_operator_and_recover() -> None:
    model = ClusterModel(3, NEW)
    for node in model.nodes:
        model.start(node)
    model.settle(3)
    for node in model.nodes[1:]:
        model.crash(node, wipe=True)
    for node in model.nodes[1:]:
        model.start(node)
    model.settle(4)
    assert [node.state for node in model.nodes] == [READY, NEEDS_OPERATOR, NEEDS_OPERATOR]
    for node in model.nodes[1:]:
        node.accept_loss = True
    model.settle(2)
    assert [node.state for node in model.nodes] == [READY] * 3


def test_a_hello_with_an_unknown_replica_state_is_a_frame_error() -> None:
    with pytest.raises(FrameError):
        Hello.from_wire([CLUSTER, "n2", "dozing"])
    with pytest.raises(FrameError):
        HelloReply.from_wire([CLUSTER, "dozing", True])
    assert HelloReply.from_wire([CLUSTER, "ready", True]).state is ReplicaState.READY

"""The chat example application on a real 3-node cluster (one per module).

* Account ids are unique across library instances that allocate ranges at once.
* Offline delivery: messages wait in the receiver's mailbox, in order, once
  each even when a send is retried with the same message id.
* Sync keys: with senders and contact/profile changes running while the
  receiver syncs, the union of what sync returned is every change exactly once.
* Expiry with an injected clock: text at 72 h, media at 120 h.
* Groups: the 501st member is refused; messages are stored once, delivered
  asynchronously (and resumably) to members' mailboxes by a deliverer woken
  by a watch, whoever sent them; unread counts follow each member's last-read
  index.
* Long-poll: a waiting receiver wakes when a message arrives, and times out
  empty otherwise.
"""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

import kvsvr
from kvsvr.apps import CHAT_TABLES, app_tables, tables_toml
from kvsvr.apps._store import GAP_SETTLE_S, contiguous, pack, seq_key
from kvsvr.apps._tables import CHAT_INBOX, HOUR_S, MEDIA_MESSAGE_TTL_S
from kvsvr.apps.chat import GROUP_MEMBERS_MAX, Chat, GroupFull, SyncKey, decode_message_value
from kvsvr.apps.chat.__main__ import demo as chat_demo
from kvsvr.client import Item
from kvsvr.config import TableConfig, parse_config
from kvsvr_tests.cluster_util import LocalCluster

pytestmark = pytest.mark.slow  # starts real node processes (the module takes ~15 s)

CLIENT_TIMEOUT_S = 15.0


class FakeClock:
    """Seconds since the epoch, moved by the test."""

    def __init__(self, now_s: float = 1_800_000_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    directory: Path = tmp_path_factory.mktemp("chat-cluster")
    with LocalCluster(directory, nodes=3, tables=(TableConfig("default"), *CHAT_TABLES)) as local:
        local.start_all()
        yield local


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[kvsvr.Client]:
    async with kvsvr.connect(
        cluster.addresses, secret=cluster.secret, timeout_s=CLIENT_TIMEOUT_S
    ) as connected:
        yield connected


# --- the gap rule, without a cluster ---------------------------------------------------


def _row(seq: int, stored_ms: int) -> Item:
    return Item(pack({"stored_ms": stored_ms}), 1, seq_key("m/", seq).encode())


def test_sequence_keys_sort_in_sequence_order() -> None:
    keys = [seq_key("m/", n) for n in (1, 2, 10, 100, 99)]
    assert sorted(keys) == [seq_key("m/", n) for n in (1, 2, 10, 99, 100)]


def test_reader_stops_at_a_fresh_gap_and_skips_a_settled_one() -> None:
    now = 1_000_000_000
    fresh = [_row(1, now), _row(3, now - 1000)]
    rows, cursor = contiguous(fresh, prefix="m/", after_seq=0, now_ms=now)
    assert [row.seq for row in rows] == [1] and cursor == 1  # 2 may still be written

    settled = [_row(1, now), _row(3, now - int(GAP_SETTLE_S * 1000) - 1), _row(4, now)]
    rows, cursor = contiguous(settled, prefix="m/", after_seq=0, now_ms=now)
    assert [row.seq for row in rows] == [1, 3, 4] and cursor == 4


# --- accounts --------------------------------------------------------------------------


async def test_account_ids_are_unique_across_instances(cluster: LocalCluster) -> None:
    ids: list[int] = []

    async def allocate(count: int) -> None:
        async with cluster.connect(CLIENT_TIMEOUT_S) as own_client:
            chat = Chat(own_client)  # its own range, as another process would have
            for _ in range(count):
                ids.append(await chat._new_id("account"))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(allocate, 150)  # more than one range (ID_RANGE = 100) each
    assert len(ids) == 450
    assert len(set(ids)) == len(ids), "an id was handed out twice"


# --- one-to-one ------------------------------------------------------------------------


async def test_offline_receiver_gets_every_message_once_in_order(client: kvsvr.Client) -> None:
    chat = Chat(client)
    alice, bob = await chat.create_account("alice"), await chat.create_account("bob")
    await chat.add_contact(alice, bob)
    assert await chat.contacts(bob) == [alice]

    seqs = [await chat.send(alice, bob, f"m{i}", message_id=f"a-{i}") for i in range(5)]
    # A retry of a send whose outcome was unknown carries the same id.
    assert await chat.send(alice, bob, "m2", message_id="a-2") == seqs[2]

    fetched = await chat.fetch(bob, 0)  # bob comes online
    assert [m.body for m in fetched.messages] == [f"m{i}".encode() for i in range(5)]
    assert [m.seq for m in fetched.messages] == sorted(seqs)
    assert {m.sender for m in fetched.messages} == {alice}
    assert fetched.cursor == max(seqs)
    assert (await chat.fetch(bob, fetched.cursor)).messages == []
    # Nothing reached the sender's own mailbox.
    assert (await chat.fetch(alice, 0)).messages == []


async def test_sync_key_returns_every_change_exactly_once(client: kvsvr.Client) -> None:
    chat = Chat(client)
    receiver = await chat.create_account("carol")
    senders = [await chat.create_account(f"sender{i}") for i in range(4)]
    per_sender = 8
    seen: list[tuple[str, str]] = []
    message_bodies: list[bytes] = []
    done = trio.Event()

    async def send_all(sender: int) -> None:
        for i in range(per_sender):
            await chat.send(sender, receiver, f"{sender}:{i}")

    async def change_profile_and_contacts() -> None:
        for i, sender in enumerate(senders):
            await chat.add_contact(receiver, sender)
            await chat.set_profile(receiver, {"signature": f"v{i}"})

    async def syncer() -> None:
        key = SyncKey()
        while True:
            finished = done.is_set()
            result = await chat.sync(receiver, key, limit=7)  # small pages: many rounds
            for change in result.changes:
                seen.append((change.category, change.key))
                if change.category == "messages":
                    assert change.value is not None
                    message_bodies.append(decode_message_value(change.value)["body"])
            key = result.key
            if finished and not result.more and not result.changes:
                return
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(syncer)
        async with trio.open_nursery() as writers:
            for sender in senders:
                writers.start_soon(send_all, sender)
            writers.start_soon(change_profile_and_contacts)
        done.set()

    expected_bodies = {f"{s}:{i}".encode() for s in senders for i in range(per_sender)}
    assert sorted(message_bodies) == sorted(expected_bodies), "a message was lost or repeated"
    keyed_once = [change for change in seen if change[0] != "profile"]
    assert len(keyed_once) == len(set(keyed_once)), "a change was returned twice"
    contacts = [key for category, key in seen if category == "contacts"]
    assert sorted(contacts) == sorted(f"contact/{s}" for s in senders)
    profile = [key for category, key in seen if category == "profile"]
    # "name" at account creation, then one "signature" change per round.
    assert profile.count("profile/name") == 1 and profile.count("profile/signature") == 4


async def test_messages_expire_text_at_72h_media_at_120h(
    client: kvsvr.Client,
) -> None:
    partition_map = await client.partition_map()
    inbox = partition_map.table(CHAT_INBOX)
    assert inbox is not None and inbox.ttl_s == MEDIA_MESSAGE_TTL_S  # the node's own expiry

    clock = FakeClock()
    chat = Chat(client, clock=clock)
    sender, receiver = await chat.create_account("s"), await chat.create_account("r")
    await chat.send(sender, receiver, "text")
    await chat.send(sender, receiver, "https://img.example/1.jpg", kind="media")

    clock.now_s += 71 * HOUR_S
    assert [m.kind for m in (await chat.fetch(receiver)).messages] == ["text", "media"]
    clock.now_s += 2 * HOUR_S  # 73 h
    fetched = await chat.fetch(receiver)
    assert [m.kind for m in fetched.messages] == ["media"]
    assert fetched.cursor == 2  # the expired message is consumed, not waited for
    clock.now_s += 48 * HOUR_S  # 121 h
    assert (await chat.fetch(receiver)).messages == []
    assert (await chat.sync(receiver)).key.messages == 2


async def test_long_poll_wakes_on_a_new_message_and_times_out_empty(
    client: kvsvr.Client,
) -> None:
    chat = Chat(client)
    alice, bob = await chat.create_account("alice"), await chat.create_account("bob")
    with trio.fail_after(30):
        empty = await chat.wait_for_messages(bob, 0, timeout_s=0.5)
    assert empty.messages == [] and empty.cursor == 0

    async with trio.open_nursery() as nursery:

        async def send_later() -> None:
            await trio.sleep(0.3)
            await chat.send(alice, bob, "ping")

        nursery.start_soon(send_later)
        started = trio.current_time()
        woke = await chat.wait_for_messages(bob, 0, timeout_s=30)
    assert [m.body for m in woke.messages] == [b"ping"]
    assert trio.current_time() - started < 20


# --- groups ----------------------------------------------------------------------------


async def test_a_501st_member_is_refused(client: kvsvr.Client) -> None:
    chat = Chat(client)
    owner = await chat.create_account("owner")
    placeholders = [50_000_000 + i for i in range(GROUP_MEMBERS_MAX - 2)]  # ids, not accounts
    group = await chat.create_group(owner, "big", placeholders)
    await chat.join_group(group, 60_000_000)
    assert len(await chat.group_members(group)) == GROUP_MEMBERS_MAX
    await chat.join_group(group, 60_000_000)  # joining again is a no-op, not a refusal
    with pytest.raises(GroupFull, match="500"):
        await chat.join_group(group, 60_000_001)
    assert len(await chat.group_members(group)) == GROUP_MEMBERS_MAX
    with pytest.raises(GroupFull):
        await chat.create_group(owner, "too big", [70_000_000 + i for i in range(500)])


async def test_group_messages_are_delivered_once_and_unread_counts_follow(
    client: kvsvr.Client,
) -> None:
    chat = Chat(client)
    alice, bob, carol = [await chat.create_account(name) for name in ("a", "b", "c")]
    group = await chat.create_group(alice, "g", [bob, carol])
    for i in range(3):
        await chat.send_group(alice, group, f"g{i}")
    # Stored once; not yet in any mailbox (delivery is the slow path).
    assert (await chat.fetch(bob)).messages == []
    assert await chat.unread_count(bob, group) == 3
    assert await chat.unread_count(alice, group) == 0  # a sender has read their own

    assert await chat.deliver_pending(group) == 3
    assert await chat.deliver_pending(group) == 0  # the cursor moved: nothing twice
    for member in (bob, carol):
        messages = (await chat.fetch(member)).messages
        assert [m.body for m in messages] == [b"g0", b"g1", b"g2"]
        assert [m.group_seq for m in messages] == [1, 2, 3]
        assert {m.group for m in messages} == {group}
    assert (await chat.fetch(alice)).messages == []

    await chat.mark_read(bob, group, 2)
    assert await chat.unread_count(bob, group) == 1
    await chat.mark_read(bob, group, 1)  # the index never moves back
    assert await chat.unread_count(bob, group) == 1

    dave = await chat.create_account("d")
    await chat.join_group(group, dave)
    assert await chat.unread_count(dave, group) == 0
    await chat.send_group(carol, group, "welcome")
    assert await chat.unread_count(dave, group) == 1
    await chat.deliver_pending(group)
    assert [m.body for m in (await chat.fetch(dave)).messages] == [b"welcome"]


async def test_group_delivery_resumes_after_a_crash_without_duplicates(
    client: kvsvr.Client,
) -> None:
    chat = Chat(client)
    owner = await chat.create_account("owner")
    members = [await chat.create_account(f"m{i}") for i in range(20)]
    group = await chat.create_group(owner, "g", members)
    await chat.send_group(owner, group, "first")
    await chat.send_group(owner, group, "second")

    # A deliverer that crashed half-way through message 1: some mailboxes have
    # it, the delivery cursor was never advanced.
    rows, _, _ = await chat._read_log(f"g{group}", "chat_group", "m/", "m0", 0, 10)
    partial = {member: 0 for member in members[:7]}
    await chat._deliver_one(group, rows[0], partial)

    assert await chat.deliver_pending(group) == 2  # a new deliverer resumes at the cursor
    for member in members:
        bodies = [m.body for m in (await chat.fetch(member)).messages]
        assert bodies == [b"first", b"second"], (member, bodies)


async def test_background_delivery_task_reaches_a_waiting_member(client: kvsvr.Client) -> None:
    # The sender is another Chat (as if another process): nothing tells the
    # deliverer of the message but its watch of the group's delivery row.
    sender, deliverer = Chat(client), Chat(client)
    alice, bob = await sender.create_account("a"), await sender.create_account("b")
    group = await sender.create_group(alice, "g", [bob])
    async with trio.open_nursery() as nursery:
        await nursery.start(deliverer.run_delivery)

        async def send_later(text: str) -> None:
            await trio.sleep(0.2)
            await sender.send_group(alice, group, text)

        for text in ("hello group", "and again"):
            cursor = (await sender.fetch(bob)).cursor
            nursery.start_soon(send_later, text)
            woke = await sender.wait_for_messages(bob, cursor, timeout_s=20)
            assert [m.body for m in woke.messages] == [text.encode()]
        nursery.cancel_scope.cancel()


def test_tables_toml_declares_every_app_table() -> None:
    text = "[[nodes]]\nid = 'n1'\nport = 7101\n\n" + tables_toml()
    config = parse_config(tomllib.loads(text))
    assert config.tables == app_tables()
    assert {t.consistency for t in config.tables if t.name == "chat_group"} == {"eventual"}


async def test_demo_transcript(cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert await chat_demo(cluster.addresses, cluster.secret, CLIENT_TIMEOUT_S) == 0
    transcript = capsys.readouterr().out
    assert "stored once, at seq 1" in transcript
    assert "carol's join refused" in transcript and "500" in transcript
    assert "73 h later bob's mailbox shows: ['media']" in transcript

"""A WeChat-style chat on kvsvr: accounts, contacts, mailboxes, groups, sync.

Everything goes through `kvsvr.Client`; the layout of the rows is described
in kvsvr/apps/README.md. In short, per user `u<id>`:

    chat_meta   (u<id>, "account" | "profile" | "contact/<id>")    current state
                (u<id>, "seq/<category>")                            log counters (CAS)
                (u<id>, "log/<category>/<seq>")                      contacts/profile changes
                (u<id>, "read/<group>")                              last-read group index
    chat_inbox  (u<id>, "m/<seq>")                                   the mailbox (TTL)
                (u<id>, "id/msg/<message id>")                       message id -> seq (TTL)

and per group `g<id>`: its info, member list (one row, CAS), message counter
and delivery cursor in chat_meta, its messages in chat_group (eventual, written
once), its message-id index in chat_inbox. The deliverer's wake-up rows:

    chat_meta   ("delivery/<group % DELIVERY_SHARDS>", "g/<group>")  the group's latest seq
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import trio

from kvsvr.api import WATCH_CURSORS_MAX
from kvsvr.apps._store import (
    COUNTER_ATTEMPTS_MAX,
    SEQ_MAX,
    AppError,
    Clock,
    LogRow,
    advance_counter,
    claim,
    contiguous,
    delete_retrying,
    get_retrying,
    new_nonce,
    now_ms,
    pack,
    put_retrying,
    read_counter,
    scan_retrying,
    seq_key,
    seq_of,
    unpack,
)
from kvsvr.apps._tables import (
    CHAT_GROUP,
    CHAT_INBOX,
    CHAT_META,
    MEDIA_MESSAGE_TTL_S,
    TEXT_MESSAGE_TTL_S,
)
from kvsvr.apps.chat._wake import (
    DELIVERY_SHARDS,
    WATCH_RESTART_S,
    delivery_row,
    watch_delivery_rows,
)
from kvsvr.client import Client, Item
from kvsvr.errors import Conflict, KvsvrError, Unavailable, WatchCompacted

logger = logging.getLogger(__name__)

# --- limits -------------------------------------------------------------------------

# WeChat's group limit: every message is delivered to each member's mailbox,
# so the member count bounds a message's fan-out work; the member list is one
# row (a 500-entry list is a few KiB).
GROUP_MEMBERS_MAX: Final = 500

# A message body travels in one row of each mailbox (one-to-one) or of the
# group table; media bodies are references (URLs), not the media itself.
MESSAGE_BODY_BYTES_MAX: Final = 64 * 1024

# Account and group ids are taken from a shared counter this many at a time,
# so creating an account costs one compare-and-set per range, not per id.
ID_RANGE: Final = 100

# Rows one fetch or one sync category returns (one scan each).
FETCH_LIMIT_MAX: Final = 1000

# Mailbox writes of one group message that run at once: enough to hide round
# trips, few enough not to swamp the coordinators with one group's fan-out.
DELIVERY_CONCURRENCY: Final = 50
# Group messages one delivery pass reads at a time.
DELIVERY_PAGE: Final = 100
# Groups waiting for the background delivery task; past this, its watches
# wait (and the nodes hold nothing for them meanwhile).
DELIVERY_QUEUE_MAX: Final = 1000

KINDS: Final = ("text", "media")
CATEGORIES: Final = ("messages", "contacts", "profile")

MESSAGE_PREFIX: Final = "m/"
MESSAGE_END: Final = "m0"  # "0" sorts right after "/": the end of the "m/" range


# --- errors ---------------------------------------------------------------------------


class ChatError(AppError):
    """A chat rule was broken; nothing was written."""


class GroupFull(ChatError):
    """The group already has GROUP_MEMBERS_MAX members."""


class NotAMember(ChatError):
    """The user is not a member of the group."""


class NoSuchGroup(ChatError):
    """No group has this id."""


# --- values -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """A message as its receiver sees it; `seq` is its place in their mailbox."""

    seq: int
    message_id: str
    sender: int
    kind: str  # "text" or "media" (a group message has `group` set)
    body: bytes
    sent_ms: int
    expires_ms: int
    group: int | None = None
    group_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Fetched:
    messages: list[Message]
    cursor: int  # the mailbox sequence to fetch after next time


@dataclass(frozen=True, slots=True)
class SyncKey:
    """What a client has already seen: its last sequence per category."""

    messages: int = 0
    contacts: int = 0
    profile: int = 0

    def to_bytes(self) -> bytes:
        data: bytes = msgpack.packb([self.messages, self.contacts, self.profile])
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> SyncKey:
        messages, contacts, profile = msgpack.unpackb(data)
        return cls(int(messages), int(contacts), int(profile))


@dataclass(frozen=True, slots=True)
class Change:
    """One key-value pair the client should apply; value None removes the key."""

    category: str
    key: str
    value: bytes | None


@dataclass(frozen=True, slots=True)
class SyncResult:
    changes: list[Change]
    key: SyncKey
    more: bool  # a category returned a full page: call sync again with `key`


@dataclass(slots=True)
class _IdRange:
    next: int = 0
    end: int = 0  # exclusive
    lock: trio.Lock = field(default_factory=trio.Lock)


def _user(user: int) -> str:
    assert isinstance(user, int) and user > 0, user
    return f"u{user}"


def _group(group: int) -> str:
    assert isinstance(group, int) and group > 0, group
    return f"g{group}"


def _log_prefix(category: str) -> str:
    return f"log/{category}/"


# --- the library ------------------------------------------------------------------------


class Chat:
    """WeChat-style chat over a connected `kvsvr.Client`.

    `clock` (seconds since the epoch) stamps messages and decides what has
    expired, so tests can move time; the node's table TTL expires the rows
    for real, by its own wall clock, at 120 hours.
    """

    def __init__(self, client: Client, *, clock: Clock = time.time) -> None:
        self.client = client
        self.clock = clock
        self._ids: dict[str, _IdRange] = {}

    # --- accounts and ids ---

    async def _new_id(self, kind: str) -> int:
        """A globally unique id: taken from this instance's range, and a new
        range taken from the shared counter with compare-and-set when it runs out."""
        ids = self._ids.setdefault(kind, _IdRange())
        async with ids.lock:
            if ids.next >= ids.end:
                end = await advance_counter(
                    self.client, ("ids", kind), table=CHAT_META, step=ID_RANGE
                )
                ids.next, ids.end = end - ID_RANGE + 1, end + 1
            new, ids.next = ids.next, ids.next + 1
        return new

    async def create_account(self, name: str) -> int:
        assert 0 < len(name.encode()) <= 256, name
        user = await self._new_id("account")
        created = now_ms(self.clock)
        await put_retrying(
            self.client,
            (_user(user), "account"),
            pack({"name": name, "created_ms": created}),
            table=CHAT_META,
        )
        await self.set_profile(user, {"name": name})
        return user

    async def account(self, user: int) -> dict[str, Any] | None:
        item = await get_retrying(self.client, (_user(user), "account"), table=CHAT_META)
        return None if item is None else unpack(item.value)

    # --- contacts and profile (each change also goes to the user's change log) ---

    async def add_contact(self, user: int, contact: int) -> None:
        """Make two users contacts of each other (WeChat contacts are mutual)."""
        assert user != contact
        for owner, other in ((user, contact), (contact, user)):
            if await self.account(other) is None:
                raise ChatError(f"no account {other}")
            value = pack({"since_ms": now_ms(self.clock)})
            await put_retrying(
                self.client, (_user(owner), f"contact/{other:020d}"), value, table=CHAT_META
            )
            await self._log_change(owner, "contacts", f"contact/{other}", value)

    async def remove_contact(self, user: int, contact: int) -> None:
        for owner, other in ((user, contact), (contact, user)):
            key = (_user(owner), f"contact/{other:020d}")
            await delete_retrying(self.client, key, table=CHAT_META)
            await self._log_change(owner, "contacts", f"contact/{other}", None)

    async def contacts(self, user: int) -> list[int]:
        rows = await scan_retrying(
            self.client,
            _user(user),
            table=CHAT_META,
            start="contact/",
            end="contact0",
            limit=FETCH_LIMIT_MAX,
        )
        assert all(row.key is not None for row in rows)
        return [int(row.key.decode().removeprefix("contact/")) for row in rows if row.key]

    async def set_profile(self, user: int, fields: Mapping[str, str]) -> None:
        """Set profile fields (name, signature, avatar URL...): a read-modify-
        write with compare-and-set, so concurrent edits of other fields survive."""
        key = (_user(user), "profile")
        for _ in range(COUNTER_ATTEMPTS_MAX):
            item = await get_retrying(self.client, key, table=CHAT_META)
            profile = {} if item is None else unpack(item.value)
            if all(profile.get(name) == text for name, text in fields.items()):
                break  # already set (or our write whose outcome was unknown landed)
            profile.update(fields)
            try:
                if item is None:
                    await self.client.put(key, pack(profile), table=CHAT_META, if_absent=True)
                else:
                    await self.client.cas(
                        key, pack(profile), if_version=item.version, table=CHAT_META
                    )
                break
            except (Conflict, Unavailable):
                continue  # re-read: another edit came first, or ours may have landed
        else:
            raise Unavailable(f"profile of user {user}: too many concurrent edits")
        for name, text in fields.items():
            await self._log_change(user, "profile", f"profile/{name}", text.encode())

    async def profile(self, user: int) -> dict[str, Any]:
        item = await get_retrying(self.client, (_user(user), "profile"), table=CHAT_META)
        return {} if item is None else unpack(item.value)

    async def _log_change(self, user: int, category: str, key: str, value: bytes | None) -> int:
        record = {"key": key, "value": value}
        return await self._append(
            _user(user), category, CHAT_META, _log_prefix(category), new_nonce().hex(), record
        )

    # --- the per-user (and per-group) logs ---

    async def _append(
        self,
        partition: str,
        category: str,
        table: str,
        prefix: str,
        record_id: str,
        record: dict[str, Any],
    ) -> int:
        """Append a record to a log under the next sequence number, once per
        `record_id`: a repeat (a retry after an unknown outcome) finds the
        id's index row and rewrites the same row instead of adding another.
        The number comes from a counter advanced with compare-and-set; the
        index row (id -> seq) is claimed with put-if-absent; only then is the
        record written, so a crash leaves at most a gap, never a duplicate."""
        index_key = (partition, f"id/{category}/{record_id}")
        index = await get_retrying(self.client, index_key, table=table)
        if index is not None:
            seq = int(unpack(index.value)["seq"])
        else:
            allocated = await advance_counter(
                self.client, (partition, f"seq/{category}"), table=CHAT_META
            )
            won = await claim(self.client, index_key, pack({"seq": allocated}), table=table)
            # Another attempt with this id claimed it first: ours stays a gap.
            seq = int(unpack(won)["seq"])
        stored = {**record, "id": record_id, "stored_ms": now_ms(self.clock)}
        await put_retrying(
            self.client, (partition, seq_key(prefix, seq)), pack(stored), table=table
        )
        return seq

    async def _read_log(
        self, partition: str, table: str, prefix: str, end: str, after_seq: int, limit: int
    ) -> tuple[list[LogRow], int, bool]:
        """(rows, cursor, page_was_full) after `after_seq`."""
        assert 1 <= limit <= FETCH_LIMIT_MAX
        items = await scan_retrying(
            self.client,
            partition,
            table=table,
            start=seq_key(prefix, after_seq + 1),
            end=end,
            limit=limit,
        )
        rows, cursor = contiguous(
            items, prefix=prefix, after_seq=after_seq, now_ms=now_ms(self.clock)
        )
        return rows, cursor, len(items) == limit

    # --- one-to-one messages ---

    async def send(
        self,
        sender: int,
        receiver: int,
        body: bytes | str,
        *,
        kind: str = "text",
        message_id: str | None = None,
    ) -> int:
        """Store a message in the receiver's mailbox (they may be offline) and
        return its sequence there. Pass the same `message_id` to retry a send
        whose outcome was unknown: the message is then stored once."""
        assert kind in KINDS, kind
        data = body.encode() if isinstance(body, str) else body
        assert len(data) <= MESSAGE_BODY_BYTES_MAX, len(data)
        sent = now_ms(self.clock)
        ttl_s = TEXT_MESSAGE_TTL_S if kind == "text" else MEDIA_MESSAGE_TTL_S
        record = {
            "from": sender,
            "kind": kind,
            "body": data,
            "sent_ms": sent,
            "expires_ms": sent + int(ttl_s * 1000),
        }
        message_id = message_id if message_id is not None else new_nonce().hex()
        return await self._deliver(receiver, message_id, record)

    async def _deliver(self, receiver: int, message_id: str, record: dict[str, Any]) -> int:
        return await self._append(
            _user(receiver), "msg", CHAT_INBOX, MESSAGE_PREFIX, message_id, record
        )

    async def fetch(self, user: int, after_seq: int = 0, *, limit: int = 100) -> Fetched:
        """The user's messages after mailbox sequence `after_seq`, oldest
        first, and the cursor to pass next time. Expired messages are skipped
        (by `clock`); a group message is resolved from the group table."""
        rows, cursor, _ = await self._read_log(
            _user(user), CHAT_INBOX, MESSAGE_PREFIX, MESSAGE_END, after_seq, limit
        )
        return await self._messages(rows, after_seq, cursor)

    async def _messages(self, rows: list[LogRow], after_seq: int, cursor: int) -> Fetched:
        now = now_ms(self.clock)
        messages: list[Message] = []
        for row in rows:
            record = row.record
            if int(record["expires_ms"]) <= now:
                continue
            body = record.get("body")
            if record.get("group") is not None:
                body = await self._group_body(int(record["group"]), int(record["gseq"]))
                if body is None:
                    # Not visible yet on this replica (eventual table): stop
                    # before it so that the next fetch picks it up.
                    return Fetched(messages, row.seq - 1)
            assert isinstance(body, bytes)
            messages.append(
                Message(
                    seq=row.seq,
                    message_id=str(record["id"]),
                    sender=int(record["from"]),
                    kind=str(record["kind"]),
                    body=body,
                    sent_ms=int(record["sent_ms"]),
                    expires_ms=int(record["expires_ms"]),
                    group=record.get("group"),
                    group_seq=record.get("gseq"),
                )
            )
        return Fetched(messages, cursor)

    async def _group_body(self, group: int, group_seq: int) -> bytes | None:
        item = await get_retrying(
            self.client, (_group(group), seq_key(MESSAGE_PREFIX, group_seq)), table=CHAT_GROUP
        )
        if item is None:
            return None
        body = unpack(item.value)["body"]
        assert isinstance(body, bytes)
        return body

    async def wait_for_messages(
        self, user: int, after_seq: int = 0, *, timeout_s: float = 30.0, limit: int = 100
    ) -> Fetched:
        """Long-poll: return as soon as the user has messages after
        `after_seq`, or an empty result after `timeout_s`. It watches the
        mailbox rows after `after_seq` (`Client.watch`): the node tells it of
        each new row the moment it is written, and nothing is read until then."""
        with trio.move_on_after(timeout_s):
            while True:
                try:
                    return await self._wait_on_watch(user, after_seq, limit)
                except (WatchCompacted, Unavailable) as error:
                    # History gone or no replica reachable: watch again from a fetch.
                    logger.info("mailbox watch of user %d restarts: %s", user, error)
                    await trio.sleep(WATCH_RESTART_S)
        return Fetched([], after_seq)

    async def _wait_on_watch(self, user: int, after_seq: int, limit: int) -> Fetched:
        # The next WATCH_CURSORS_MAX - 1 mailbox rows (a watch covers at most
        # WATCH_CURSORS_MAX): when they are all there, the fetch returns them.
        window_end = min(after_seq + WATCH_CURSORS_MAX, SEQ_MAX)
        async with self.client.watch(
            _user(user),
            table=CHAT_INBOX,
            partition=True,
            start=seq_key(MESSAGE_PREFIX, after_seq + 1),
            end=seq_key(MESSAGE_PREFIX, window_end),
        ) as events:
            # The watch holds from here: a message stored after this fetch wakes it.
            fetched = await self.fetch(user, after_seq, limit=limit)
            if fetched.cursor > after_seq:
                return fetched
            # The events carry the new rows (each a chosen version, as a strong
            # read would return it), so the wake-up needs no read of its own.
            arrived: dict[int, Item] = {}
            async for event in events:
                if event.value is None:
                    continue
                seq = seq_of(event.key, MESSAGE_PREFIX)
                arrived[seq] = Item(value=event.value, version=event.version, key=event.key)
                ordered = [arrived[s] for s in sorted(arrived)][:limit]
                rows, cursor = contiguous(
                    ordered, prefix=MESSAGE_PREFIX, after_seq=after_seq, now_ms=now_ms(self.clock)
                )
                if rows:
                    fetched = await self._messages(rows, after_seq, cursor)
                    if fetched.cursor > after_seq:
                        return fetched
        raise AssertionError("a watch's events never end")

    # --- sync ---

    async def sync(self, user: int, key: SyncKey | None = None, *, limit: int = 200) -> SyncResult:
        """Every change since `key` as key-value pairs, and the key to hold
        next: new messages (`msg/<seq>` -> the message, msgpack), contact
        changes (`contact/<id>` -> details, None: removed) and profile changes
        (`profile/<field>` -> text)."""
        key = key if key is not None else SyncKey()
        fetched_rows, message_cursor, messages_full = await self._read_log(
            _user(user), CHAT_INBOX, MESSAGE_PREFIX, MESSAGE_END, key.messages, limit
        )
        fetched = await self._messages(fetched_rows, key.messages, message_cursor)
        changes = [
            Change("messages", f"msg/{message.seq}", _message_value(message))
            for message in fetched.messages
        ]
        cursors = {"messages": fetched.cursor}
        more = messages_full or fetched.cursor < message_cursor
        for category in ("contacts", "profile"):
            prefix = _log_prefix(category)
            rows, cursor, full = await self._read_log(
                _user(user),
                CHAT_META,
                prefix,
                f"log/{category}0",
                getattr(key, category),
                limit,
            )
            changes += [Change(category, str(r.record["key"]), r.record["value"]) for r in rows]
            cursors[category] = cursor
            more = more or full
        return SyncResult(changes, SyncKey(**cursors), more)

    # --- groups ---

    async def create_group(self, owner: int, name: str, members: Sequence[int] = ()) -> int:
        everyone = list(dict.fromkeys([owner, *members]))
        if len(everyone) > GROUP_MEMBERS_MAX:
            raise GroupFull(
                f"a group has at most {GROUP_MEMBERS_MAX} members; {len(everyone)} were given"
            )
        group = await self._new_id("group")
        partition = _group(group)
        info = pack({"name": name, "owner": owner, "created_ms": now_ms(self.clock)})
        await put_retrying(self.client, (partition, "info"), info, table=CHAT_META)
        member_rows = pack({"members": [[user, 0] for user in everyone]})
        await claim(self.client, (partition, "members"), member_rows, table=CHAT_META)
        await put_retrying(self.client, ("groups", f"g/{group:020d}"), b"", table=CHAT_META)
        return group

    async def _members(self, group: int) -> tuple[dict[int, int], int | None]:
        """{member: group seq they joined after}, and the row's version."""
        item = await get_retrying(self.client, (_group(group), "members"), table=CHAT_META)
        if item is None:
            raise NoSuchGroup(f"no group {group}")
        members = {int(user): int(after) for user, after in unpack(item.value)["members"]}
        return members, item.version

    async def group_members(self, group: int) -> list[int]:
        members, _ = await self._members(group)
        return sorted(members)

    async def join_group(self, group: int, user: int) -> None:
        """Add a member (idempotent). A join past GROUP_MEMBERS_MAX raises
        `GroupFull`. The member sees the group's messages sent after joining."""
        for _ in range(200):
            members, version = await self._members(group)
            if user in members:
                # Also after a join whose outcome was unknown: start its read index.
                await self.mark_read(user, group, members[user])
                return
            if len(members) >= GROUP_MEMBERS_MAX:
                raise GroupFull(
                    f"group {group} already has {len(members)} members, the limit is "
                    f"{GROUP_MEMBERS_MAX}; user {user} was not added"
                )
            latest = await read_counter(self.client, (_group(group), "seq"), table=CHAT_META)
            members[user] = latest
            value = pack({"members": [[member, after] for member, after in members.items()]})
            assert version is not None
            try:
                await self.client.cas(
                    (_group(group), "members"), value, if_version=version, table=CHAT_META
                )
            except Conflict:
                continue
            except Unavailable:
                continue  # re-read: if it was written, the user is a member now
            await self.mark_read(user, group, latest)
            return
        raise Unavailable(f"join of group {group}: too many concurrent membership changes")

    async def send_group(
        self, sender: int, group: int, body: bytes | str, *, message_id: str | None = None
    ) -> int:
        """Store a group message once and return its group sequence; the
        members' mailboxes get it from `deliver_pending` (the `run_delivery`
        task, in any process, is woken by a watch of the group's delivery
        row). Pass the same `message_id` to retry: the message is then stored
        once."""
        data = body.encode() if isinstance(body, str) else body
        assert len(data) <= MESSAGE_BODY_BYTES_MAX, len(data)
        members, _ = await self._members(group)
        if sender not in members:
            raise NotAMember(f"user {sender} is not a member of group {group}")
        sent = now_ms(self.clock)
        record = {
            "from": sender,
            "kind": "text",
            "body": data,
            "sent_ms": sent,
            "expires_ms": sent + int(TEXT_MESSAGE_TTL_S * 1000),
        }
        message_id = message_id if message_id is not None else new_nonce().hex()
        # The id index must be strong (put-if-absent), so it lives in chat_inbox;
        # the message itself is one blind write to the eventual group table.
        partition = _group(group)
        index_key = (partition, f"id/msg/{message_id}")
        index = await get_retrying(self.client, index_key, table=CHAT_INBOX)
        if index is not None:
            group_seq = int(unpack(index.value)["seq"])
        else:
            allocated = await advance_counter(self.client, (partition, "seq"), table=CHAT_META)
            won = await claim(self.client, index_key, pack({"seq": allocated}), table=CHAT_INBOX)
            group_seq = int(unpack(won)["seq"])
        stored = {**record, "id": message_id, "stored_ms": now_ms(self.clock)}
        await put_retrying(
            self.client,
            (partition, seq_key(MESSAGE_PREFIX, group_seq)),
            pack(stored),
            table=CHAT_GROUP,
        )
        await self.mark_read(sender, group, group_seq)
        # Written after the message, so a deliverer woken by it finds the message.
        await put_retrying(
            self.client, delivery_row(group), pack({"seq": group_seq}), table=CHAT_META
        )
        return group_seq

    async def deliver_pending(self, group: int) -> int:
        """Deliver the group's undelivered messages to its members' mailboxes;
        returns how many messages were delivered. Resumable and idempotent:
        the group's delivery cursor (chat_meta) advances after each message
        reached every member, and each mailbox write carries the id
        `g<group>/<seq>`, so a pass repeated after a crash adds no duplicates."""
        partition = _group(group)
        delivered = 0
        while True:
            cursor = await self._delivery_cursor(group)
            rows, _, full = await self._read_log(
                partition, CHAT_GROUP, MESSAGE_PREFIX, MESSAGE_END, cursor, DELIVERY_PAGE
            )
            if not rows:
                return delivered
            members, _ = await self._members(group)
            for row in rows:
                await self._deliver_one(group, row, members)
                await self._advance_delivery_cursor(group, row.seq)
                delivered += 1
            if not full:
                return delivered

    async def _deliver_one(self, group: int, row: LogRow, members: Mapping[int, int]) -> None:
        sender = int(row.record["from"])
        reference = {
            "from": sender,
            "kind": "text",
            "sent_ms": int(row.record["sent_ms"]),
            "expires_ms": int(row.record["expires_ms"]),
            "group": group,
            "gseq": row.seq,
        }
        receivers = [m for m, after in members.items() if m != sender and after < row.seq]
        limiter = trio.CapacityLimiter(DELIVERY_CONCURRENCY)

        async def deliver(receiver: int) -> None:
            async with limiter:
                await self._deliver(receiver, f"g{group}/{row.seq}", reference)

        async with trio.open_nursery() as nursery:
            for receiver in receivers:
                nursery.start_soon(deliver, receiver)

    async def _delivery_cursor(self, group: int) -> int:
        item = await get_retrying(self.client, (_group(group), "delivered"), table=CHAT_META)
        return 0 if item is None else int(unpack(item.value)["seq"])

    async def _advance_delivery_cursor(self, group: int, seq: int) -> None:
        await self._raise_to(_group(group), "delivered", seq)

    async def _raise_to(self, partition: str, sort_key: str, seq: int) -> None:
        """Set a {"seq": n} row to max(n, seq) with compare-and-set (forward only)."""
        key = (partition, sort_key)
        for _ in range(200):
            item = await get_retrying(self.client, key, table=CHAT_META)
            if item is not None and int(unpack(item.value)["seq"]) >= seq:
                return
            value = pack({"seq": seq})
            try:
                if item is None:
                    await self.client.put(key, value, table=CHAT_META, if_absent=True)
                else:
                    await self.client.cas(key, value, if_version=item.version, table=CHAT_META)
                return
            except (Conflict, Unavailable):
                continue  # re-read: someone moved it, or our write's outcome is unknown
        raise Unavailable(f"could not advance {key!r} to {seq}")

    async def deliver_all(self) -> int:
        """One delivery pass over every group (what a restarted deliverer runs)."""
        delivered = 0
        start = "g/"
        while True:
            rows = await scan_retrying(
                self.client, "groups", table=CHAT_META, start=start, end="g0", limit=1000
            )
            for row in rows:
                assert row.key is not None
                delivered += await self.deliver_pending(int(row.key.decode()[2:]))
            if len(rows) < 1000:
                return delivered
            assert rows[-1].key is not None
            start = rows[-1].key.decode() + "\x00"

    async def run_delivery(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The asynchronous delivery task: `nursery.start(chat.run_delivery)`.
        It watches the groups' delivery rows (`DELIVERY_SHARDS` partition
        watches; `send_group` in any process writes one per message), is
        started once they hold, sweeps every group (resuming a crashed
        deliverer's work), then delivers each group a watch names, until
        cancelled. A failed pass is logged and left to the next message."""
        send, receive = trio.open_memory_channel[int](DELIVERY_QUEUE_MAX)
        queued: set[int] = set()  # a burst of messages to one group: one pass

        async def wake(group: int) -> None:
            if group not in queued:
                queued.add(group)
                await send.send(group)

        async with trio.open_nursery() as nursery:
            for shard in range(DELIVERY_SHARDS):
                await nursery.start(watch_delivery_rows, self.client, shard, wake)
            task_status.started()
            try:
                await self.deliver_all()
            except KvsvrError as error:
                logger.warning("group delivery sweep failed: %s", error)
            async for group in receive:
                queued.discard(group)
                try:
                    await self.deliver_pending(group)
                except KvsvrError as error:
                    logger.warning("delivery to group %d failed: %s", group, error)

    async def mark_read(self, user: int, group: int, group_seq: int) -> None:
        """The user has read the group up to `group_seq` (never moves back)."""
        await self._raise_to(_user(user), f"read/{group}", group_seq)

    async def unread_count(self, user: int, group: int) -> int:
        """Group messages after the user's last-read index."""
        latest = await read_counter(self.client, (_group(group), "seq"), table=CHAT_META)
        item = await get_retrying(self.client, (_user(user), f"read/{group}"), table=CHAT_META)
        read = 0 if item is None else int(unpack(item.value)["seq"])
        return max(0, latest - read)


def _message_value(message: Message) -> bytes:
    return pack(
        {
            "id": message.message_id,
            "seq": message.seq,
            "from": message.sender,
            "kind": message.kind,
            "body": message.body,
            "sent_ms": message.sent_ms,
            "expires_ms": message.expires_ms,
            "group": message.group,
            "gseq": message.group_seq,
        }
    )


def decode_message_value(value: bytes) -> dict[str, Any]:
    """A sync change's message value as a dict."""
    return unpack(value)

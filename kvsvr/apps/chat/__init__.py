"""A WeChat-style chat on kvsvr: accounts with unique ids, contacts, offline
mailboxes with per-user sequences and expiry, groups of up to 500 members with
asynchronous delivery and unread counts, long-poll notification, and sync keys.

    async with kvsvr.connect(addresses, secret=s) as client:
        chat = Chat(client)
        alice, bob = await chat.create_account("alice"), await chat.create_account("bob")
        await chat.send(alice, bob, "hi")
        fetched = await chat.fetch(bob, after_seq=0)

`python -m kvsvr.apps.chat demo [--cluster HOST:PORT,...]` runs a transcript.
"""

from __future__ import annotations

from kvsvr.apps.chat._chat import (
    FETCH_LIMIT_MAX,
    GROUP_MEMBERS_MAX,
    ID_RANGE,
    MESSAGE_BODY_BYTES_MAX,
    Change,
    Chat,
    ChatError,
    Fetched,
    GroupFull,
    Message,
    NoSuchGroup,
    NotAMember,
    SyncKey,
    SyncResult,
    decode_message_value,
)

__all__ = [
    "FETCH_LIMIT_MAX",
    "GROUP_MEMBERS_MAX",
    "ID_RANGE",
    "MESSAGE_BODY_BYTES_MAX",
    "Change",
    "Chat",
    "ChatError",
    "Fetched",
    "GroupFull",
    "Message",
    "NoSuchGroup",
    "NotAMember",
    "SyncKey",
    "SyncResult",
    "decode_message_value",
]

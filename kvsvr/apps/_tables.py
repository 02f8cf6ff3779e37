"""The tables the example applications need, as config declarations."""

from __future__ import annotations

from typing import Final

from kvsvr.config import TableConfig, local_cluster, render_config

HOUR_S: Final = 3600.0

# WeChat keeps an undelivered message for 72 hours, a media message for 120.
# The mailbox table expires rows at the longer of the two (the node's TTL is
# per table); the chat library filters text messages at 72 hours itself.
TEXT_MESSAGE_TTL_S: Final = 72 * HOUR_S
MEDIA_MESSAGE_TTL_S: Final = 120 * HOUR_S

CHAT_META: Final = "chat_meta"
CHAT_INBOX: Final = "chat_inbox"
CHAT_GROUP: Final = "chat_group"

MOMENTS_META: Final = "moments_meta"
MOMENTS_POST: Final = "moments_post"
MOMENTS_ALBUM: Final = "moments_album"
MOMENTS_COMMENT: Final = "moments_comment"
MOMENTS_TIMELINE: Final = "moments_timeline"

CHAT_TABLES: Final = (
    # Accounts, contacts, profiles, change logs, counters, groups, cursors:
    # everything that is read-modify-written with compare-and-set.
    TableConfig(CHAT_META, consistency="strong"),
    # Per-user mailboxes and their message-id index; rows expire.
    TableConfig(CHAT_INBOX, consistency="strong", ttl_s=MEDIA_MESSAGE_TTL_S),
    # Group messages, written once under a unique key (append-only), as WeChat
    # chose an eventually consistent store for group chat.
    TableConfig(CHAT_GROUP, consistency="eventual", ttl_s=MEDIA_MESSAGE_TTL_S, write_quorum=2),
)

MOMENTS_TABLES: Final = (
    # The friend graph and block lists: small, read-modify-written.
    TableConfig(MOMENTS_META, consistency="strong"),
    # WeChat Moments' four tables: every row is written under a unique key
    # (a post id, a comment id, a reference) and never updated in place, so
    # eventual consistency and blind retries are safe.
    TableConfig(MOMENTS_POST, consistency="eventual", write_quorum=2),
    TableConfig(MOMENTS_ALBUM, consistency="eventual", write_quorum=2),
    TableConfig(MOMENTS_COMMENT, consistency="eventual", write_quorum=2),
    TableConfig(MOMENTS_TIMELINE, consistency="eventual", write_quorum=2),
)


def app_tables() -> tuple[TableConfig, ...]:
    """Every table of both applications (add `TableConfig("default")` yourself)."""
    return (*CHAT_TABLES, *MOMENTS_TABLES)


def tables_toml(tables: tuple[TableConfig, ...] | None = None) -> str:
    """The `[[tables]]` declarations of both applications (or of `tables`),
    as TOML to paste into a cluster config (next to the `default` table)."""
    chosen = app_tables() if tables is None else tables
    text = render_config(local_cluster(1, 7100, tables=chosen))
    return text[text.index("[[tables]]") :]

"""What wakes the chat: watches, never polls.

`wait_for_messages` watches the rows of a mailbox (in `_chat`). The group
deliverer (`Chat.run_delivery`) watches the groups' delivery rows:
`send_group` writes the group's row, in chat_meta

    ("delivery/<group % DELIVERY_SHARDS>", "g/<group>")    {"seq": latest group seq}

after storing the message, and each change of a row wakes the deliverer
for that group, whichever process sent the message.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from kvsvr.apps._tables import CHAT_META
from kvsvr.client import Client
from kvsvr.errors import KvsvrError

# The delivery rows are spread over this many partitions, each followed by one
# partition watch: a watch covers at most WATCH_CURSORS_MAX (1,000) rows, so a
# deliverer follows up to 16,000 groups with 16 of a connection's 128 watches.
DELIVERY_SHARDS: Final = 16
DELIVERY_PARTITION: Final = "delivery/"  # + the shard

# Pause before a watch is entered again after it failed (history gone, or no
# replica reachable for the client's timeout).
WATCH_RESTART_S: Final = 0.1

_GROUP_ROW_PREFIX: Final = "g/"

logger = logging.getLogger(__name__)


def delivery_row(group: int) -> tuple[str, str]:
    """The key of a group's delivery row."""
    assert isinstance(group, int) and group > 0, group
    return (f"{DELIVERY_PARTITION}{group % DELIVERY_SHARDS}", f"{_GROUP_ROW_PREFIX}{group:020d}")


def _group_of(sort_key: bytes) -> int:
    return int(sort_key.decode()[len(_GROUP_ROW_PREFIX) :])


async def watch_delivery_rows(
    client: Client,
    shard: int,
    wake: Callable[[int], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call `wake(group)` for each group whose delivery row in `shard`
    changes, until cancelled; started once the watch holds. Each time the
    watch is entered, every group of the shard is woken once: what a failed
    watch could not tell (history gone, no replica reachable) is delivered
    that way."""
    assert 0 <= shard < DELIVERY_SHARDS, shard
    started = False
    while True:
        try:
            async with client.watch(
                f"{DELIVERY_PARTITION}{shard}", table=CHAT_META, partition=True
            ) as events:
                if not started:
                    task_status.started()
                    started = True
                for sort_key in events.versions:
                    await wake(_group_of(sort_key))
                async for event in events:
                    if event.value is not None:
                        await wake(_group_of(event.key))
        except KvsvrError as error:
            logger.warning("delivery watch of shard %d restarts: %s", shard, error)
            await trio.sleep(WATCH_RESTART_S)

"""`python -m kvsvr.apps.chat demo [--cluster HOST:PORT,...] [--secret S]`"""

from __future__ import annotations

import argparse
import sys
import time

import trio

import kvsvr
from kvsvr.apps._local import demo_parser, missing_tables, missing_tables_message, run_demo
from kvsvr.apps._tables import CHAT_TABLES, HOUR_S
from kvsvr.apps.chat._chat import GROUP_MEMBERS_MAX, Chat, GroupFull, SyncKey, decode_message_value


class _DemoClock:
    """Wall time plus a shift the demo moves forward to show expiry."""

    def __init__(self) -> None:
        self.shift_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift_s


def say(text: str) -> None:
    print(text, flush=True)


async def demo(addresses: list[str], secret: str | None, timeout_s: float) -> int:
    async with kvsvr.connect(addresses, secret=secret, timeout_s=timeout_s) as client:
        missing = await missing_tables(client, CHAT_TABLES)
        if missing:
            print(missing_tables_message(missing), file=sys.stderr)
            return 2
        clock = _DemoClock()
        chat = Chat(client, clock=clock)
        alice = await chat.create_account("alice")
        bob = await chat.create_account("bob")
        carol = await chat.create_account("carol")
        say(f"accounts: alice={alice} bob={bob} carol={carol} (ids from a CAS-allocated range)")
        await chat.add_contact(alice, bob)
        await chat.add_contact(alice, carol)
        say(f"alice's contacts: {await chat.contacts(alice)}")

        say("\n-- one-to-one, bob offline --")
        await chat.send(alice, bob, "hi bob, dinner tonight?", message_id="alice-1")
        await chat.send(alice, bob, "https://img.example/menu.jpg", kind="media")
        again = await chat.send(alice, bob, "hi bob, dinner tonight?", message_id="alice-1")
        say(f"alice sent 2 messages (and retried the first: stored once, at seq {again})")
        fetched = await chat.fetch(bob, 0)
        for message in fetched.messages:
            say(
                f"  bob <- #{message.seq} from {message.sender} [{message.kind}] "
                f"{message.body.decode()!r}"
            )
        bob_cursor = fetched.cursor

        say("\n-- long-poll: bob waits, alice sends --")
        sent_at: list[float] = []
        async with trio.open_nursery() as nursery:

            async def later() -> None:
                await trio.sleep(0.3)
                sent_at.append(trio.current_time())
                await chat.send(alice, bob, "see you at 7")
                sent_at.append(trio.current_time())

            nursery.start_soon(later)
            woke = await chat.wait_for_messages(bob, bob_cursor, timeout_s=10)
            woke_at = trio.current_time()
        say(
            f"  bob woke {(woke_at - sent_at[0]) * 1000:.0f} ms after alice's send began "
            f"(the send itself: {(sent_at[-1] - sent_at[0]) * 1000:.0f} ms; a watch, no "
            f"polling) with {[m.body.decode() for m in woke.messages]}"
        )

        say("\n-- group chat --")
        group = await chat.create_group(alice, "dinner", [bob, carol])
        say(f"group {group}: members {await chat.group_members(group)}")
        for text in ("who's in?", "me", "me too"):
            await chat.send_group(alice, group, text)
        unread = await chat.unread_count(bob, group)
        say(f"3 group messages stored once; bob's unread count: {unread}")
        delivered = await chat.deliver_pending(group)
        say(f"delivery pass: {delivered} messages fanned out to members' mailboxes")
        fetched = await chat.fetch(bob, woke.cursor)
        for message in fetched.messages:
            say(
                f"  bob <- #{message.seq} group {message.group}/{message.group_seq} "
                f"{message.body.decode()!r}"
            )
        await chat.mark_read(bob, group, 2)
        say(f"bob read up to group message 2; unread now {await chat.unread_count(bob, group)}")

        # Placeholder member ids stand in for 499 accounts (membership is by id).
        placeholders = [10_000_000 + i for i in range(GROUP_MEMBERS_MAX - 2)]
        big = await chat.create_group(alice, "big", placeholders)
        await chat.join_group(big, bob)
        say(f"group {big}: {len(await chat.group_members(big))} members after bob joined")
        try:
            await chat.join_group(big, carol)
        except GroupFull as error:
            say(f"carol's join refused: {error}")

        say("\n-- sync keys --")
        result = await chat.sync(carol, SyncKey())
        for change in result.changes:
            say(f"  carol sync: {change.category:9} {change.key}")
        await chat.set_profile(carol, {"signature": "out for dinner"})
        await chat.send(bob, carol, "hello carol")
        result = await chat.sync(carol, result.key)
        say(f"  after key {result.key}: ")
        for change in result.changes:
            value = change.value
            shown = (
                decode_message_value(value)["body"]
                if change.category == "messages" and value is not None
                else value
            )
            say(f"  carol sync: {change.category:9} {change.key} = {shown!r}")

        say("\n-- expiry (the demo moves the library's clock) --")
        clock.shift_s = 73 * HOUR_S
        left = await chat.fetch(bob, 0)
        say(
            f"  73 h later bob's mailbox shows: {[m.kind for m in left.messages]} "
            "(text expired at 72 h, media lasts 120 h)"
        )
        clock.shift_s = 121 * HOUR_S
        left = await chat.fetch(bob, 0)
        say(f"  121 h later: {len(left.messages)} messages")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser("python -m kvsvr.apps.chat", "WeChat-style chat on kvsvr")
    args: argparse.Namespace = parser.parse_args(argv)
    return run_demo("python -m kvsvr.apps.chat", args, demo)


if __name__ == "__main__":
    sys.exit(main())

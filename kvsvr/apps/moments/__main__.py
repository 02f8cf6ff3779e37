"""`python -m kvsvr.apps.moments demo [--cluster HOST:PORT,...] [--secret S]`"""

from __future__ import annotations

import argparse
import sys

import kvsvr
from kvsvr.apps._local import demo_parser, missing_tables, missing_tables_message, run_demo
from kvsvr.apps._tables import MOMENTS_TABLES
from kvsvr.apps.moments._moments import Moments, MomentsError, TimelinePage


def say(text: str) -> None:
    print(text, flush=True)


def show(reader: str, page: TimelinePage) -> None:
    say(f"  {reader}'s timeline ({len(page.posts)} posts, newest first):")
    for view in page.posts:
        post = view.post
        say(f"    [{post.author}] {post.text!r} images={len(post.images)}")
        for comment in view.comments:
            say(f"        comment by {comment.author}: {comment.text!r}")
        if view.likes:
            say(f"        liked by {', '.join(view.likes)}")


async def demo(addresses: list[str], secret: str | None, timeout_s: float) -> int:
    async with kvsvr.connect(addresses, secret=secret, timeout_s=timeout_s) as client:
        missing = await missing_tables(client, MOMENTS_TABLES)
        if missing:
            print(missing_tables_message(missing), file=sys.stderr)
            return 2
        moments = Moments(client)
        # alice is friends with bob, carol and dave; bob and carol are friends;
        # dave knows only alice.
        for a, b in (("alice", "bob"), ("alice", "carol"), ("alice", "dave"), ("bob", "carol")):
            await moments.add_friends(a, b)
        await moments.block("alice", "dave")
        say("friends: alice-bob, alice-carol, alice-dave, bob-carol; alice blocks dave")

        say("\n-- publish --")
        hike = moments.draft("alice", "hiking today", ["https://img.example/peak.jpg"])
        report = await moments.publish(hike)
        say(f"alice's post fanned out to {report.audience} timelines in {report.batches} batch(es)")
        secret_post = moments.draft("alice", "surprise party plans", hidden_from=["bob"])
        report = await moments.publish(secret_post)
        say(f"alice's post hidden from bob reached {report.audience} timeline(s)")
        diary = moments.draft("alice", "note to self", visibility="private")
        report = await moments.publish(diary)
        say(f"a private post reached {report.audience} timelines")
        again = await moments.publish(hike)
        say(f"publishing the first post again (a retry) rewrote the same {again.audience} rows")

        say("\n-- comments and likes --")
        await moments.comment("bob", hike.post_id, "great view!")
        await moments.comment("carol", hike.post_id, "take me next time")
        await moments.like("carol", hike.post_id)
        await moments.like("bob", hike.post_id)
        try:
            await moments.comment("dave", hike.post_id, "hello?")
        except MomentsError as error:
            say(f"dave may not comment: {error}")

        say("\n-- reading --")
        for reader in ("bob", "carol", "dave"):
            show(reader, await moments.timeline(reader, page_size=20))
        await moments.remove_friends("bob", "carol")
        say("bob and carol are no longer friends:")
        show("bob", await moments.timeline("bob", page_size=20))
        show("alice (album)", await moments.album("alice", "alice", page_size=20))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser("python -m kvsvr.apps.moments", "WeChat Moments on kvsvr")
    args: argparse.Namespace = parser.parse_args(argv)
    return run_demo("python -m kvsvr.apps.moments", args, demo)


if __name__ == "__main__":
    sys.exit(main())

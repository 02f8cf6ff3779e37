"""WeChat Moments on kvsvr: the Post, Album, Comment and Timeline tables;
publish with batched fan-out to friends' timelines under visibility rules;
timeline pages newest first with the comments and likes the reader may see.

    async with kvsvr.connect(addresses, secret=s) as client:
        moments = Moments(client)
        await moments.add_friends("alice", "bob")
        post = moments.draft("alice", "sunset", ["https://img.example/1.jpg"])
        await moments.publish(post)              # again with the same post to retry
        page = await moments.timeline("bob", page_size=20)

`python -m kvsvr.apps.moments demo [--cluster HOST:PORT,...]` runs a transcript.
"""

from __future__ import annotations

from kvsvr.apps.moments._moments import (
    FANOUT_BATCH,
    FRIENDS_MAX,
    PAGE_SIZE_MAX,
    Comment,
    Moments,
    MomentsError,
    Post,
    PostView,
    PublishIncomplete,
    PublishReport,
    TimelinePage,
)

__all__ = [
    "FANOUT_BATCH",
    "FRIENDS_MAX",
    "PAGE_SIZE_MAX",
    "Comment",
    "Moments",
    "MomentsError",
    "Post",
    "PostView",
    "PublishIncomplete",
    "PublishReport",
    "TimelinePage",
]

"""WeChat Moments on kvsvr: posts fanned out to friends' timelines.

The four tables of WeChat's Moments, all append-only under unique keys (so
eventual consistency and blind retries are safe), plus the friend graph:

    moments_post      p:<post id>                          author, text, images, visibility
    moments_album     (a:<author>, "<time>/<post id>")     the author's own posts
    moments_timeline  (t:<reader>, "<time>/<post id>")     friends' posts for a reader
    moments_comment   (c:<post id>, "c/<time>/<id>")       comments
                      (c:<post id>, "l/<user>")            likes (one per user)
    moments_meta      (m:<user>, "friend/<other>")         mutual friends (strong)
                      (m:<user>, "block/<other>")          posts hidden from <other>

(<time> sorts newest first: 10**13 - 1 minus the post's time in ms.)

A post's timeline keys depend only on the post (its time and id), so
publishing the same post again writes the same rows: a publish cut short (a
node killed mid-fan-out) is finished by repeating it, without duplicates.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from kvsvr.apps._store import (
    AppError,
    Clock,
    delete_retrying,
    get_retrying,
    new_nonce,
    now_ms,
    pack,
    put_retrying,
    scan_retrying,
    unpack,
)
from kvsvr.apps._tables import (
    MOMENTS_ALBUM,
    MOMENTS_COMMENT,
    MOMENTS_META,
    MOMENTS_POST,
    MOMENTS_TIMELINE,
)
from kvsvr.client import Client, Item
from kvsvr.errors import KvsvrError

# --- limits -------------------------------------------------------------------------

# WeChat caps friends at 5000; the fan-out of one post is at most this many writes.
FRIENDS_MAX: Final = 5000
# Timeline writes in flight at once: one batch of the fan-out. Enough to hide
# round trips, few enough that one publish does not crowd out other clients.
FANOUT_BATCH: Final = 50
IMAGES_MAX: Final = 9  # a Moments post shows at most nine pictures
TEXT_BYTES_MAX: Final = 16 * 1024
COMMENT_BYTES_MAX: Final = 4 * 1024
PAGE_SIZE_MAX: Final = 100
# Comments and likes read per post on a timeline page.
COMMENTS_PER_POST_MAX: Final = 1000
# Timeline rows scanned per page request while filling a page with posts the
# reader may still see (posts can be hidden after they were fanned out).
PAGE_SCAN_ROUNDS_MAX: Final = 5
USER_BYTES_MAX: Final = 64

# Time keys sort newest first: this minus the post's time in ms, zero-padded.
_TIME_BASE_MS: Final = 10**13 - 1
VISIBILITIES: Final = ("friends", "private")


class MomentsError(AppError):
    """A Moments rule was broken (not allowed to see or comment on a post...)."""


class PublishIncomplete(MomentsError):
    """Some timeline writes failed (their outcome is unknown); publish the same
    post again to finish, which adds no duplicates."""


@dataclass(frozen=True, slots=True)
class Post:
    """A post. Make one with `Moments.draft` and keep it to retry `publish`."""

    post_id: str
    author: str
    text: str
    images: tuple[str, ...]
    created_ms: int
    visibility: str = "friends"  # "friends" or "private" (the author only)
    hidden_from: frozenset[str] = frozenset()  # friends this post is hidden from

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.post_id,
            "author": self.author,
            "text": self.text,
            "images": list(self.images),
            "created_ms": self.created_ms,
            "visibility": self.visibility,
            "hidden_from": sorted(self.hidden_from),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Post:
        return cls(
            post_id=str(record["id"]),
            author=str(record["author"]),
            text=str(record["text"]),
            images=tuple(record["images"]),
            created_ms=int(record["created_ms"]),
            visibility=str(record["visibility"]),
            hidden_from=frozenset(record["hidden_from"]),
        )

    @property
    def time_key(self) -> str:
        return f"{_TIME_BASE_MS - self.created_ms:013d}/{self.post_id}"


@dataclass(frozen=True, slots=True)
class Comment:
    comment_id: str
    author: str
    text: str
    created_ms: int


@dataclass(frozen=True, slots=True)
class PostView:
    """A post as one reader sees it: only the comments and likes of that
    reader's friends (and their own), as in WeChat."""

    post: Post
    comments: list[Comment]
    likes: list[str]


@dataclass(frozen=True, slots=True)
class TimelinePage:
    posts: list[PostView]
    next_cursor: str | None  # pass as `after` for the next (older) page; None: the end


@dataclass(frozen=True, slots=True)
class PublishReport:
    audience: int  # timelines written
    batches: int


@dataclass(slots=True)
class _Graph:
    """What one request learned of the graph: per author, whether the reader
    is a friend the author has not blocked."""

    reader: str
    author_allows: dict[str, bool] = field(default_factory=dict)


def _check_user(user: str) -> str:
    assert isinstance(user, str) and 0 < len(user.encode()) <= USER_BYTES_MAX, user
    assert "/" not in user, user
    return user


class Moments:
    """WeChat Moments over a connected `kvsvr.Client`."""

    def __init__(self, client: Client, *, clock: Clock = time.time) -> None:
        self.client = client
        self.clock = clock

    # --- the friend graph ---

    async def add_friends(self, a: str, b: str) -> None:
        """Make two users friends (mutual, as in WeChat)."""
        assert _check_user(a) != _check_user(b)
        await put_retrying(self.client, (f"m:{a}", f"friend/{b}"), b"", table=MOMENTS_META)
        await put_retrying(self.client, (f"m:{b}", f"friend/{a}"), b"", table=MOMENTS_META)

    async def remove_friends(self, a: str, b: str) -> None:
        await delete_retrying(self.client, (f"m:{a}", f"friend/{b}"), table=MOMENTS_META)
        await delete_retrying(self.client, (f"m:{b}", f"friend/{a}"), table=MOMENTS_META)

    async def friends(self, user: str) -> set[str]:
        return await self._set(user, "friend/")

    async def block(self, user: str, blocked: str) -> None:
        """Hide all of `user`'s posts, past and future, from `blocked`."""
        await put_retrying(
            self.client, (f"m:{_check_user(user)}", f"block/{blocked}"), b"", table=MOMENTS_META
        )

    async def unblock(self, user: str, blocked: str) -> None:
        await delete_retrying(self.client, (f"m:{user}", f"block/{blocked}"), table=MOMENTS_META)

    async def blocked(self, user: str) -> set[str]:
        return await self._set(user, "block/")

    async def _set(self, user: str, prefix: str) -> set[str]:
        end = prefix[:-1] + "0"  # "0" sorts right after "/"
        rows = await scan_retrying(
            self.client,
            f"m:{_check_user(user)}",
            table=MOMENTS_META,
            start=prefix,
            end=end,
            limit=FRIENDS_MAX,
        )
        return {_sort_key(row).removeprefix(prefix) for row in rows}

    # --- publishing ---

    def draft(
        self,
        author: str,
        text: str,
        images: Sequence[str] = (),
        *,
        visibility: str = "friends",
        hidden_from: Iterable[str] = (),
    ) -> Post:
        """A new post with a unique id and its creation time (not stored yet)."""
        assert visibility in VISIBILITIES, visibility
        assert len(text.encode()) <= TEXT_BYTES_MAX
        assert len(images) <= IMAGES_MAX
        created = now_ms(self.clock)
        return Post(
            post_id=f"{_check_user(author)}.{created:013d}.{new_nonce().hex()}",
            author=author,
            text=text,
            images=tuple(images),
            created_ms=created,
            visibility=visibility,
            hidden_from=frozenset(hidden_from),
        )

    async def audience(self, post: Post) -> list[str]:
        """Who gets the post on their timeline: the author's friends, minus
        those the author blocked and those the post is hidden from."""
        if post.visibility == "private":
            return []
        friends = await self.friends(post.author)
        blocked = await self.blocked(post.author)
        return sorted(friends - blocked - post.hidden_from)

    async def publish(self, post: Post) -> PublishReport:
        """Write the post, add it to the author's album, and fan a reference
        out to the timeline of everyone in its audience, FANOUT_BATCH at a
        time. Idempotent: to finish a publish that raised, call it again with
        the same `Post`."""
        record = pack(post.to_record())
        await put_retrying(self.client, f"p:{post.post_id}", record, table=MOMENTS_POST)
        reference = pack({"id": post.post_id, "author": post.author})
        await put_retrying(
            self.client, (f"a:{post.author}", post.time_key), reference, table=MOMENTS_ALBUM
        )
        audience = await self.audience(post)
        failures: list[KvsvrError] = []

        async def write(reader: str) -> None:
            try:
                await put_retrying(
                    self.client, (f"t:{reader}", post.time_key), reference, table=MOMENTS_TIMELINE
                )
            except KvsvrError as error:  # Unavailable past the retries
                failures.append(error)

        batches = 0
        for start in range(0, len(audience), FANOUT_BATCH):
            batches += 1
            async with trio.open_nursery() as nursery:
                for reader in audience[start : start + FANOUT_BATCH]:
                    nursery.start_soon(write, reader)
        if failures:
            raise PublishIncomplete(
                f"post {post.post_id}: {len(failures)} of {len(audience)} timeline writes "
                f"failed (first: {failures[0]}); publish it again to finish"
            )
        return PublishReport(audience=len(audience), batches=batches)

    async def delete_post(self, post: Post) -> None:
        """Remove a post; the timeline references left behind are skipped on read."""
        await delete_retrying(self.client, f"p:{post.post_id}", table=MOMENTS_POST)
        await delete_retrying(self.client, (f"a:{post.author}", post.time_key), table=MOMENTS_ALBUM)

    # --- comments and likes ---

    async def comment(
        self, reader: str, post_id: str, text: str, *, comment_id: str | None = None
    ) -> str:
        """Comment on a post the reader may see; returns the comment id (pass
        it again to retry without a duplicate)."""
        assert len(text.encode()) <= COMMENT_BYTES_MAX
        await self._check_may_see(reader, post_id)
        created = now_ms(self.clock)
        comment_id = comment_id if comment_id is not None else new_nonce().hex()
        record = pack({"author": reader, "text": text, "created_ms": created})
        await put_retrying(
            self.client,
            (f"c:{post_id}", f"c/{created:013d}/{comment_id}"),
            record,
            table=MOMENTS_COMMENT,
        )
        return comment_id

    async def like(self, reader: str, post_id: str) -> None:
        await self._check_may_see(reader, post_id)
        record = pack({"created_ms": now_ms(self.clock)})
        await put_retrying(
            self.client, (f"c:{post_id}", f"l/{reader}"), record, table=MOMENTS_COMMENT
        )

    async def unlike(self, reader: str, post_id: str) -> None:
        await delete_retrying(self.client, (f"c:{post_id}", f"l/{reader}"), table=MOMENTS_COMMENT)

    async def _check_may_see(self, reader: str, post_id: str) -> Post:
        post = await self._post(post_id)
        if post is None:
            raise MomentsError(f"no post {post_id}")
        if not await self._may_see(_Graph(reader), post):
            raise MomentsError(f"{reader} may not see post {post_id}")
        return post

    # --- reading ---

    async def timeline(
        self, reader: str, *, page_size: int = 20, after: str | None = None
    ) -> TimelinePage:
        """A page of the reader's timeline, newest first, from friends' posts
        the reader may see now, each with the comments and likes of the
        reader's friends. `after` is the previous page's `next_cursor`."""
        return await self._page(
            reader, f"t:{_check_user(reader)}", MOMENTS_TIMELINE, page_size, after
        )

    async def album(
        self, viewer: str, owner: str, *, page_size: int = 20, after: str | None = None
    ) -> TimelinePage:
        """A page of `owner`'s own posts, newest first, as `viewer` may see them."""
        return await self._page(viewer, f"a:{_check_user(owner)}", MOMENTS_ALBUM, page_size, after)

    async def _page(
        self, reader: str, partition: str, table: str, page_size: int, after: str | None
    ) -> TimelinePage:
        assert 1 <= page_size <= PAGE_SIZE_MAX, page_size
        graph = _Graph(reader)
        reader_friends = await self.friends(reader)
        views: list[PostView] = []
        start = "" if after is None else after + "\x00"
        for _ in range(PAGE_SCAN_ROUNDS_MAX):
            wanted = page_size - len(views)
            rows = await scan_retrying(
                self.client, partition, table=table, start=start, end="~", limit=wanted
            )
            found = await self._views(graph, reader, reader_friends, rows)
            views += found
            if len(rows) < wanted:
                return TimelinePage(views, None)
            start = _sort_key(rows[-1]) + "\x00"
            if len(views) >= page_size:
                break
        return TimelinePage(views, start[:-1])

    async def _views(
        self, graph: _Graph, reader: str, reader_friends: set[str], rows: list[Item]
    ) -> list[PostView]:
        """The views of the referenced posts the reader may see, in row order,
        read concurrently."""
        results: list[PostView | None] = [None] * len(rows)

        async def view(position: int, row: Item) -> None:
            post = await self._post(str(unpack(row.value)["id"]))
            if post is None or not await self._may_see(graph, post):
                return
            results[position] = await self._view(reader, reader_friends, post)

        async with trio.open_nursery() as nursery:
            for position, row in enumerate(rows):
                nursery.start_soon(view, position, row)
        return [result for result in results if result is not None]

    async def _view(self, reader: str, reader_friends: set[str], post: Post) -> PostView:
        rows = await scan_retrying(
            self.client,
            f"c:{post.post_id}",
            table=MOMENTS_COMMENT,
            start="",
            end="~",
            limit=COMMENTS_PER_POST_MAX,
        )

        def shown(author: str) -> bool:
            # WeChat shows a reader the comments of their own friends only
            # (so, of friends they share with the author); the author sees all.
            return reader in (author, post.author) or author in reader_friends

        comments: list[Comment] = []
        likes: list[str] = []
        for row in rows:
            sort_key = _sort_key(row)
            if sort_key.startswith("l/"):
                if shown(sort_key[2:]):
                    likes.append(sort_key[2:])
                continue
            record = unpack(row.value)
            if shown(str(record["author"])):
                comments.append(
                    Comment(
                        comment_id=sort_key.rsplit("/", 1)[1],
                        author=str(record["author"]),
                        text=str(record["text"]),
                        created_ms=int(record["created_ms"]),
                    )
                )
        return PostView(post, comments, likes)

    async def _post(self, post_id: str) -> Post | None:
        item = await get_retrying(self.client, f"p:{post_id}", table=MOMENTS_POST)
        return None if item is None else Post.from_record(unpack(item.value))

    async def _may_see(self, graph: _Graph, post: Post) -> bool:
        """Visibility as of now (a post fanned out earlier may since have been
        hidden): the author, or a current friend the author has not blocked
        and the post is not hidden from."""
        reader = graph.reader
        if reader == post.author:
            return True
        if post.visibility != "friends" or reader in post.hidden_from:
            return False
        allows = graph.author_allows.get(post.author)
        if allows is None:
            partition = f"m:{post.author}"
            friend = await get_retrying(
                self.client, (partition, f"friend/{reader}"), table=MOMENTS_META
            )
            block = await get_retrying(
                self.client, (partition, f"block/{reader}"), table=MOMENTS_META
            )
            allows = graph.author_allows[post.author] = friend is not None and block is None
        return allows


def _sort_key(row: Item) -> str:
    assert row.key is not None
    return row.key.decode()

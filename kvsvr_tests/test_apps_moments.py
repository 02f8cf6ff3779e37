"""The Moments example application on a real 3-node cluster (one per module).

* Publish fans a post out to all 200 friends' timelines, once each, and to no
  one else; the author's album has it.
* Visibility: private posts, per-post "hidden from", the author's block list
  (also for posts published before the block), non-friends.
* Comments and likes: a reader sees only those of their own friends (and
  their own); the author sees all; a reader who may not see a post may not
  comment on it.
* Pages: newest first, page by page, nothing skipped or repeated.
* A node SIGKILLed in the middle of a 200-friend fan-out: once the publish is
  finished (or retried with the same post), every friend's timeline holds the
  post exactly once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

import kvsvr
from kvsvr.apps import MOMENTS_TABLES
from kvsvr.apps._tables import MOMENTS_TIMELINE
from kvsvr.apps.moments import Moments, MomentsError, Post
from kvsvr.apps.moments.__main__ import demo as moments_demo
from kvsvr.config import TableConfig
from kvsvr.errors import Unavailable
from kvsvr_tests.cluster_util import LocalCluster

pytestmark = pytest.mark.slow  # starts real node processes

CLIENT_TIMEOUT_S = 10.0
FRIENDS = 200
KILL_TEST_DEADLINE_S = 180.0
PUBLISH_ATTEMPTS_MAX = 5


class StepClock:
    """Wall-clock-like time that moves 1 ms per reading, so posts made in a
    quick loop have distinct, ordered times."""

    def __init__(self, start_s: float = 1_800_000_000.0) -> None:
        self.now_ms = int(start_s * 1000)

    def __call__(self) -> float:
        self.now_ms += 1
        return self.now_ms / 1000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    directory: Path = tmp_path_factory.mktemp("moments-cluster")
    tables = (TableConfig("default"), *MOMENTS_TABLES)
    with LocalCluster(directory, nodes=3, tables=tables) as local:
        local.start_all()
        yield local


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[kvsvr.Client]:
    async with kvsvr.connect(
        cluster.addresses, secret=cluster.secret, timeout_s=CLIENT_TIMEOUT_S
    ) as connected:
        yield connected


async def _befriend(moments: Moments, author: str, friends: list[str]) -> None:
    limiter = trio.CapacityLimiter(50)

    async def one(friend: str) -> None:
        async with limiter:
            await moments.add_friends(author, friend)

    async with trio.open_nursery() as nursery:
        for friend in friends:
            nursery.start_soon(one, friend)


async def _timeline_counts(client: kvsvr.Client, readers: list[str], post: Post) -> list[int]:
    """How many rows of each reader's timeline reference the post."""
    counts = [0] * len(readers)
    limiter = trio.CapacityLimiter(50)

    async def count(position: int, reader: str) -> None:
        async with limiter:
            rows = await client.scan(f"t:{reader}", table=MOMENTS_TIMELINE, limit=1000)
        counts[position] = sum(1 for row in rows if post.post_id.encode() in row.value)

    async with trio.open_nursery() as nursery:
        for position, reader in enumerate(readers):
            nursery.start_soon(count, position, reader)
    return counts


async def test_publish_reaches_all_200_friends_once_and_no_one_else(
    client: kvsvr.Client,
) -> None:
    moments = Moments(client)
    friends = [f"fan{i:03d}" for i in range(FRIENDS)]
    await _befriend(moments, "star", friends)
    await moments.add_friends("fan000", "outsider")  # a friend of a friend only

    post = moments.draft("star", "hello fans", ["https://img.example/a.jpg"] * 3)
    report = await moments.publish(post)
    assert report.audience == FRIENDS and report.batches == 4
    assert await _timeline_counts(client, friends, post) == [1] * FRIENDS
    assert await _timeline_counts(client, ["outsider", "star"], post) == [0, 0]

    page = await moments.timeline("fan123")
    assert [view.post for view in page.posts] == [post]
    assert page.posts[0].post.images == ("https://img.example/a.jpg",) * 3
    album = await moments.album("fan007", "star")
    assert [view.post.post_id for view in album.posts] == [post.post_id]
    assert (await moments.album("outsider", "star")).posts == []


async def test_visibility_rules(client: kvsvr.Client) -> None:
    moments = Moments(client, clock=StepClock())
    for friend in ("v-bob", "v-carol", "v-dave"):
        await moments.add_friends("v-alice", friend)
    await moments.block("v-alice", "v-dave")

    public = moments.draft("v-alice", "for friends")
    hidden = moments.draft("v-alice", "not for bob", hidden_from=["v-bob"])
    private = moments.draft("v-alice", "diary", visibility="private")
    assert (await moments.publish(public)).audience == 2  # bob, carol: dave is blocked
    assert (await moments.publish(hidden)).audience == 1
    assert (await moments.publish(private)).audience == 0

    async def texts(reader: str) -> list[str]:
        return [view.post.text for view in (await moments.timeline(reader)).posts]

    assert await texts("v-bob") == ["for friends"]
    assert await texts("v-carol") == ["not for bob", "for friends"]
    assert await texts("v-dave") == []
    assert [v.post.text for v in (await moments.album("v-alice", "v-alice")).posts] == [
        "diary",
        "not for bob",
        "for friends",
    ]
    assert [v.post.text for v in (await moments.album("v-dave", "v-alice")).posts] == []

    # Blocking after publishing hides what was already fanned out; so does unfriending.
    await moments.block("v-alice", "v-carol")
    assert await texts("v-carol") == []
    await moments.unblock("v-alice", "v-carol")
    assert await texts("v-carol") == ["not for bob", "for friends"]
    await moments.remove_friends("v-alice", "v-bob")
    assert await texts("v-bob") == []
    with pytest.raises(MomentsError):
        await moments.comment("v-bob", public.post_id, "can I still comment?")


async def test_readers_see_only_their_friends_comments_and_likes(client: kvsvr.Client) -> None:
    moments = Moments(client)
    # author is friends with r1, r2, r3; r1 and r2 are friends; r3 knows only author.
    for friend in ("c-r1", "c-r2", "c-r3"):
        await moments.add_friends("c-author", friend)
    await moments.add_friends("c-r1", "c-r2")
    post = moments.draft("c-author", "comment on me")
    await moments.publish(post)
    await moments.comment("c-r1", post.post_id, "from r1")
    await moments.comment("c-r3", post.post_id, "from r3")
    await moments.comment("c-author", post.post_id, "author reply")
    await moments.like("c-r2", post.post_id)
    await moments.like("c-r3", post.post_id)
    await moments.like("c-r3", post.post_id)  # a like is per user: twice is once
    with pytest.raises(MomentsError):
        await moments.comment("c-stranger", post.post_id, "hi")

    async def seen(reader: str) -> tuple[list[str], list[str]]:
        page = await moments.timeline(reader)
        assert len(page.posts) == 1
        view = page.posts[0]
        return sorted(c.author for c in view.comments), sorted(view.likes)

    assert await seen("c-r1") == (["c-author", "c-r1"], ["c-r2"])
    assert await seen("c-r2") == (["c-author", "c-r1"], ["c-r2"])
    assert await seen("c-r3") == (["c-author", "c-r3"], ["c-r3"])
    author_view = (await moments.album("c-author", "c-author")).posts[0]
    assert sorted(c.author for c in author_view.comments) == ["c-author", "c-r1", "c-r3"]
    assert sorted(author_view.likes) == ["c-r2", "c-r3"]


async def test_timeline_pages_are_newest_first_without_gaps(client: kvsvr.Client) -> None:
    moments = Moments(client, clock=StepClock())
    authors = [f"p-author{i}" for i in range(3)]
    await _befriend(moments, "p-reader", authors)
    posts = []
    for i in range(25):
        post = moments.draft(authors[i % 3], f"post {i}")
        await moments.publish(post)
        posts.append(post)
    first = await moments.timeline("p-reader", page_size=20)
    assert first.next_cursor is not None
    second = await moments.timeline("p-reader", page_size=20, after=first.next_cursor)
    assert second.next_cursor is None
    read = [view.post.post_id for view in first.posts + second.posts]
    assert len(first.posts) == 20 and len(second.posts) == 5
    assert read == [post.post_id for post in reversed(posts)]


async def test_node_killed_mid_fanout_loses_nothing_and_duplicates_nothing(
    cluster: LocalCluster, client: kvsvr.Client
) -> None:
    moments = Moments(client)
    friends = [f"k-fan{i:03d}" for i in range(FRIENDS)]
    await _befriend(moments, "k-star", friends)
    post = moments.draft("k-star", "published through a crash")
    victim = "n2"
    outcome: list[str] = []
    try:
        with trio.fail_after(KILL_TEST_DEADLINE_S):
            async with trio.open_nursery() as nursery:

                async def publish_first_time() -> None:
                    try:
                        report = await moments.publish(post)
                        outcome.append(f"finished ({report.audience})")
                    except (MomentsError, Unavailable) as error:
                        outcome.append(f"cut short: {error}")

                nursery.start_soon(publish_first_time)
                # Kill once the fan-out has started (the first friend has it)
                # and before it has finished (the last one does not yet).
                for _ in range(100_000):  # bounded by the fail_after above
                    if await _timeline_counts(client, friends[:1], post) == [1]:
                        break
                    await trio.sleep(0.005)
                unfinished = await _timeline_counts(client, friends[-1:], post) == [0]
                await cluster.akill(victim)
                # The fan-out takes a second or more; the kill lands within milliseconds.
                assert unfinished, "the fan-out finished before the node was killed"
            for _ in range(PUBLISH_ATTEMPTS_MAX):
                if outcome and outcome[-1].startswith("finished"):
                    break
                try:  # the retry a client makes after an error: the same post again
                    report = await moments.publish(post)
                    outcome.append(f"finished ({report.audience})")
                except (MomentsError, Unavailable) as error:
                    outcome.append(f"cut short: {error}")
            print("publish attempts:", outcome)
            assert outcome[-1] == f"finished ({FRIENDS})"
            assert await _timeline_counts(client, friends, post) == [1] * FRIENDS
            page = await moments.timeline(friends[-1])
            assert [view.post.post_id for view in page.posts] == [post.post_id]
    finally:
        if not cluster.is_running(victim):
            await cluster.astart(victim)


async def test_demo_transcript(cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert await moments_demo(cluster.addresses, cluster.secret, CLIENT_TIMEOUT_S) == 0
    transcript = capsys.readouterr().out
    assert "fanned out to 2 timelines" in transcript
    assert "dave may not comment" in transcript
    assert "dave's timeline (0 posts" in transcript

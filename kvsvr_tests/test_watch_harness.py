"""The harness's watch workload: watchers follow every key through a node
kill and a partition and their streams check out against the history; a run
whose watch streams break a rule is an anomaly; bad settings are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from jepsen_like.checker import LINEARIZABLE, NOT_LINEARIZABLE
from jepsen_like.harness import watchers as watchers_module
from jepsen_like.harness.run import RunConfig, run_test
from jepsen_like.harness.watchers import WATCHERS_PER_NODE_MAX, WatchRecorder


@pytest.mark.slow
async def test_watchers_stream_every_key_through_kills_and_partitions(tmp_path: Path) -> None:
    config = RunConfig(
        out_dir=tmp_path / "run",
        time_s=40.0,
        nemeses=("kill", "partition"),
        seed=3,
        watchers_per_node=1,
    )
    with trio.fail_after(600):
        result = await run_test(config)
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert result.valid and result.verdict == LINEARIZABLE, summary
    watch = result.summary["watch"]
    assert watch["problems"] == [], summary
    assert watch["events"] > 100, summary
    assert (tmp_path / "run" / "watch.jsonl").stat().st_size > 0
    assert "watchers:" in summary


@pytest.mark.slow
async def test_a_watcher_that_drops_events_makes_the_run_an_anomaly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A planted bug in the watcher (every 7th event of a key never recorded,
    as a node that skipped a version would look) is caught by the checker."""
    original = WatchRecorder._record
    seen: dict[object, int] = {}

    def dropping(self: WatchRecorder, event: dict[str, object]) -> None:
        key = (event["watcher"], event["key"])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] % 7 == 0 and not event.get("reset"):
            return
        original(self, event)

    monkeypatch.setattr(watchers_module.WatchRecorder, "_record", dropping)
    config = RunConfig(out_dir=tmp_path / "run", time_s=20.0, nemeses=(), watchers_per_node=1)
    with trio.fail_after(600):
        result = await run_test(config)
    assert result.verdict == NOT_LINEARIZABLE
    assert any("follows version" in p for p in result.summary["watch"]["problems"])


def test_bad_watcher_settings_are_refused(tmp_path: Path) -> None:
    for count in (0, WATCHERS_PER_NODE_MAX + 1):
        with pytest.raises(ValueError, match="watchers per node"):
            WatchRecorder(count)
    config = RunConfig(out_dir=tmp_path / "kv", workload="kv", watchers_per_node=1)
    with pytest.raises(ValueError, match="register workload"):
        trio.run(run_test, config)

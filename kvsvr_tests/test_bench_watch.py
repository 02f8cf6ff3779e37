"""`bench.watch`: both modes deliver every message and report their figures;
bad arguments are refused before a cluster starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import watch

pytestmark = pytest.mark.slow


def test_both_modes_deliver_every_message_and_write_a_report(tmp_path: Path) -> None:
    argv = ["--receivers", "12", "--messages", "6", "--gap-ms", "20", "--idle-s", "0.5"]
    assert watch.main([*argv, "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("watch-*.json")
    results = json.loads(report.read_text())["results"]
    assert [r["mode"] for r in results] == list(watch.MODES)
    for result in results:
        assert result["messages"] == 6  # every message woke its receiver, once
        assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]


@pytest.mark.parametrize("argv", [["--receivers", "0"], ["--idle-s", "0"], ["--modes", "x"]])
def test_bad_arguments_are_refused(argv: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        watch.main([*argv, "--out", str(tmp_path)])

"""`--log-format json`: a real node's log is one JSON object per line with
time, level, node, event and fields; the formatter's own rules; text stays
the default."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime
from pathlib import Path

import pytest

from kvsvr import cli, logs
from kvsvr_tests.cluster_util import LocalCluster

# The line kvsvr.local writes into a node's log before each start (not node output).
START_MARKER = "=== kvsvr.local: start"


def test_a_node_started_with_json_logs_writes_one_object_per_line(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, nodes=1, replication=1) as cluster:
        cluster.start("n1", extra_args=("--log-format", "json"))
        cluster.wait_ready(["n1"])
        cluster.stop("n1")
        lines = [
            line
            for line in cluster.log_text("n1").splitlines()
            if line and not line.startswith(START_MARKER)
        ]
    assert len(lines) >= 3, lines
    events = []
    for line in lines:
        record = json.loads(line)
        assert list(record) == list(logs.JSON_KEYS), record
        assert record["node"] == "n1"
        assert record["level"] in ("INFO", "WARNING", "ERROR")
        assert datetime.fromisoformat(record["time"]).tzinfo is not None
        assert isinstance(record["fields"], dict) and record["fields"]["logger"].startswith("kvsvr")
        events.append(record["event"])
    assert any(event.startswith("node n1 serving on") for event in events), events
    assert any("stopped; storage closed" in event for event in events), events


def test_text_is_the_default_format(tmp_path: Path) -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["node", "--config", "c", "--id", "n1"]).log_format == "text"
    assert parser.parse_args(["up", "--log-format", "json"]).log_format == "json"
    assert cli.main(["node", "--config", "c", "--id", "n1", "--log-format", "xml"]) == 2


def _formatted(log_format: str, emit: object) -> str:
    stream = io.StringIO()
    logs.configure("n7", log_format, stream)
    try:
        assert callable(emit)
        emit(logging.getLogger("kvsvr.test"))
    finally:
        logs.configure("n7", logs.TEXT)
    return stream.getvalue()


def test_extra_values_and_tracebacks_go_under_fields() -> None:
    def emit(log: logging.Logger) -> None:
        log.warning("peer %s slow", "n2", extra={"peer": "n2", "delay_ms": 40})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")

    first, second = (json.loads(line) for line in _formatted(logs.JSON, emit).splitlines())
    assert first["event"] == "peer n2 slow" and first["level"] == "WARNING"
    assert first["fields"] == {"logger": "kvsvr.test", "peer": "n2", "delay_ms": 40}
    assert second["level"] == "ERROR" and "RuntimeError: boom" in second["fields"]["exc_info"]


def test_text_lines_keep_their_shape() -> None:
    text = _formatted(logs.TEXT, lambda log: log.info("hello %d", 1))
    assert text.rstrip().endswith(" n7 INFO kvsvr.test: hello 1"), text


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        logs.configure("n1", "xml")

"""Readers and writers: JSONL and EDN round trips, the two corpus formats."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from jepsen_like.checker import (
    Keyword,
    Op,
    RegisterModel,
    check,
    detect_format,
    parse_edn,
    read_history,
    read_jepsen_etcd,
    read_jsonl,
    read_kv_edn,
    to_edn,
    write_edn,
    write_jsonl,
)
from jepsen_like.checker.gen import sequential_history

ETCD_SAMPLE = """\
INFO  jepsen.core - Running test with nemesis partition
INFO  jepsen.util - 0\t:invoke\t:read\tnil
INFO  jepsen.util - 1\t:invoke\t:cas\t[1 4]
INFO  jepsen.util - 2   :invoke :write  3
INFO  jepsen.util - 0\t:ok\t:read\tnil
INFO  jepsen.util - :nemesis\t:info\t:start\tnil
INFO  jepsen.util - 1\t:fail\t:cas\t[1 4]
INFO  jepsen.util - 2\t:info\t:write\t:timed-out
INFO  jepsen.util - 3\t:invoke\t:read\tnil
INFO  jepsen.util - 3\t:fail\t:read\t:timed-out
\tat clojure.lang.AFn.run(AFn.java:22)
"""

KV_SAMPLE = """\
{:process 0, :type :invoke, :f :append, :key "4", :value "x 0 3 y"}
{:process 1, :type :invoke, :f :get, :key "4", :value nil}
{:process 0, :type :ok, :f :append, :key "4", :value "x 0 3 y"}
{:process 1, :type :ok, :f :get, :key "4", :value ""}
{:process :nemesis, :type :info, :f :start, :value nil}
"""


def _mixed_history() -> list[Op]:
    return [
        Op(0, "invoke", "write", "k", 1, 10, 0, {"consistency": "quorum"}),
        Op(0, "ok", "write", "k", 1, 20, 1, {"version": 3}),
        Op(1, "invoke", "cas", "k", [1, "two"], 30, 2),
        Op(1, "info", "cas", "k", [1, "two"], 40, 3, {"error": 'timed out "quote"\n'}),
        Op(2, "invoke", "read", None, None, 50, 4),
        Op(2, "ok", "read", None, {"a": [1, 2.5, None, True]}, 60, 5),
        Op(3, "invoke", "append", "k2", Keyword("kw"), 70, 6),
    ]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    history = _mixed_history()
    path = tmp_path / "h.jsonl"
    write_jsonl(history, path)
    assert read_jsonl(path) == history
    assert detect_format(path) == "jsonl"


def test_edn_round_trip(tmp_path: Path) -> None:
    history = _mixed_history()
    path = tmp_path / "h.edn"
    write_edn(history, path)
    back = read_kv_edn(path)
    assert back == history
    assert isinstance(back[6].value, Keyword)
    assert detect_format(path) == "kv"
    text = path.read_text()
    assert text.splitlines()[0] == (
        '{:process 0, :type :invoke, :f :write, :key "k", :value 1, :time 10, :index 0, '
        ':consistency "quorum"}'
    )


def test_generated_history_round_trips_keep_the_verdict(tmp_path: Path) -> None:
    history = sequential_history(random.Random(7), 300, keys=3, processes=6, info_rate=0.1)
    write_jsonl(history, tmp_path / "h.jsonl")
    write_edn(history, tmp_path / "h.edn")
    for name in ("h.jsonl", "h.edn"):
        back, _ = read_history(tmp_path / name)
        assert back == history
        assert check(back, RegisterModel()).verdict == "linearizable"


def test_read_jepsen_etcd(tmp_path: Path) -> None:
    path = tmp_path / "etcd_999.log"
    path.write_text(ETCD_SAMPLE)
    ops = read_jepsen_etcd(path)
    assert [(o.process, o.type, o.f, o.value) for o in ops] == [
        (0, "invoke", "read", None),
        (1, "invoke", "cas", [1, 4]),
        (2, "invoke", "write", 3),
        (0, "ok", "read", None),
        (1, "fail", "cas", [1, 4]),
        (2, "info", "write", None),
        (3, "invoke", "read", None),
        (3, "info", "read", None),  # :fail :read :timed-out: result unknown
    ]
    assert ops[5].extra == {"error": "timed-out"}
    assert all(o.key is None and o.time_ns == o.index == i for i, o in enumerate(ops))
    assert detect_format(path) == "jepsen-etcd"


def test_read_kv_edn(tmp_path: Path) -> None:
    path = tmp_path / "c01-ok.txt"
    path.write_text(KV_SAMPLE)
    ops = read_kv_edn(path)
    assert len(ops) == 4  # the nemesis event is skipped
    assert ops[3] == Op(1, "ok", "get", "4", "", 3, 3)
    assert detect_format(path) == "kv"


def test_parse_edn_forms() -> None:
    forms = parse_edn('{:a [1 -2 3.5 "s\\"t\\n"], :b #{nil}} (true false) ; comment\n:k sym')
    assert forms == [
        {"a": [1, -2, 3.5, 's"t\n'], "b": {None}},
        [True, False],
        "k",
        "sym",
    ]
    assert to_edn({"a": [1, None, "x"]}) == '{"a" [1 nil "x"]}'
    with pytest.raises(ValueError):
        parse_edn("{:a 1")
    with pytest.raises(ValueError):
        parse_edn("[1 2}")


def test_bad_input_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"process": 0, "type": "invoke"}\n')
    with pytest.raises(ValueError, match="missing field"):
        read_jsonl(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError):
        read_jsonl(path)


def test_jsonl_skips_nemesis_events(tmp_path: Path) -> None:
    """The harness writes fault events (process "nemesis") into the history."""
    path = tmp_path / "history.jsonl"
    path.write_text(
        '{"process": "nemesis", "type": "info", "f": "kill", "value": "n1", "time": 1}\n'
        '{"process": 0, "type": "invoke", "f": "read", "key": "k", "value": null, "time": 2}\n'
        '{"process": 0, "type": "ok", "f": "read", "key": "k", "value": null, "time": 3}\n'
    )
    ops = read_jsonl(path)
    assert [op.process for op in ops] == [0, 0]

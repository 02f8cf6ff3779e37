"""The HTML report for a violation: self-contained, and says what broke."""

from __future__ import annotations

import random
import re
from pathlib import Path

from jepsen_like.checker import NOT_LINEARIZABLE, RegisterModel, check, write_html_report
from jepsen_like.checker.gen import corrupt_read, sequential_history


def test_report_for_violation_is_self_contained(tmp_path: Path) -> None:
    result = check(
        corrupt_read(random.Random(1), sequential_history(random.Random(1), 200, keys=2)) or [],
        RegisterModel(),
    )
    assert result.verdict == NOT_LINEARIZABLE
    (bad_key,) = result.bad_keys
    path = write_html_report(result, tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"<(link|img|iframe)\b|\bsrc\s*=|@import|url\((?!#)", text)
    assert "<svg" in text and "<style>" in text
    key_result = result.keys[bad_key]
    assert f"Key {bad_key}" in text
    assert f"op {key_result.failed_op}" in text
    assert "cannot be linearized" in text
    # the model state after each prefix operation is in the table
    assert text.count("<tr data-op=") >= len(key_result.prefix)


def test_report_window_for_a_long_key(tmp_path: Path) -> None:
    result = check(
        corrupt_read(random.Random(2), sequential_history(random.Random(2), 2000, keys=1)) or [],
        RegisterModel(),
    )
    assert result.verdict == NOT_LINEARIZABLE
    text = write_html_report(result, tmp_path / "long.html").read_text(encoding="utf-8")
    assert "around the failure" in text
    assert "http://" not in text and "https://" not in text


def test_report_for_linearizable_result(tmp_path: Path) -> None:
    result = check(sequential_history(random.Random(3), 50), RegisterModel())
    text = write_html_report(result, tmp_path / "ok.html").read_text(encoding="utf-8")
    assert "nothing to explain" in text

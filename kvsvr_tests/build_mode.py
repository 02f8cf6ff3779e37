"""Which build of kvsvr the tests run against: pure Python (the default) or
with its hot modules compiled by mypyc (`python3 dev.py compile`; CI runs
the whole suite both ways, see .ci/run).

Compiled code binds module globals and methods when it is built, so a test
that swaps one in with `monkeypatch` would see no effect there; such tests
are marked `pure_python_only` and run in the pure-Python suite, which runs
every test."""

from __future__ import annotations

import pytest

from kvsvr import _build

COMPILED = bool(_build.compiled_modules())

pure_python_only = pytest.mark.skipif(
    COMPILED,
    reason="swaps a module global or method with monkeypatch, which compiled code does not "
    "look up; this test runs in the pure-Python suite",
)

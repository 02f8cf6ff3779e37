"""The compiled build (`python3 dev.py compile`) is never used stale: a
compiled module whose source changed since it was compiled stops
`import kvsvr` with a clear error."""

from __future__ import annotations

import hashlib
import json
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from kvsvr import _build


def _package(tmp_path: Path) -> Path:
    package = tmp_path / "kvsvr"
    (package / "node").mkdir(parents=True)
    (package / "node" / "server.py").write_text("x = 1\n")
    (package / "node" / "plain.py").write_text("y = 2\n")
    return package


def _compile(package: Path) -> None:
    """What `dev.py compile` leaves: an extension beside the source, and the manifest."""
    source = package / "node" / "server.py"
    source.with_name("server" + EXTENSION_SUFFIXES[0]).write_bytes(b"")
    (package / _build.MANIFEST.name).write_text(
        json.dumps({"kvsvr/node/server.py": hashlib.sha256(source.read_bytes()).hexdigest()})
    )


def test_a_pure_python_tree_passes(tmp_path: Path) -> None:
    package = _package(tmp_path)
    assert _build.compiled_sources(package) == []
    _build.check_fresh(package)


def test_a_fresh_build_passes_and_names_its_modules(tmp_path: Path) -> None:
    package = _package(tmp_path)
    _compile(package)
    assert _build.compiled_sources(package) == [package / "node" / "server.py"]
    _build.check_fresh(package)


def test_an_edited_source_is_refused(tmp_path: Path) -> None:
    package = _package(tmp_path)
    _compile(package)
    (package / "node" / "server.py").write_text("x = 2\n")
    with pytest.raises(_build.StaleBuild, match=r"kvsvr/node/server\.py.*dev\.py compile"):
        _build.check_fresh(package)


def test_a_build_without_its_manifest_is_refused(tmp_path: Path) -> None:
    package = _package(tmp_path)
    _compile(package)
    (package / _build.MANIFEST.name).unlink()
    with pytest.raises(_build.StaleBuild):
        _build.check_fresh(package)


def test_this_process_runs_the_build_it_reports() -> None:
    """compiled_modules() is what Python imported: extension modules exactly
    for the modules it names."""
    import kvsvr.net.framing
    import kvsvr.protocol.coordinator

    compiled = _build.compiled_modules()
    for module in (kvsvr.net.framing, kvsvr.protocol.coordinator):
        is_extension = any(str(module.__file__).endswith(s) for s in EXTENSION_SUFFIXES)
        assert is_extension == (module.__name__ in compiled)

"""Which build of kvsvr is running: pure Python, or with its hot modules
compiled by mypyc (`python3 dev.py compile`).

A compiled module is an extension module beside its source, and Python
imports it instead of the source. An edit to the source after compiling
would then be silently ignored, so `check_fresh` (run when this module is
imported, which `import kvsvr` does before anything else of kvsvr) refuses
to go on when a compiled module's source no longer matches the hash
`dev.py compile` recorded.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
MANIFEST = PACKAGE / "compiled-sources.json"


class StaleBuild(ImportError):
    """A compiled module no longer matches its source."""


def compiled_sources(package: Path = PACKAGE) -> list[Path]:
    """The sources (under kvsvr/) that have a compiled module beside them."""
    found: list[Path] = []
    for suffix in EXTENSION_SUFFIXES:
        for extension in package.rglob(f"*{suffix}"):
            source = extension.with_name(extension.name[: -len(suffix)] + ".py")
            if source.exists():
                found.append(source)
    return sorted(found)


def compiled_modules() -> list[str]:
    """Dotted names of the modules this process runs compiled, e.g.
    ["kvsvr.node.server", ...]; [] for a pure-Python build."""
    return list(_compiled_modules())


@functools.cache
def _compiled_modules() -> tuple[str, ...]:
    # Looked up once: the build a process runs does not change under it
    # (the node's status asks for it on every call).
    root = PACKAGE.parent
    return tuple(
        ".".join(source.relative_to(root).with_suffix("").parts) for source in compiled_sources()
    )


def describe(compiled: list[str]) -> str:
    """How logs and benchmarks name a build, from its `compiled_modules()`."""
    return f"compiled with mypyc ({len(compiled)} modules)" if compiled else "pure Python"


def check_fresh(package: Path = PACKAGE) -> None:
    """Raise StaleBuild when a compiled module's source changed since it was
    compiled (or was compiled by something other than `dev.py compile`)."""
    sources = compiled_sources(package)
    if not sources:
        return
    try:
        recorded = json.loads((package / MANIFEST.name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = {}
    root = package.parent
    stale = [
        source.relative_to(root).as_posix()
        for source in sources
        if recorded.get(source.relative_to(root).as_posix())
        != hashlib.sha256(source.read_bytes()).hexdigest()
    ]
    if stale:
        raise StaleBuild(
            f"compiled kvsvr modules are older than their sources: {', '.join(stale)}; "
            "run `python3 dev.py compile` again, or `python3 dev.py uncompile` for pure Python"
        )


check_fresh()

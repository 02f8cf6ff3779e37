"""No import loop between kvsvr's modules, not even one that only the type
checker follows (`if TYPE_CHECKING:`) or that an import inside a function
hides until it runs: a loop means two modules that cannot be read, tested or
compiled one without the other.

The graph is built from the source with `ast`, without importing anything:
a module depends on every kvsvr module it names in an `import` or a `from
... import` anywhere in its body. `from kvsvr.x import y` depends on the
module `kvsvr.x.y` when there is one, else on `kvsvr.x`; relative imports are
resolved against the importing module's package. A package is the module of
its `__init__.py`, and importing a submodule is not counted as importing its
package (every import of `kvsvr.net.framing` runs `kvsvr/net/__init__.py`
first; counting that would make a loop of every package that re-exports its
submodules)."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kvsvr"

Graph = Mapping[str, Iterable[str]]


def module_names(package: Path) -> dict[str, Path]:
    """Every module under `package` by dotted name (a package by its own name)."""
    modules: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may refer to, best guess first."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        # Relative: level 1 is the importing module's own package.
        package_parts = module.split(".") if is_package else module.split(".")[:-1]
        base_parts = package_parts[: len(package_parts) - (node.level - 1)]
        base = ".".join([*base_parts, *([node.module] if node.module else [])])
    else:
        base = node.module or ""
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the kvsvr modules it imports, from every import statement in
    its source (module level, `if TYPE_CHECKING:` blocks, function bodies)."""
    modules = module_names(package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            if isinstance(node, ast.Import):
                targets = [t for t in _imported(node, name, is_package) if t in modules]
            else:
                # `from a import b`: the submodule a.b if it exists, else a itself.
                candidates = _imported(node, name, is_package)
                submodules = [t for t in candidates[:-1] if t in modules]
                base = candidates[-1]
                targets = submodules
                if len(submodules) < len(candidates) - 1 and base in modules:
                    targets = [*submodules, base]
            graph[name].update(t for t in targets if t != name)
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One import loop as a path that starts and ends at the same module
    (`[a, b, a]`), or None when the graph has none. Modules are visited in
    sorted order, so the answer does not change from run to run."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        # Iterative depth-first search; `path` is the chain from `start`.
        path: list[str] = [start]
        on_path = {start}
        children = [iter(sorted(graph.get(start, ())))]
        while children:
            child = next(children[-1], None)
            if child is None:
                children.pop()
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                continue
            if child in on_path:
                return [*path[path.index(child) :], child]
            if child in done:
                continue
            path.append(child)
            on_path.add(child)
            children.append(iter(sorted(graph.get(child, ()))))
    return None


# --- the finder, on graphs small enough to check by eye ----------------------


def test_the_finder_names_a_two_module_loop() -> None:
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_the_finder_names_a_longer_loop_behind_a_clean_branch() -> None:
    graph = {"a": {"b", "c"}, "b": set(), "c": {"d"}, "d": {"e"}, "e": {"c"}}
    assert find_cycle(graph) == ["c", "d", "e", "c"]


def test_the_finder_passes_a_graph_without_loops() -> None:
    # A diamond: d is reached twice, which is no loop.
    graph = {"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}
    assert find_cycle(graph) is None
    assert find_cycle({}) is None


def test_the_finder_names_a_self_import() -> None:
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


# --- the graph builder, on a package written for the test --------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_builder_follows_every_kind_of_import(tmp_path: Path) -> None:
    package = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.sub import a\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/a.py": "from . import b\nfrom .b import thing\n",
            "pkg/sub/b.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from pkg.c import C\n"
                "def late():\n"
                "    import pkg.d\n"
            ),
            "pkg/c.py": "from ..outside import nothing\nimport json\n",
            "pkg/d.py": "from pkg import sub\nfrom pkg.sub.a import name\n",
        },
    )
    assert import_graph(package) == {
        "pkg": {"pkg.sub.a"},
        "pkg.sub": set(),
        "pkg.sub.a": {"pkg.sub.b"},
        "pkg.sub.b": {"pkg.c", "pkg.d"},
        "pkg.c": set(),
        "pkg.d": {"pkg.sub", "pkg.sub.a"},
    }


def test_a_loop_only_the_type_checker_sees_is_found(tmp_path: Path) -> None:
    package = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import B\n",
            "pkg/b.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\n"
            ),
        },
    )
    assert find_cycle(import_graph(package)) == ["pkg.a", "pkg.b", "pkg.a"]


# --- kvsvr itself ----------------------------------------------------------------


def test_the_graph_covers_kvsvr() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) > 30
    assert {"kvsvr.errors", "kvsvr.protocol.state"} <= graph["kvsvr.storage.engine"]


def test_kvsvr_has_no_import_loop() -> None:
    cycle = find_cycle(import_graph(PACKAGE))
    if cycle is not None:
        pytest.fail("import loop: " + " -> ".join(cycle))

"""Every test is in exactly one layer (`kvsvr_tests/layers.py`): a new test
file fails here until the table names its layer."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from kvsvr_tests.layers import FILE_LAYERS, LAYERS, PROCESS, TEST_LAYERS, UNIT, layer_of

TESTS = Path(__file__).resolve().parent


def _test_files() -> set[str]:
    return {path.name for path in TESTS.glob("test_*.py")}


def _functions(file_name: str) -> set[str]:
    tree = ast.parse((TESTS / file_name).read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def test_every_test_file_has_a_layer() -> None:
    missing = sorted(_test_files() - FILE_LAYERS.keys())
    assert not missing, f"test files without a layer in kvsvr_tests/layers.py: {missing}"


def test_the_table_names_only_test_files_that_exist() -> None:
    assert not sorted(FILE_LAYERS.keys() - _test_files())


def test_every_exception_names_a_test_that_exists() -> None:
    for test, layer in TEST_LAYERS.items():
        file_name, function = test.split("::")
        assert file_name in FILE_LAYERS, test
        assert function in _functions(file_name), test
        assert layer != FILE_LAYERS[file_name], f"{test} is in its file's layer already"


def test_every_layer_is_a_registered_marker() -> None:
    assert set(FILE_LAYERS.values()) | set(TEST_LAYERS.values()) <= set(LAYERS)
    pyproject = tomllib.loads((TESTS.parent / "pyproject.toml").read_text(encoding="utf-8"))
    pytest_options = pyproject["tool"]["pytest"]["ini_options"]
    registered = {marker.split(":")[0] for marker in pytest_options["markers"]}
    assert set(LAYERS) <= registered
    assert "--strict-markers" in pytest_options["addopts"].split()


def test_a_test_that_starts_nodes_is_a_process_test_wherever_it_is() -> None:
    assert layer_of("test_storage.py", "test_anything", starts_nodes=False) == UNIT
    assert layer_of("test_storage.py", "test_anything", starts_nodes=True) == PROCESS
    assert layer_of("test_unknown.py", "test_anything", starts_nodes=False) is None
    for test, layer in TEST_LAYERS.items():
        file_name, function = test.split("::")
        assert layer_of(file_name, function, starts_nodes=False) == layer


def test_every_collected_test_carries_one_layer(request: pytest.FixtureRequest) -> None:
    for item in request.session.items:
        layers = [layer for layer in LAYERS if item.get_closest_marker(layer) is not None]
        assert len(layers) == 1, f"{item.nodeid}: layers {layers}"

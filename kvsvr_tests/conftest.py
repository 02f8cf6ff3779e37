"""Marks every test with its layer (`unit`, `simulation` or `process`, see
`kvsvr_tests/layers.py`), so that `pytest -m unit` (`python3 dev.py test
--layer unit`) runs one layer. A test file the table does not name gets no
layer; `test_layers.py` fails until it is added."""

from __future__ import annotations

import pytest

from kvsvr_tests.layers import layer_of


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        function = getattr(item, "originalname", item.name)
        slow = item.get_closest_marker("slow") is not None
        layer = layer_of(item.path.name, function, starts_nodes=slow)
        if layer is not None:
            item.add_marker(layer)

"""Config settings that no other test file owns: `unsafe_no_fsync`."""

from __future__ import annotations

import tomllib

import pytest

from kvsvr.cli import format_cluster_status
from kvsvr.config import ConfigError, local_cluster, parse_config, render_config


def _with_cluster_line(line: str) -> str:
    text = render_config(local_cluster(1, 7100))
    return text.replace("[cluster]\n", f"[cluster]\n{line}\n", 1)


def test_fsync_is_on_unless_the_config_says_otherwise() -> None:
    config = local_cluster(1, 7100)
    assert config.unsafe_no_fsync is False
    text = render_config(config)
    assert "unsafe_no_fsync" not in text  # never written by accident
    assert parse_config(tomllib.loads(text)).unsafe_no_fsync is False


def test_unsafe_no_fsync_parses_and_survives_a_round_trip() -> None:
    config = parse_config(tomllib.loads(_with_cluster_line("unsafe_no_fsync = true")))
    assert config.unsafe_no_fsync is True
    again = parse_config(tomllib.loads(render_config(config)))
    assert again == config


@pytest.mark.parametrize("value", ['"yes"', "1", "0", '"false"'])
def test_unsafe_no_fsync_must_be_a_boolean(value: str) -> None:
    with pytest.raises(ConfigError, match="unsafe_no_fsync must be true or false"):
        parse_config(tomllib.loads(_with_cluster_line(f"unsafe_no_fsync = {value}")))


def test_status_shows_a_node_that_does_not_fsync() -> None:
    base = {"node": "n1", "address": "127.0.0.1:7101", "zone": "z1", "health": "up"}
    safe, unsafe, old = format_cluster_status(
        [{**base, "fsync": True}, {**base, "fsync": False}, base]
    )[1:]
    assert "UNSAFE" not in safe and "UNSAFE" not in old
    assert unsafe.endswith("up, UNSAFE: no fsync")


def _one_node(**cluster: object) -> dict[str, object]:
    return {"cluster": cluster, "nodes": [{"id": "n1", "port": 7101}]}


def test_read_leases_are_on_by_default_and_survive_a_round_trip() -> None:
    config = parse_config(_one_node())
    assert config.read_leases and config.lease_s == 2.0 and config.clock_drift_max == 0.01
    timing = config.lease_timing
    assert timing is not None and timing.hold_s > timing.lease_s
    changed = parse_config(
        {
            **_one_node(read_leases=False, lease_s=0.5, clock_drift_max=0.05),
            "tables": [{"name": "default"}, {"name": "hot", "read_leases": False}],
        }
    )
    assert changed.lease_timing is None
    assert [t.read_leases for t in changed.tables] == [True, False]
    assert parse_config(tomllib.loads(render_config(changed))) == changed


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"read_leases": "yes"}, "read_leases must be true or false"),
        ({"lease_s": 0}, "lease_s must be between 0.01 and 60"),
        ({"lease_s": 61}, "lease_s must be between 0.01 and 60"),
        ({"lease_s": "2"}, "lease_s must be a number"),
        ({"lease_s": True}, "lease_s must be a number"),
        ({"clock_drift_max": 0.5}, "clock_drift_max must be at least 0 and below 0.5"),
        ({"clock_drift_max": -0.01}, "clock_drift_max must be at least 0 and below 0.5"),
    ],
)
def test_bad_lease_settings_are_refused_clearly(setting: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(_one_node(**setting))


def test_a_tables_read_leases_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match=r"tables\[1\]: read_leases must be true or false"):
        parse_config({**_one_node(), "tables": [{"name": "t", "read_leases": 1}]})

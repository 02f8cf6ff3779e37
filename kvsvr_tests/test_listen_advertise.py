"""A node binds its `listen` address and is known by its `advertise` address:
peers and clients dial the advertised one. 127.0.0.x are all loopback on
Linux, so three nodes advertising 127.0.0.2-4 stand in for three hosts."""

from __future__ import annotations

import dataclasses
import socket
import tomllib
from pathlib import Path

import pytest

import kvsvr
from kvsvr.config import ConfigError, NodeConfig, local_cluster, parse_config, render_config
from kvsvr.errors import Unavailable
from kvsvr.local import LocalCluster, local_config


def _advertised(config: kvsvr.ClusterConfig, listen_any: bool) -> kvsvr.ClusterConfig:
    """Node i advertises 127.0.0.(i+1) on its port, and listens on every
    address (`listen_any`) or on the advertised one only."""
    nodes: list[NodeConfig] = []
    for node in config.nodes:
        host = f"127.0.0.{node.index + 1}"
        listen = ("0.0.0.0" if listen_any else host, node.port)
        nodes.append(dataclasses.replace(node, host=host, listen=listen))
    return dataclasses.replace(config, nodes=tuple(nodes))


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        return False
    return True


def test_nodes_listening_on_any_address_are_reached_through_their_advertised_ones(
    tmp_path: Path,
) -> None:
    config = _advertised(local_config(3, secret="s", partitions=8), listen_any=True)
    with LocalCluster.create(tmp_path, config) as cluster:
        cluster.start_all()  # ready: every node sees its peers, dialed at 127.0.0.2-4
        assert cluster.addresses == [
            f"127.0.0.{i}:{n.port}" for i, n in zip((2, 3, 4), config.nodes, strict=True)
        ]
        with kvsvr.SyncClient([cluster.addresses[0]], secret="s") as client:
            for i in range(20):
                client.put(f"k{i}", b"v%d" % i)
            assert client.get("k7").value == b"v7"  # type: ignore[union-attr]
            status = client.status("n2")
            assert status["address"] == cluster.addresses[1]
        port = config.nodes[0].port
        assert _reachable("127.0.0.1", port)  # bound on every address, as listen says
        assert f"serving on 0.0.0.0:{port} (advertised as 127.0.0.2:{port})" in cluster.log_text(
            "n1"
        )


def test_a_node_binds_only_its_listen_address(tmp_path: Path) -> None:
    config = _advertised(local_config(3, partitions=8), listen_any=False)
    with LocalCluster.create(tmp_path, config) as cluster:
        cluster.start_all()  # peers can only have dialed the advertised addresses
        port = config.nodes[0].port
        assert _reachable("127.0.0.2", port)
        assert not _reachable("127.0.0.1", port)
        with kvsvr.SyncClient(cluster.addresses[1:2]) as client:
            client.put("k", b"v")
            assert client.get("k").value == b"v"  # type: ignore[union-attr]
        with pytest.raises(Unavailable):
            kvsvr.SyncClient([f"127.0.0.1:{port}"], timeout_s=5)


def test_advertise_and_listen_parse_and_survive_a_round_trip() -> None:
    text = render_config(local_cluster(2, 7100)).replace(
        'host = "127.0.0.1"\nport = 7101\n',
        'advertise = "10.0.0.5:7201"\nlisten = "0.0.0.0:7101"\n',
    )
    config = parse_config(tomllib.loads(text))
    first, second = config.nodes
    assert (first.host, first.port, first.listen_address) == ("10.0.0.5", 7201, ("0.0.0.0", 7101))
    assert second.listen is None and second.listen_address == ("127.0.0.1", 7102)
    assert parse_config(tomllib.loads(render_config(config))) == config
    plain = local_cluster(2, 7100)  # configs without either read as before
    assert parse_config(tomllib.loads(render_config(plain))).nodes == plain.nodes


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ('advertise = "10.0.0.5:7201"\nport = 7101\n', "either 'advertise' or 'host' and 'port'"),
        ('advertise = "10.0.0.5"\n', "expected 'host:port'"),
        ('port = 7101\nlisten = "0.0.0.0:99999"\n', "bad port"),
        ("port = 7101\nlisten = 7101\n", "expected 'host:port'"),
        ('port = 7101\nhost = ""\n', "'host' must be a non-empty string"),
        ('port = 7101\ntls_cert = "n1.pem"\n', "no \\[tls\\]"),
    ],
)
def test_bad_addresses_are_refused_clearly(lines: str, error: str) -> None:
    text = render_config(local_cluster(1, 7100)).replace('host = "127.0.0.1"\nport = 7101\n', lines)
    with pytest.raises(ConfigError, match=error):
        parse_config(tomllib.loads(text))


def test_tls_settings_parse_relative_to_the_config_and_survive_a_round_trip(
    tmp_path: Path,
) -> None:
    text = render_config(local_cluster(2, 7100)) + (
        '[tls]\nca = "tls/ca.pem"\ncert = "tls/node.pem"\nkey = "tls/node.key"\n'
    )
    text = text.replace(
        "port = 7102\n", 'port = 7102\ntls_cert = "/etc/n2.pem"\ntls_key = "/etc/n2.key"\n'
    )
    config = parse_config(tomllib.loads(text), source=tmp_path / "cluster.toml")
    assert config.node_tls_files("n1") == (
        tmp_path / "tls/ca.pem",
        tmp_path / "tls/node.pem",
        tmp_path / "tls/node.key",
    )
    assert config.node_tls_files("n2") == (
        tmp_path / "tls/ca.pem",
        Path("/etc/n2.pem"),
        Path("/etc/n2.key"),
    )
    again = parse_config(tomllib.loads(render_config(config)), source=tmp_path / "cluster.toml")
    assert again == config
    for bad, error in (
        ('[tls]\ncert = "a"\nkey = "b"\n', "missing 'ca'"),
        ('[tls]\nca = "a"\n', "no certificate and key"),
        ('[tls]\nca = "a"\ncert = "b"\nkey = "c"\nclient_cert = "d"\n', "both client_cert"),
        ('[tls]\nca = "a"\ncert = "b"\nkey = "c"\ncafile = "d"\n', "unknown keys"),
    ):
        with pytest.raises(ConfigError, match=error):
            parse_config(tomllib.loads(render_config(local_cluster(1, 7100)) + bad))

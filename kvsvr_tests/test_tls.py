"""TLS on client and peer links (`kvsvr.net.tls`): a TLS cluster serves; a
plain client, a client trusting another CA, a client with a certificate from
another CA or with none are each refused with an error that says why, and
the node logs why; nothing they send is applied. Certificates come from
`trustme`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme

import kvsvr
from kvsvr import cli
from kvsvr.config import ConfigError, TLSConfig
from kvsvr.errors import AuthenticationFailed, InvalidRequest, Unavailable
from kvsvr.local import LocalCluster, local_config
from kvsvr.net import connect, serve
from kvsvr.net.auth import NONCE_BYTES, is_tls_notice
from kvsvr.net.framing import FrameDecoder, encode_frame
from kvsvr.net.messages import encode_request
from kvsvr.net.stream import receive_frame
from kvsvr.net.tls import TLSOptions, client_context, server_context
from kvsvr.tls import with_local_tls
from kvsvr_tests.test_rpc import RecordingHandler

SECRET = b"tls-test-secret"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The cluster's CA with node and client certificates, and a stranger CA
    with a client certificate of its own."""
    directory = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    files = {"ca": directory / "ca.pem", "stranger_ca": directory / "stranger-ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    stranger.cert_pem.write_to_path(str(files["stranger_ca"]))
    for name, issuer, names in (
        ("node", ca, ["127.0.0.1", "localhost"]),
        ("client", ca, ["kvsvr-client"]),
        ("stranger", stranger, ["kvsvr-client"]),
    ):
        certificate = issuer.issue_cert(*names)
        files[f"{name}_cert"] = directory / f"{name}.pem"
        files[f"{name}_key"] = directory / f"{name}.key"
        certificate.cert_chain_pems[0].write_to_path(str(files[f"{name}_cert"]))
        certificate.private_key_pem.write_to_path(str(files[f"{name}_key"]))
    return files


def _client_options(
    pki: dict[str, Path], ca: str = "ca", cert: str | None = "client"
) -> TLSOptions:
    if cert is None:
        return TLSOptions(pki[ca])
    return TLSOptions(pki[ca], pki[f"{cert}_cert"], pki[f"{cert}_key"])


async def _serving(nursery: trio.Nursery, pki: dict[str, Path], *, tls: bool = True) -> int:
    context = server_context(pki["ca"], pki["node_cert"], pki["node_key"]) if tls else None
    port: int = await nursery.start(
        partial(serve, "127.0.0.1", 0, RecordingHandler(), secret=SECRET, tls=context)
    )
    return port


async def test_a_tls_connection_carries_requests(pki: dict[str, Path]) -> None:
    async with trio.open_nursery() as nursery:
        port = await _serving(nursery, pki)
        context = client_context(_client_options(pki))
        connection = await connect(
            "127.0.0.1", port, secret=SECRET, connect_timeout_s=10, tls=context
        )
        async with connection:
            replies = [await connection.request("echo", [i, b"x" * i]) for i in range(50)]
            assert replies == [[i, b"x" * i] for i in range(50)]
            big = b"y" * 3_000_000  # many TLS records in one frame
            assert await connection.request("echo", big) == big
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("options", "error", "says", "node_logs"),
    [
        (None, AuthenticationFailed, "the node expects TLS", "this node expects TLS"),
        (("stranger_ca", "client"), AuthenticationFailed, "not trusted", "does not trust this"),
        (("ca", "stranger"), Unavailable, "refuses this client's certificate", "handshake failed"),
        (("ca", None), Unavailable, "refuses this client's certificate", "handshake failed"),
    ],
    ids=["plain client", "client trusts another CA", "client cert of another CA", "no cert"],
)
async def test_a_tls_node_refuses_a_client_it_cannot_trust_and_says_why(
    pki: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
    options: tuple[str, str | None] | None,
    error: type[Exception],
    says: str,
    node_logs: str,
) -> None:
    caplog.set_level(logging.INFO, logger="kvsvr.net.serving")
    logged = trio.Event()

    class SetOnRefusal(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "refused" in record.getMessage():
                logged.set()

    handler = SetOnRefusal()
    logging.getLogger("kvsvr.net.serving").addHandler(handler)
    try:
        async with trio.open_nursery() as nursery:
            port = await _serving(nursery, pki)
            context = None if options is None else client_context(_client_options(pki, *options))
            with pytest.raises(error, match=says):
                await connect("127.0.0.1", port, secret=SECRET, connect_timeout_s=10, tls=context)
            with trio.fail_after(10):
                await logged.wait()
            nursery.cancel_scope.cancel()
    finally:
        logging.getLogger("kvsvr.net.serving").removeHandler(handler)
    assert "refused 127.0.0.1:" in caplog.text and node_logs in caplog.text


async def test_plain_requests_sent_past_the_tls_notice_reach_no_handler(
    pki: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A plain client that ignores the notice and sends an open cluster's
    login and a request anyway: the node refuses it, and nothing is handled."""
    caplog.set_level(logging.INFO, logger="kvsvr.net.serving")
    handler = RecordingHandler()
    context = server_context(pki["ca"], pki["node_cert"], pki["node_key"])
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(serve, "127.0.0.1", 0, handler, secret=None, tls=context)
        )
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(10):
            assert is_tls_notice(await receive_frame(stream, FrameDecoder()))
        login = encode_frame(["auth", bytes(NONCE_BYTES), b""])
        await stream.send_all(login + encode_request(1, "echo", "sent in plain TCP"))
        with trio.move_on_after(10):  # a node that took the request would keep it open
            try:
                while await stream.receive_some():  # until the node closes it
                    pass
            except trio.BrokenResourceError:
                pass  # or resets it
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert handler.requests == []
    assert "it does not speak TLS" in caplog.text


async def test_a_tls_client_refuses_a_plain_node_and_says_why(pki: dict[str, Path]) -> None:
    async with trio.open_nursery() as nursery:
        port = await _serving(nursery, pki, tls=False)
        context = client_context(_client_options(pki))
        with pytest.raises(AuthenticationFailed, match="the node does not use TLS"):
            await connect("127.0.0.1", port, secret=SECRET, connect_timeout_s=10, tls=context)
        nursery.cancel_scope.cancel()


async def test_a_node_certificate_must_name_the_address_dialed(pki: dict[str, Path]) -> None:
    async with trio.open_nursery() as nursery:
        port = await _serving(nursery, pki)
        context = client_context(_client_options(pki))
        with pytest.raises(AuthenticationFailed, match="not trusted"):
            await connect(
                "127.0.0.1",
                port,
                secret=SECRET,
                connect_timeout_s=10,
                tls=context,
                tls_server_name="10.9.9.9",
            )
        nursery.cancel_scope.cancel()


def test_bad_tls_options_are_refused_before_connecting(tmp_path: Path) -> None:
    async def attempt(tls: object) -> None:
        async with kvsvr.connect(["127.0.0.1:1"], tls=tls):  # type: ignore[arg-type]
            pass

    with pytest.raises(InvalidRequest, match="no such file"):
        trio.run(attempt, TLSOptions(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(InvalidRequest, match="cannot be loaded"):
        trio.run(attempt, TLSOptions(tmp_path / "junk.pem"))
    with pytest.raises(InvalidRequest, match="TLSOptions"):
        trio.run(attempt, "ca.pem")


@pytest.fixture(scope="module")
def tls_cluster(
    pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    config = local_config(3, secret="s", partitions=8)
    tls = TLSConfig(
        ca=pki["ca"],
        cert=pki["node_cert"],
        key=pki["node_key"],
        client_cert=pki["client_cert"],
        client_key=pki["client_key"],
    )
    config = dataclasses.replace(config, tls=tls)
    with LocalCluster.create(tmp_path_factory.mktemp("tls-cluster"), config) as cluster:
        cluster.start_all()
        yield cluster


def test_a_tls_cluster_serves_and_refuses_plain_clients(
    tls_cluster: LocalCluster, pki: dict[str, Path]
) -> None:
    options = _client_options(pki)
    with kvsvr.SyncClient(tls_cluster.addresses, secret="s", tls=options) as client:
        for i in range(30):  # keys on every node's partitions: peer links carry TLS too
            client.put(f"k{i}", b"v%d" % i)
        assert [client.get(f"k{i}").value for i in range(30)] == [  # type: ignore[union-attr]
            b"v%d" % i for i in range(30)
        ]
    with pytest.raises(AuthenticationFailed, match="expects TLS"):
        kvsvr.SyncClient(tls_cluster.addresses, secret="s", timeout_s=10)
    with pytest.raises(AuthenticationFailed, match="not trusted"):
        kvsvr.SyncClient(
            tls_cluster.addresses, secret="s", tls=_client_options(pki, "stranger_ca"), timeout_s=10
        )
    with kvsvr.SyncClient(tls_cluster.addresses, secret="s", tls=options) as client:
        assert client.get("k0").value == b"v0"  # type: ignore[union-attr]
    log = tls_cluster.log_text("n1")
    assert "with TLS" in log
    assert "this node expects TLS" in log


def test_a_local_cluster_with_its_own_ca_serves(tmp_path: Path) -> None:
    """What `kvsvr up --tls` makes: a CA and per-node and client certificates."""
    config = with_local_tls(local_config(3, partitions=8), tmp_path / "tls")
    assert (tmp_path / "tls" / "n1.key").stat().st_mode & 0o077 == 0
    with LocalCluster.create(tmp_path, config) as cluster:
        cluster.start_all()
        assert cluster.tls is not None
        with kvsvr.SyncClient(cluster.addresses, tls=cluster.tls) as client:
            for i in range(10):
                client.put(f"k{i}", b"v")
            assert client.get("k9").value == b"v"  # type: ignore[union-attr]


def test_the_cli_connects_with_tls_flags_or_the_configs_tls(
    tls_cluster: LocalCluster, pki: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = ["--cluster", tls_cluster.addresses[0], "--secret", "s"]
    flags = ["--cacert", str(pki["ca"]), "--cert", str(pki["client_cert"])]
    flags += ["--key", str(pki["client_key"])]
    assert cli.main(["put", *cluster, *flags, "cli-key", "v1"]) == cli.EXIT_OK
    config = ["--config", str(tls_cluster.config_path)]
    assert cli.main(["get", *config, "cli-key"]) == cli.EXIT_OK  # [tls]'s client certificate
    assert "v1" in capsys.readouterr().out
    assert cli.main(["get", *cluster, "cli-key"]) == cli.EXIT_ERROR
    assert "the node expects TLS" in capsys.readouterr().err
    assert cli.main(["get", *cluster, "--cert", str(pki["client_cert"]), "k"]) == cli.EXIT_USAGE
    assert "--cert and --key need --cacert" in capsys.readouterr().err
    half = ["--cacert", str(pki["ca"]), "--cert", str(pki["client_cert"])]
    assert cli.main(["get", *cluster, *half, "k"]) == cli.EXIT_USAGE
    assert "give --cert and --key together" in capsys.readouterr().err


def test_a_backup_of_a_tls_cluster_travels_over_tls(
    tls_cluster: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ["--config", str(tls_cluster.config_path)]
    assert cli.main(["put", *config, "backed-up", "v1"]) == cli.EXIT_OK
    out = tmp_path / "backup"
    assert cli.main(["backup", *config, "--out", str(out)]) == cli.EXIT_OK
    assert cli.main(["verify-backup", str(out)]) == cli.EXIT_OK
    plain = ["--cluster", tls_cluster.addresses[0], "--secret", "s"]
    assert cli.main(["backup", *plain, "--out", str(tmp_path / "plain")]) != cli.EXIT_OK
    assert "expects TLS" in capsys.readouterr().err


def test_up_with_tls_writes_a_ca_and_certificates_beside_its_config(tmp_path: Path) -> None:
    path, config, reused = cli.prepare_up_config(
        tmp_path, nodes=3, base_port=7200, secret=None, partitions=None, tls=True
    )
    assert not reused and config.tls is not None
    assert 'ca = "tls/ca.pem"' in path.read_text()  # relative: the folder can move
    assert config.node_tls_files("n2") == (
        tmp_path / "tls/ca.pem",
        tmp_path / "tls/n2.pem",
        tmp_path / "tls/n2.key",
    )
    _, again, reused = cli.prepare_up_config(
        tmp_path, nodes=3, base_port=7200, secret=None, partitions=None
    )
    assert reused and again.tls == config.tls  # a reused TLS config stays TLS
    plain = tmp_path / "plain"
    plain.mkdir()
    cli.prepare_up_config(plain, nodes=3, base_port=7200, secret=None, partitions=None)
    before = (plain / "cluster.toml").read_text()
    with pytest.raises(ConfigError, match="without TLS; drop --tls"):
        cli.prepare_up_config(
            plain, nodes=3, base_port=7200, secret=None, partitions=None, tls=True
        )
    assert (plain / "cluster.toml").read_text() == before and not (plain / "tls").exists()

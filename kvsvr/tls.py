"""A cluster's TLS, from its config: the contexts a node serves and dials
with (`node_contexts`), the options a tool that reads the config connects
with (`config_client_options`), and the local CA and certificates that
`kvsvr up --tls` makes (`make_local_certificates`, with PyCA's
`cryptography`) and the config that names them (`with_local_tls`). The
wire side is `kvsvr.net.tls`."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from kvsvr.config import ClusterConfig, ConfigError, TLSConfig
from kvsvr.net.tls import TLSOptions, TLSSetupError, client_context, server_context

# A local cluster's certificates are for trying kvsvr out: a year outlives any
# demo, and nobody should keep them as a production CA.
LOCAL_CERT_VALID_DAYS: Final = 365
# Names every local node certificate carries besides the node's own host, so
# that a client dialing "localhost" or 127.0.0.1 can check it.
LOCAL_NAMES: Final = ("localhost", "127.0.0.1")
CA_FILE: Final = "ca.pem"
CLIENT_CERT_FILE: Final = "client.pem"
CLIENT_KEY_FILE: Final = "client.key"


@dataclass(frozen=True, slots=True)
class NodeTLS:
    server: ssl.SSLContext  # what the node serves with
    client: ssl.SSLContext  # what it dials its peers with (mutual TLS)


def node_contexts(config: ClusterConfig, node_id: str) -> NodeTLS | None:
    """A node's TLS contexts; None when the cluster has no [tls]. Raises
    `ConfigError` when a file cannot be loaded."""
    files = config.node_tls_files(node_id)
    if files is None:
        return None
    ca, cert, key = files
    try:
        return NodeTLS(server_context(ca, cert, key), client_context(TLSOptions(ca, cert, key)))
    except TLSSetupError as exc:
        raise ConfigError(f"node {node_id}: {exc}") from None


def config_client_options(config: ClusterConfig) -> TLSOptions | None:
    """What a tool that reads the config connects with: [tls]'s CA and client
    certificate; None when the cluster has no [tls]."""
    if config.tls is None:
        return None
    return TLSOptions(config.tls.ca, config.tls.client_cert, config.tls.client_key)


def make_local_certificates(directory: Path, node_hosts: dict[str, str]) -> None:
    """Write a new CA (`ca.pem`, `ca.key`), a certificate and key per node
    (`<id>.pem`, `<id>.key`, naming its host and `LOCAL_NAMES`) and a client
    certificate (`client.pem`, `client.key`) into `directory`. Keys are
    written readable by their owner only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    clashing = {"ca", "client"} & node_hosts.keys()
    if clashing:
        raise ConfigError(f"node ids {sorted(clashing)} clash with the CA's and client's files")
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvsvr local CA")])

    def build(subject: str, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=LOCAL_CERT_VALID_DAYS))
        )

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)

    def general_name(host: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            return x509.DNSName(host)

    def issue(name: str, hosts: list[str]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        # Node certificates serve and dial (mutual TLS): both usages.
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = build(name, key.public_key()).add_extension(
            x509.ExtendedKeyUsage(usages), critical=False
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([general_name(host) for host in hosts]),
                critical=False,
            )
        certificate = builder.sign(ca_key, hashes.SHA256())
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        (directory / f"{name}.pem").write_bytes(pem)
        write_key(directory / f"{name}.key", key)

    ca = (
        build("kvsvr local CA", ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / CA_FILE).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    write_key(directory / "ca.key", ca_key)
    for node_id, host in node_hosts.items():
        issue(node_id, list(dict.fromkeys([host, *LOCAL_NAMES])))
    issue("client", [])


def with_local_tls(
    config: ClusterConfig, directory: Path, *, relative_to: Path | None = None
) -> ClusterConfig:
    """`config` with TLS on: a new CA and node and client certificates made in
    `directory` (`kvsvr.tls.make_local_certificates`), each node's naming its
    host, and [tls] naming them: paths relative to `relative_to` (the config
    file's folder) if given, else absolute."""
    make_local_certificates(directory, {node.id: node.host for node in config.nodes})
    directory = directory.resolve()
    if relative_to is not None:
        directory = directory.relative_to(relative_to.resolve())
    nodes = tuple(
        dataclasses.replace(
            node, tls_cert=directory / f"{node.id}.pem", tls_key=directory / f"{node.id}.key"
        )
        for node in config.nodes
    )
    tls = TLSConfig(
        ca=directory / CA_FILE,
        client_cert=directory / CLIENT_CERT_FILE,
        client_key=directory / CLIENT_KEY_FILE,
    )
    return dataclasses.replace(config, nodes=nodes, tls=tls)

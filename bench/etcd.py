"""etcd as a benchmark peer: a local cluster `bench` starts and stops itself,
and a small client for etcd's v3 HTTP/JSON gateway (h11 over trio streams).

The gateway is the only etcd API reachable from Python without a new
dependency (gRPC needs grpcio). It costs etcd some CPU per request (JSON and
an in-process gRPC hop) that a Go client would not pay; the report says so.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import h11
import trio

from kvsvr.local import die_with_parent

# Bytes asked of the socket per read; a gateway reply for one 1 KiB value is ~1.6 KB.
RECEIVE_BYTES: Final = 64 * 1024
# A reply bigger than this is not something the benchmark asked for.
RESPONSE_BYTES_MAX: Final = 16 * 1024 * 1024
# etcd refuses a txn with more operations than its --max-txn-ops (128 by default).
TXN_OPS_MAX: Final = 128
# Time a fresh cluster gets to elect a leader and answer on every member.
START_TIMEOUT_S: Final = 60.0
# Time a member gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S: Final = 10.0
HEALTH_POLL_S: Final = 0.1

INSTALL_HINT: Final = (
    "etcd is not installed (no `etcd` on PATH).\n"
    "  Debian/Ubuntu:  sudo apt-get install etcd-server\n"
    "    (the package may also enable a system etcd on port 2379; bench does not use it:\n"
    "     `sudo systemctl disable --now etcd` stops it)\n"
    "  elsewhere:      download etcd from https://github.com/etcd-io/etcd/releases and put\n"
    "                  `etcd` on PATH, or pass --etcd-binary /path/to/etcd\n"
    "  or leave etcd out: --targets kvsvr"
)


class EtcdMissing(RuntimeError):
    """No etcd binary; the message says how to install one."""


class EtcdError(RuntimeError):
    """etcd answered with an error (HTTP status and the gateway's message)."""


# --- the cluster ---------------------------------------------------------------------


def find_etcd(binary: str = "etcd") -> str:
    """The etcd executable's path, or EtcdMissing with the install hint."""
    path = shutil.which(binary)
    if path is None:
        raise EtcdMissing(INSTALL_HINT)
    return path


def etcd_version(binary: str) -> str:
    try:
        output = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in output.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.client_port}"


@dataclass
class EtcdCluster:
    """`node_count` etcd members on 127.0.0.1, data in `directory`, default
    durability (etcd fsyncs its WAL before acknowledging; no unsafe flags).

        cluster = EtcdCluster(3, Path(tmp), ports=[...6 free ports...])
        cluster.start()
        ...
        cluster.stop()
    """

    node_count: int
    directory: Path
    ports: Sequence[int]  # 2 per member: client, peer
    binary: str = "etcd"
    members: list[EtcdMember] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.ports) != 2 * self.node_count:
            raise ValueError("give two free ports per member")
        self.members = [
            EtcdMember(
                name=f"e{index + 1}",
                client_port=self.ports[2 * index],
                peer_port=self.ports[2 * index + 1],
                data_dir=self.directory / f"e{index + 1}",
                log_path=self.directory / f"e{index + 1}.log",
            )
            for index in range(self.node_count)
        ]

    @property
    def addresses(self) -> list[str]:
        return [member.address for member in self.members]

    @property
    def pids(self) -> list[int]:
        return [m.process.pid for m in self.members if m.process is not None]

    def command(self, member: EtcdMember) -> list[str]:
        initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        return [
            self.binary,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"bench-{os.getpid()}-{self.ports[0]}",
            # Quieter logs; nothing that touches durability or consensus timing.
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start every member and wait until each answers a linearizable read."""
        self.binary = find_etcd(self.binary)
        self.directory.mkdir(parents=True, exist_ok=True)
        for member in self.members:
            with member.log_path.open("ab") as log:
                member.process = subprocess.Popen(
                    self.command(member),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches bench, which stops it in order
                    preexec_fn=die_with_parent,
                )
        deadline = time.monotonic() + timeout_s
        for member in self.members:
            self._wait_ready(member, deadline)

    def _wait_ready(self, member: EtcdMember, deadline: float) -> None:
        body = json.dumps({"key": _b64(b"bench-probe")}).encode()
        while True:
            assert member.process is not None
            code = member.process.poll()
            if code is not None:
                raise EtcdError(
                    f"etcd member {member.name} exited with code {code} while starting; "
                    f"log: {member.log_path}\n{_tail(member.log_path)}"
                )
            try:
                request = urllib.request.Request(
                    member.client_url + "/v3/kv/range", data=body, method="POST"
                )
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise EtcdError(
                    f"etcd member {member.name} did not answer within the start timeout; "
                    f"log: {member.log_path}\n{_tail(member.log_path)}"
                )
            time.sleep(HEALTH_POLL_S)

    def stop(self) -> None:
        """SIGTERM every member, wait, SIGKILL stragglers. Idempotent."""
        running = [m for m in self.members if m.process is not None and m.process.poll() is None]
        for member in running:
            assert member.process is not None
            member.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for member in running:
            assert member.process is not None
            try:
                member.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- the client ------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class HttpConnection:
    """One keep-alive HTTP/1.1 connection (h11 over a trio stream), opened on
    first use and reopened after any failure. One request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._stream: trio.SocketStream | None = None
        self._http: h11.Connection | None = None
        self._host_header = f"{host}:{port}".encode()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            return await self._post(path, body)
        except BaseException:
            await self.aclose()
            raise

    async def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self._stream is None or self._http is None:
            self._stream = await trio.open_tcp_stream(self.host, self.port)
            self._http = h11.Connection(h11.CLIENT)
        http, stream = self._http, self._stream
        request = h11.Request(
            method="POST",
            target=path,
            headers=[
                (b"host", self._host_header),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        )
        await stream.send_all(
            http.send(request) + http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage())
        )
        status = 0
        chunks: list[bytes] = []
        size = 0
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(await stream.receive_some(RECEIVE_BYTES))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
                size += len(event.data)
                if size > RESPONSE_BYTES_MAX:
                    raise EtcdError(f"reply larger than {RESPONSE_BYTES_MAX} bytes")
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise EtcdError("etcd closed the connection mid-reply")
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
        else:
            await self.aclose()
        return status, b"".join(chunks)

    async def aclose(self) -> None:
        stream, self._stream, self._http = self._stream, None, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()


class EtcdSession:
    """get / put / cas against one member through the v3 JSON gateway.

    Reads are linearizable (etcd's default) unless `serializable` (served by
    the member alone, etcd's analogue of kvsvr's stale read)."""

    def __init__(self, address: str, *, serializable: bool = False) -> None:
        host, _, port = address.rpartition(":")
        self._http = HttpConnection(host, int(port))
        self._serializable = serializable

    async def _call(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        status, body = await self._http.post(path, json.dumps(request).encode())
        if status != 200:
            raise EtcdError(f"{path}: HTTP {status}: {body[:200]!r}")
        reply = json.loads(body)
        if not isinstance(reply, dict):
            raise EtcdError(f"{path}: malformed reply {body[:200]!r}")
        return reply

    async def get(
        self, key: bytes, *, serializable: bool | None = None
    ) -> tuple[int, bytes | None]:
        """(mod_revision, value); (0, None) when the key is absent. `serializable`
        overrides the session's read mode for this read."""
        request: dict[str, Any] = {"key": _b64(key)}
        if self._serializable if serializable is None else serializable:
            request["serializable"] = True
        reply = await self._call("/v3/kv/range", request)
        return _first_kv(reply.get("kvs"))

    async def put(self, key: bytes, value: bytes) -> int:
        """The revision the put created."""
        reply = await self._call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(reply.get("header", {}).get("revision", 0))

    async def cas(self, key: bytes, value: bytes, mod_revision: int) -> bool:
        """Put only if the key's mod_revision is still `mod_revision` (0: absent)."""
        key64 = _b64(key)
        reply = await self._call(
            "/v3/kv/txn",
            {
                "compare": [
                    {"target": "MOD", "result": "EQUAL", "key": key64,
                     "mod_revision": str(mod_revision)}
                ],
                "success": [{"request_put": {"key": key64, "value": _b64(value)}}],
            },
        )  # fmt: skip
        return bool(reply.get("succeeded", False))

    async def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Several puts in one transaction (bulk loading only)."""
        for start in range(0, len(items), TXN_OPS_MAX):
            chunk = items[start : start + TXN_OPS_MAX]
            await self._call(
                "/v3/kv/txn",
                {
                    "success": [
                        {"request_put": {"key": _b64(key), "value": _b64(value)}}
                        for key, value in chunk
                    ]
                },
            )

    async def aclose(self) -> None:
        await self._http.aclose()


def _first_kv(kvs: object) -> tuple[int, bytes | None]:
    if not kvs:
        return 0, None
    if not isinstance(kvs, list) or not isinstance(kvs[0], dict):
        raise EtcdError(f"malformed kvs in a range reply: {kvs!r:.200}")
    entry = kvs[0]
    value = base64.b64decode(entry.get("value", ""))
    return int(entry.get("mod_revision", 0)), value

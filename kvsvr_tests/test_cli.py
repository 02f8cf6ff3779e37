"""The `kvsvr` command: parsing and exit codes, the key commands against fake
nodes (in-process), and end to end against real node processes started by
`kvsvr up` (marked slow)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

import kvsvr
from kvsvr import cli
from kvsvr.apps import app_tables
from kvsvr.cli import up as cli_up
from kvsvr.config import ConfigError, load_config, local_cluster
from kvsvr.errors import (
    AuthenticationFailed,
    Conflict,
    CorruptRow,
    InvalidRequest,
    KvsvrError,
    Timeout,
    Unavailable,
)
from kvsvr.local import LocalCluster, free_base_port, write_config
from kvsvr_tests.test_client_fakes import SECRET, FakeCluster, fake_cluster_in_thread, unused_port

REPO_ROOT = Path(__file__).resolve().parent.parent

COMMANDS = ["up", "node", "get", "put", "cas", "del", "scan", "status"]


@pytest.fixture(autouse=True)
def no_cluster_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVSVR_CLUSTER", raising=False)
    monkeypatch.delenv("KVSVR_SECRET", raising=False)


# --- help and usage -----------------------------------------------------------------


def test_help_lists_commands_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out
    assert "exit codes" in out and "3  conflict" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kvsvr {command}")
    assert "exit codes" in out


def test_the_module_docstring_documents_the_exit_codes() -> None:
    assert cli.__doc__ is not None
    for line in cli.EXIT_CODES_HELP.splitlines()[1:]:
        assert line.strip() in cli.__doc__


CLUSTER = ["--cluster", "127.0.0.1:7101"]


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["put", *CLUSTER, "k"],
        ["cas", *CLUSTER, "k", "v"],  # --if-version is required
        ["get", *CLUSTER],
        ["get", "--cluster", "nohost", "k"],
        ["get", "--cluster", "h:0", "k"],
        ["get", "--cluster", ",", "k"],
        ["get", *CLUSTER, "--config", "c.toml", "k"],
        ["get", *CLUSTER, "--consistency", "eventual", "k"],
        ["get", *CLUSTER, "--timeout-s", "0", "k"],
        ["get", *CLUSTER, "--timeout-s", "inf", "k"],
        ["get", *CLUSTER, "--max-age-s", "-1", "k"],
        ["put", *CLUSTER, "k", "v", "--if-version", "-1"],
        ["put", *CLUSTER, "k", "v", "--if-version", "x"],
        ["put", *CLUSTER, "k", "v", "--if-version", "1", "--if-absent"],
        ["scan", *CLUSTER, "p", "--limit", "0"],
        ["scan", *CLUSTER, "p", "--limit", "10001"],
        ["up", "--nodes", "0"],
        ["up", "--nodes", "17"],
        ["up", "--partitions", "3"],
        ["up", "--base-port", "70000"],
        ["node", "--config", "c.toml"],
        ["node", "--config", "c.toml", "--id", "n1", "--initial-cluster-state", "old"],
        ["recover", *CLUSTER],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "usage: kvsvr" in capsys.readouterr().err


def test_a_key_command_must_say_which_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["get", "k"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--cluster" in err and "--config" in err


def test_a_bad_cluster_in_the_environment_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVSVR_CLUSTER", "nohost")
    assert cli.main(["get", "k"]) == cli.EXIT_USAGE
    assert "KVSVR_CLUSTER" in capsys.readouterr().err


def test_exit_codes_by_error() -> None:
    assert cli.exit_code_for(Conflict("x")) == 3
    assert cli.exit_code_for(Unavailable("x")) == 4
    assert cli.exit_code_for(Timeout("x")) == 4
    for error in (AuthenticationFailed, InvalidRequest, CorruptRow, KvsvrError):
        assert cli.exit_code_for(error("x")) == 5


def test_an_unreachable_cluster_exits_4(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["get", "--cluster", f"127.0.0.1:{unused_port()}", "--timeout-s", "2", "k"])
    assert code == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert err.startswith("kvsvr: unavailable: ") and err.count("\n") == 1


def test_a_missing_config_file_exits_5(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["get", "--config", str(tmp_path / "none.toml"), "k"]) == cli.EXIT_ERROR
    assert "bad config" in capsys.readouterr().err


def test_status_is_printed_as_indented_lines() -> None:
    status = {"node": "n1", "partitions": [0, 1], "counters": {"gets": 3, "puts": 1}, "z": {}}
    assert cli.format_status(status) == [
        "counters:",
        "  gets: 3",
        "  puts: 1",
        "node: n1",
        "partitions: 0, 1",
        "z: (none)",
    ]


def test_catch_up_lines_show_hints_and_the_oldest_anti_entropy_pass() -> None:
    statuses = [
        {
            "node": "n1",
            "replication": {
                "state": "ready",
                "hints": {"n2": {"pending": 0}, "n3": {"pending": 1234}},
                "anti_entropy": {"last_pass_s_ago": {"0": 3.0, "1": 12.4}},
            },
        },
        {
            "node": "n3",
            "replication": {
                "state": "rebuilding",
                "hints": {},
                "anti_entropy": {"last_pass_s_ago": {"0": None, "1": 2.0}},
            },
        },
        {"node": "n2", "health": "unreachable"},
    ]
    lines = cli.format_catch_up(statuses)
    assert lines[1].split() == (
        "n1 ready hints pending: n2=0 n3=1234 anti-entropy, oldest pass: 12s ago".split()
    )
    assert "rebuilding" in lines[2] and "not yet for 1 of 2 partitions" in lines[2]
    assert len(lines) == 3


def test_status_lines_say_each_nodes_state_and_who_needs_an_operator() -> None:
    message = "needs operator: n2, n3 lost data for partitions 0-15"
    statuses = [
        {"node": "n1", "health": "ready", "replication": {"state": "ready"}},
        {
            "node": "n2",
            "health": "rebuilding",
            "replication": {
                "state": "rebuilding",
                "rebuild": {"tables_done": 1, "tables_total": 3, "rows_rebuilt": 120},
            },
        },
        {
            "node": "n3",
            "health": "rebuilding",
            "replication": {"state": "rebuilding", "rebuild": {"waiting_for": ["n1"]}},
        },
        {
            "node": "n4",
            "health": "needs_operator",
            "replication": {"state": "needs_operator", "needs_operator": message},
        },
        {"node": "n5", "health": "waiting_for_peers"},
        {"node": "n6", "health": "unreachable (refused)"},
    ]
    lines = cli.format_cluster_status(statuses)[1:]
    assert [line.split("  ")[-1].strip() for line in lines] == [
        "ready",
        "rebuilding (1/3 tables, 120 rows)",
        "rebuilding, waiting for n1",
        "needs operator",
        "waiting for peers",
        "unreachable (refused)",
    ]
    assert not any(line.endswith(" up") for line in lines)
    (operator,) = cli.format_operator_messages(statuses)
    assert operator.startswith(f"n4: {message}") and "kvsvr recover --accept-data-loss" in operator


def test_up_gives_a_config_from_before_cluster_ids_one(tmp_path: Path) -> None:
    path, config, _ = cli.prepare_up_config(
        tmp_path, nodes=3, base_port=7200, secret=None, partitions=None
    )
    assert config.cluster_id is not None
    text = path.read_text().replace(f'id = "{config.cluster_id}"\n', "")
    path.write_text(text)
    _, again, reused = cli.prepare_up_config(
        tmp_path, nodes=3, base_port=7200, secret=None, partitions=None
    )
    assert reused and again.cluster_id is not None and again.cluster_id != config.cluster_id
    _, third, _ = cli.prepare_up_config(
        tmp_path, nodes=3, base_port=7200, secret=None, partitions=None
    )
    assert third.cluster_id == again.cluster_id


def test_cache_figures_per_node() -> None:
    statuses = [
        {
            "node": "n1",
            "cache": {
                "hit_ratio": 0.875,
                "bytes_used": 3 << 20,
                "bytes_max": 64 << 20,
                "evictions": 12,
                "stale_served": 40,
                "fallbacks": 2,
            },
        },
        {"node": "n2", "cache": {"hit_ratio": 0.0, "bytes_used": 0, "bytes_max": 0}},
        {"node": "n3", "health": "unreachable (refused)"},
    ]
    lines = cli.format_cache_status(statuses)
    assert lines[0].split() == [
        "cache", "hit", "ratio", "used", "/", "limit", "evictions", "stale", "served", "fallbacks"
    ]  # fmt: skip
    assert lines[1].split() == ["n1", "87.5%", "3.0", "MiB", "/", "64.0", "MiB", "12", "40", "2"]
    assert lines[2].split() == ["n2", "0.0%", "off", "0", "0", "0"]
    small = {"cache": {"bytes_used": 1, "bytes_max": 1 << 19}}
    assert "512.0 KiB" in cli.format_cache_status([small])[1]
    assert lines[3].split() == ["n3", "-"]


# --- `up`'s config -----------------------------------------------------------------------


def test_up_writes_a_config_then_reuses_it(tmp_path: Path) -> None:
    path, config, reused = cli.prepare_up_config(
        tmp_path, nodes=3, base_port=7200, secret="s3cret", partitions=16
    )
    assert not reused and path == tmp_path / "cluster.toml"
    assert [node.address for node in config.nodes] == [
        "127.0.0.1:7201",
        "127.0.0.1:7202",
        "127.0.0.1:7203",
    ]
    assert config.partitions == 16 and config.secret == b"s3cret"
    assert config.node_data_dir("n2") == tmp_path / "n2"  # data_dir "." is the folder
    assert path.stat().st_mode & 0o077 == 0  # it holds the secret
    text = path.read_text()

    _, again, reused = cli.prepare_up_config(
        tmp_path, nodes=3, base_port=7200, secret=None, partitions=None
    )
    assert reused and again == load_config(path) and path.read_text() == text


@pytest.mark.parametrize(
    ("nodes", "base_port", "secret", "partitions", "message"),
    [
        (2, 7200, None, None, "another cluster"),
        (3, 7300, None, None, "another cluster"),
        (3, 7200, None, 32, "partitions"),
        (3, 7200, "other", None, "secret"),
    ],
)
def test_up_refuses_to_contradict_an_existing_config(
    tmp_path: Path,
    nodes: int,
    base_port: int,
    secret: str | None,
    partitions: int | None,
    message: str,
) -> None:
    cli.prepare_up_config(tmp_path, nodes=3, base_port=7200, secret="s3cret", partitions=16)
    with pytest.raises(ConfigError, match=message):
        cli.prepare_up_config(
            tmp_path, nodes=nodes, base_port=base_port, secret=secret, partitions=partitions
        )


def test_up_apps_declares_the_app_tables(tmp_path: Path) -> None:
    names = {table.name for table in app_tables()}
    (tmp_path / "new").mkdir()
    _, config, _ = cli.prepare_up_config(
        tmp_path / "new", nodes=3, base_port=7200, secret=None, partitions=None, apps=True
    )
    assert {table.name for table in config.tables} == {"default", *names}

    # A cluster started without them gets them appended; its own lines stay.
    path, _, _ = cli.prepare_up_config(
        tmp_path, nodes=3, base_port=7200, secret=None, partitions=None
    )
    before = path.read_text()
    _, config, reused = cli.prepare_up_config(
        tmp_path, nodes=3, base_port=7200, secret=None, partitions=None, apps=True
    )
    assert reused and path.read_text().startswith(before)
    assert config == load_config(path)
    assert {table.name: table for table in config.tables} == {
        "default": config.tables[0],
        **{table.name: table for table in app_tables()},
    }
    # Declared already: nothing more is written.
    text = path.read_text()
    cli.prepare_up_config(
        tmp_path, nodes=3, base_port=7200, secret=None, partitions=None, apps=True
    )
    assert path.read_text() == text


def test_up_apps_refuses_a_table_declared_otherwise(tmp_path: Path) -> None:
    path, _, _ = cli.prepare_up_config(
        tmp_path, nodes=3, base_port=7200, secret=None, partitions=None
    )
    path.write_text(
        path.read_text() + '\n[[tables]]\nname = "chat_group"\nconsistency = "strong"\n'
    )
    text = path.read_text()
    with pytest.raises(ConfigError, match="chat_group"):
        cli.prepare_up_config(
            tmp_path, nodes=3, base_port=7200, secret=None, partitions=None, apps=True
        )
    assert path.read_text() == text


def test_up_refuses_ports_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = cli.main(
            ["up", "--nodes", "1", "--dir", str(tmp_path), "--base-port", str(port - 1)]
        )
    assert code == cli.EXIT_ERROR
    assert "already in use" in capsys.readouterr().err


def test_up_reports_nodes_that_die_and_stops_once_all_have(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    codes = {"n1": 3, "n2": 0}
    # `python -c CODE` ends the interpreter's options: the nodes exit at once with these codes.
    cluster = LocalCluster(
        write_config(local_cluster(2, 7100), tmp_path / "cluster.toml"),
        log_dir=tmp_path,
        python_args=lambda node_id: ["-c", f"raise SystemExit({codes[node_id]})"],
    )
    for node_id in cluster.ids:
        cluster.log_path(node_id).write_text(f"{node_id} says goodbye\n")
        cluster.start(node_id, wait=False)
        cluster.wait_exit(node_id, COMMAND_TIMEOUT_S)
    assert cli_up._supervise(cluster, cli_up._StopRequest()) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "node n1 exited on its own with code 3" in err and "n1| n1 says goodbye" in err
    assert "node n2 exited on its own with code 0" in err
    assert "every node has exited" in err
    # A stop request wins over exits seen at the same time (a terminal's Ctrl-C).
    assert cli_up._supervise(cluster, cli_up._StopRequest(requested=True)) == cli.EXIT_OK


# --- key commands against fake nodes ------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeCluster]:
    with fake_cluster_in_thread() as cluster:
        yield cluster


def run_cli(
    capsys: pytest.CaptureFixture[str], cluster: FakeCluster, *argv: str
) -> tuple[int, str, str]:
    target = ["--cluster", ",".join(cluster.addresses), "--secret", SECRET.decode()]
    code = cli.main([argv[0], *target, *argv[1:]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_key_commands_against_fake_nodes(
    fake: FakeCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, fake, "get", "greeting") == (1, "", "kvsvr: not found: greeting\n")
    assert run_cli(capsys, fake, "put", "greeting", "hello") == (0, "ok  (version 1)\n", "")
    assert run_cli(capsys, fake, "get", "greeting") == (0, "hello  (version 1)\n", "")
    assert run_cli(capsys, fake, "cas", "greeting", "hi", "--if-version", "1")[:2] == (
        0,
        "ok  (version 2)\n",
    )
    code, out, err = run_cli(capsys, fake, "cas", "greeting", "late", "--if-version", "1")
    assert (code, out) == (3, "") and err.startswith("kvsvr: conflict: ")
    code, _, err = run_cli(capsys, fake, "put", "greeting", "again", "--if-absent")
    assert code == 3
    assert run_cli(capsys, fake, "get", "greeting", "--consistency", "stale")[:2] == (
        0,
        "hi  (version 2)\n",
    )
    assert run_cli(capsys, fake, "del", "greeting", "--if-version", "9")[0] == 3
    assert run_cli(capsys, fake, "del", "greeting") == (0, "deleted  (version 3)\n", "")
    assert run_cli(capsys, fake, "get", "greeting")[0] == 1

    for sort_key, value in [("b", "2"), ("a", "1"), ("c", "3")]:
        assert run_cli(capsys, fake, "put", "inbox", "--sort-key", sort_key, value)[0] == 0
    assert run_cli(capsys, fake, "get", "inbox", "--sort-key", "b")[1] == "2  (version 1)\n"
    code, out, _ = run_cli(capsys, fake, "scan", "inbox", "--start", "b")
    assert code == 0
    assert out == "b\t2\t(version 1)\nc\t3\t(version 1)\n"
    assert run_cli(capsys, fake, "scan", "inbox", "--limit", "1")[1] == "a\t1\t(version 1)\n"
    assert run_cli(capsys, fake, "scan", "nobody") == (0, "", "")

    code, out, _ = run_cli(capsys, fake, "status", "--node", "n2")
    assert code == 0 and "node: n2" in out.splitlines()
    code, _, err = run_cli(capsys, fake, "put", "--table", "nope", "k", "v")
    assert code == 5 and "invalid request" in err and "no table 'nope'" in err


def test_values_from_stdin_and_raw_output(
    fake: FakeCluster,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    target = ["--cluster", fake.addresses[0], "--secret", SECRET.decode()]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x00binary\xff\n")))
    assert cli.main(["put", *target, "blob", "-"]) == 0
    capsysbinary.readouterr()
    assert cli.main(["get", *target, "--raw", "blob"]) == 0
    assert capsysbinary.readouterr().out == b"\x00binary\xff\n"
    assert cli.main(["get", *target, "blob"]) == 0
    assert capsysbinary.readouterr().out == b"\x00binary\\xff\n  (version 1)\n"


def test_wrong_secret_exits_5(fake: FakeCluster, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["get", "--cluster", fake.addresses[0], "--secret", "wrong", "k"])
    assert code == cli.EXIT_ERROR
    assert capsys.readouterr().err.startswith("kvsvr: authentication failed: ")


def test_a_hanging_cluster_exits_4(fake: FakeCluster, capsys: pytest.CaptureFixture[str]) -> None:
    for node in fake.nodes:
        node.hang_on.add("put")
    target = ["--cluster", fake.addresses[0], "--secret", SECRET.decode()]
    code = cli.main(["put", *target, "--timeout-s", "0.3", "k", "v"])
    assert code == cli.EXIT_UNAVAILABLE
    assert "timed out" in capsys.readouterr().err


def test_the_cluster_and_secret_from_config_or_environment(
    fake: FakeCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "cluster.toml"
    nodes = "".join(f'[[nodes]]\nid = "{node.id}"\nport = {node.port}\n' for node in fake.nodes)
    config.write_text(f'[cluster]\nsecret = "{SECRET.decode()}"\npartitions = 8\n{nodes}')
    assert cli.main(["put", "--config", str(config), "k", "v"]) == 0
    monkeypatch.setenv("KVSVR_CLUSTER", ",".join(fake.addresses))
    monkeypatch.setenv("KVSVR_SECRET", SECRET.decode())
    assert cli.main(["get", "k"]) == 0
    assert capsys.readouterr().out.endswith("v  (version 1)\n")


# --- end to end: `kvsvr up` and real nodes --------------------------------------------------

E2E_SECRET = "end-to-end secret"
STARTUP_TIMEOUT_S = 90.0  # `up` waits up to 60 s for its nodes; leave it room to say why
COMMAND_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0  # `up` gives its nodes 10 s, then kills them


def _environment() -> dict[str, str]:
    # The repo first on the path, so the subprocesses import this tree whatever
    # their working directory.
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "KVSVR_CLUSTER": "", "KVSVR_SECRET": ""}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class UpCluster:
    directory: Path
    process: subprocess.Popen[bytes]
    output_path: Path
    addresses: list[str]
    node_pids: list[int]

    @property
    def cluster(self) -> str:
        return ",".join(self.addresses)

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def logs(self) -> str:
        parts = [f"--- kvsvr up output ---\n{self.output()}"]
        for log in sorted(self.directory.glob("n*.log")):
            parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def kvsvr(self, *argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run a key command against this cluster, as a user would."""
        command = [sys.executable, "-m", "kvsvr", argv[0], "--cluster", self.cluster]
        if not any(arg.startswith("--secret") for arg in argv):
            command += ["--secret", E2E_SECRET]
        return subprocess.run(
            [*command, *argv[1:]],
            input=stdin.decode() if stdin is not None else None,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            env=_environment(),
            cwd=self.directory.parent,
            check=False,
        )

    def stop(self) -> int:
        """SIGTERM `up` and wait for it, as Ctrl-C would; its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STOP_TIMEOUT_S)

    def force_cleanup(self) -> None:
        """Whatever happened, leave no process behind."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.node_pids:
            if _alive(pid) and _is_our_node(pid):
                os.kill(pid, signal.SIGKILL)


def _is_our_node(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"kvsvr" in command and b"node" in command


def start_up(directory: Path, nodes: int, base_port: int | None = None) -> UpCluster:
    base_port = base_port if base_port is not None else free_base_port(nodes)
    output_path = directory.parent / f"{directory.name}-up.out"
    command = [sys.executable, "-m", "kvsvr", "up", "--nodes", str(nodes), "--dir", str(directory)]
    with output_path.open("ab") as output:
        process = subprocess.Popen(
            [*command, "--base-port", str(base_port), "--secret", E2E_SECRET],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_environment(),
            cwd=directory.parent,
        )
    addresses = [f"127.0.0.1:{base_port + i}" for i in range(1, nodes + 1)]
    up = UpCluster(directory, process, output_path, addresses, [])
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        runs = output_path.read_text().count("press Ctrl-C")
        while up.output().count("press Ctrl-C") == runs:
            if process.poll() is not None:
                raise AssertionError(f"kvsvr up exited with {process.returncode}\n{up.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"kvsvr up did not get ready\n{up.logs()}")
            time.sleep(0.1)
        up.node_pids = [int((directory / f"n{i}.pid").read_text()) for i in range(1, nodes + 1)]
    except BaseException:
        up.force_cleanup()
        raise
    return up


@pytest.fixture(scope="module")
def single_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpCluster]:
    up = start_up(tmp_path_factory.mktemp("e2e") / "cluster", nodes=1)
    try:
        yield up
    finally:
        up.force_cleanup()


def _version_in(text: str) -> int:
    assert "(version " in text, text
    return int(text.rsplit("(version ", 1)[1].split(")")[0])


@pytest.mark.slow
def test_end_to_end_cli(single_node: UpCluster) -> None:
    up = single_node
    assert "127.0.0.1" in up.output() and "kvsvr put --config" in up.output()

    put = up.kvsvr("put", "greeting", "hello")
    assert put.returncode == 0, put.stderr + up.logs()
    first = _version_in(put.stdout)
    got = up.kvsvr("get", "greeting")
    assert (got.returncode, got.stdout) == (0, f"hello  (version {first})\n"), got.stderr

    won = up.kvsvr("cas", "greeting", "hi", "--if-version", str(first))
    assert won.returncode == 0, won.stderr
    second = _version_in(won.stdout)
    assert second > first
    lost = up.kvsvr("cas", "greeting", "late", "--if-version", str(first))
    assert lost.returncode == 3 and lost.stderr.startswith("kvsvr: conflict: "), lost.stderr
    assert up.kvsvr("put", "greeting", "x", "--if-absent").returncode == 3
    assert up.kvsvr("get", "greeting").stdout == f"hi  (version {second})\n"
    stale = up.kvsvr("get", "greeting", "--consistency", "stale")
    assert stale.returncode == 0 and stale.stdout.startswith("hi  ("), stale.stderr

    deleted = up.kvsvr("del", "greeting")
    assert deleted.returncode == 0 and _version_in(deleted.stdout) > second, deleted.stderr
    missing = up.kvsvr("get", "greeting")
    assert (missing.returncode, missing.stdout) == (1, ""), missing.stderr
    assert up.kvsvr("get", "never-written").returncode == 1

    for sort_key, value in [("2024-01-02", "b"), ("2024-01-01", "a"), ("2024-02-01", "c")]:
        assert up.kvsvr("put", "cli-user", "--sort-key", sort_key, value).returncode == 0
    scan = up.kvsvr("scan", "cli-user", "--start", "2024-01", "--end", "2024-02")
    assert scan.returncode == 0, scan.stderr
    assert [line.split("\t")[:2] for line in scan.stdout.splitlines()] == [
        ["2024-01-01", "a"],
        ["2024-01-02", "b"],
    ]
    assert up.kvsvr("put", "piped", "-", stdin=b"from stdin").returncode == 0
    assert up.kvsvr("get", "piped").stdout.startswith("from stdin  (")

    config = up.directory / "cluster.toml"
    key = ["cli-user", "--sort-key", "2024-02-01"]
    direct = subprocess.run(  # --config alone: the nodes and the secret come from the file
        [sys.executable, "-m", "kvsvr", "get", "--config", str(config), *key],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        env=_environment(),
        check=False,
    )
    assert (direct.returncode, direct.stdout.split("  ")[0]) == (0, "c"), direct.stderr

    status = up.kvsvr("status")
    assert status.returncode == 0 and status.stdout.strip(), status.stderr
    # The cache table: the repeated strong gets of "greeting" hit the cache,
    # the stale get was served without a quorum round.
    lines = status.stdout.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("cache ")))
    assert "hit ratio" in lines[header] and "stale served" in lines[header]
    cells = lines[header + 1].split()
    assert cells[0] == "n1", status.stdout
    assert float(cells[1].rstrip("%")) > 0, status.stdout
    assert cells[3] == "KiB" and cells[4:7] == ["/", "64.0", "MiB"], status.stdout
    evictions, stale_served, fallbacks = (int(cell) for cell in cells[7:10])
    assert evictions == 0 and stale_served >= 1 and fallbacks >= 0, status.stdout


@pytest.mark.slow
def test_end_to_end_wrong_secret_is_refused(single_node: UpCluster) -> None:
    wrong = single_node.kvsvr("get", "greeting", "--secret", "not the secret")
    assert wrong.returncode == 5
    assert wrong.stderr.startswith("kvsvr: authentication failed"), wrong.stderr
    assert wrong.stderr.count("\n") == 1
    with pytest.raises(AuthenticationFailed):
        with kvsvr.SyncClient(single_node.addresses, secret="not the secret"):
            pass

    async def with_async_client() -> None:
        async with kvsvr.connect(single_node.addresses, secret="not the secret"):
            pass

    with pytest.raises(AuthenticationFailed):
        trio.run(with_async_client)


@pytest.mark.slow
async def test_end_to_end_async_client(single_node: UpCluster) -> None:
    async with kvsvr.connect(single_node.addresses, secret=E2E_SECRET, timeout_s=10) as client:
        assert await client.get("async-key") is None
        first = await client.put("async-key", b"one")
        assert await client.get("async-key") == kvsvr.Item(b"one", first)
        second = await client.cas("async-key", b"two", if_version=first)
        with pytest.raises(kvsvr.Conflict):
            await client.cas("async-key", b"three", if_version=first)
        stale = await client.get("async-key", consistency="stale")
        assert stale is not None and stale.version >= second  # never behind our own write
        await client.delete("async-key", if_version=second)
        assert await client.get("async-key") is None

        for sort_key in ("c", "a", "b"):
            await client.put(("async-user", sort_key), sort_key.encode())
        await client.put(("async-user2", "a"), b"elsewhere")
        rows = await client.scan("async-user")
        assert [(row.key, row.value) for row in rows] == [(b"a", b"a"), (b"b", b"b"), (b"c", b"c")]
        assert [row.key for row in await client.scan("async-user", start="b")] == [b"b", b"c"]
        assert [row.key for row in await client.scan("async-user", end="b")] == [b"a"]
        assert len(await client.scan("async-user", limit=2)) == 2
        assert isinstance(await client.status(), dict)
        with pytest.raises(kvsvr.InvalidRequest):
            await client.put("async-key", b"x" * (1024 * 1024 + 1))


@pytest.mark.slow
def test_end_to_end_sync_client(single_node: UpCluster) -> None:
    with kvsvr.SyncClient(single_node.cluster, secret=E2E_SECRET, timeout_s=10) as client:
        first = client.put("sync-key", b"one")
        assert client.get("sync-key") == kvsvr.Item(b"one", first)
        assert client.cas("sync-key", b"two", if_version=first) > first
        with pytest.raises(kvsvr.Conflict):
            client.cas("sync-key", b"three", if_version=first)
        client.put(("sync-user", "x"), b"1")
        assert [row.key for row in client.scan("sync-user")] == [b"x"]
        client.delete("sync-key")
        assert client.get("sync-key") is None


@pytest.mark.slow
def test_end_to_end_three_nodes_restart_and_stop(tmp_path: Path) -> None:
    directory = tmp_path / "cluster"
    base_port = free_base_port(3)
    up = start_up(directory, nodes=3, base_port=base_port)
    try:
        with kvsvr.SyncClient(up.addresses, secret=E2E_SECRET, timeout_s=10) as client:
            versions = {
                f"key-{i}": client.put(f"key-{i}", f"value-{i}".encode()) for i in range(30)
            }
            coordinators = {
                client.partition_map().replicas("default", key.encode())[0].id for key in versions
            }
            assert coordinators == {"n1", "n2", "n3"}  # the keys spread over every node
            for key, version in versions.items():
                assert client.get(key) == kvsvr.Item(f"value-{key[4:]}".encode(), version)
        assert up.stop() == 0, up.logs()
        assert not any(_alive(pid) for pid in up.node_pids), up.logs()
        assert not list(directory.glob("n*.pid"))

        # Started again on the same folder, the cluster still has its data.
        up = start_up(directory, nodes=3, base_port=base_port)
        assert "reusing" in up.output()
        with kvsvr.SyncClient(up.addresses, secret=E2E_SECRET, timeout_s=10) as client:
            assert client.get("key-7") == kvsvr.Item(b"value-7", versions["key-7"])
        assert up.stop() == 0, up.logs()
        assert not any(_alive(pid) for pid in up.node_pids), up.logs()
    finally:
        up.force_cleanup()

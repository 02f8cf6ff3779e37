"""`bench.wakeup`: each receiver gets every message from a sender process and
reports a positive CPU time per message; bad arguments are refused."""

from __future__ import annotations

import argparse

import pytest

from bench import wakeup


def _args(messages: int = 20) -> argparse.Namespace:
    return wakeup.build_parser().parse_args(["--messages", str(messages), "--gap-ms", "1"])


@pytest.mark.parametrize("receiver", wakeup.RECEIVERS)
def test_each_receiver_reports_the_cpu_of_a_message(receiver: str) -> None:
    per_message_s = wakeup.MEASURE[receiver](_args())
    # Positive (the receiver did work for each message), and below the 1 ms
    # gap: a receiver that polled instead of sleeping would use all of it.
    assert 0 < per_message_s < 1e-3


def test_the_report_names_every_receiver(capsys: pytest.CaptureFixture[str]) -> None:
    assert wakeup.main(["--messages", "10", "--gap-ms", "1", "--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "10 messages 1 ms apart" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == list(wakeup.RECEIVERS)
    assert lines[1].rstrip().endswith("1.00x epoll")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--messages", "1"], "--messages must be 2"),
        (["--gap-ms", "-1"], "--gap-ms must be 0"),
        (["--repeat", "0"], "--repeat must be 1"),
    ],
)
def test_bad_arguments_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        wakeup.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err

"""Command line: check history files for linearizability.

    python -m jepsen_like.check [--format jsonl|jepsen-etcd|kv] [--model register|kv]
                                [--timeout-s S] [--workers N] [--report-dir DIR] FILE...

Prints one line per file, ``FILE: linearizable`` / ``not linearizable`` /
``unknown``, and exits 0 if every file is linearizable, 1 if any is not, 2 if
any is unknown (and none is not).  A file that cannot be read counts as
unknown (its error goes to stderr): the checker could not vouch for it.

Stale reads (``consistency: "stale"`` on a read, as the harness records
them with ``--stale-reads``) are exempt from linearizability by design: they
are left out of the linearizability check and checked instead never to go
back in time for their own process.  A stale read that did counts as ``not
linearizable`` (exit 1), with a ``stale read went backwards`` line per case
on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from jepsen_like.checker import (
    FAIL_CONFLICT,
    FAIL_KNOSSOS,
    FORMATS,
    LINEARIZABLE,
    NOT_LINEARIZABLE,
    UNKNOWN,
    KvModel,
    Model,
    RegisterModel,
    check,
    check_stale_reads_monotonic,
    model_for_fs,
    read_history,
    without_stale_reads,
)
from jepsen_like.checker.report import write_html_report

EXIT_CODES = {LINEARIZABLE: 0, NOT_LINEARIZABLE: 1, UNKNOWN: 2}


def choose_model(name: str | None, fmt: str, fs: set[str]) -> Model:
    """The model for a file: as asked, else by format (and functions used).

    The ``kv`` corpus reads a never-written key as ``""``, kvsvr as nil.
    """
    missing = "" if fmt == "kv" else None
    if name == "register":
        return RegisterModel()
    if name == "kv":
        return KvModel(missing=missing)
    if fmt == "jepsen-etcd":
        return RegisterModel()
    if fmt == "kv":
        return KvModel(missing="")
    return model_for_fs(fs)


def fail_convention_for(fmt: str) -> str:
    """Our own histories record why a cas failed, and a Conflict is checked as
    a claim; in Jepsen's etcd logs and the ``kv`` files a failed operation
    did not happen (Knossos's convention)."""
    return FAIL_CONFLICT if fmt == "jsonl" else FAIL_KNOSSOS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jepsen_like.check",
        description="Check histories for linearizability (exit 0: all linearizable, "
        "1: some not, 2: some unknown).",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", type=Path)
    parser.add_argument(
        "--format", choices=FORMATS, help="history format (default: detected per file)"
    )
    parser.add_argument(
        "--model",
        choices=("register", "kv"),
        help="model (default: register for jepsen-etcd, kv for kv, "
        "register for jsonl unless it uses get/put/append/delete)",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=60.0,
        metavar="S",
        help="time budget per file in seconds; past it the verdict is unknown (default 60)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes for hard keys (default 2)"
    )
    parser.add_argument(
        "--report-dir",
        type=Path,
        metavar="DIR",
        help="write an HTML report FILE.html here for each file that is not linearizable",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="details (bad keys, timings) on stderr"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    verdicts: list[str] = []
    for path in args.files:
        try:
            history, fmt = read_history(path, args.format)
            model = choose_model(args.model, fmt, {op.f for op in history})
            stale_problems = check_stale_reads_monotonic(history)
            checked = without_stale_reads(history)
            result = check(
                checked,
                model,
                timeout_s=args.timeout_s,
                workers=args.workers,
                fail_convention=fail_convention_for(fmt),
            )
        except (OSError, ValueError) as exc:
            print(f"{path}: {UNKNOWN}", flush=True)
            print(f"{path}: error: {exc}", file=sys.stderr)
            verdicts.append(UNKNOWN)
            continue
        verdict = NOT_LINEARIZABLE if stale_problems else result.verdict
        verdicts.append(verdict)
        print(f"{path}: {verdict}", flush=True)
        for problem in stale_problems:
            print(f"{path}:   stale read went backwards: {problem}", file=sys.stderr)
        if args.verbose:
            set_aside = len(history) - len(checked)
            print(
                f"{path}: {fmt}, {model.name} model, {len(result.keys)} key(s), "
                f"{result.elapsed_s:.3f} s"
                + (
                    f", {set_aside} stale-read events checked for monotonicity only"
                    if set_aside
                    else ""
                ),
                file=sys.stderr,
            )
            for key in result.bad_keys:
                key_result = result.keys[key]
                print(
                    f"{path}:   key {key!r}: not linearizable, longest linearizable prefix "
                    f"{len(key_result.prefix)} of {len(key_result.ops)} ops, "
                    f"breaks at op {key_result.failed_op}",
                    file=sys.stderr,
                )
            for key in result.unknown_keys:
                note = result.keys[key].note
                print(f"{path}:   key {key!r}: unknown ({note})", file=sys.stderr)
        if args.report_dir is not None and result.verdict == NOT_LINEARIZABLE:
            args.report_dir.mkdir(parents=True, exist_ok=True)
            report = write_html_report(
                result, args.report_dir / f"{path.name}.html", title=str(path)
            )
            print(f"{path}: report {report}", file=sys.stderr)
    combined = (
        NOT_LINEARIZABLE
        if NOT_LINEARIZABLE in verdicts
        else UNKNOWN
        if UNKNOWN in verdicts
        else LINEARIZABLE
    )
    return EXIT_CODES[combined]


if __name__ == "__main__":
    sys.exit(main())

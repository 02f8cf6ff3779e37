"""CPU per call of the pure codecs every node runs several times per operation.

    python -m bench.codec_cpu                 # a table of µs per call
    python -m bench.codec_cpu --json out.json # the same numbers, for comparing
    python -m bench.codec_cpu --compare before.json after.json
    python -m bench.codec_cpu --compare b1.json,b2.json a1.json,a2.json  # best run of each

Each case runs `--number` calls per repeat, timed with `time.process_time`;
the figure is the median of `--repeat` repeats, in µs per call. The inputs are
shaped as the node builds them: rows as `kvsvr/protocol/replica.py` leaves
them (eight recent ops, a proposal in flight or not), Paxos messages in the
envelope `kvsvr/net/connection.py` sends (method "px"/"px1"), and the client's
put/get bodies and replies as `kvsvr/client.py` and `kvsvr/node/server.py`
build them.

To compare two versions of the code, run this file by its path from outside
any checkout (`python -m` puts the current directory first on sys.path), with
each version's root on PYTHONPATH, alternating:

    cd /tmp && git -C REPO archive BASE kvsvr | tar -x -C /tmp/base
    PYTHONPATH=/tmp/base python REPO/bench/codec_cpu.py --json b1.json
    PYTHONPATH=REPO python REPO/bench/codec_cpu.py --json a1.json
    (again for b2/a2, b3/a3)
    python REPO/bench/codec_cpu.py --compare b1.json,b2.json,b3.json a1.json,a2.json,a3.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from kvsvr.net import messages as net
from kvsvr.net.framing import FrameDecoder, encode_frame
from kvsvr.protocol import messages as px
from kvsvr.protocol.state import Accepted, Row
from kvsvr.storage import codec

HLC = 1_763_700_000_000 << 16
OP = (3 << 48) ^ (0x5A5A5A5A5A << 8) ^ 77
TABLE = "kv"
KEY = b"\x00\x0buser0001234\x00"


def _rows(value: bytes) -> dict[str, Row]:
    recent = tuple((1000 - i, OP + i) for i in range(1, 9))
    committed = Row(
        version=1000,
        value=value,
        expires_at_ms=None,
        promised=(5123, 2),
        accepted=None,
        hlc=HLC,
        op_id=OP,
        recent_ops=recent,
    )
    in_flight = Row(
        version=1000,
        value=value,
        expires_at_ms=None,
        promised=(5124, 1),
        accepted=Accepted((5124, 1), 1001, value, None, OP + 1),
        hlc=HLC,
        op_id=OP,
        recent_ops=recent,
    )
    return {"committed": committed, "accepted": in_flight}


def _paxos(value: bytes) -> dict[str, Any]:
    return {
        "Accept": px.Accept(TABLE, KEY, (5124, 1), 1001, value, None, OP + 1, 1000, (5123, 2)),
        "AcceptReply": px.AcceptReply(True, (5124, 1), 1000),
        "Commit": px.Commit(TABLE, KEY, 1001, (5124, 1), False, None, None, OP + 1),
        "Read": px.Read(TABLE, KEY, 1000),
        "ReadReply": px.ReadReply(1000, True, value, None, None, 0, (5123, 2), OP),
        "Promise": px.Promise(
            True,
            (5125, 1),
            1000,
            False,
            None,
            None,
            None,
            OP,
            tuple((999 - i, OP) for i in range(8)),
        ),
    }


def _envelopes(value: bytes) -> dict[str, net.Message]:
    """What travels in frames: Paxos requests and replies, client put/get."""
    messages = _paxos(value)
    out: dict[str, net.Message] = {
        "px Accept": net.Request(41, "px", px.to_wire(messages["Accept"])),
        "px AcceptReply": net.ok_reply(41, px.to_wire(messages["AcceptReply"])),
        "px1 Commit": net.OneWay("px1", px.to_wire(messages["Commit"])),
        "px Read": net.Request(42, "px", px.to_wire(messages["Read"])),
        "px ReadReply": net.ok_reply(42, px.to_wire(messages["ReadReply"])),
        "client put": net.Request(
            7,
            "put",
            {"table": TABLE, "key": KEY, "value": value, "if_version": None, "if_absent": False},
        ),
        "client put reply": net.ok_reply(7, {"version": 1001}),
        "client get": net.Request(8, "get", {"table": TABLE, "key": KEY, "consistency": "strong"}),
        "client get reply": net.ok_reply(8, {"version": 1001, "value": value}),
    }
    return out


def _time(call: Callable[[], object], number: int, repeat: int) -> float:
    """Median µs per call over `repeat` runs of `number` calls."""
    results = []
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(number):
            call()
        results.append((time.process_time() - start) / number * 1e6)
    return statistics.median(results)


def cases() -> dict[str, Callable[[], object]]:
    out: dict[str, Callable[[], object]] = {}
    for size in (100, 1024):
        value = bytes(range(256)) * (size // 256) + bytes(size % 256)
        tag = f"{size}B"
        for kind, row in _rows(value).items():
            data = codec.encode_row(row)
            assert codec.decode_row(data) == row
            out[f"codec.encode_row {kind} {tag}"] = lambda row=row: codec.encode_row(row)
            out[f"codec.decode_row {kind} {tag}"] = lambda data=data: codec.decode_row(data)
            if size == 100:
                out[f"codec._row_ok {kind}"] = lambda row=row: codec._row_ok(row)
                out[f"codec._recent_ops_ok {kind}"] = lambda row=row: codec._recent_ops_ok(
                    row.recent_ops, row.version
                )
        for name, envelope in _envelopes(value).items():
            if size == 1024 and "Accept" not in name and "put" not in name and "get" not in name:
                continue  # no value inside: the 100 B figure says it all
            wire = net.to_wire(envelope)
            frame = encode_frame(wire)
            out[f"framing.encode_message {name} {tag}"] = lambda e=envelope: net.encode_message(e)
            out[f"framing.encode_frame {name} {tag}"] = lambda w=wire: encode_frame(w)

            def decode_one(frame: bytes = frame) -> object:
                decoder = FrameDecoder()
                decoder.feed(frame)
                return decoder.next_frame()

            out[f"framing.feed+next_frame {name} {tag}"] = decode_one
            batch = frame * 64

            def decode_batch(batch: bytes = batch) -> object:
                decoder = FrameDecoder()
                decoder.feed(batch)
                next_frame = decoder.next_frame
                while (frame := next_frame()) is not None:
                    last = frame
                return last

            out[f"framing.next_frame x64 {name} {tag} (per frame)"] = decode_batch
            decoded = FrameDecoder()
            decoded.feed(frame)
            obj = decoded.next_frame()
            out[f"net.from_wire {name} {tag}"] = lambda o=obj: net.from_wire(o)
            out[f"net.to_wire {name} {tag}"] = lambda e=envelope: net.to_wire(e)
        for name, message in _paxos(value).items():
            if size == 1024 and name not in ("Accept", "ReadReply"):
                continue
            raw = px.to_wire(message)
            # as received: through msgpack, so lists and exact types
            decoder = FrameDecoder()
            decoder.feed(encode_frame(raw))
            received = decoder.next_frame()
            assert px.from_wire(received) == message
            out[f"px.to_wire {name} {tag}"] = lambda m=message: px.to_wire(m)
            out[f"px.from_wire {name} {tag}"] = lambda r=received: px.from_wire(r)
    return out


PER_FRAME_DIVISOR = 64


def _best_of(paths: list[str]) -> dict[str, float]:
    """Per case, the lowest median among several runs: on a busy machine the
    other load only ever adds time, so runs alternated between two versions
    compare best against best."""
    best: dict[str, float] = {}
    for path in paths:
        with open(path) as f:
            for name, us in json.load(f).items():
                best[name] = min(us, best.get(name, us))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (_best_of(paths.split(",")) for paths in args.compare)
        print(f"{'case':60} {'before':>8} {'after':>8} {'ratio':>6}")
        for name, old in before.items():
            new = after.get(name)
            if new is not None:
                print(f"{name:60} {old:8.3f} {new:8.3f} {new / old:6.2f}")
        return
    results: dict[str, float] = {}
    for name, call in cases().items():
        if args.only not in name:
            continue
        number = args.number
        if "x64" in name:
            number = max(1, number // PER_FRAME_DIVISOR)
        us = _time(call, number, args.repeat)
        if "x64" in name:
            us /= PER_FRAME_DIVISOR
        results[name] = us
        print(f"{name:60} {us:8.3f} µs", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"(python {sys.version.split()[0]})", file=sys.stderr)


if __name__ == "__main__":
    main()

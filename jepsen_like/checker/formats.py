"""Reading and writing histories.

* JSON Lines, kvsvr's own format: one event per line,
  ``{"process", "type", "f", "key", "value", "time_ns", "index", ...}``; any
  other field is kept in :attr:`Op.extra`.
* Jepsen etcd logs (``INFO  jepsen.util - 3	:invoke	:cas	[1 4]``): a single
  register, no key, no clock.
* EDN maps, one per line (``{:process 0, :type :invoke, :f :get, :key "4",
  :value nil}``): the ``kv`` corpus files, and what :func:`write_edn` emits so
  that histories can be fed to Knossos, Elle or Porcupine's tools.

Formats without a clock get ``time_ns`` = line number, which preserves the
real-time order of events, all that linearizability depends on.  JSON and EDN
only: no pickle, so a stored history can be read by anything.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .history import Op

StrPath = str | os.PathLike[str]

FORMATS = ("jsonl", "jepsen-etcd", "kv")

_JSONL_FIELDS = ("process", "type", "f", "key", "value", "time_ns", "index")


# --------------------------------------------------------------------------- JSONL


def _op_from_mapping(fields: dict[str, Any], position: int) -> Op:
    """Build an :class:`Op` from a decoded JSON or EDN map.

    Missing ``index`` and clock default to the position in the file; keys are
    strings (or ``None``) so that ``1`` and ``"1"`` from different writers
    name the same key.
    """
    try:
        process = fields.pop("process")
        type_ = fields.pop("type")
        f = fields.pop("f")
    except KeyError as missing:
        raise ValueError(f"event {position}: missing field {missing}") from None
    key = fields.pop("key", None)
    value = fields.pop("value", None)
    index = fields.pop("index", position)
    # JSONL says time_ns, EDN (Jepsen) says time; accept either in both.
    time_ns = fields.pop("time_ns", None)
    time_alt = fields.pop("time", None)
    if time_ns is None:
        time_ns = index if time_alt is None else time_alt
    if not isinstance(process, int) or isinstance(process, bool):
        raise ValueError(f"event {position}: process must be an integer, got {process!r}")
    return Op(
        process=process,
        type=str(type_),
        f=str(f),
        key=None if key is None else str(key),
        value=value,
        time_ns=int(time_ns),
        index=int(index),
        extra=fields,
    )


def read_jsonl(path: StrPath) -> list[Op]:
    """Read a JSON Lines history (blank lines are skipped)."""
    ops: list[Op] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
            if not isinstance(fields, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            if fields.get("process") == "nemesis":
                # Fault-injection events share the history file (as in Jepsen);
                # they are no client's operations, so the checker skips them.
                continue
            ops.append(_op_from_mapping(fields, len(ops)))
    return ops


def op_to_json(op: Op) -> dict[str, Any]:
    """The JSON object for one event; ``extra`` fields sit beside the others."""
    obj: dict[str, Any] = {
        "process": op.process,
        "type": op.type,
        "f": op.f,
        "key": op.key,
        "value": op.value,
        "time_ns": op.time_ns,
        "index": op.index,
    }
    for name, value in op.extra.items():
        if name in obj:
            raise ValueError(f"extra field {name!r} of event {op.index} shadows a field")
        obj[name] = value
    return obj


def write_jsonl(history: Iterable[Op], path: StrPath) -> None:
    """Write a history as JSON Lines, one event per line."""
    with open(path, "w", encoding="utf-8") as fh:
        for op in history:
            fh.write(json.dumps(op_to_json(op), separators=(",", ":")))
            fh.write("\n")


# --------------------------------------------------------------------------- EDN


class Keyword(str):
    """An EDN keyword's name (``:timed-out`` is ``Keyword("timed-out")``).

    A ``str`` so that it compares and serialises like one, but a distinct type
    so that :func:`write_edn` writes it back as a keyword, not a string.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return ":" + str(self)


class Symbol(str):
    """An EDN symbol other than nil/true/false (kept, rarely meaningful)."""

    __slots__ = ()


_EDN_TOKEN = re.compile(
    r"""
    (?P<ws>[\s,]+|;[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<open>\#\{|[\[{(])
  | (?P<close>[\]})])
  | (?P<keyword>:[^\s,\[\]{}()";]+)
  | (?P<atom>[^\s,\[\]{}()";]+)
    """,
    re.VERBOSE | re.DOTALL,
)
_INT = re.compile(r"[+-]?\d+N?")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\d*\.\d+|\d+)([eE][+-]?\d+)?M?")
_STRING_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "b": "\b", "f": "\f"}


def _unescape(body: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt == "u" and i + 6 <= len(body):
                out.append(chr(int(body[i + 2 : i + 6], 16)))
                i += 6
                continue
            out.append(_STRING_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _atom(text: str) -> Any:
    if text == "nil":
        return None
    if text == "true":
        return True
    if text == "false":
        return False
    if _INT.fullmatch(text):
        return int(text.rstrip("N"))
    if _FLOAT.fullmatch(text):
        return float(text.rstrip("M"))
    return Symbol(text)


def parse_edn(text: str) -> list[Any]:
    """Parse a sequence of EDN forms: maps, vectors, lists, sets, scalars.

    Enough EDN for Jepsen histories (no tagged literals other than sets, no
    characters).  Maps become dicts with :class:`Keyword` keys as plain
    strings' subclass, vectors and lists become lists.
    """
    stack: list[tuple[str, list[Any]]] = [("top", [])]
    closers = {"[": "]", "(": ")", "{": "}", "#{": "}"}
    pos = 0
    while pos < len(text):
        m = _EDN_TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"EDN: cannot parse at offset {pos}: {text[pos : pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup
        token = m.group()
        if kind == "ws":
            continue
        if kind == "open":
            stack.append((token, []))
            continue
        if kind == "close":
            opener, items = stack.pop() if len(stack) > 1 else ("top", [])
            if opener == "top" or closers[opener] != token:
                raise ValueError(f"EDN: unexpected {token!r} at offset {m.start()}")
            value: Any
            if opener == "{":
                if len(items) % 2:
                    raise ValueError(f"EDN: odd number of forms in map ending at {m.start()}")
                value = {items[i]: items[i + 1] for i in range(0, len(items), 2)}
            elif opener == "#{":
                value = set(items)
            else:
                value = items
            stack[-1][1].append(value)
            continue
        if kind == "string":
            value = _unescape(token[1:-1])
        elif kind == "keyword":
            value = Keyword(token[1:])
        else:
            value = _atom(token)
        stack[-1][1].append(value)
    if len(stack) != 1:
        raise ValueError("EDN: unclosed collection at end of input")
    return stack[0][1]


def to_edn(value: Any) -> str:
    """One value as EDN text (strings quoted, :class:`Keyword` as keywords)."""
    if value is None:
        return "nil"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, Keyword):
        return ":" + str(value)
    if isinstance(value, str):
        escaped = (
            value.replace("\\", "\\\\")
            .replace('"', '\\"')
            .replace("\n", "\\n")
            .replace("\t", "\\t")
            .replace("\r", "\\r")
        )
        return f'"{escaped}"'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"EDN cannot represent {value!r}")
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + " ".join(to_edn(v) for v in value) + "]"
    if isinstance(value, set | frozenset):
        return "#{" + " ".join(sorted(to_edn(v) for v in value)) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{to_edn(k)} {to_edn(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as EDN")


def op_to_edn(op: Op) -> str:
    """One event as a Jepsen-style EDN map (``:time`` holds ``time_ns``)."""
    fields: list[tuple[str, Any]] = [
        ("process", op.process),
        ("type", Keyword(op.type)),
        ("f", Keyword(op.f)),
    ]
    if op.key is not None:
        fields.append(("key", op.key))
    fields += [("value", op.value), ("time", op.time_ns), ("index", op.index)]
    fields += list(op.extra.items())
    return "{" + ", ".join(f":{name} {to_edn(value)}" for name, value in fields) + "}"


def write_edn(history: Iterable[Op], path: StrPath) -> None:
    """Write a history as EDN maps, one per line, readable by Jepsen's tools."""
    with open(path, "w", encoding="utf-8") as fh:
        for op in history:
            fh.write(op_to_edn(op))
            fh.write("\n")


def read_kv_edn(path: StrPath) -> list[Op]:
    """Read a history of EDN maps (the ``kv`` corpus files, or :func:`write_edn`).

    Events of a non-integer process (``:nemesis``) are skipped: they are fault
    injections, not client operations.  Map keys become field names.
    """
    text = Path(path).read_text(encoding="utf-8")
    ops: list[Op] = []
    for form in parse_edn(text):
        if not isinstance(form, dict):
            raise ValueError(f"{path}: expected EDN maps, found {to_edn(form)[:40]}")
        fields = {str(k): v for k, v in form.items()}
        process = fields.get("process")
        if not isinstance(process, int) or isinstance(process, bool):
            continue
        ops.append(_op_from_mapping(fields, len(ops)))
    return ops


# --------------------------------------------------------------------------- Jepsen etcd logs

_ETCD_LINE = re.compile(r"jepsen\.util - (\S+)\s+:(\w+)\s+:(\S+)\s*(.*?)\s*$")


def read_jepsen_etcd(path: StrPath) -> list[Op]:
    """Read a Jepsen etcd log: one register, lines ``P :type :f value``.

    Other lines (nemesis, stack traces) are skipped.  Error completions such as
    ``:info :write :timed-out`` keep the invoke's value (the pairing ignores
    it) and record the error in ``extra["error"]``.  ``:fail :read :timed-out``
    becomes ``info``: the read returned nothing, so its result is unknown
    rather than "did not happen" (for a read the two are checked alike).
    """
    ops: list[Op] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            m = _ETCD_LINE.search(line)
            if m is None:
                continue
            process_text, type_, f, value_text = m.groups()
            if not re.fullmatch(r"\d+", process_text) or type_ not in (
                "invoke",
                "ok",
                "fail",
                "info",
            ):
                continue
            forms = parse_edn(value_text) if value_text else [None]
            value = forms[0] if forms else None
            extra: dict[str, Any] = {}
            if isinstance(value, Keyword):
                extra["error"] = str(value)
                value = None
                if type_ == "fail" and f == "read":
                    type_ = "info"
            index = len(ops)
            ops.append(Op(int(process_text), type_, f, None, value, index, index, extra))
    return ops


# --------------------------------------------------------------------------- dispatch


def detect_format(path: StrPath) -> str:
    """Guess a file's format from its first meaningful line, then its name."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for _, line in zip(range(200), fh, strict=False):
            stripped = line.strip()
            if not stripped:
                continue
            if "jepsen.util - " in stripped:
                return "jepsen-etcd"
            if stripped.startswith('{"') or stripped.startswith('{ "'):
                return "jsonl"
            if stripped.startswith("{:") or stripped.startswith("[{:"):
                return "kv"
    name = os.fspath(path)
    if name.endswith(".log"):
        return "jepsen-etcd"
    if name.endswith((".edn", ".txt")):
        return "kv"
    return "jsonl"


def read_history(path: StrPath, format: str | None = None) -> tuple[list[Op], str]:
    """Read ``path`` in ``format`` (detected when ``None``); returns (history, format)."""
    fmt = format or detect_format(path)
    if fmt == "jsonl":
        return read_jsonl(path), fmt
    if fmt == "jepsen-etcd":
        return read_jepsen_etcd(path), fmt
    if fmt in ("kv", "edn"):
        return read_kv_edn(path), "kv"
    raise ValueError(f"unknown history format {fmt!r} (known: {', '.join(FORMATS)})")

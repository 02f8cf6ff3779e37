"""Linearizability checker for kvsvr histories (Wing & Gong / Lowe / Porcupine).

Pure Python, no cluster needed.

* History model: :class:`Op` events (invoke / ok / fail / info), paired into
  :class:`Operation` intervals by :func:`pair_history`.
* Readers and writers: :func:`read_jsonl` / :func:`write_jsonl` (kvsvr's
  format), :func:`read_jepsen_etcd`, :func:`read_kv_edn` / :func:`write_edn`,
  and :func:`read_history` which detects the format.
* Models: :class:`RegisterModel` (read / write / cas, nil initially) and
  :class:`KvModel` (get / put / append / delete, plus the register
  functions), both per key.
* :func:`check` splits a history per key, searches each key (in worker
  processes when that pays) within a time budget and returns a
  :class:`CheckResult`; :func:`write_html_report` explains a violation.
* :func:`check_stale_reads_monotonic` checks kvsvr's stale reads per process;
  :func:`without_stale_reads` leaves them out of the linearizability check.

The command line is ``python -m jepsen_like.check``.
"""

from .core import (
    LINEARIZABLE,
    NOT_LINEARIZABLE,
    UNKNOWN,
    CheckResult,
    KeyResult,
    check,
    check_operations,
    combine_verdicts,
    prepare,
)
from .formats import (
    FORMATS,
    Keyword,
    detect_format,
    parse_edn,
    read_history,
    read_jepsen_etcd,
    read_jsonl,
    read_kv_edn,
    to_edn,
    write_edn,
    write_jsonl,
)
from .history import (
    CAS_CONFLICT,
    FAIL_CONFLICT,
    FAIL_CONVENTIONS,
    FAIL_KNOSSOS,
    UNREPORTED,
    Op,
    Operation,
    freeze,
    pair_history,
)
from .models import BaseModel, KvModel, Model, RegisterModel, model_for_fs
from .report import render_html_report, write_html_report
from .stale import StaleReadProblem, check_stale_reads_monotonic, is_stale_read, without_stale_reads

__all__ = [
    "CAS_CONFLICT",
    "FAIL_CONFLICT",
    "FAIL_CONVENTIONS",
    "FAIL_KNOSSOS",
    "FORMATS",
    "LINEARIZABLE",
    "NOT_LINEARIZABLE",
    "UNKNOWN",
    "UNREPORTED",
    "BaseModel",
    "CheckResult",
    "KeyResult",
    "Keyword",
    "KvModel",
    "Model",
    "Op",
    "Operation",
    "RegisterModel",
    "StaleReadProblem",
    "check",
    "check_operations",
    "check_stale_reads_monotonic",
    "combine_verdicts",
    "detect_format",
    "freeze",
    "is_stale_read",
    "model_for_fs",
    "pair_history",
    "parse_edn",
    "prepare",
    "read_history",
    "read_jepsen_etcd",
    "read_jsonl",
    "read_kv_edn",
    "render_html_report",
    "to_edn",
    "without_stale_reads",
    "write_edn",
    "write_html_report",
    "write_jsonl",
]

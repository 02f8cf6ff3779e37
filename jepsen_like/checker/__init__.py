"""Linearizability checker for kvsvr histories (Wing & Gong / Lowe / Porcupine).

Pure Python, no cluster needed.  See :func:`check` for the entry point and
``python -m jepsen_like.check`` for the command line.
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
from .history import Op, Operation, freeze, pair_history
from .models import BaseModel, KvModel, Model, RegisterModel, model_for_fs
from .report import render_html_report, write_html_report
from .stale import StaleReadProblem, check_stale_reads_monotonic

__all__ = [
    "FORMATS",
    "LINEARIZABLE",
    "NOT_LINEARIZABLE",
    "UNKNOWN",
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
    "write_edn",
    "write_html_report",
    "write_jsonl",
]

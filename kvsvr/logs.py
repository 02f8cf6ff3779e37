"""The node's logging setup: text lines (the default) or one JSON object per line.

`--log-format text`:

    2026-12-07 06:30:22,123 n1 INFO kvsvr.node: node n1 serving on 127.0.0.1:7101

`--log-format json` (python-json-logger's formatter, stdlib `logging`):

    {"time": "2026-12-07T06:30:22.123000+00:00", "level": "INFO", "node": "n1",
     "event": "node n1 serving on 127.0.0.1:7101", "fields": {"logger": "kvsvr.node"}}

(one line each). `event` is the message as the text format prints it;
`fields` holds the logger's name and anything a call passes in `extra=`,
and a traceback as `exc_info`. Log processors (Loki, Elasticsearch,
CloudWatch) read these lines as they are.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final, TextIO

from pythonjsonlogger.json import JsonFormatter

TEXT: Final = "text"
JSON: Final = "json"
LOG_FORMATS: Final = (TEXT, JSON)

# The keys every JSON line has; everything else goes under "fields".
JSON_KEYS: Final = ("time", "level", "node", "event", "fields")


class NodeJsonFormatter(JsonFormatter):
    """One JSON object per record, with the keys of `JSON_KEYS`."""

    def __init__(self, node_id: str) -> None:
        super().__init__(
            "%(levelname)s %(message)s %(name)s",
            rename_fields={"levelname": "level", "message": "event", "name": "logger"},
            static_fields={"node": node_id},
            timestamp="time",
        )

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        fields = {key: log_data.pop(key) for key in list(log_data) if key not in JSON_KEYS}
        ordered = {key: log_data.get(key) for key in JSON_KEYS if key != "fields"}
        ordered["fields"] = fields
        return ordered


def text_formatter(node_id: str) -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s {node_id} %(levelname)s %(name)s: %(message)s")


def configure(node_id: str, log_format: str, stream: TextIO | None = None) -> None:
    """Send the root logger's INFO and above to `stream` (stderr) in `log_format`,
    replacing any handler set before."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    formatter = NodeJsonFormatter(node_id) if log_format == JSON else text_formatter(node_id)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)

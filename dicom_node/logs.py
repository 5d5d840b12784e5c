"""The node's log: readable lines or JSON lines on stderr, libraries quiet, no patient data from libraries.

``[node] log_format = "json"`` writes one JSON object per record (``time`` ISO 8601 UTC, ``level``,
``logger``, ``thread``, ``message`` and, when there is one, the traceback as ``exc``) for a log shipper;
``[node] library_log_level`` keeps the INFO lines of pynetdicom, apscheduler, highdicom, PIL and onnxruntime
out of a hospital's log. :mod:`dicom_node.logsafe` redacts the values libraries quote.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from .logsafe import install as install_redaction

#: Libraries whose INFO lines are noise in the node's log (``[node] library_log_level`` applies to them).
LIBRARY_LOGGERS = ("pynetdicom", "apscheduler", "highdicom", "PIL", "onnxruntime", "urllib3")

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


#: Control characters in a text line's message (a tab stays): escaped, so that a value quoted from a received header
#: (a SOP Instance UID "1.2\n2026-01-01 ERROR ...") cannot start a forged line of its own
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT`, one line per record's message: its control characters escaped (``\\n``, ``\\x1b``); a
    traceback or stack follows on lines of its own, each indented, so that none (an exception's message may quote a
    received value too) can pass for a record."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def setup_logging(level: str, fmt: str = "text", library_level: str = "WARNING",
                  stream: TextIO | None = None) -> None:
    """Configure the root logger once for a command (replacing handlers an earlier call installed)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(getattr(logging, library_level))
    install_redaction()  # no patient data in the log through library warnings

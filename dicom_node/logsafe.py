"""Keep patient data out of the node's log.

pydicom reports a value it finds invalid with the value itself (``Invalid value for VR PN:
'Doe^John\\x01'``), through its logger and through :mod:`warnings`; converting PatientName or
PatientID of a received object is enough. :func:`install` routes warnings into logging (no raw
lines on stderr), keeps one copy of each (pydicom's own logger is raised to ERROR), and redacts every
quoted value in the records of pydicom and of warnings.
"""

from __future__ import annotations

import logging
import re

#: A Python repr of a str or bytes value, as pydicom writes them into its messages.
_QUOTED = re.compile(r"""b?'(?:[^'\\]|\\.)*'|b?"(?:[^"\\]|\\.)*\"""")
_LIBRARY_LOGGERS = ("pydicom", "py.warnings")
REDACTED = "<value withheld>"


class RedactLibraryValues(logging.Filter):
    """Replaces quoted values in records of pydicom and of the warnings module."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in ("pydicom", "py"):
            message = record.getMessage()
            redacted = _QUOTED.sub(REDACTED, message)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


def install() -> None:
    """Route warnings into logging and redact library values in every root handler's output."""
    logging.captureWarnings(True)
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # its warnings arrive once, via py.warnings
    redact = RedactLibraryValues()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactLibraryValues) for f in handler.filters):
            handler.addFilter(redact)

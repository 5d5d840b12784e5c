"""Tests for dicom_node.logs: text or JSON lines, libraries quiet by default."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from dicom_node.logs import LIBRARY_LOGGERS, setup_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


def test_json_lines_with_the_traceback() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", stream=stream)
    logging.getLogger("dicom_node.jobs").info("job %d written", 7)
    try:
        raise ValueError("bad geometry")
    except ValueError:
        logging.getLogger("dicom_node.jobs").exception("job %d failed", 8)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "INFO" and first["logger"] == "dicom_node.jobs" and first["message"] == "job 7 written"
    assert first["time"].endswith("+00:00") and "exc" not in first
    assert second["level"] == "ERROR" and "ValueError: bad geometry" in second["exc"]


def test_a_value_from_a_received_header_cannot_forge_a_text_line() -> None:
    """Found in review: a C-STORE whose SOP Instance UID held a newline wrote a line of the sender's choosing into the
    node's text log ("2026-01-01 ERROR ..."). A text line's message has its control characters escaped; a traceback
    still follows on lines of its own."""
    stream = io.StringIO()
    setup_logging("INFO", "text", stream=stream)
    log = logging.getLogger("dicom_node.scp")
    log.error("C-STORE of %s from %s refused", "1.2\n2026-01-01 00:00:00,000 ERROR   dicom_node.jobs: forged\x1b[2J",
              "MR1")
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("job %d failed", 8)
    lines = stream.getvalue().splitlines()
    escaped = "1.2\\n2026-01-01 00:00:00,000 ERROR   dicom_node.jobs: forged\\x1b[2J"
    assert f"C-STORE of {escaped} from MR1 refused" in lines[0]
    assert lines[1].endswith("dicom_node.scp: job 8 failed") and lines[2] == "  Traceback (most recent call last):"
    assert lines[-1] == "  ValueError: bad" and all(line.startswith("  ") for line in lines[2:])
    stream.truncate(0)
    stream.seek(0)
    try:  # an exception's message quoting a received value: indented with the rest of its traceback
        raise ValueError("SOPInstanceUID 1.2\n2026-01-01 00:00:00,000 ERROR   dicom_node.jobs: forged")
    except ValueError:
        log.exception("C-STORE failed unexpectedly")
    assert all(line.startswith("  ") for line in stream.getvalue().splitlines()[1:])


def test_library_info_is_quiet_by_default_and_can_be_shown() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "text", stream=stream)
    for name in ("pynetdicom.assoc", "highdicom.seg.sop", "apscheduler.scheduler"):
        logging.getLogger(name).info("noise from %s", name)
    logging.getLogger("dicom_node.scp").info("listening")
    assert stream.getvalue().count("\n") == 1 and "dicom_node.scp: listening" in stream.getvalue()
    stream = io.StringIO()
    setup_logging("INFO", "text", library_level="INFO", stream=stream)
    logging.getLogger("highdicom.seg.sop").info("now shown")
    assert "highdicom.seg.sop: now shown" in stream.getvalue()


def test_library_values_stay_redacted_in_json() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", stream=stream)
    logging.getLogger("pydicom").error("Invalid value for VR PN: 'Doe^John'")
    line = json.loads(stream.getvalue())
    assert "Doe^John" not in line["message"] and "withheld" in line["message"]

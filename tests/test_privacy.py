"""Patient data stays private: file modes of what the node writes, no received values in its log,
and the node runs as a user of its own (not root)."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from dicom_node.logsafe import REDACTED, RedactLibraryValues
from dicom_node.scp import STATUS_SUCCESS
from tests.dicom_factory import make_mr_series
from tests.e2e.node_proc import REPO, NodeProcess

SECRET = "SecretPatientId"


def _store(port: int, called: str, path: Path) -> int:
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def _instance(tmp_path: Path) -> Path:
    path = make_mr_series(tmp_path / "series", shape=(1, 16, 16))[0]
    ds = dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_are_private_and_values_stay_out_of_the_log(tmp_path: Path) -> None:
    (tmp_path / "no-models").mkdir()
    instance = _instance(tmp_path)
    node = NodeProcess(tmp_path / "node", models_dir=tmp_path / "no-models", rules=[], node={"fsync": False})
    node.data_dir.mkdir(parents=True)
    node.data_dir.chmod(0o755)  # as an earlier version left it
    node.start()
    try:
        assert _store(node.port, node.ae_title, instance) == STATUS_SUCCESS
        umask = next(line.split()[1] for line in Path(f"/proc/{node.pid}/status").read_text().splitlines()
                     if line.startswith("Umask:"))
    finally:
        node.stop()
    assert umask == "0077"
    data = node.data_dir
    assert _mode(data) == 0o700
    assert _mode(data / "outputs") == 0o700
    journal = sorted(data.glob("journal.sqlite3*"))
    assert journal and all(_mode(p) == 0o600 for p in journal), {p.name: oct(_mode(p)) for p in journal}
    spooled = [p for p in (data / "spool").rglob("*")]
    assert any(p.suffix == ".dcm" for p in spooled)
    for p in spooled + [data / "spool"]:
        assert _mode(p) == (0o700 if p.is_dir() else 0o600), f"{p}: {oct(_mode(p))}"
    assert "readable by other users: now 0700" in node.log()


_READ_INVALID_VALUES = f"""
import io
from pydicom import dcmread
from pydicom.dataset import Dataset
import pydicom.config
from dicom_node.cli import _setup_logging

_setup_logging("INFO")
pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
ds = Dataset()
ds.PatientName = "Doe^Jane"
ds.PatientBirthDate = "{SECRET}"  # not a DA: pydicom quotes it when the value is read
ds.PatientSex = "female {SECRET}"
buffer = io.BytesIO()
ds.save_as(buffer, implicit_vr=False, little_endian=True)
read = dcmread(io.BytesIO(buffer.getvalue()), force=True)
print(read.PatientBirthDate, read.PatientSex, file=open("/dev/null", "w"))
"""


def test_library_warnings_do_not_log_received_values() -> None:
    """As ``serve`` sets up logging: pydicom's warnings about the values of a header it reads (as the
    jobs do with the patient module) reach the log once each, with the value withheld."""
    result = subprocess.run([sys.executable, "-c", _READ_INVALID_VALUES], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr, result.stderr
    assert result.stderr.count(f"Invalid value for VR DA: {REDACTED}") == 1, result.stderr


def test_library_values_are_redacted() -> None:
    record = logging.LogRecord("py.warnings", logging.WARNING, __file__, 1,
                               "%s", ("valuerep.py:440: UserWarning: Invalid value for VR PN: 'Doe^John\\x01'.",),
                               None)
    assert RedactLibraryValues().filter(record)
    assert record.getMessage() == f"valuerep.py:440: UserWarning: Invalid value for VR PN: {REDACTED}."
    own = logging.LogRecord("dicom_node.scp", logging.INFO, __file__, 1, "series %r", ("T1 'sag'",), None)
    RedactLibraryValues().filter(own)
    assert "T1" in own.getMessage()  # the node's own lines are left as they are


def _runs_as_nobody() -> str | None:
    """Why the node cannot be run as 'nobody' here, or None."""
    if os.geteuid() != 0:
        return "needs root to switch to the user 'nobody'"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux)"
    probe = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                            "-c", "import dicom_node.cli, pynetdicom"], cwd=REPO, capture_output=True, text=True,
                           timeout=60, check=False)
    if probe.returncode != 0:
        return (f"the user 'nobody' cannot run {sys.executable} with the node's packages here (e.g. an "
                f"interpreter under /root): {probe.stderr.strip().splitlines()[-1:]}")
    return None


def test_node_runs_as_an_unprivileged_user(tmp_path: Path) -> None:
    reason = _runs_as_nobody()
    if reason:
        pytest.skip(reason)
    import pwd

    nobody = pwd.getpwnam("nobody")
    (tmp_path / "no-models").mkdir()
    instance = _instance(tmp_path)
    node = NodeProcess(tmp_path / "node", models_dir=tmp_path / "no-models", rules=[], node={"fsync": False},
                       user="nobody")
    node.data_dir.mkdir(parents=True)
    os.chown(node.data_dir, nobody.pw_uid, nobody.pw_gid)
    tmp_path.chmod(0o755)
    node.start()
    try:
        assert _store(node.port, node.ae_title, instance) == STATUS_SUCCESS
        uid = next(line.split()[1] for line in Path(f"/proc/{node.pid}/status").read_text().splitlines()
                   if line.startswith("Uid:"))
    finally:
        node.stop()
    assert int(uid) == nobody.pw_uid
    assert all(p.stat().st_uid == nobody.pw_uid for p in node.data_dir.rglob("*"))

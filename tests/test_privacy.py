"""Patient data stays private: file modes of what the node writes, no received values in its log,
and the node runs as a user of its own (not root)."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
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
from dicom_node.logs import setup_logging

setup_logging("INFO")
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


def _unprivileged_run_impossible() -> str | None:
    """Why the node cannot be run as 'nobody' here, or None."""
    if os.geteuid() != 0:
        return "needs root to switch to the user 'nobody'"
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return "no user 'nobody' on this host"
    return None


def _proc_ids(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid (real, effective, saved, filesystem) and Groups lines of /proc/PID/status."""
    ids = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            ids[key] = [int(v) for v in value.split()]
    return ids


def test_node_runs_as_an_unprivileged_user() -> None:
    """``serve`` as 'nobody' (the launcher starts as root, imports, then drops to it for good, as the
    Python here lives under /root, which 'nobody' cannot read): a series sent with dcmtk storescu is
    stored, and the data directory, spool and journal belong to 'nobody' with modes 0700/0600."""
    reason = _unprivileged_run_impossible()
    if reason:
        pytest.skip(reason)
    from tests.e2e.peers import failed_stores, missing_tools, storescu, tools_verdict

    verdict = tools_verdict(missing_tools())
    if verdict is not None:
        (pytest.fail if verdict[0] == "fail" else pytest.skip)(verdict[1])
    nobody = pwd.getpwnam("nobody")
    # not under pytest's tmp_path: its parent (/tmp/pytest-of-root) is 0700, which 'nobody' cannot cross
    workdir = Path(tempfile.mkdtemp(prefix="dicom-node-nobody-"))
    try:
        workdir.chmod(0o755)
        (workdir / "no-models").mkdir(mode=0o755)
        series = make_mr_series(workdir / "series", shape=(4, 16, 16))
        node = NodeProcess(workdir / "node", models_dir=workdir / "no-models", rules=[], node={"fsync": False},
                           user="nobody")
        node.data_dir.mkdir(parents=True)
        os.chown(node.data_dir, nobody.pw_uid, nobody.pw_gid)
        node.start()
        try:
            ids = _proc_ids(node.pid)
            result = storescu(node.port, series, called_ae=node.ae_title, calling_ae="SCANNER")
            assert result.returncode == 0 and not failed_stores(result), result.stdout + result.stderr
            node.wait_for(lambda j: len(j.instances(str(dcmread(series[0]).SeriesInstanceUID))) == len(series),
                          timeout=30, what="the series in the journal")
            umask = next(line.split()[1] for line in Path(f"/proc/{node.pid}/status").read_text().splitlines()
                         if line.startswith("Umask:"))
        finally:
            node.stop()
        assert ids["Uid"] == [nobody.pw_uid] * 4, ids
        assert ids["Gid"] == [nobody.pw_gid] * 4, ids
        assert ids["Groups"] == [], ids
        assert umask == "0077"
        data = node.data_dir
        written = [data, *data.rglob("*")]
        assert any(p.suffix == ".dcm" for p in written)
        assert sorted(p.name for p in data.glob("journal.sqlite3*"))
        for path in written:
            assert path.stat().st_uid == nobody.pw_uid, f"{path} belongs to uid {path.stat().st_uid}"
            assert _mode(path) == (0o700 if path.is_dir() else 0o600), f"{path}: {oct(_mode(path))}"
        log = node.log()
        assert "ready" in log
        for problem in ("Permission denied", "Traceback", "ModuleNotFoundError"):
            assert problem not in log, log[-3000:]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

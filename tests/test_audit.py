"""Tests for dicom_node.audit: the JSON-lines audit trail of associations, deliveries and operator actions."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE

from dicom_node.audit import AssociationLedger, AuditTrail
from dicom_node.config import Destination, NodeConfig, NodeSettings, Peer
from dicom_node.dispatch import Dispatcher
from dicom_node.journal import Journal
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from tests.dicom_factory import make_mr_series
from tests.e2e.peers import free_port


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _wait_for_events(path: Path, n: int, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(_events(path)) >= n:
            break
        time.sleep(0.02)
    return _events(path) if path.exists() else []


def test_trail_writes_json_lines_and_follows_logrotate(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    trail = AuditTrail(path, "NODE")
    trail.record("operator", action="retry", by="alice", items=2)
    path.rename(tmp_path / "audit" / "audit.jsonl.1")  # logrotate moves the file away
    trail.record("operator", action="retry", by="bob", items=0)
    trail.close()
    first, = _events(tmp_path / "audit" / "audit.jsonl.1")
    second, = _events(path)
    assert first["event"] == "operator" and first["by"] == "alice" and first["items"] == 2
    assert first["node"] == "NODE" and first["time"].endswith("+00:00")
    assert second["by"] == "bob"


def test_the_shipped_logrotate_file_rotates_the_trail_without_losing_a_line(tmp_path: Path) -> None:
    """deploy/dicom-node.logrotate, run by logrotate itself (its path and owner made this test's): the lines written
    before are in the rotated file, those after in a new file readable by its owner only (the trail holds patient
    IDs), and the node needs no signal."""
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    if not Path(logrotate).exists():
        pytest.skip("logrotate is not installed (.ci/install-test-deps.sh installs it)")
    shipped = (Path(__file__).resolve().parents[1] / "deploy" / "dicom-node.logrotate").read_text(encoding="utf-8")
    assert "/var/lib/dicom-node/audit.jsonl {" in shipped and "create 0600 dicom-node dicom-node" in shipped
    path = tmp_path / "data" / "audit.jsonl"
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    conf = tmp_path / "dicom-node.logrotate"
    conf.write_text(shipped.replace("/var/lib/dicom-node/audit.jsonl", str(path))
                    .replace("create 0600 dicom-node dicom-node", f"create 0600 {user} {group}"), encoding="utf-8")
    conf.chmod(0o644)
    trail = AuditTrail(path, "NODE")
    try:
        trail.record("operator", action="retry", by="alice", items=1)
        done = subprocess.run([logrotate, "--force", "--state", str(tmp_path / "state"), str(conf)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        rotated = path.with_name("audit.jsonl.1")
        assert [e["by"] for e in _events(rotated)] == ["alice"]
        assert path.exists() and path.stat().st_size == 0 and stat.S_IMODE(path.stat().st_mode) == 0o600
        trail.record("operator", action="retry", by="bob", items=0)
    finally:
        trail.close()
    assert [e["by"] for e in _events(path)] == ["bob"]
    assert [e["by"] for e in _events(rotated)] == ["alice"]


def test_disabled_trail_writes_nothing(tmp_path: Path) -> None:
    trail = AuditTrail(None, "NODE")
    trail.record("operator", action="retry", by="alice")
    trail.close()
    assert list(tmp_path.iterdir()) == []


def test_ledger_counts_per_series_and_forgets_closed_associations() -> None:
    ledger = AssociationLedger()
    for _ in range(3):
        ledger.stored(1, "P1", "1.2", "1.2.3")
    ledger.stored(1, "P1", "1.2", "1.2.4")
    ledger.refused(1, 0xA700)
    ledger.stored(2, "P2", "1.5", "1.5.6")
    assert ledger.close(1) == {
        "stored": [{"patient_id": "P1", "study_uid": "1.2", "series_uid": "1.2.3", "instances": 3},
                   {"patient_id": "P1", "study_uid": "1.2", "series_uid": "1.2.4", "instances": 1}],
        "refused": {"0xA700": 1}}
    assert ledger.close(1) == {"stored": [], "refused": {}}
    assert ledger.close(2)["stored"][0]["patient_id"] == "P2"


def test_the_scp_audits_each_association_and_each_rejection(tmp_path: Path) -> None:
    """A scanner's association: who (calling AE, host), what it stored per series with the patient ID, and what
    was refused; an unknown AE title's rejection with the reason."""
    config = NodeConfig(node=NodeSettings(ae_title="NODE", host="127.0.0.1", port=free_port(),
                                          data_dir=tmp_path / "data", fsync=False),
                        peers=[Peer(ae_title="MR1")])
    journal = Journal(tmp_path / "data" / "journal.sqlite3", fsync=False)
    trail = AuditTrail(config.audit_path(), "NODE")
    scp = StorageSCP(config, Spool(tmp_path / "data" / "spool", fsync=False), journal, on_released=lambda s: None,
                     audit=trail)
    scp.start()
    try:
        files = make_mr_series(tmp_path / "series", shape=(3, 8, 8))
        ae = AE(ae_title="MR1")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="NODE")
        assert assoc.is_established
        for f in files:
            assert assoc.send_c_store(dcmread(f)).Status == 0x0000
        broken = dcmread(files[0])
        broken.SOPInstanceUID = "1.2.3.998"
        del broken.SeriesInstanceUID  # refused: an image without a series
        assert assoc.send_c_store(broken).Status != 0x0000
        assoc.release()
        stranger = AE(ae_title="UNKNOWN")
        stranger.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assert not stranger.associate("127.0.0.1", scp.port, ae_title="NODE").is_established
        events = _wait_for_events(tmp_path / "data" / "audit.jsonl", 2)
    finally:
        scp.stop()
        trail.close()
        journal.close()
    association = next(e for e in events if e["event"] == "association")
    first = dcmread(files[0])
    assert association["outcome"] == "released" and association["calling_ae"] == "MR1"
    assert association["called_ae"] == "NODE" and association["host"] == "127.0.0.1" and association["tls"] is None
    assert association["stored"] == [{"patient_id": first.PatientID, "study_uid": first.StudyInstanceUID,
                                      "series_uid": first.SeriesInstanceUID, "instances": len(files)}]
    assert sum(association["refused"].values()) == 1
    rejected = next(e for e in events if e["event"] == "association-rejected")
    assert rejected["calling_ae"] == "UNKNOWN" and "not" in rejected["reason"]


def test_the_dispatcher_audits_a_delivery_that_cannot_connect(tmp_path: Path) -> None:
    """An attempt that fails is audited with its error and the studies it carried."""
    from dicom_node.headers import InstanceHeader, ReceivedInstance, SeriesAttributes

    config = NodeConfig(node=NodeSettings(data_dir=tmp_path / "data", fsync=False),
                        destinations=[Destination(name="PACS", ae_title="PACS", host="127.0.0.1", port=free_port())])
    journal = Journal(tmp_path / "data" / "journal.sqlite3", fsync=False)
    received = ReceivedInstance("1.9.1", "1.2.840.10008.5.1.4.1.1.4", "1.7", "1.7.1", "PAT", InstanceHeader(),
                                SeriesAttributes(series_description="t1", modality="MR"))
    journal.add_instance(received, transfer_syntax="", path="/x", calling_ae="MR1")
    job = journal.add_job(series_uid="1.7.1", version=1, rule="r", action="synthesize", model="m")
    out = make_mr_series(tmp_path / "out", shape=(1, 8, 8))[0]
    journal.record_outputs(job, [("1.8", "sT1")], [("PACS", str(out), "1.2.840.10008.5.1.4.1.1.4", "1.8.1")])
    trail = AuditTrail(config.audit_path(), "NODE")
    Dispatcher(config, journal, trail).send_due()
    trail.close()
    journal.close()
    delivery, = _events(tmp_path / "data" / "audit.jsonl")
    assert delivery["event"] == "delivery" and delivery["destination"] == "PACS"
    assert delivery["sent"] == 0 and delivery["failed"] == 1 and delivery["error"]
    assert delivery["studies"] == [{"job": job, "patient_id": "PAT", "study_uid": "1.7", "series_uid": "1.7.1"}]

"""Failures where readers are, reprocessing, and optional steps that fail, end to end: the node (as a process, or
its job runner and dispatcher in process) against Orthanc and dcmtk's storescp, objects checked with dciodvfy,
webhooks posted to a local HTTP server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node.config import Destination, InferenceSettings, NodeConfig, NodeSettings
from dicom_node.dispatch import Dispatcher
from dicom_node.headers import describe
from dicom_node.jobs import JobRunner
from dicom_node.journal import Journal
from inference.models import ModelRegistry
from tests.dicom_factory import make_mr_series, make_study
from tests.test_jobs import AGREEMENT_RULES, MODEL, SHAPE, SPACING, UID_ROOT, _real_and_thick
from tests.test_notify import Hook

from .node_proc import REPO, NodeProcess, synthesis_rule
from .peers import assert_valid_dicom, failed_stores, storescu

RULE = {"name": "t1-2d", "series_description": "t1", "model": MODEL, "output_name": "sT12DT1", "volumetry": False}


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    yield server
    server.close()


def _pacs(orthanc: Any) -> dict[str, Any]:
    return {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}


def _send(node: NodeProcess, files: list[Path]) -> None:
    result = storescu(node.port, files, called_ae=node.ae_title, calling_ae="SCANNER")
    assert result.returncode == 0, result.stderr
    assert not failed_stores(result), failed_stores(result)


def _download(orthanc: Any, series: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, instance_id in enumerate(series["Instances"]):
        paths.append(out_dir / f"{i:04d}.dcm")
        paths[-1].write_bytes(orthanc.instance_file(instance_id))
    return paths


def test_a_series_that_cannot_be_processed_leaves_a_not_processed_page_in_the_pacs(
        tmp_path: Path, orthanc: Any, models_dir: Path, hook: Hook) -> None:
    """A series with a missing slice cannot be processed: the reader finds "sT12DT1 NOT PROCESSED" in the study, a
    valid Secondary Capture saying why; the webhook hears "job_failed"; the job stays failed once it is delivered."""
    source = make_mr_series(tmp_path / "gap", shape=SHAPE, spacing=SPACING, omit_slices=[3], series_number=6,
                            study=make_study(study_id="7"))
    with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[_pacs(orthanc)], rules=[RULE],
                     extra={"notifications": [{"url": hook.url, "events": ["job_failed"], "tries": 2}]}) as node:
        _send(node, source)
        (series,) = orthanc.wait_for_series("^sT12DT1 NOT PROCESSED$", timeout=90)
        node.wait_for(lambda j: j.outbox() and all(i.state == "sent" for i in j.outbox()), what="notice delivered")
        (job,) = node.wait_for(lambda j: j.jobs(), what="the job")
        (body,) = hook.wait(1)
    assert job.state == "failed" and job.reason.startswith("inconsistent geometry") and "gap" in job.reason
    (notice,) = _download(orthanc, series, tmp_path / "notice")
    assert_valid_dicom([notice])
    ds, src = pydicom.dcmread(notice), pydicom.dcmread(source[0], stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.SeriesNumber == 651
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    assert ds.ImageComments == f"NOT PROCESSED: {job.reason}"
    assert {r.ReferencedSOPInstanceUID for r in ds.ReferencedImageSequence} == {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in source}
    assert ds.pixel_array.shape == (576, 1024, 3)
    assert (body["event"], body["job"], body["reason"]) == ("job_failed", job.id, job.reason)
    assert body["series_uid"] == src.SeriesInstanceUID and body["node"] == node.ae_title


def test_reprocess_after_a_rule_change_delivers_the_new_outputs(tmp_path: Path, orthanc: Any,
                                                                models_dir: Path) -> None:
    """Processed under one rule, then the rule changes (a new output name) and the node restarts: `dicom-node
    reprocess --study` (the node running) routes the stored series again and the PACS gets version 2 under the
    new name; version 1 stays as it was."""
    source = make_mr_series(tmp_path / "t1", shape=SHAPE, spacing=SPACING, series_number=5)
    study_uid = str(pydicom.dcmread(source[0], stop_before_pixels=True).StudyInstanceUID)
    workdir = tmp_path / "node"
    with NodeProcess(workdir, models_dir=models_dir, destinations=[_pacs(orthanc)], rules=[RULE]) as node:
        _send(node, source)
        node.wait_for(lambda j: [x for x in j.jobs() if x.state == "sent"], what="version 1 sent")
    (v1,) = orthanc.find_series("^sT12DT1$")
    new_rule = {**RULE, "output_name": "sT1NEW"}
    with NodeProcess(workdir, models_dir=models_dir, destinations=[_pacs(orthanc)], rules=[new_rule]) as node:
        command = [sys.executable, "-m", "dicom_node.cli", "reprocess", "--config", str(node.config_path),
                   "--study", study_uid]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert "1 series marked for reprocessing" in result.stdout
        (v2,) = orthanc.wait_for_series("^sT1NEW v2$", count=len(v1["Instances"]), timeout=90)
        node.wait_for(lambda j: len([x for x in j.jobs() if x.state == "sent"]) == 2, what="version 2 sent")
        jobs = node.wait_for(lambda j: j.jobs(), what="jobs")
    assert sorted((j.version, j.rule, j.output_name) for j in jobs) == [(1, "t1-2d", "sT12DT1"),
                                                                        (2, "t1-2d", "sT1NEW")]
    assert len(orthanc.find_series("^sT12DT1$")) == 1 and len(orthanc.find_series("^sT1NEW")) == 1
    outputs = _download(orthanc, v2, tmp_path / "v2")
    assert_valid_dicom([outputs[0]])
    first = pydicom.dcmread(outputs[0], stop_before_pixels=True)
    assert first.SeriesNumber == 502 and first.StudyInstanceUID == study_uid


def test_an_agreement_failure_still_delivers_the_core_outputs(tmp_path: Path, store_scp: Any, models_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The agreement step raises: the sT1, SEG, volumetry SR and summary of the job are recorded, queued and
    delivered to dcmtk's storescp all the same, and the failure is reported on its own (``optional_failed``)."""
    import dicom_node.steps as steps

    def failing_compare(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("registration diverged")

    monkeypatch.setattr(steps, "compare", failing_compare)
    real, thick = _real_and_thick(tmp_path)
    config = NodeConfig(
        node=NodeSettings(ae_title="NODE", data_dir=tmp_path / "data", uid_root=UID_ROOT, fsync=False),
        destinations=[Destination(name="scp", ae_title=store_scp.aet, host="127.0.0.1", port=store_scp.port)],
        rules=AGREEMENT_RULES, inference=InferenceSettings(models_dir=models_dir, segmenter=""),
    )
    journal = Journal(tmp_path / "data" / "journal.sqlite3", fsync=False)
    dispatcher = Dispatcher(config, journal)
    runner = JobRunner(config, journal, ModelRegistry(models_dir, providers="cpu", threads=1),
                       on_written=dispatcher.send_due)
    try:
        jobs = []
        for paths, rule in ((real, AGREEMENT_RULES[0]), (thick, AGREEMENT_RULES[1])):
            for path in paths:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                journal.add_instance(describe(ds), transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                                     path=str(path), calling_ae="MR1")
            uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
            version = journal.close_series(uid)
            assert version is not None
            jobs.append(journal.add_job(series_uid=uid, version=version, rule=rule.name, action=rule.action,
                                        model=rule.model))
            runner.run(jobs[-1])
        synth = journal.job(jobs[1])
        assert synth.state == "sent", synth.reason  # delivered, not failed
        assert synth.optional_failed == "agreement: RuntimeError: registration diverged"
        outbox = journal.outbox(jobs[1])
        assert outbox and all(i.state == "sent" for i in outbox)
        kinds = {f.sop_instance_uid: f.kind for f in journal.output_files(jobs[1])}
        assert set(kinds.values()) >= {"sT1", "SEG", "SR", "SUMMARY"} and "AGREEMENT" not in kinds.values()
        total = len(journal.outbox(jobs[0])) + len(outbox)
    finally:
        journal.close()
    received = store_scp.wait_for_files(total)
    got = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received}
    assert {i.sop_instance_uid for i in outbox} <= got
    assert {kinds[uid] for uid in got if uid in kinds} == {"sT1", "SEG", "SR", "SUMMARY"}


@pytest.mark.parametrize("grace_s", [2.0, 0.0])
def test_a_series_split_over_two_associations_is_processed_once(tmp_path: Path, store_scp: Any, models_dir: Path,
                                                                grace_s: float) -> None:
    """A sender that splits a series over two associations (no ImagesInAcquisition): the first, contiguous part
    looks whole at its release. With ``[node] release_grace_s`` the close waits, the second part arrives, and the
    series is processed once; without it (0) the first part is processed alone and the second makes version 2."""
    files = make_mr_series(tmp_path / "series", shape=SHAPE, spacing=SPACING, series_description="t1")
    destination = {"name": "scp", "ae_title": store_scp.aet, "host": "127.0.0.1", "port": store_scp.port}
    with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[destination],
                     rules=[synthesis_rule("t1", "t1", "scp")], node={"release_grace_s": grace_s}) as node:
        for part in (files[:3], files[3:]):
            _send(node, part)  # two associations, one after the other
        jobs = node.wait_for(lambda j: (js := j.jobs()) and all(x.state == "sent" for x in js) and js,
                             what="the jobs sent", timeout=60)
        if grace_s:
            (job,) = jobs
            assert job.version == 1
        else:
            assert sorted(j.version for j in jobs) == [1, 2]

"""Tests for dicom_node.jobs: the job runner on a journaled factory series with a tiny ONNX model."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import SimpleITK as sitk
from pydicom import dcmread

from dicom_node import MANUFACTURER
from dicom_node.config import Destination, InferenceSettings, NodeConfig, NodeSettings, Rule
from dicom_node.headers import describe
from dicom_node.jobs import JobRunner, Task, ThreadExecutor
from dicom_node.journal import Journal
from dicom_node.steps import (
    DESCRIPTION_SUFFIXES,
    SERIES_NUMBER_OFFSETS,
    SeriesNaming,
    output_description,
    output_series_number,
)
from inference.models import ModelRegistry
from tests.dicom_factory import make_mr_series, make_study
from tests.onnx_fixtures import make_synthesis_model

MODEL = "test-synth"
UID_ROOT = "1.2.826.0.1.3680043.10.999"
SHAPE = (6, 24, 24)
SPACING = (2.0, 2.0, 4.0)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    make_synthesis_model(folder, model_id=MODEL, tile=(16, 16, 16), overlap=4, divisible_by=8)
    return folder


@pytest.fixture(scope="module")
def registry(models_dir: Path) -> ModelRegistry:
    return ModelRegistry(models_dir, providers="cpu", threads=1)


def make_config(data_dir: Path, models_dir: Path, rules: list[Rule],
                destinations: Sequence[str] = ("PACS", "ARCHIVE"), *, fsync: bool = False) -> NodeConfig:
    return NodeConfig(
        node=NodeSettings(data_dir=data_dir, uid_root=UID_ROOT, fsync=fsync),
        destinations=[Destination(name=n, ae_title=n, host="127.0.0.1", port=104 + k)
                      for k, n in enumerate(destinations)],
        rules=rules,
        inference=InferenceSettings(models_dir=models_dir, segmenter=""),  # the fixture model's own labels
    )


def rule(**overrides: Any) -> Rule:
    fields: dict[str, Any] = dict(name="t1-2d", series_description="t1", model=MODEL, output_name="sT12DT1",
                                  volumetry=False)
    fields.update(overrides)
    return Rule(**fields)


def record_series(journal: Journal, paths: Sequence[Path]) -> str:
    """File ``paths`` in the journal as the SCP would, and close the series."""
    uid = ""
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        uid = str(ds.SeriesInstanceUID)
        journal.add_instance(describe(ds), transfer_syntax=str(ds.file_meta.TransferSyntaxUID), path=str(path),
                             calling_ae="MR1")
    return uid


class Setup:
    def __init__(self, tmp_path: Path, models_dir: Path, registry: ModelRegistry, rules: list[Rule],
                 destinations: Sequence[str] = ("PACS", "ARCHIVE"), *, fsync: bool = False) -> None:
        self.config = make_config(tmp_path / "data", models_dir, rules, destinations, fsync=fsync)
        self.journal = Journal(tmp_path / "data" / "journal.sqlite3", fsync=False)
        self.written = 0
        self.runner = JobRunner(self.config, self.journal, registry, on_written=self._on_written)

    def _on_written(self) -> None:
        self.written += 1

    def job_for(self, paths: Sequence[Path], rule_name: str = "t1-2d") -> int:
        uid = record_series(self.journal, paths)
        version = self.journal.close_series(uid)
        assert version is not None
        r = next(r for r in self.config.rules if r.name == rule_name)
        return self.journal.add_job(series_uid=uid, version=version, rule=r.name, action=r.action, model=r.model)


@pytest.fixture
def setup(tmp_path: Path, models_dir: Path, registry: ModelRegistry) -> Iterator[Setup]:
    s = Setup(tmp_path, models_dir, registry, [rule(), rule(name="absent", series_description="t2",
                                                            model="not-installed", output_name="x"),
                                                rule(name="real", series_description="mprage",
                                                     action="volumetry", volumetry=True, output_name="rT1")])
    yield s
    s.journal.close()


def test_synthesis_job_writes_outputs_and_outbox(setup: Setup, tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING, series_number=7,
                           study=make_study(study_id="42"))
    job_id = setup.job_for(paths)
    setup.runner.run(job_id)

    job = setup.journal.job(job_id)
    assert job.state == "written", job.reason
    assert setup.written == 1
    assert {"load", "write", "total"} <= set(job.timings) and any(k.startswith("model.") for k in job.timings)
    out_dir = setup.config.node.data_dir / "outputs" / f"job-{job_id:06d}" / "sT1"
    files = sorted(out_dir.glob("*.dcm"))
    assert files
    headers = [dcmread(p, stop_before_pixels=True) for p in files]
    source = dcmread(paths[0], stop_before_pixels=True)
    series_uids = {str(h.SeriesInstanceUID) for h in headers}
    assert len(series_uids) == 1
    (series_uid,) = series_uids
    assert series_uid.startswith(UID_ROOT + ".")
    for h in headers:
        assert h.SeriesDescription == "sT12DT1"
        assert h.SeriesNumber == output_series_number(7, "sT1", 1) == 701
        assert h.StudyInstanceUID == source.StudyInstanceUID and h.PatientID == source.PatientID
        assert h.Manufacturer == MANUFACTURER
    # 1-mm output: (SHAPE[0] * 4 mm) slices along the normal
    assert len(files) == SHAPE[0] * SPACING[2]

    # one outbox item per file and destination; the produced series is known to the loop guard
    items = setup.journal.outbox(job_id)
    assert len(items) == 2 * len(files)
    assert {i.destination for i in items} == {"PACS", "ARCHIVE"}
    assert {i.path for i in items} == {str(p) for p in files}
    assert {i.sop_instance_uid for i in items} == {str(h.SOPInstanceUID) for h in headers}
    assert all(i.state == "pending" for i in items)
    assert setup.journal.produced_by(job_id) == [(series_uid, "sT1")]
    assert setup.journal.is_produced(series_uid)


def test_second_version_is_named_and_numbered(tmp_path: Path, models_dir: Path, registry: ModelRegistry) -> None:
    s = Setup(tmp_path, models_dir, registry, [rule(destinations=["PACS"])])
    try:
        paths = make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING, series_number=3)
        uid = record_series(s.journal, paths)
        s.journal.close_series(uid)
        job_id = s.journal.add_job(series_uid=uid, version=2, rule="t1-2d", action="synthesize", model=MODEL)
        s.runner.run(job_id)
        assert s.journal.job(job_id).state == "written"
        files = sorted((s.config.node.data_dir / "outputs" / f"job-{job_id:06d}" / "sT1").glob("*.dcm"))
        header = dcmread(files[0], stop_before_pixels=True)
        assert header.SeriesDescription == "sT12DT1 v2" and header.SeriesNumber == 302
        assert {i.destination for i in s.journal.outbox(job_id)} == {"PACS"}
    finally:
        s.journal.close()


def test_no_destination_keeps_outputs_on_disk(tmp_path: Path, models_dir: Path, registry: ModelRegistry) -> None:
    s = Setup(tmp_path, models_dir, registry, [rule()], destinations=())
    try:
        job_id = s.job_for(make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING))
        s.runner.run(job_id)
        job = s.journal.job(job_id)
        assert job.state == "sent" and "no destination" in job.reason
        assert s.journal.outbox(job_id) == []
    finally:
        s.journal.close()


def test_delivery_during_the_run_is_not_overwritten(tmp_path: Path, models_dir: Path,
                                                    registry: ModelRegistry) -> None:
    """The dispatcher may settle the job between record_outputs and the timings update."""
    s = Setup(tmp_path, models_dir, registry, [rule()])
    try:
        job_id = s.job_for(make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING))
        record_outputs = s.journal.record_outputs

        def record_then_deliver(job: int, produced: Any, items: Any, **kwargs: Any) -> None:
            record_outputs(job, produced, items, **kwargs)
            s.journal.mark_sent([i.id for i in s.journal.outbox(job)])  # a concurrent outbox scan

        s.journal.record_outputs = record_then_deliver  # type: ignore[method-assign]
        s.runner.run(job_id)
        job = s.journal.job(job_id)
        assert job.state == "sent" and job.timings["total"] > 0
    finally:
        s.journal.close()


def test_series_with_a_gap_fails_and_leaves_a_not_processed_page_in_the_study(setup: Setup, tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING, omit_slices=[3], series_number=7)
    job_id = setup.job_for(paths)
    setup.runner.run(job_id)
    job = setup.journal.job(job_id)
    assert job.state == "failed"
    assert job.reason.startswith("inconsistent geometry: ") and "gap" in job.reason
    # the reader's side: one Secondary Capture per destination, in the source's study, named after the rule
    (notice,) = setup.journal.output_files(job_id)
    assert notice.kind == "NOT_PROCESSED" and notice.path.endswith("not_processed.dcm")
    items = setup.journal.outbox(job_id)
    assert {(i.destination, i.sop_instance_uid, i.state) for i in items} == {
        ("PACS", notice.sop_instance_uid, "pending"), ("ARCHIVE", notice.sop_instance_uid, "pending")}
    assert setup.written == 1  # the dispatcher was woken for it
    assert setup.journal.is_produced(notice.series_uid)  # never processed by the node if sent back
    ds = dcmread(notice.path)
    source = dcmread(paths[0], stop_before_pixels=True)
    assert ds.SOPClassUID == notice.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.SeriesDescription == "sT12DT1 NOT PROCESSED"
    assert ds.SeriesNumber == output_series_number(7, "NOT_PROCESSED", 1) == 751
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.ImageComments == "NOT PROCESSED: " + job.reason
    assert len(ds.ReferencedImageSequence) == len(paths)
    # delivered: the job stays failed with its reason
    setup.journal.mark_sent([i.id for i in items])
    assert (setup.journal.job(job_id).state, setup.journal.job(job_id).reason) == ("failed", job.reason)


def test_too_few_slices_fail_with_reason_and_a_notice(setup: Setup, tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path / "in", shape=(2, 24, 24), spacing=SPACING)
    job_id = setup.job_for(paths)
    setup.runner.run(job_id)
    job = setup.journal.job(job_id)
    assert (job.state, job.reason) == ("failed", "not processed: too few slices (2; a volume needs at least 3)")
    (notice,) = setup.journal.output_files(job_id, "NOT_PROCESSED")
    assert dcmread(notice.path, stop_before_pixels=True).ImageComments == (
        "NOT PROCESSED: too few slices (2; a volume needs at least 3)")


def test_a_job_folder_left_by_an_earlier_journal_is_kept_aside(setup: Setup, tmp_path: Path) -> None:
    """Found in review: after `journal rebuild` (or a new journal on the same data directory) job ids start at 1
    again, and the first run of job 1 deleted the earlier job 1's outputs, delivered or not."""
    earlier = setup.runner.outputs_dir / "job-000001"
    earlier.mkdir(parents=True)
    (earlier / "sr.dcm").write_bytes(b"an earlier journal's output")
    job_id = setup.job_for(make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING))
    assert job_id == 1
    setup.runner.run(job_id)
    assert setup.journal.job(job_id).state == "written"
    (aside,) = setup.runner.outputs_dir.glob("job-000001.earlier-*")
    assert (aside / "sr.dcm").read_bytes() == b"an earlier journal's output"


def test_a_series_missing_images_its_scanner_announced_fails_with_reason(setup: Setup, tmp_path: Path) -> None:
    """Found in review: an association aborted after 6 of 8 slices (ImagesInAcquisition 8) closed on the idle
    timeout, and the contiguous part was processed as if it were the whole head."""
    paths = make_mr_series(tmp_path / "in", shape=(8, 24, 24), spacing=SPACING, omit_slices=[6, 7],
                           header={"ImagesInAcquisition": 8})
    job_id = setup.job_for(paths)
    setup.runner.run(job_id)
    job = setup.journal.job(job_id)
    assert (job.state, job.reason) == (
        "failed", "not processed: incomplete series, 6 of 8 images (ImagesInAcquisition); the rest never arrived")
    assert not setup.journal.output_files(job_id, "sT1")
    (notice,) = setup.journal.output_files(job_id, "NOT_PROCESSED")


def test_missing_model_fails_with_reason(setup: Setup, tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING, series_description="t2_tse_tra")
    job_id = setup.job_for(paths, "absent")
    setup.runner.run(job_id)
    job = setup.journal.job(job_id)
    assert (job.state, job.reason) == ("failed", "not processed: model 'not-installed' not installed")
    (notice,) = setup.journal.output_files(job_id, "NOT_PROCESSED")
    ds = dcmread(notice.path, stop_before_pixels=True)
    assert ds.SeriesDescription == "x NOT PROCESSED"
    assert ds.ImageComments == "NOT PROCESSED: model 'not-installed' not installed"


def test_no_notice_when_turned_off_or_without_destination(tmp_path: Path, models_dir: Path,
                                                          registry: ModelRegistry) -> None:
    from dicom_node.config import JobSettings

    for n, (notify, destinations) in enumerate(((False, ("PACS",)), (True, ()))):
        s = Setup(tmp_path / str(n), models_dir, registry, [rule()], destinations=destinations)
        s.runner.config = s.config.model_copy(update={"jobs": JobSettings(notify_failures_in_study=notify)})
        try:
            job_id = s.job_for(make_mr_series(tmp_path / str(n) / "in", shape=SHAPE, spacing=SPACING,
                                              omit_slices=[3]))
            s.runner.run(job_id)
            assert s.journal.job(job_id).state == "failed"
            assert s.journal.outbox(job_id) == [] and s.journal.output_files(job_id) == [] and s.written == 0
        finally:
            s.journal.close()


def test_a_notice_that_cannot_be_written_costs_nothing_but_itself(setup: Setup, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import dicom_node.steps as steps

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(steps, "write_not_processed", broken)
    job_id = setup.job_for(make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING, omit_slices=[3]))
    setup.runner.run(job_id)
    job = setup.journal.job(job_id)
    assert job.state == "failed" and job.reason.startswith("inconsistent geometry")
    assert setup.journal.outbox(job_id) == []


def _kinds(journal: Journal, job_id: int) -> dict[str, str]:
    return {kind: uid for uid, kind in journal.produced_by(job_id)}


def test_volumetry_of_a_real_t1_writes_seg_sr_summary(setup: Setup, tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING, series_description="mprage",
                           series_number=4)
    job_id = setup.job_for(paths, "real")
    setup.runner.run(job_id)
    job = setup.journal.job(job_id)
    assert job.state == "written", job.reason
    kinds = _kinds(setup.journal, job_id)
    assert set(kinds) == {"SEG", "SR", "SUMMARY"}  # no synthetic T1 of a real T1
    out_dir = setup.config.node.data_dir / "outputs" / f"job-{job_id:06d}"
    seg = dcmread(out_dir / "seg.dcm", stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.SeriesNumber == output_series_number(4, "SEG", 1)
    assert seg.SeriesDescription.startswith("rT1 SEG")
    sr = dcmread(out_dir / "sr.dcm", stop_before_pixels=True)
    assert sr.Modality == "SR" and sr.SeriesNumber == 421
    assert len(setup.journal.outbox(job_id)) == 2 * 3
    # a head of a few ml fails QC (ICV): every object that shows the volumetry says so (SeriesNaming flags them)
    summary = dcmread(out_dir / "summary.dcm", stop_before_pixels=True)
    assert [ds.SeriesDescription for ds in (seg, sr, summary)] == ["rT1 SEG QC FAILED", "rT1 volumes QC FAILED",
                                                                  "rT1 summary QC FAILED"]


def test_series_naming_flags_a_failed_quality_control_for_every_kind_that_shows_it() -> None:
    from inference.volumetry import QCLimits, compute_volumetry

    labels = sitk.Image(8, 8, 8, sitk.sitkUInt16)
    labels[2:6, 2:6, 2:6] = 17  # a left hippocampus alone
    failed = compute_volumetry(labels, None, age=None, sex=None, limits=QCLimits(icv_min_ml=1000.0))
    passed = compute_volumetry(labels, None, age=None, sex=None, limits=QCLimits(icv_min_ml=0.0),
                               expected_codes={17})
    assert not failed.qc_passed and passed.qc_passed
    naming = SeriesNaming("sT1AAH", 2, 7)
    for kind, text in (("SEG", "sT1AAH SEG v2"), ("SR", "sT1AAH volumes v2"), ("SUMMARY", "sT1AAH summary v2")):
        assert naming.description(kind, failed) == text + " QC FAILED"
        assert naming.description(kind, passed) == naming.description(kind) == text
    assert naming.description("sT1") == "sT1AAH v2" and naming.description("NOT_PROCESSED") == "sT1AAH NOT PROCESSED v2"
    # the longest output name the config allows (48) still leaves the kind, the version and the flag in 64 (LO)
    long = SeriesNaming("N" * 48, 12, 7)
    for kind in DESCRIPTION_SUFFIXES:
        for volumetry in (None, failed, passed):
            text = long.description(kind, volumetry)
            assert len(text) <= 64 and text.endswith(f"{DESCRIPTION_SUFFIXES[kind]} v12"
                                                     + (" QC FAILED" if volumetry is failed else "")), text
    assert SeriesNaming.agreement_description("N" * 48).endswith("N vs rT1 agreement")
    assert len(SeriesNaming.agreement_description("N" * 48)) == 64
    assert SeriesNaming.agreement_description("N" * 48, qc_failed=True).endswith("N vs rT1 agreement QC FAILED")
    assert len(SeriesNaming.agreement_description("N" * 48, qc_failed=True)) == 64
    assert SeriesNaming.agreement_description("sT1AAH", qc_failed=True) == "sT1AAH vs rT1 agreement QC FAILED"


def test_a_normative_table_in_the_config_gives_z_scores(tmp_path: Path, models_dir: Path,
                                                       registry: ModelRegistry) -> None:
    """[volumetry] normative_table reaches the measurement: the SR holds z-scores and percentiles."""
    from dicom_node.config import VolumetrySettings
    from inference.labels import STRUCTURES

    table = tmp_path / "norms.csv"
    table.write_text("code,age_min,age_max,sex,mean_ml,sd_ml\n"
                     + "".join(f"{code},0,200,,1.0,0.5\n" for code in STRUCTURES))
    s = Setup(tmp_path, models_dir, registry, [rule(volumetry=True)], destinations=("PACS",))
    s.config = s.config.model_copy(update={"volumetry": VolumetrySettings(normative_table=table)})
    s.runner = JobRunner(s.config, s.journal, registry, on_written=s._on_written)
    try:
        # an unknown age as some scanners write it ("000Y"): the age comes from the dates (subject_age), 50 years
        job_id = s.job_for(make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING,
                                          header={"PatientAge": "000Y", "PatientBirthDate": "19750101",
                                                  "StudyDate": "20250101"}))
        s.runner.run(job_id)
        assert s.journal.job(job_id).state == "written", s.journal.job(job_id).reason
        (sr,) = s.journal.output_files(job_id, "SR")
        data = Path(sr.path).read_bytes()
        assert b"121416" in data and b"121415" in data  # Z-score, percentile ranking (DCM)
        ages = [float(content.MeasuredValueSequence[0].NumericValue)
                for element in dcmread(sr.path).iterall() if element.keyword == "ContentSequence"
                for content in element.value
                if "ConceptNameCodeSequence" in content and content.ConceptNameCodeSequence[0].CodeValue == "121033"]
        assert ages and ages[0] == pytest.approx(50.0, abs=0.01)
    finally:
        s.journal.close()


def test_synthesis_with_volumetry_writes_all_objects(tmp_path: Path, models_dir: Path,
                                                     registry: ModelRegistry) -> None:
    s = Setup(tmp_path, models_dir, registry, [rule(volumetry=True)], destinations=("PACS",))
    try:
        job_id = s.job_for(make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING))
        s.runner.run(job_id)
        assert s.journal.job(job_id).state == "written", s.journal.job(job_id).reason
        assert set(_kinds(s.journal, job_id)) == {"sT1", "SEG", "SR", "SUMMARY"}
        n_t1 = len(list((s.config.node.data_dir / "outputs" / f"job-{job_id:06d}" / "sT1").glob("*.dcm")))
        assert len(s.journal.outbox(job_id)) == n_t1 + 3
    finally:
        s.journal.close()


def test_the_kept_volumes_written_beside_the_dicom_objects_are_recorded_and_their_failure_fails_the_job(
        tmp_path: Path, models_dir: Path, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kept T1 and labels are written in a thread of their own while the DICOM objects are written; they are
    recorded with the job, and a failure there fails the job with its reason (nothing recorded or queued)."""
    import dicom_node.jobs as jobs_module

    s = Setup(tmp_path, models_dir, registry, [rule(volumetry=True)], destinations=("PACS",))
    real_keep = jobs_module.keep_volumes_step
    threads: list[str] = []

    def keep(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        if len(threads) > 1:  # (not a full disk: that is run again after a wait, tested on its own)
            raise OSError(13, "Permission denied")
        return real_keep(*args)

    monkeypatch.setattr(jobs_module, "keep_volumes_step", keep)
    try:
        kept_job = s.job_for(make_mr_series(tmp_path / "a", shape=SHAPE, spacing=SPACING))
        s.runner.run(kept_job)
        assert s.journal.job(kept_job).state == "written", s.journal.job(kept_job).reason
        assert {"T1_VOLUME", "LABEL_VOLUME"} <= {f.kind for f in s.journal.output_files(kept_job)}
        failed_job = s.job_for(make_mr_series(tmp_path / "b", shape=SHAPE, spacing=SPACING, series_number=5))
        s.runner.run(failed_job)
        failed = s.journal.job(failed_job)
        assert failed.state == "failed" and "Permission denied" in failed.reason
        assert {f.kind for f in s.journal.output_files(failed_job)} <= {"NOT_PROCESSED"}
    finally:
        s.journal.close()
    assert all(name.startswith("job-") and name.endswith("-keep_0") for name in threads), threads


def test_rule_removed_from_config(setup: Setup, tmp_path: Path) -> None:
    uid = record_series(setup.journal, make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING))
    job_id = setup.journal.add_job(series_uid=uid, version=1, rule="gone", action="synthesize", model=MODEL)
    setup.runner.run(job_id)
    assert setup.journal.job(job_id).reason == "rule 'gone' is no longer configured"


def test_missing_source_file_fails_the_job(setup: Setup, tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING)
    job_id = setup.job_for(paths)
    paths[2].unlink()
    setup.runner.run(job_id)
    job = setup.journal.job(job_id)
    assert job.state == "failed" and job.reason
    (notice,) = setup.journal.output_files(job_id, "NOT_PROCESSED")  # from a file that is still there
    assert len(dcmread(notice.path, stop_before_pixels=True).ReferencedImageSequence) == len(paths)


def test_finished_jobs_are_not_run_again(setup: Setup, tmp_path: Path) -> None:
    job_id = setup.job_for(make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING))
    setup.journal.set_job_state(job_id, "failed", "earlier")
    setup.runner.run(job_id)
    assert setup.journal.job(job_id).reason == "earlier"


def test_output_naming() -> None:
    assert output_series_number(1001, "sT1", 1) == 100101
    assert output_series_number(5, "SEG", 2) == 512
    assert output_series_number(5, "SR", 9) == 529
    # no SeriesNumber (0, or a negative one): not 1, 11, 21, ... (a scanner's first series), but after all others
    assert output_series_number(-1, "SUMMARY", 1) == output_series_number(0, "SUMMARY", 1) == 999_999_931
    assert output_series_number(0, "sT1", 1) == 999_999_901
    r = rule()
    assert output_description(r, 1) == "sT12DT1" and output_description(r, 3) == "sT12DT1 v3"


def test_every_version_has_numbers_of_its_own_within_the_is_range() -> None:
    """Version 10 and later once took version 9's numbers (the version digit was capped at 9)."""
    assert output_series_number(5, "SR", 12) not in {output_series_number(5, "SR", v) for v in range(1, 12)}
    kinds = list(SERIES_NUMBER_OFFSETS)
    for sources in ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [101, 201, 301, 1001, 1101], [99999]):
        numbers = [output_series_number(s, k, v) for s in sources for k in kinds for v in range(1, 1000)]
        assert len(set(numbers)) == len(numbers)
    for source in (0, 7, 99999, 10_000_000, 2**31 - 1):
        for kind in kinds:
            for version in (1, 9, 10, 11, 999, 1000, 10**6):
                assert 0 <= output_series_number(source, kind, version) <= 2**31 - 1


def test_thread_executor_runs_and_survives_crashes() -> None:
    done: list[int] = []
    finished = threading.Event()

    def run(job_id: int) -> None:
        if job_id == 2:
            raise RuntimeError("crash")
        done.append(job_id)
        if job_id == 3:
            finished.set()

    executor = ThreadExecutor(run, workers=1)
    for job_id in (1, 2, 3):
        executor.submit(job_id)
    assert finished.wait(5)
    executor.shutdown()
    assert done == [1, 3]


def _real_and_thick(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    study = make_study()
    real = make_mr_series(tmp_path / "real", shape=(24, 32, 32), spacing=(2.0, 2.0, 2.0), study=study,
                          series_description="t1_mprage_sag", series_number=3,
                          header={"MRAcquisitionType": "3D"})
    thick = make_mr_series(tmp_path / "thick", shape=(12, 32, 32), spacing=(2.0, 2.0, 4.0), study=study,
                           series_description="t1_fl2d_sag", series_number=4)
    return real, thick


AGREEMENT_RULES = [rule(name="rt1", series_description="mprage", action="volumetry", output_name="rT1",
                        volumetry=True), rule(volumetry=True)]


def test_real_and_synthetic_t1_in_one_study_give_an_agreement_sr(tmp_path: Path, models_dir: Path,
                                                                  registry: ModelRegistry) -> None:
    import highdicom as hd

    real, thick = _real_and_thick(tmp_path)
    study_uid = str(dcmread(real[0], stop_before_pixels=True).StudyInstanceUID)
    s = Setup(tmp_path, models_dir, registry, AGREEMENT_RULES)
    try:
        real_job = s.job_for(real, "rt1")
        s.runner.run(real_job)
        assert "AGREEMENT" not in _kinds(s.journal, real_job)  # nothing to compare with yet
        synth_job = s.job_for(thick)
        s.runner.run(synth_job)
        job = s.journal.job(synth_job)
        assert job.state == "written", job.reason
        assert "AGREEMENT" in _kinds(s.journal, synth_job)
        path = next(i.path for i in s.journal.outbox(synth_job) if i.path.endswith("agreement.dcm"))
        sr = hd.sr.srread(path)
        # the fixture's phantom heads fail volumetry QC (their ICV): the labels compared are flagged, so is the
        # agreement (it read as sound before)
        segs = [dcmread(next(i.path for i in s.journal.outbox(j) if i.path.endswith("seg.dcm")),
                        stop_before_pixels=True) for j in (real_job, synth_job)]
        assert all(str(ds.SeriesDescription).endswith(" QC FAILED") for ds in segs)
        assert sr.SeriesDescription == "sT12DT1 vs rT1 agreement QC FAILED"
        assert sr.StudyInstanceUID == study_uid
        assert int(sr.SeriesNumber) == output_series_number(4, "AGREEMENT", 1)
        assert job.timings["agreement"] > 0
    finally:
        s.journal.close()


@pytest.mark.parametrize("error", [RuntimeError("registration diverged"), SystemExit(1)])
def test_a_failing_optional_step_costs_only_its_own_output(tmp_path: Path, models_dir: Path, registry: ModelRegistry,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          error: BaseException) -> None:
    """The agreement check fails: the job stays written and its core outputs (sT1, SEG, SR, summary) are
    queued; they were recorded and queued before the check ran."""
    import dicom_node.steps as steps

    real, thick = _real_and_thick(tmp_path)
    s = Setup(tmp_path, models_dir, registry, AGREEMENT_RULES, destinations=("PACS",))
    seen: dict[str, Any] = {}

    def failing_compare(*args: Any, **kwargs: Any) -> Any:
        job = s.journal.job(synth_job)
        seen.update(state=job.state, queued={i.path for i in s.journal.outbox(synth_job)})
        raise error

    monkeypatch.setattr(steps, "compare", failing_compare)
    try:
        s.runner.run(s.job_for(real, "rt1"))
        synth_job = s.job_for(thick)
        s.runner.run(synth_job)
        job = s.journal.job(synth_job)
        assert job.state == "written" and job.reason == ""
        assert set(_kinds(s.journal, synth_job)) == {"sT1", "SEG", "SR", "SUMMARY"}
        items = s.journal.outbox(synth_job)
        assert seen["state"] == "written" and seen["queued"] == {i.path for i in items}
        assert not any(i.path.endswith("agreement.dcm") for i in items)
        n_t1 = len(s.journal.output_files(synth_job, "sT1"))
        assert n_t1 > 0 and len(items) == n_t1 + 3
        assert "agreement" not in job.timings and job.timings["total"] > 0
        assert s.written == 2  # the dispatcher was woken for each job's core outputs
        # reported on its own, beside the state
        assert job.optional_failed == f"agreement: {type(error).__name__}: {error}"
    finally:
        s.journal.close()


def test_a_counterpart_whose_rule_is_gone_is_still_compared(tmp_path: Path, models_dir: Path,
                                                           registry: ModelRegistry) -> None:
    """The sT1 job's rule was removed from the config before the real T1 arrived: the real T1's job is
    written and compared with the sT1 as the journal recorded it."""
    real, thick = _real_and_thick(tmp_path)
    s = Setup(tmp_path, models_dir, registry, AGREEMENT_RULES)
    try:
        synth_job = s.job_for(thick)
        s.runner.run(synth_job)
        assert s.journal.job(synth_job).state == "written"
        s.runner.config = s.config.model_copy(update={"rules": [AGREEMENT_RULES[0]]})  # "t1-2d" is gone
        real_job = s.job_for(real, "rt1")
        s.runner.run(real_job)
        job = s.journal.job(real_job)
        assert job.state == "written", job.reason
        assert set(_kinds(s.journal, real_job)) == {"SEG", "SR", "SUMMARY", "AGREEMENT"}
        (agreement,) = s.journal.output_files(real_job, "AGREEMENT")
        sr = dcmread(agreement.path, stop_before_pixels=True)
        assert sr.SeriesDescription == "sT12DT1 vs rT1 agreement QC FAILED"  # (the fixture's phantoms fail QC)
        assert int(sr.SeriesNumber) == output_series_number(3, "AGREEMENT", 1)
        assert {i.sop_instance_uid for i in s.journal.outbox(real_job)} >= {agreement.sop_instance_uid}
    finally:
        s.journal.close()


def test_follow_ups_are_tasks_of_their_own_and_resume_after_a_crash(tmp_path: Path, models_dir: Path,
                                                                   registry: ModelRegistry,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With an executor, a job ends once its core outputs are recorded and queued; its agreement check is a task of
    its own, queued in the journal in the same transaction. The two checks of a pair compare it once (the later
    one). A check the node dies in is queued again at the next start and runs from the start."""
    import dicom_node.steps as steps

    real, thick = _real_and_thick(tmp_path)
    s = Setup(tmp_path, models_dir, registry, AGREEMENT_RULES, destinations=("PACS",))
    tasks: list[Task] = []
    s.runner.submit = tasks.append  # the executor's queue
    try:
        real_job, synth_job = s.job_for(real, "rt1"), s.job_for(thick)
        s.runner.perform(Task("job", real_job))
        s.runner.perform(Task("job", synth_job))
        (real_check,), (synth_check,) = s.journal.follow_ups(real_job), s.journal.follow_ups(synth_job)
        assert tasks == [Task("follow_up", real_check.id), Task("follow_up", synth_check.id)]
        assert (real_check.step, real_check.state, synth_check.state) == ("agreement", "queued", "queued")
        assert s.journal.job(synth_job).state == "written" and "AGREEMENT" not in _kinds(s.journal, synth_job)

        s.runner.perform(tasks[0])  # the real T1's check leaves the pair to the sT1's, queued after it
        done = s.journal.follow_up(real_check.id)
        assert (done.state, done.reason) == ("done", f"compared with job {synth_job} by that job's follow-up "
                                                     f"({synth_check.id})")
        real_compare = steps.compare
        watched: list[dict[int, tuple[str, float]]] = []

        def dying(*args: Any, **kwargs: Any) -> Any:
            watched.append(dict(s.runner.follow_up_stages))  # what runs_progressing sees meanwhile
            raise KeyboardInterrupt  # the node dies here

        monkeypatch.setattr(steps, "compare", dying)
        with pytest.raises(KeyboardInterrupt):
            s.runner.perform(tasks[1])
        assert s.journal.follow_up(synth_check.id).state == "running"
        assert [{k: step for k, (step, _) in w.items()} for w in watched] == [{synth_check.id: "agreement"}]
        assert s.runner.follow_up_stages == {}
        monkeypatch.setattr(steps, "compare", real_compare)
        resumed, quarantined = s.journal.recover_follow_ups(max_attempts=3)  # the next start
        assert [f.id for f in resumed] == [synth_check.id] and quarantined == []
        s.runner.perform(Task("follow_up", synth_check.id))
        check = s.journal.follow_up(synth_check.id)
        assert (check.state, check.attempts, check.reason) == ("done", 2, "")
        (agreement,) = s.journal.output_files(synth_job, "AGREEMENT")
        assert "AGREEMENT" not in _kinds(s.journal, real_job)
        assert {i.sop_instance_uid for i in s.journal.outbox(synth_job)} >= {agreement.sop_instance_uid}
        assert s.journal.job(synth_job).timings["agreement"] > 0
    finally:
        s.journal.close()


class FakePanic(BaseException):
    """What a Rust decoder's panic looks like from Python (pyo3_runtime.PanicException): not an Exception."""


def test_a_panicking_decoder_fails_its_job_alone_and_the_queue_moves_on(
        setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dicom_node.steps as jobs_module

    poison = make_mr_series(tmp_path / "poison", shape=SHAPE, spacing=SPACING)
    good = make_mr_series(tmp_path / "good", shape=SHAPE, spacing=SPACING, series_number=5)
    real_load = jobs_module.load_series

    def load_series(paths: Sequence[Path]) -> Any:
        if any("poison" in str(p) for p in paths):
            raise FakePanic("called `Result::unwrap()` on an `Err` value: corrupt RLE segment")
        return real_load(paths)

    monkeypatch.setattr(jobs_module, "load_series", load_series)
    poison_job, good_job = setup.job_for(poison), setup.job_for(good)
    later_job = setup.job_for(make_mr_series(tmp_path / "later", shape=SHAPE, spacing=SPACING, series_number=6))
    executor = ThreadExecutor(setup.runner.run, workers=1)
    try:
        for job_id in (poison_job, good_job, later_job):
            executor.submit(job_id)
        deadline = time.monotonic() + 60
        while setup.journal.job(later_job).state in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        executor.shutdown()
    failed = setup.journal.job(poison_job)
    assert failed.state == "failed" and failed.attempts == 1
    assert failed.reason.startswith("FakePanic: called `Result::unwrap()`") and "crashed" in failed.reason
    # only its "not processed" page is queued (from the header: the pixels that crashed are never read for it)
    (notice,) = setup.journal.output_files(poison_job)
    assert notice.kind == "NOT_PROCESSED"
    assert {i.sop_instance_uid for i in setup.journal.outbox(poison_job)} == {notice.sop_instance_uid}
    for job_id in (good_job, later_job):  # the worker survived and went on with the queue
        job = setup.journal.job(job_id)
        assert (job.state, job.attempts) == ("written", 1), job.reason
    assert setup.written == 3


def test_keyboard_interrupt_leaves_the_job_running_for_recovery(
        setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dicom_node.steps as jobs_module

    def interrupted(paths: Sequence[Path]) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs_module, "load_series", interrupted)
    job_id = setup.job_for(make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING))
    with pytest.raises(KeyboardInterrupt):
        setup.runner.run(job_id)
    assert (setup.journal.job(job_id).state, setup.journal.job(job_id).attempts) == ("running", 1)
    # the next start queues it again, and its second run is alone (RunIsolation)
    monkeypatch.undo()
    setup.runner.recover(own=setup.runner.worker)
    attempts: list[int] = []
    real_of = setup.runner.isolation.of

    def recording(attempt: int) -> Any:
        attempts.append(attempt)
        return real_of(attempt)

    monkeypatch.setattr(setup.runner.isolation, "of", recording)
    assert setup.runner.run(job_id) == "done"
    assert attempts == [2]


def test_thread_executor_survives_base_exceptions() -> None:
    done: list[int] = []
    finished = threading.Event()

    def run(job_id: int) -> None:
        if job_id == 1:
            raise FakePanic("panic")
        if job_id == 2:
            raise SystemExit(1)  # would end a worker thread silently
        done.append(job_id)
        finished.set()

    executor = ThreadExecutor(run, workers=1)
    for job_id in (1, 2, 3):
        executor.submit(job_id)
    assert finished.wait(5)
    executor.shutdown()
    assert done == [3]


def _with_segmenter(tmp_path: Path, folder: Path) -> tuple[Setup, str]:
    """A Setup whose models folder (holding the synthesis fixture MODEL) also has the bundled segmenter, configured
    as ``[inference] segmenter``; and the segmenter's id."""
    from tests.onnx_fixtures import link_bundled_segmenter

    segmenter = link_bundled_segmenter(folder)
    registry = ModelRegistry(folder, providers="cpu", threads=1)
    s = Setup(tmp_path, folder, registry, [rule(volumetry=True)], destinations=("PACS",))
    s.config = s.config.model_copy(update={"inference": InferenceSettings(models_dir=folder, segmenter=segmenter)})
    s.runner.config = s.config
    return s, segmenter


def _run_written(s: Setup, tmp_path: Path):  # noqa: ANN202
    """Run the job of a generated series; (job id, job), its state checked as written."""
    job_id = s.job_for(make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING))
    s.runner.run(job_id)
    job = s.journal.job(job_id)
    assert job.state == "written", job.reason
    return job_id, job


def test_the_segmenter_measures_and_no_brain_means_no_seg_but_a_failed_qc(tmp_path: Path, models_dir: Path) -> None:
    """With the bundled segmenter configured, it (not the synthesis model's own output) measures the sT1. A small
    generated series holds no brain: the sT1, an SR and a summary still go out, with QC failed; no empty SEG."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / MODEL).symlink_to(models_dir / MODEL, target_is_directory=True)
    s, segmenter = _with_segmenter(tmp_path, folder)
    try:
        job_id, job = _run_written(s, tmp_path)
        assert set(_kinds(s.journal, job_id)) == {"sT1", "SR", "SUMMARY"}
        out_dir = s.config.node.data_dir / "outputs" / f"job-{job_id:06d}"
        assert not (out_dir / "seg.dcm").exists()
        sr = dcmread(out_dir / "sr.dcm")
        assert sr.SeriesDescription.endswith("QC FAILED")
        assert segmenter.encode() in (out_dir / "sr.dcm").read_bytes()  # the SR names the segmenter as algorithm
        assert any(k.startswith("segment.") for k in (job.timings or {}))
    finally:
        s.journal.close()


def test_a_model_that_measures_its_own_sT1_better_is_used_despite_the_segmenter(tmp_path: Path) -> None:
    """``measures_synthetic`` in a synthesis model's manifest: its own labels measure its sT1 (the SR names it as
    the algorithm) and the configured segmenter is not run."""
    folder = tmp_path / "models"
    make_synthesis_model(folder, model_id=MODEL, tile=(16, 16, 16), overlap=4, divisible_by=8,
                         measures_synthetic=True)
    s, segmenter = _with_segmenter(tmp_path, folder)
    try:
        job_id, job = _run_written(s, tmp_path)
        sr = (s.config.node.data_dir / "outputs" / f"job-{job_id:06d}" / "sr.dcm").read_bytes()
        assert MODEL.encode() in sr and segmenter.encode() not in sr
        assert not any(k.startswith("segment.") for k in (job.timings or {}))
    finally:
        s.journal.close()


def test_age_from_birth_and_study_dates() -> None:
    """Without PatientAge the QC's ICV range comes from the birth date and the study date."""
    from pydicom.dataset import Dataset

    from dicom_node.steps import age_from_dates as _age_from_dates

    ds = Dataset()
    ds.PatientBirthDate, ds.StudyDate = "20200615", "20231215"
    assert _age_from_dates(ds) == pytest.approx(3.5, abs=0.01)
    ds.StudyDate = ""
    ds.SeriesDate = "20210615"
    assert _age_from_dates(ds) == pytest.approx(1.0, abs=0.01)
    ds.PatientBirthDate = "unknown"
    assert _age_from_dates(ds) is None
    ds.PatientBirthDate = "20250101"  # born after the scan: no age
    assert _age_from_dates(ds) is None


@pytest.mark.parametrize(("age", "expected"), [
    ("053Y", 53.0), ("006M", 0.5), ("000Y", 43.5), ("45", 43.5), ("3 years", 43.5), ("", 43.5), ("000Y ", 43.5),
])
def test_the_subject_age_falls_back_to_the_dates_when_patient_age_says_nothing(age: str, expected: float) -> None:
    """Found in review: "000Y" (an unknown age, as some scanners and anonymisers write it) judged an adult as a
    newborn (ICV range 250-750 ml: QC FAILED for everyone), and a PatientAge that does not parse hid valid dates."""
    from pydicom.dataset import Dataset

    from dicom_node.steps import subject_age

    ds = Dataset()
    ds.PatientAge, ds.PatientBirthDate, ds.StudyDate = age, "19800615", "20231215"
    assert subject_age(ds) == pytest.approx(expected, abs=0.01)


def test_thread_executor_shutdown_says_whether_a_task_still_runs() -> None:
    """The node closes its journal only when no job runs any more (else the process's exit ends it)."""
    release = threading.Event()
    executor: ThreadExecutor[int] = ThreadExecutor(lambda _task: release.wait(5), workers=1)
    executor.submit(1)
    time.sleep(0.1)
    assert executor.shutdown(timeout_s=0.2) is False
    release.set()
    idle: ThreadExecutor[int] = ThreadExecutor(lambda _task: None, workers=2)
    assert idle.shutdown(timeout_s=5) is True


def test_a_job_interrupted_before_runs_alone() -> None:
    """Found in review: with `[inference] workers` 2, a poison job that crashed the process took the job running
    beside it down at every restart, both lost an attempt each time, and both were quarantined. A job at its
    second claim or later now runs alone; one waiting to is not overtaken by jobs arriving after it."""
    import threading
    import time

    from dicom_node.jobs import RunIsolation

    isolation, events, lock = RunIsolation(), [], threading.Lock()

    def run(name: str, attempt: int, hold_s: float, inside: threading.Event | None = None) -> None:
        with isolation.of(attempt):
            with lock:
                events.append(f"{name}+")
            if inside is not None:
                inside.set()
            time.sleep(hold_s)
            with lock:
                events.append(f"{name}-")

    a_inside = threading.Event()
    threads = [threading.Thread(target=run, args=("a", 1, 0.3, a_inside))]
    threads[0].start()
    assert a_inside.wait(5)
    for name, attempt, hold_s in (("b", 1, 0.3), ("poison", 2, 0.2), ("c", 1, 0.0)):
        threads.append(threading.Thread(target=run, args=(name, attempt, hold_s)))
        threads[-1].start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(5)
    assert events.index("b+") < events.index("a-")  # first claims run side by side
    alone = events.index("poison+")
    assert events[alone + 1] == "poison-" and alone > max(events.index("a-"), events.index("b-"))
    assert events.index("c+") > events.index("poison-")  # arrived after it: waited


def test_outputs_are_on_disk_before_the_journal_records_them(tmp_path: Path, models_dir: Path,
                                                             registry: ModelRegistry,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The outputs (sT1, notice) were written without fsync and then recorded, durably, as written with their outbox
    rows: after a power loss the rows named empty files, and the job ended undeliverable."""
    import os

    synced: set[str] = set()
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def recorded(real: Callable[..., Any]) -> Callable[..., Any]:
        def check(job_id: int, produced: Any, items: Sequence[tuple[str, str, str, str]], **kwargs: Any) -> Any:
            for path in {p for _, p, _, _ in items}:
                folders = [str(f) for f in Path(path).parents if f.is_relative_to(s.config.node.data_dir)]
                assert path in synced and all(f in synced for f in folders), path
            return real(job_id, produced, items, **kwargs)
        return check

    monkeypatch.setattr(os, "fsync", spy)
    s = Setup(tmp_path, models_dir, registry, [rule()], fsync=True)
    try:
        monkeypatch.setattr(s.journal, "record_outputs", recorded(s.journal.record_outputs))
        monkeypatch.setattr(s.journal, "record_notice", recorded(s.journal.record_notice))
        written = s.job_for(make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING))
        s.runner.run(written)
        assert s.journal.job(written).state == "written" and s.journal.outbox(written)
        failed = s.job_for(make_mr_series(tmp_path / "gap", shape=SHAPE, spacing=SPACING, omit_slices=[3]))
        s.runner.run(failed)
        assert s.journal.job(failed).state == "failed" and s.journal.outbox(failed)
    finally:
        s.journal.close()


@pytest.mark.parametrize("error", [sqlite3.OperationalError("database is locked"), MemoryError(),
                                   OSError(28, "No space left on device"),
                                   RuntimeError("ITK ERROR: ... No space left on device")])
def test_a_run_failed_for_a_reason_outside_the_job_is_run_again(setup: Setup, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 error: BaseException) -> None:
    """A journal locked past its busy timeout (or memory, or disk space, run out) once failed the job for good and
    put a "not processed" page in the study for a result the next run gives. It waits before it is queued again
    (the condition would fail the next run too), 10 s times its attempt."""
    waits: list[float | None] = []
    monkeypatch.setattr(setup.runner.retry_wait, "wait", lambda timeout=None: waits.append(timeout))
    real = setup.journal.record_outputs
    calls = []

    def once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(setup.journal, "record_outputs", once)
    job_id = setup.job_for(make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING))
    assert setup.runner.run(job_id) == "requeued"  # (the next run, handed to submit, ran it: written)
    job = setup.journal.job(job_id)
    assert (job.state, job.attempts, len(calls)) == ("written", 2, 2), job.reason
    assert waits == [10.0]
    assert {f.kind for f in setup.journal.output_files(job_id)} == {"sT1"}  # no "not processed" page


def test_a_run_failing_for_a_reason_outside_the_job_every_time_fails_after_its_attempts(
        setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def locked(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("database is locked")

    waits: list[float | None] = []
    monkeypatch.setattr(setup.runner.retry_wait, "wait", lambda timeout=None: waits.append(timeout))
    monkeypatch.setattr(setup.journal, "record_outputs", locked)
    job_id = setup.job_for(make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING))
    setup.runner.run(job_id)
    job = setup.journal.job(job_id)
    assert (job.state, job.attempts) == ("failed", setup.config.jobs.max_attempts)
    assert job.reason == "OperationalError: database is locked"
    assert waits == [10.0, 20.0]  # before the 2nd and the 3rd run
    assert {f.kind for f in setup.journal.output_files(job_id)} == {"NOT_PROCESSED"}


def test_a_run_whose_timings_cannot_be_written_ends_done_and_leaves_no_stage(setup: Setup, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The job recorded, a journal error writing its timings (for the dashboard) escaped the run and left its stage
    behind: an hour later runs_progressing read a hung run and the watchdog restarted the process."""
    def busy(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(setup.journal, "set_job_timings", busy)
    job_id = setup.job_for(make_mr_series(tmp_path / "in", shape=SHAPE, spacing=SPACING))
    assert setup.runner.run(job_id) == "done"
    assert setup.journal.job(job_id).state == "written" and setup.runner.stages == {}


def test_only_conditions_outside_the_job_are_transient() -> None:
    from dicom_node.jobs import transient

    assert transient(sqlite3.OperationalError("database is locked")) and transient(MemoryError())
    assert transient(OSError(28, "No space left on device"))
    assert not transient(sqlite3.ProgrammingError("Incorrect number of bindings"))  # a fault of the code
    assert not transient(OSError(2, "No such file or directory")) and not transient(RuntimeError("diverged"))

"""The node end to end: dcmtk as the scanner, Orthanc as the PACS, dciodvfy as the validator.

The model is a tiny ONNX graph built by the tests (identity T1), so what is checked here is the
node's mechanics and geometry, not image quality (that is the model card's job).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_node.config import default_rules
from inference.volume import load_series
from tests.conftest import SHARED_DATA, requires_shared_data
from tests.dicom_factory import make_mr_series, make_study, oblique_iop
from tests.onnx_fixtures import link_bundled_segmenter, make_synthesis_model

from .node_proc import NodeProcess
from .peers import assert_valid_dicom, echoscu, failed_stores, storescu

SCOUT = SHARED_DATA / "dicom" / "phantom_siemens_xa30_aahead_scout" / "01001_AAHead_Scout"
SCOUT_MPR = SHARED_DATA / "dicom" / "phantom_siemens_xa30_aahead_scout" / "02001_AAHead_Scout_MPR_sag"
T1_2D = SHARED_DATA / "dicom" / "human_siemens_prisma_t1_2d_4mm"
MPRAGE = SHARED_DATA / "dicom" / "human_siemens_skyra_mprage"
PHANTOM_T1 = SHARED_DATA / "dicom" / "phantom_siemens_xa30_aahead_scout" / "05001_anat_T1w_acq_tfl"
JPEG_DIR = SHARED_DATA / "dicom" / "phantom_siemens_xa30_t1_jpegll_j2k"
ENHANCED_DIR = SHARED_DATA / "dicom" / "phantom_siemens_xa30_enhanced_mr"

#: A rule for the phantom's 2 mm 3D T1 (which no default rule processes), to test assembly of the
#: compressed and Enhanced MR encodings through the whole path.
#: the product's path: the bundled segmenter measures the T1 (other tests run without it, for time)
SEGMENTER = {"segmenter": "brainchop-aparc-aseg"}
ANAT_RULE = {"name": "phantom-anat", "series_description": "anat", "model": "synth-t1", "output_name": "sT1TEST"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parent = tmp_path_factory.mktemp("models")
    for model_id in sorted({r.model for r in default_rules() if r.model}):  # the built-in rules' models, as fixtures
        make_synthesis_model(parent, model_id=model_id)
    link_bundled_segmenter(parent)  # the real segmenter measures every T1 and sT1
    return parent


def _pacs(orthanc) -> dict:  # noqa: ANN001
    return {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}


def _send(node: NodeProcess, files, calling_ae: str = "SCANNER", extra_args=()) -> None:  # noqa: ANN001
    result = storescu(node.port, files, called_ae=node.ae_title, calling_ae=calling_ae, extra_args=extra_args)
    assert result.returncode == 0, result.stderr
    assert not failed_stores(result), failed_stores(result)


def _download(orthanc, series: dict, out_dir: Path) -> list[Path]:  # noqa: ANN001
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, instance_id in enumerate(series["Instances"]):
        path = out_dir / f"{i:04d}.dcm"
        path.write_bytes(orthanc.instance_file(instance_id))
        paths.append(path)
    return paths


def _centre_of_mass(image: sitk.Image) -> np.ndarray:
    """Patient-space centre of mass of the intensities above the 0.5 % foreground percentile."""
    arr = sitk.GetArrayFromImage(image).astype(np.float64)  # [k, j, i]
    fg = arr[arr > 0]
    weights = np.clip(arr - np.percentile(fg, 0.5), 0, None)
    k, j, i = np.indices(arr.shape)
    total = weights.sum()
    index = [float((w * weights).sum() / total) for w in (i, j, k)]
    return np.array(image.TransformContinuousIndexToPhysicalPoint(index))


def _check_geometry(source: sitk.Image, output: sitk.Image) -> None:
    """The synthetic series lies where its source lies in patient space, at 1 mm isotropic."""
    assert np.allclose(output.GetSpacing(), (1.0, 1.0, 1.0), atol=1e-3)
    assert np.allclose(output.GetDirection(), source.GetDirection(), atol=1e-4), "orientation changed"
    shift = np.linalg.norm(_centre_of_mass(output) - _centre_of_mass(source))
    assert shift < 1.5, f"centre of mass moved {shift:.2f} mm"
    # same content at the same patient positions: resample the source onto the output grid
    resampled = sitk.GetArrayFromImage(sitk.Resample(source, output, sitk.Transform(), sitk.sitkLinear, 0.0))
    out = sitk.GetArrayFromImage(output)
    mask = resampled > 0
    corr = np.corrcoef(resampled[mask], out[mask])[0, 1]
    assert corr > 0.9, f"output does not match the source at the same positions (r={corr:.3f})"


def _check_derived_attributes(paths: list[Path], source_paths: list[Path], description: str) -> None:
    source = pydicom.dcmread(source_paths[0], stop_before_pixels=True)
    source_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in source_paths}
    series_uids = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription == description
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName
        assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert "synth-t1" in ds.DerivationDescription
        assert len(ds.DerivationCodeSequence) >= 1
        refs = {str(item.ReferencedSOPInstanceUID) for item in ds.SourceImageSequence}
        assert refs == source_uids
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
        assert "SYNTHETIC" in ds.ImageComments.upper() and "lesion" in ds.ImageComments
        assert ds.Manufacturer == "dicom-node project"
        assert float(ds.WindowWidth) > 0
        series_uids.add(ds.SeriesInstanceUID)
    assert len(series_uids) == 1


def _check_volumetry_objects(orthanc, out_dir: Path, name: str, *, t1_series_uid: str, study_uid: str) -> Path:  # noqa: ANN001
    """SEG, SR and summary of ``name`` are in the PACS, valid, in the study, and agree with each other."""
    import highdicom as hd

    seg_series = orthanc.wait_for_series(rf"^{name} SEG( QC FAILED)?$", timeout=60)
    sr_series = orthanc.wait_for_series(rf"^{name} volumes( QC FAILED)?$", timeout=60)
    summary_series = orthanc.wait_for_series(rf"^{name} summary( QC FAILED)?$", timeout=60)
    assert len(seg_series) == len(sr_series) == len(summary_series) == 1
    seg_path = _download(orthanc, seg_series[0], out_dir / "seg")[0]
    sr_path = _download(orthanc, sr_series[0], out_dir / "sr")[0]
    summary_path = _download(orthanc, summary_series[0], out_dir / "summary")[0]
    assert_valid_dicom([seg_path, sr_path, summary_path])
    seg = hd.seg.segread(seg_path)
    sr = hd.sr.srread(sr_path)
    for ds in (seg, sr, pydicom.dcmread(summary_path, stop_before_pixels=True)):
        assert ds.StudyInstanceUID == study_uid
    # the SEG is computed on the T1 series it references
    assert {str(r.SeriesInstanceUID) for r in seg.ReferencedSeriesSequence} == {str(t1_series_uid)}
    # SR volumes = SEG voxel counts x voxel volume
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    voxel_ml = float(measures.PixelSpacing[0]) * float(measures.PixelSpacing[1]) * float(measures.SliceThickness) / 1000
    pixels = seg.pixel_array.reshape(len(seg.PerFrameFunctionalGroupsSequence), -1)
    counts: dict[int, int] = {}
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        counts[number] = counts.get(number, 0) + int(frame.sum())
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert groups, "no volumetric ROI groups in the SR"
    checked = 0
    for group in groups:
        reference = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        number = int(reference.ReferencedSegmentNumber)
        volume = [m for m in group.get_measurements() if m.name.meaning.lower() == "volume"][0]
        assert abs(float(volume.value) - counts[number] * voxel_ml) < 1e-3 * max(1.0, float(volume.value))
        checked += 1
    assert checked == len(counts)
    return sr_path


@requires_shared_data
def test_real_mprage_gives_seg_sr_and_summary(tmp_path: Path, orthanc, models_dir: Path) -> None:  # noqa: ANN001
    src_dir = next(p for p in MPRAGE.iterdir() if p.is_dir())
    sources = sorted(src_dir.glob("*.dcm"))
    with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[_pacs(orthanc)],
                     inference=SEGMENTER) as node:
        _send(node, src_dir)
        job = node.wait_for(lambda j: [x for x in j.jobs() if x.state in ("sent", "failed")], what="job done",
                            timeout=300)[0]
        assert job.state == "sent", job.reason
        assert job.rule == "real-3d-t1"
        config_path = node.config_path
    first = pydicom.dcmread(sources[0], stop_before_pixels=True)
    assert not orthanc.find_series("^rT1$")  # a real T1 is not re-sent as an image series
    sr_path = _check_volumetry_objects(orthanc, tmp_path / "volumetry", "rT1", t1_series_uid=first.SeriesInstanceUID,
                                       study_uid=first.StudyInstanceUID)
    report = subprocess.run(["python", "-m", "dicom_node.cli", "report", str(sr_path), "--config", str(config_path)],
                            capture_output=True, text=True, check=False)
    assert report.returncode == 0, report.stderr
    assert "Intracranial volume" in report.stdout
    # the real MPRAGE (a 3-year-old) passes QC with the ICV range of its age, every structure measured
    assert "Quality control: PASS" in report.stdout, report.stdout
    for name in ("Left hippocampus", "Right amygdala", "Left temporal cortex", "Right frontal cortex",
                 "Corpus callosum"):
        assert name in report.stdout


@requires_shared_data
def test_autoalign_scout_gives_sT1AAH_in_the_pacs(tmp_path: Path, orthanc, models_dir: Path) -> None:  # noqa: ANN001
    assert echoscu(orthanc.dicom_port, called_ae=orthanc.aet).returncode == 0
    with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[_pacs(orthanc)],
                     inference=SEGMENTER) as node:
        assert echoscu(node.port, called_ae=node.ae_title, calling_ae="SCANNER").returncode == 0
        # the scanner forwards the scout and its scanner reformat (which must not be processed)
        _send(node, [SCOUT, SCOUT_MPR])
        found = orthanc.wait_for_series("^sT1AAH$", timeout=180)
        assert len(found) == 1
        # everything the node wrote is in Orthanc before we look at it
        job = node.wait_for(lambda j: [x for x in j.jobs() if x.state == "sent"], what="job sent")[0]
        assert job.rule == "aahead-scout"
        journal = node.journal()
        states = {s.description: (s.state, s.note) for s in journal.all_series()}
        journal.close()
    assert states["AAHead_Scout_MPR_sag"][0] == "ignored"
    assert "reformat" in states["AAHead_Scout_MPR_sag"][1]
    series = orthanc.wait_for_series("^sT1AAH$", count=len(orthanc.find_series("^sT1AAH$")[0]["Instances"]))[0]
    sources = sorted(SCOUT.glob("*.dcm"))
    outputs = _download(orthanc, series, tmp_path / "out")
    study_of_source = orthanc.find_series("^AAHead_Scout$")
    assert not study_of_source  # the scout itself was never sent to the PACS by the node
    _check_derived_attributes(outputs, sources, "sT1AAH")
    assert_valid_dicom([outputs[0], outputs[len(outputs) // 2], outputs[-1]])
    _check_geometry(load_series(sources).image, load_series(outputs).image)
    sT1_uid = pydicom.dcmread(outputs[0], stop_before_pixels=True).SeriesInstanceUID
    _check_volumetry_objects(orthanc, tmp_path / "volumetry", "sT1AAH", t1_series_uid=sT1_uid,
                             study_uid=pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID)


def test_oblique_generated_series_geometry(tmp_path: Path, orthanc, models_dir: Path) -> None:  # noqa: ANN001
    src = make_mr_series(
        tmp_path / "src", shape=(24, 64, 64), spacing=(1.0, 1.0, 4.0), iop=oblique_iop(rotation_deg=(15, -10, 20)),
        series_description="t1_fl2d_tra", marker_mm=(12.0, -20.0, 8.0),
        header={"MRAcquisitionType": "2D"}, slice_thickness=4.0,
    )
    with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[_pacs(orthanc)]) as node:
        _send(node, src)
        node.wait_for(lambda j: [x for x in j.jobs() if x.state == "sent"], what="job sent")
    series = orthanc.find_series("^sT12DT1$")
    assert len(series) == 1
    outputs = _download(orthanc, series[0], tmp_path / "out")
    _check_derived_attributes(outputs, src, "sT12DT1")
    assert_valid_dicom([outputs[0], outputs[-1]])
    _check_geometry(load_series(src).image, load_series(outputs).image)


@requires_shared_data
@pytest.mark.parametrize("position", ["HFS", "HFDL"])
def test_patient_position_geometry(tmp_path: Path, orthanc, models_dir: Path, position: str) -> None:  # noqa: ANN001
    src_dir = next((T1_2D / position).iterdir())
    sources = sorted(src_dir.glob("*.dcm"))
    assert pydicom.dcmread(sources[0], stop_before_pixels=True).PatientPosition == position
    with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[_pacs(orthanc)]) as node:
        _send(node, src_dir)
        node.wait_for(lambda j: [x for x in j.jobs() if x.state == "sent"], what="job sent")
    series = orthanc.find_series("^sT12DT1$")
    assert len(series) == 1
    outputs = _download(orthanc, series[0], tmp_path / "out")
    _check_derived_attributes(outputs, sources, "sT12DT1")
    _check_geometry(load_series(sources).image, load_series(outputs).image)


@requires_shared_data
@pytest.mark.parametrize("encoding", ["jpeg-lossless", "jpeg2000", "enhanced"])
def test_compressed_and_enhanced_series_are_received_and_assembled(
    tmp_path: Path, orthanc, models_dir: Path, encoding: str  # noqa: ANN001
) -> None:
    if encoding == "enhanced":
        src_dir = sorted(p for p in ENHANCED_DIR.iterdir() if p.is_dir())[0]
    else:
        dirs = sorted(p for p in JPEG_DIR.iterdir() if p.is_dir())
        src_dir = dirs[0] if encoding == "jpeg-lossless" else dirs[-1]
    sources = sorted(p for p in src_dir.rglob("*") if p.is_file())
    ts = str(pydicom.dcmread(sources[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    expected_ts = {"jpeg-lossless": "1.2.840.10008.1.2.4.70", "jpeg2000": "1.2.840.10008.1.2.4.90"}
    if encoding in expected_ts:
        assert ts == expected_ts[encoding]
    with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[_pacs(orthanc)],
                     rules=[ANAT_RULE]) as node:
        _send(node, src_dir)
        job = node.wait_for(lambda j: [x for x in j.jobs() if x.state in ("sent", "failed")], what="job done")[0]
        assert job.state == "sent", job.reason
        journal = node.journal()
        received = journal.instances(job.series_uid)
        journal.close()
    assert len(received) == len(sources)
    # stored as received: the compressed encoding is kept in the spool
    assert {r.transfer_syntax for r in received} == {ts}
    outputs = _download(orthanc, orthanc.find_series("^sT1TEST$")[0], tmp_path / "out")
    _check_geometry(load_series(sources).image, load_series(outputs).image)


def test_unknown_calling_ae_is_refused(tmp_path: Path, models_dir: Path) -> None:
    peers = [{"ae_title": "SCANNER", "host": "127.0.0.1"}]
    src = make_mr_series(tmp_path / "src", shape=(4, 16, 16))
    with NodeProcess(tmp_path / "node", models_dir=models_dir, peers=peers) as node:
        ok = echoscu(node.port, called_ae=node.ae_title, calling_ae="SCANNER")
        assert ok.returncode == 0
        refused = echoscu(node.port, called_ae=node.ae_title, calling_ae="INTRUDER")
        assert refused.returncode != 0
        assert "Rejected" in refused.stderr or "rejected" in refused.stderr.lower()
        sent = storescu(node.port, src, called_ae=node.ae_title, calling_ae="INTRUDER")
        assert sent.returncode != 0 or failed_stores(sent)
        wrong_called = echoscu(node.port, called_ae="NOT_THE_NODE", calling_ae="SCANNER")
        assert wrong_called.returncode != 0
        time.sleep(0.5)
        log = node.log()
        journal = node.journal()
        assert journal.counts()["instances"]["total"] == 0
        journal.close()
    assert "association from INTRUDER@127.0.0.1 rejected: calling AE title 'INTRUDER' is not a configured peer" in log
    events = [json.loads(line) for line in (node.data_dir / "audit.jsonl").read_text().splitlines()]
    rejected = {(e["calling_ae"], e["host"]) for e in events if e["event"] == "association-rejected"}
    assert ("INTRUDER", "127.0.0.1") in rejected and ("SCANNER", "127.0.0.1") in rejected  # wrong called AE


def test_corrupt_object_gets_failure_status(tmp_path: Path, models_dir: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    good = make_mr_series(tmp_path / "src", shape=(2, 32, 32))[0]
    data = good.read_bytes()
    bad = tmp_path / "truncated.dcm"
    bad.write_bytes(data[: len(data) - 700])  # PixelData cut short
    with NodeProcess(tmp_path / "node", models_dir=models_dir) as node:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        status = assoc.send_c_store(bad)
        assert status.Status == 0xC000
        status_ok = assoc.send_c_store(good)
        assert status_ok.Status == 0x0000
        assoc.release()
        time.sleep(0.5)
        log = node.log()
        journal = node.journal()
        assert journal.counts()["instances"]["total"] == 1  # only the good one
        journal.close()
    assert "refused (status 0xC000): PixelData is truncated" in log


@requires_shared_data
def test_own_output_sent_back_is_not_reprocessed(tmp_path: Path, orthanc, models_dir: Path) -> None:  # noqa: ANN001
    with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[_pacs(orthanc)]) as node:
        _send(node, SCOUT)
        node.wait_for(lambda j: [x for x in j.jobs() if x.state == "sent"], what="job sent")
        outputs = _download(orthanc, orthanc.find_series("^sT1AAH$")[0], tmp_path / "out")
        seg = _download(orthanc, orthanc.find_series("^sT1AAH SEG")[0], tmp_path / "seg")
        # The PACS (or a user) sends the synthetic series and the SEG back to the node
        _send(node, outputs + seg, calling_ae="PACS")
        own = [str(pydicom.dcmread(p[0], stop_before_pixels=True).SeriesInstanceUID) for p in (outputs, seg)]
        notes = node.wait_for(
            lambda j: all((s := j.series(uid)) and s.state == "ignored" for uid in own)
            and [j.series(uid).note for uid in own],
            what="own outputs ignored",
        )
        journal = node.journal()
        n_jobs = len(journal.jobs())
        journal.close()
    assert all("written by this node" in note for note in notes), notes
    assert n_jobs == 1
    assert len(orthanc.find_series("^sT1AAH$")) == 1


def test_sigkill_after_ack_before_processing(tmp_path: Path, orthanc, models_dir: Path) -> None:  # noqa: ANN001
    src = make_mr_series(tmp_path / "src", shape=(20, 48, 48), spacing=(1.0, 1.0, 4.0),
                         series_description="t1_fl2d_sag", header={"MRAcquisitionType": "2D"})
    workdir = tmp_path / "node"
    # A long idle timeout and an aborted association: the series is acknowledged but not processed.
    node = NodeProcess(workdir, models_dir=models_dir, destinations=[_pacs(orthanc)],
                       node={"idle_timeout_s": 3600.0}).start()
    try:
        _send(node, src, extra_args=["--abort"])
        journal = node.journal()
        assert journal.counts()["instances"]["total"] == len(src)
        assert not journal.jobs()
        journal.close()
        node.kill()
        # Restart with a short idle timeout: the series closes, is processed and delivered.
        restarted = NodeProcess(workdir, models_dir=models_dir, destinations=[_pacs(orthanc)],
                                node={"idle_timeout_s": 1.0}, port=node.port)
        restarted.start()
        restarted.wait_for(lambda j: [x for x in j.jobs() if x.state == "sent"], what="job sent after restart")
    finally:
        node.kill()
        if "restarted" in locals():
            restarted.stop()
    assert len(orthanc.find_series("^sT12DT1$")) == 1


def test_acknowledged_instances_survive_losing_their_unsynced_rows_and_files(tmp_path: Path, models_dir: Path) -> None:
    """The node SIGKILLed with an association open (its receipt log segment not settled), then the journal rows and
    spool files of those instances taken away (they were not synced: a power loss may take them). At the next start
    the receipt log files them again: every acknowledged instance is there, byte for byte. (A SIGKILL keeps the page
    cache, so this cannot show that the log's own write reached the disk: O_DSYNC is what promises that.)"""
    import sqlite3

    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    from dicom_node.scp import stored_digest

    src = make_mr_series(tmp_path / "src", shape=(6, 32, 32), spacing=(1.0, 1.0, 4.0))
    workdir = tmp_path / "node"
    node = NodeProcess(workdir, models_dir=models_dir, node={"idle_timeout_s": 3600.0}).start()
    sent = {}
    try:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(MRImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        for path in src:
            ds = pydicom.dcmread(path)
            assert assoc.send_c_store(ds).Status == 0x0000
            sent[str(ds.SOPInstanceUID)] = ds
        node.kill()  # with the association open: nothing was settled
        assoc.abort()
    finally:
        node.kill()
    # one segment holds them (beside it may lie an empty spare, made ahead for the next association)
    segments = [path for path in (node.data_dir / "receipts").glob("*.log") if path.stat().st_size]
    assert len(segments) == 1
    db = sqlite3.connect(node.data_dir / "journal.sqlite3")
    paths = [row[0] for row in db.execute("SELECT path FROM instances")]
    assert len(paths) == len(src)
    db.execute("DELETE FROM instances")
    db.execute("DELETE FROM series")
    db.commit()
    db.close()
    Path(paths[0]).write_bytes(Path(paths[0]).read_bytes()[:200])  # cut short
    for path in paths[1:]:
        Path(path).unlink()
    restarted = NodeProcess(workdir, models_dir=models_dir, node={"idle_timeout_s": 3600.0}, port=node.port).start()
    try:
        journal = restarted.journal()
        try:
            records = {uid: journal.instance(uid) for uid in sent}
        finally:
            journal.close()
        # what IT sees: the objects filed again are counted, and the log settles
        local = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with local.open(restarted.http_url + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
        try:  # (503 when any check fails: only receipt_log's matters here)
            with local.open(restarted.http_url + "/health", timeout=10) as response:
                health = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            health = json.loads(exc.read())
    finally:
        restarted.stop()
    assert f"dicom_node_receipt_objects_replayed_total {float(len(src))}" in metrics.splitlines()
    assert "dicom_node_receipt_segment_files 0.0" in metrics.splitlines()
    assert health["checks"]["receipt_log"]["ok"], health
    assert all(records.values()), records
    for uid, ds in sent.items():
        record = records[uid]
        assert record is not None and record.sha256 == stored_digest(Path(record.path))
        assert pydicom.dcmread(record.path).PixelData == ds.PixelData
    assert not list((node.data_dir / "receipts").glob("*.log"))
    assert "filed again from the receipt log" in restarted.log()


def test_destination_down_then_up(tmp_path: Path, store_scp, models_dir: Path) -> None:  # noqa: ANN001
    store_scp.stop()  # the PACS is down when the results are ready
    src = make_mr_series(tmp_path / "src", shape=(12, 32, 32), spacing=(1.0, 1.0, 4.0),
                         header={"MRAcquisitionType": "2D"})
    dest = {"name": "pacs", "ae_title": store_scp.aet, "host": "127.0.0.1", "port": store_scp.port}
    with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[dest]) as node:
        _send(node, src)
        items = node.wait_for(lambda j: [i for i in j.outbox() if i.tries >= 1], what="a failed try")
        assert all(i.state == "pending" for i in node.wait_for(lambda j: j.outbox(), what="outbox"))
        n_items = len(node.wait_for(lambda j: j.outbox(), what="outbox"))
        assert items
        store_scp.start()
        node.wait_for(lambda j: [x for x in j.jobs() if x.state == "sent"], what="delivery after the PACS came up")
    files = store_scp.wait_for_files(n_items)
    assert len(files) == n_items
    assert len({pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}) == n_items


def test_late_instance_gives_a_new_version_and_duplicates_do_not(tmp_path: Path, orthanc, models_dir: Path) -> None:  # noqa: ANN001
    study = make_study()
    all_files = make_mr_series(tmp_path / "src", shape=(16, 32, 32), spacing=(1.0, 1.0, 4.0), study=study,
                               header={"MRAcquisitionType": "2D"})
    first, late = all_files[:-1], all_files[-1:]
    with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[_pacs(orthanc)]) as node:
        _send(node, first)
        node.wait_for(lambda j: [x for x in j.jobs() if x.state == "sent"], what="version 1 sent")
        _send(node, first)  # the scanner sends the same instances again: nothing new happens
        time.sleep(2.0)
        journal = node.journal()
        assert len(journal.jobs()) == 1
        journal.close()
        _send(node, late)
        node.wait_for(lambda j: len([x for x in j.jobs() if x.state == "sent"]) == 2, what="version 2 sent")
    v1 = orthanc.find_series("^sT12DT1$")
    v2 = orthanc.find_series("^sT12DT1 v2$")
    assert len(v1) == 1 and len(v2) == 1
    assert v1[0]["ID"] != v2[0]["ID"]
    n1 = int(v1[0]["MainDicomTags"]["SeriesNumber"])
    n2 = int(v2[0]["MainDicomTags"]["SeriesNumber"])
    assert n2 == n1 + 1


def test_cli_status_echo_and_dry_run(tmp_path: Path, orthanc, models_dir: Path) -> None:  # noqa: ANN001
    src = make_mr_series(tmp_path / "src", shape=(6, 16, 16), spacing=(1.0, 1.0, 4.0),
                         header={"MRAcquisitionType": "2D"})
    with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[_pacs(orthanc)]) as node:
        cli = ["python", "-m", "dicom_node.cli"]
        echo = subprocess.run([*cli, "echo", "pacs", "--config", str(node.config_path)],
                              capture_output=True, text=True, check=False)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert "success" in echo.stdout
        dry = subprocess.run([*cli, "route", "--dry-run", "--config", str(node.config_path), str(tmp_path / "src")],
                             capture_output=True, text=True, check=False)
        assert dry.returncode == 0, dry.stderr
        assert "rule 't1-2d': MATCH" in dry.stdout and "whole" in dry.stdout
        _send(node, src)
        node.wait_for(lambda j: [x for x in j.jobs() if x.state == "sent"], what="job sent")
        status = subprocess.run([*cli, "status", "--config", str(node.config_path)],
                                capture_output=True, text=True, check=False)
        as_json = subprocess.run([*cli, "status", "--json", "--config", str(node.config_path)],
                                 capture_output=True, text=True, check=False)
        pid = node.pid
    assert status.returncode == 0  # running, nothing failed
    assert status.stdout.startswith(f"node: RUNNING (process {pid}, DICOM port {node.port})")
    assert f"instances received: {len(src)}" in status.stdout
    assert "pacs:" in status.stdout and "sent" in status.stdout
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and report["node"]["running"] and report["problems"] == []
    stopped = subprocess.run([*cli, "status", "--config", str(node.config_path)], capture_output=True, text=True,
                             check=False)
    assert stopped.returncode == 3 and stopped.stdout.startswith("node: NOT RUNNING")
    # the audit trail: what the scanner stored (per series, with the patient) and what went to the PACS
    events = [json.loads(line) for line in (node.data_dir / "audit.jsonl").read_text().splitlines()]
    stored = [e for e in events if e["event"] == "association" and e["calling_ae"] == "SCANNER"]
    assert [s["instances"] for e in stored for s in e["stored"]] == [len(src)]
    assert stored[0]["stored"][0]["patient_id"] == pydicom.dcmread(src[0]).PatientID
    delivered = [e for e in events if e["event"] == "delivery"]
    assert delivered and all(e["destination"] == "pacs" and e["error"] is None for e in delivered)
    assert sum(e["sent"] for e in delivered) == sum(o["n"] for o in report["outbox"] if o["state"] == "sent")

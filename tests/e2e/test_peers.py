"""The end-to-end harness itself: dcmtk, Orthanc and dciodvfy really answer, store and validate."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    MRImageStorage,
    generate_uid,
)

from tests.conftest import SHARED_DATA
from tests.e2e.peers import (
    DCMTK_ENV,
    Orthanc,
    StoreSCP,
    assert_valid_dicom,
    dciodvfy,
    echoscu,
    failed_stores,
    free_port,
    storescu,
    storescu_profile,
    tools_verdict,
)

COMPRESSED_T1 = SHARED_DATA / "dicom" / "phantom_siemens_xa30_t1_jpegll_j2k"
J2K_SERIES = COMPRESSED_T1 / "06001_anat_T1w_acq_tfl"
JPEG_LL_SERIES = COMPRESSED_T1 / "05001_anat_T1w_acq_tfl"


def write_mr_series(folder: Path, description: str, slices: int = 3, *, complete: bool = True) -> list[Path]:
    """A tiny single-frame MR series; ``complete=False`` leaves out the MR Image module's acquisition attributes."""
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for index in range(slices):
        ds = Dataset()
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName = "E2E^Harness"
        ds.PatientID = "E2E001"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 7
        ds.SeriesDescription = description
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "HEAD"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "dicom-node tests"
        ds.InstanceNumber = index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.PixelSpacing = [1.0, 1.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(index)]
        ds.SliceThickness = 1.0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = 8
        ds.Columns = 8
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        if complete:
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "SP"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.RepetitionTime = 2000.0
            ds.EchoTime = 3.0
            ds.EchoTrainLength = 1
        ds.PixelData = (np.arange(64, dtype=np.uint16) * 10 + index).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"mr{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sop_instance_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_tools_verdict_skips_locally_and_fails_in_ci() -> None:
    missing = [Path("/usr/sbin/Orthanc")]
    assert tools_verdict([], {"CI": "true"}) is None
    action, reason = tools_verdict(missing, {})  # type: ignore[misc]
    assert action == "skip" and "/usr/sbin/Orthanc" in reason
    assert tools_verdict(missing, {"CI": "true"})[0] == "fail"  # type: ignore[index]
    assert tools_verdict(missing, {"CI": "false"})[0] == "skip"  # type: ignore[index]


def test_e2e_marker_is_applied(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("e2e") is not None


def test_dcmtk_env_disables_nagle() -> None:
    assert DCMTK_ENV["TCP_NODELAY"] == "1"


def test_echoscu_reaches_orthanc_and_fails_on_a_closed_port(orthanc: Orthanc) -> None:
    ok = echoscu(orthanc.dicom_port, called_ae=orthanc.aet, calling_ae="E2E")
    assert ok.returncode == 0, ok.stderr
    refused = echoscu(free_port(), called_ae="NOBODY", calling_ae="E2E", timeout=10)
    assert refused.returncode != 0


def test_storescu_mr_series_arrives_in_orthanc(orthanc: Orthanc, dicom_tmp: Path) -> None:
    paths = write_mr_series(dicom_tmp, "E2E HARNESS T1", slices=3)
    (dicom_tmp / "notes.txt").write_text("not DICOM; -nh lets storescu go on")
    result = storescu(orthanc.dicom_port, dicom_tmp, called_ae=orthanc.aet)
    assert result.returncode == 0, result.stderr
    assert failed_stores(result) == [], result.stderr

    [series] = orthanc.wait_for_series(r"^E2E HARNESS T1$", count=3, timeout=30)
    assert series["MainDicomTags"]["Modality"] == "MR"
    assert orthanc.series_info(series["ID"])["MainDicomTags"]["SeriesDescription"] == "E2E HARNESS T1"
    assert len(orthanc.studies()) == 1
    assert [s["ID"] for s in orthanc.series_of_study(orthanc.studies()[0])] == [series["ID"]]
    assert orthanc.find_series("HARNESS") and not orthanc.find_series("^NO SUCH")

    instances = orthanc.instances_of_series(series["ID"])
    received = {pydicom.dcmread(io.BytesIO(orthanc.instance_file(i["ID"]))).SOPInstanceUID for i in instances}
    assert received == sop_instance_uids(paths)
    assert orthanc.instance_tags(instances[0]["ID"])["PatientID"] == "E2E001"


def test_failed_stores_reports_what_storescu_exit_status_hides(orthanc: Orthanc, dicom_tmp: Path) -> None:
    private, regular = write_mr_series(dicom_tmp, "PARTLY", slices=2)
    ds = pydicom.dcmread(private)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.10.511.99"  # unknown to Orthanc
    ds.save_as(private)
    result = storescu(orthanc.dicom_port, [private, regular], called_ae=orthanc.aet)
    assert result.returncode == 0  # -nh: storescu goes on and reports success
    [failure] = failed_stores(result)
    assert "1.2.826.0.1.3680043.10.511.99" in failure
    assert len(orthanc.wait_for_series("PARTLY", timeout=30)[0]["Instances"]) == 1


def test_wait_for_series_times_out_with_what_orthanc_has(orthanc: Orthanc, dicom_tmp: Path) -> None:
    orthanc.upload(write_mr_series(dicom_tmp, "ONLY THIS", slices=1)[0])
    with pytest.raises(TimeoutError, match="ONLY THIS"):
        orthanc.wait_for_series("ONLY THIS", count=2, timeout=0.5)
    with pytest.raises(TimeoutError):
        orthanc.wait_for_series(lambda s: False, timeout=0.3)


def test_storescu_to_storescp_writes_the_files(store_scp: StoreSCP, dicom_tmp: Path) -> None:
    paths = write_mr_series(dicom_tmp, "TO STORESCP", slices=2)
    result = storescu(store_scp.port, paths, called_ae=store_scp.aet)
    assert result.returncode == 0, result.stderr
    received = store_scp.wait_for_files(2, timeout=30)
    assert sop_instance_uids(received) == sop_instance_uids(paths)
    sent = pydicom.dcmread(paths[1]).pixel_array
    got = [pydicom.dcmread(p) for p in received]
    assert any(np.array_equal(ds.pixel_array, sent) for ds in got)


def test_storescp_can_come_up_late_and_restart(tmp_path: Path, dicom_tmp: Path) -> None:
    paths = write_mr_series(dicom_tmp, "LATE", slices=1)
    scp = StoreSCP(tmp_path / "late", aet="LATE")
    assert echoscu(scp.port, called_ae="LATE", timeout=10).returncode != 0
    with scp:
        assert storescu(scp.port, paths, called_ae="LATE").returncode == 0
        assert len(scp.wait_for_files(1, timeout=30)) == 1
    assert not scp.running
    scp.start()  # same port again
    try:
        assert echoscu(scp.port, called_ae="LATE").returncode == 0
    finally:
        scp.stop()


def test_orthanc_stores_to_a_registered_modality(orthanc: Orthanc, store_scp: StoreSCP, dicom_tmp: Path) -> None:
    paths = write_mr_series(dicom_tmp, "FROM ORTHANC", slices=2)
    for path in paths:
        orthanc.upload(path)
    orthanc.add_modality("SCP", store_scp.aet, store_scp.port)
    assert orthanc.echo_modality("SCP")
    [series] = orthanc.find_series("FROM ORTHANC")
    orthanc.store_to_modality("SCP", [series["ID"]])
    assert sop_instance_uids(store_scp.wait_for_files(2, timeout=30)) == sop_instance_uids(paths)


def test_orthanc_reports_a_failed_start(tmp_path: Path) -> None:
    server = Orthanc(workdir=tmp_path / "busy", startup_timeout=10)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        server.http_port = blocker.getsockname()[1]
        server.url = f"http://127.0.0.1:{server.http_port}"
        with pytest.raises(RuntimeError, match="Orthanc"):
            server.start()
    assert not server.running


def test_dciodvfy_accepts_a_complete_mr_and_flags_a_broken_one(dicom_tmp: Path) -> None:
    (dicom_tmp / "good").mkdir()
    (dicom_tmp / "bad").mkdir()
    [good] = write_mr_series(dicom_tmp / "good", "COMPLETE", 1)
    [bad] = write_mr_series(dicom_tmp / "bad", "BROKEN", 1, complete=False)
    assert dciodvfy(good) == []
    errors = dciodvfy(bad)
    assert any("ScanningSequence" in line for line in errors), errors
    assert all(line.startswith("Error") for line in errors)
    assert_valid_dicom([good])
    with pytest.raises(AssertionError, match=r"(?s)bad.*mr000\.dcm.*EchoTime"):
        assert_valid_dicom([good, bad])


def test_storescu_profile_proposes_each_files_transfer_syntax(dicom_tmp: Path) -> None:
    [mr] = write_mr_series(dicom_tmp, "PROFILE", 1)
    profile = storescu_profile([mr])
    assert f"{MRImageStorage}\\Uncompressed" in profile
    assert "TS" not in profile.replace("TransferSyntax", "")  # nothing but uncompressed
    (dicom_tmp / "junk.txt").write_text("junk")
    with pytest.raises(ValueError, match="no DICOM files"):
        storescu_profile([dicom_tmp / "junk.txt"])


@pytest.mark.skipif(not COMPRESSED_T1.is_dir(), reason=f"shared test data not found at {COMPRESSED_T1}")
def test_storescu_sends_jpeg2000_and_jpeg_lossless_as_they_are(orthanc: Orthanc) -> None:
    files = sorted(J2K_SERIES.glob("*.dcm"))[:3] + sorted(JPEG_LL_SERIES.glob("*.dcm"))[:3]
    profile = storescu_profile(files)
    assert JPEG2000Lossless in profile and JPEGLosslessSV1 in profile
    result = storescu(orthanc.dicom_port, files, called_ae=orthanc.aet)
    assert result.returncode == 0, result.stderr
    series = orthanc.wait_for_series(".", count=3, timeout=30)
    assert len(series) == 2
    syntaxes = set()
    for s in series:
        for instance in orthanc.instances_of_series(s["ID"]):
            ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance["ID"])), stop_before_pixels=True)
            syntaxes.add(ds.file_meta.TransferSyntaxUID)
    assert syntaxes == {JPEG2000Lossless, JPEGLosslessSV1}


def test_free_port_draws_again_when_the_kernel_hands_out_a_port_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's HTTP port is drawn after its DICOM port; the kernel may give the same one twice."""
    handed_out = iter([5104, 5104, 5105])

    class Probe:
        def __enter__(self) -> Probe:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def bind(self, address: tuple[str, int]) -> None:
            pass

        def getsockname(self) -> tuple[str, int]:
            return "127.0.0.1", next(handed_out)

    monkeypatch.setattr(socket, "socket", lambda *args: Probe())
    assert free_port() == 5104
    assert free_port(besides=(5104,)) == 5105

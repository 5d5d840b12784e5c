"""docs/conformance.md against what the code negotiates: its tables are parsed and held against the SCP's supported
presentation contexts, the SCU's proposals, the implementation identity on the wire and the default policies."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification

from dicom_node.config import Destination, DispatchSettings, NodeConfig, NodeSettings
from dicom_node.dispatch import Dispatcher, echo
from dicom_node.headers import InstanceHeader, ReceivedInstance, SeriesAttributes
from dicom_node.journal import Journal
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from dicom_node.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from tests.e2e.peers import free_port

DOC = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"


def table(name: str) -> list[dict[str, str]]:
    """The rows of the table after ``<!-- conformance:NAME -->``, as dicts by header."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"<!-- conformance:{name} -->") + 1
    rows: list[list[str]] = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, separator, *body = rows
    assert set("".join(separator)) <= set("-: "), f"table {name}: no header separator"
    assert body, f"table {name} is empty"
    return [dict(zip(header, row, strict=True)) for row in body]


def uids(cell: str) -> list[str]:
    return [u.strip() for u in cell.split(",") if u.strip()]


@pytest.fixture
def scp(tmp_path: Path):  # noqa: ANN201
    config = NodeConfig(node=NodeSettings(ae_title="NODE", host="127.0.0.1", port=free_port(), data_dir=tmp_path,
                                          fsync=False))
    journal = Journal(tmp_path / "journal.sqlite3", fsync=False)
    node = StorageSCP(config, Spool(tmp_path / "spool", fsync=False), journal, on_released=lambda uids: None)
    node.start()
    yield node
    node.stop()
    journal.close()


def test_the_implementation_identity_is_what_both_sides_announce(scp: StorageSCP) -> None:
    identity = {row["Item"]: row["Value"] for row in table("implementation")}
    assert identity == {"Implementation Class UID": IMPLEMENTATION_CLASS_UID,
                        "Implementation Version Name": IMPLEMENTATION_VERSION_NAME}
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="NODE")
    assert assoc.is_established
    try:  # the A-ASSOCIATE-AC
        assert str(assoc.acceptor.implementation_class_uid) == identity["Implementation Class UID"]
        assert assoc.acceptor.implementation_version_name == identity["Implementation Version Name"]
        policies = {row["Setting"]: row["Default"] for row in table("policies")}
        assert assoc.acceptor.maximum_length == int(policies["`[node] max_pdu_size`"])
    finally:
        assoc.release()


def test_the_scp_accepts_exactly_the_documented_contexts(scp: StorageSCP) -> None:
    supported = {str(cx.abstract_syntax): [str(ts) for ts in cx.transfer_syntax] for cx in scp.ae.supported_contexts}
    documented = table("scp-sop-classes")
    assert len({row["SOP Class UID"] for row in documented}) == len(documented)
    assert {row["SOP Class UID"] for row in documented} == set(supported)
    for row in documented:
        assert UID(row["SOP Class UID"]).name == row["SOP Class"]
    storage_syntaxes = [row["UID"] for row in table("scp-storage-transfer-syntaxes")]
    verification_syntaxes = [row["UID"] for row in table("scp-verification-transfer-syntaxes")]
    for sop_class, syntaxes in supported.items():
        expected = verification_syntaxes if sop_class == Verification else storage_syntaxes
        assert syntaxes == expected, UID(sop_class).name
    # and on the wire: a documented class is accepted in a documented syntax, another class is not
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(documented[-1]["SOP Class UID"], storage_syntaxes[-1])
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="NODE")
    try:
        assert [(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts] == [
            (documented[-1]["SOP Class UID"], storage_syntaxes[-1])]
    finally:
        assoc.release()


class ProposalRecorder:
    """A storage SCP that records the presentation contexts proposed to it and accepts them all."""

    def __init__(self, sop_classes: list[str]) -> None:
        self.port = free_port()
        self.proposed: dict[str, list[str]] = {}
        self.implementations: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="RECORDER")
        ae.add_supported_context(Verification)
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, ExplicitVRLittleEndian)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_REQUESTED, self._requested), (evt.EVT_C_STORE, lambda event: 0x0000),
            (evt.EVT_C_ECHO, lambda event: 0x0000)])

    def _requested(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        with self._lock:
            self.implementations.append((str(requestor.implementation_class_uid),
                                         str(requestor.implementation_version_name)))
            for cx in requestor.requested_contexts:
                self.proposed[str(cx.abstract_syntax)] = [str(ts) for ts in cx.transfer_syntax]

    def stop(self) -> None:
        self._server.shutdown()


def _object(folder: Path, sop_class: str) -> tuple[Path, str]:
    """A minimal object of ``sop_class`` as the node stores its own (Explicit VR Little Endian)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, str(generate_uid())
    ds.StudyInstanceUID, ds.SeriesInstanceUID = str(generate_uid()), str(generate_uid())
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


def test_the_scu_proposes_exactly_the_documented_contexts(tmp_path: Path) -> None:
    documented = {row["SOP Class UID"]: uids(row["Transfer syntaxes proposed"]) for row in table("scu-sop-classes")}
    for row in table("scu-sop-classes"):
        assert UID(row["SOP Class UID"]).name == row["SOP Class"]
    storage = [uid for uid in documented if uid != Verification]
    recorder = ProposalRecorder(storage)
    journal = Journal(tmp_path / "journal.sqlite3", fsync=False)
    try:
        dest = Destination(name="pacs", ae_title="RECORDER", host="127.0.0.1", port=recorder.port)
        config = NodeConfig(node=NodeSettings(ae_title="NODE", data_dir=tmp_path, fsync=False), destinations=[dest],
                            dispatch=DispatchSettings(timeout_s=5))
        assert echo(config, dest)[0]
        received = ReceivedInstance("1.9.1", "1.2.840.10008.5.1.4.1.1.4", "1.2.3", "1.2.3.4", "P", InstanceHeader(),
                                    SeriesAttributes(series_description="t1", modality="MR"))
        journal.add_instance(received, transfer_syntax="", path="/x", calling_ae="MR1")
        job = journal.add_job(series_uid="1.2.3.4", version=1, rule="r", action="synthesize", model="m")
        items = []
        for sop_class in storage:
            path, sop_uid = _object(tmp_path, sop_class)
            items.append(("pacs", str(path), sop_class, sop_uid))
        journal.record_outputs(job, [], items)
        assert Dispatcher(config, journal).send_due() == len(storage)
    finally:
        journal.close()
        recorder.stop()
    assert recorder.proposed == documented
    assert set(recorder.implementations) == {(IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)}


def test_the_created_objects_are_the_ones_the_scu_sends() -> None:
    created = {row["SOP Class UID"] for row in table("created-objects")}
    sent = {row["SOP Class UID"] for row in table("scu-sop-classes")} - {Verification}
    assert created == sent


def _setting(setting: str) -> object:
    match = re.fullmatch(r"`\[(\[)?(\w+)\]?\] (\w+)`", setting)
    assert match, setting
    section, field = match[2], match[3]
    if match[1]:  # an array of tables: the field's default
        model = {"destinations": Destination}[section]
        return model.model_fields[field].default
    return getattr(getattr(NodeConfig(), section), field)


def test_the_documented_policies_are_the_defaults() -> None:
    rows = table("policies")
    assert len(rows) >= 10
    for row in rows:
        value = _setting(row["Setting"])
        text = str(value).lower() if isinstance(value, bool) else str(value)
        assert text == row["Default"], f"{row['Policy']}: documented {row['Default']}, default {text}"

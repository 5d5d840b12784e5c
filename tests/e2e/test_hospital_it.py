"""What hospital IT checks before connecting the node: sending to a PACS that accepts only Implicit VR
Little Endian, the node's implementation identity on the wire, and (below) DICOM TLS with dcmtk."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from dicom_node.config import default_rules
from dicom_node.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from tests.dicom_factory import make_mr_series
from tests.onnx_fixtures import make_synthesis_model

from .node_proc import NodeProcess
from .peers import ECHOSCU, StoreSCP, failed_stores, storescu


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parent = tmp_path_factory.mktemp("models")
    for model_id in sorted({r.model for r in default_rules() if r.model}):
        make_synthesis_model(parent, model_id=model_id)
    return parent


def _series(tmp_path: Path) -> list[Path]:
    return make_mr_series(tmp_path / "src", shape=(12, 32, 32), spacing=(1.0, 1.0, 4.0),
                          header={"MRAcquisitionType": "2D"})


def test_a_pacs_accepting_only_implicit_vr_receives_every_result(tmp_path: Path, models_dir: Path) -> None:
    # dcmtk storescp restricted to Implicit VR Little Endian (+xi), as older PACS are
    with StoreSCP(tmp_path / "storescp", extra_args=["+xi"]) as old_pacs:
        dest = {"name": "old", "ae_title": old_pacs.aet, "host": "127.0.0.1", "port": old_pacs.port}
        with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[dest]) as node:
            result = storescu(node.port, _series(tmp_path), called_ae=node.ae_title)
            assert result.returncode == 0 and not failed_stores(result), result.stderr
            node.wait_for(lambda j: [x for x in j.jobs() if x.state == "sent"], what="results sent")
            journal = node.journal()
            items = journal.outbox()
            journal.close()
        assert items and {i.state for i in items} == {"sent"}, [(i.state, i.last_error) for i in items]
        files = old_pacs.wait_for_files(len(items))
    received = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {str(ds.SOPInstanceUID) for ds in received} == {i.sop_instance_uid for i in items}
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in received} == {ImplicitVRLittleEndian}
    # every kind of object the node writes went through: the synthetic series and its volumetry
    classes = {str(ds.SOPClassUID) for ds in received}
    assert "1.2.840.10008.5.1.4.1.1.4" in classes and len(classes) >= 3, classes


def test_the_node_announces_its_own_implementation(tmp_path: Path, models_dir: Path) -> None:
    import subprocess

    from .peers import DCMTK_ENV

    with NodeProcess(tmp_path / "node", models_dir=models_dir) as node:
        # echoscu -d prints the A-ASSOCIATE-AC, with the acceptor's implementation class UID and version name
        out = subprocess.run([str(ECHOSCU), "-d", "-aec", node.ae_title, "127.0.0.1", str(node.port)],
                             env=DCMTK_ENV, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    accepted = text[text.index("====================== BEGIN A-ASSOCIATE-AC"):]
    assert f"Their Implementation Class UID:    {IMPLEMENTATION_CLASS_UID}" in accepted
    assert f"Their Implementation Version Name: {IMPLEMENTATION_VERSION_NAME}" in accepted

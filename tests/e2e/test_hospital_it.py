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
from tests.test_conformance import table as conformance_table

from .node_proc import NodeProcess
from .peers import ECHOSCU, StoreSCP, echoscu, failed_stores, free_port, storescu


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parent = tmp_path_factory.mktemp("models")
    for model_id in sorted({r.model for r in default_rules() if r.model}):
        make_synthesis_model(parent, model_id=model_id)
    return parent


def _series(tmp_path: Path) -> list[Path]:
    return make_mr_series(tmp_path / "src", shape=(12, 32, 32), spacing=(1.0, 1.0, 4.0),
                          header={"MRAcquisitionType": "2D"})


def _send_and_deliver(node: NodeProcess, tmp_path: Path) -> list:
    """Send the test series to the node; its outbox once the job's results were all delivered."""
    result = storescu(node.port, _series(tmp_path), called_ae=node.ae_title)
    assert result.returncode == 0 and not failed_stores(result), result.stderr
    node.wait_for(lambda j: [x for x in j.jobs() if x.state == "sent"], what="results sent")
    journal = node.journal()
    items = journal.outbox()
    journal.close()
    assert items and {i.state for i in items} == {"sent"}, [(i.state, i.last_error) for i in items]
    return items


def test_a_pacs_accepting_only_implicit_vr_receives_every_result(tmp_path: Path, models_dir: Path) -> None:
    # dcmtk storescp restricted to Implicit VR Little Endian (+xi), as older PACS are
    with StoreSCP(tmp_path / "storescp", extra_args=["+xi"]) as old_pacs:
        dest = {"name": "old", "ae_title": old_pacs.aet, "host": "127.0.0.1", "port": old_pacs.port}
        with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[dest]) as node:
            items = _send_and_deliver(node, tmp_path)
        files = old_pacs.wait_for_files(len(items))
    received = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {str(ds.SOPInstanceUID) for ds in received} == {i.sop_instance_uid for i in items}
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in received} == {ImplicitVRLittleEndian}
    # every kind of object the node writes went through (synthetic series, SEG, SR, summary), and they are the
    # ones docs/conformance.md lists as created and sent
    classes = {str(ds.SOPClassUID) for ds in received}
    assert classes == {row["SOP Class UID"] for row in conformance_table("created-objects")}


def test_a_dicomweb_pacs_receives_every_result_by_stow_rs(tmp_path: Path, models_dir: Path, orthanc_factory) -> None:  # noqa: ANN001
    """The second way out: Orthanc with its DICOMweb plugin as a STOW-RS destination, behind HTTP basic
    authentication; `echo` checks it by QIDO-RS; every object arrives, unchanged."""
    import subprocess
    import sys

    vna = orthanc_factory(dicomweb=True, aet="VNA", users={"node": "s3cret"})
    password = tmp_path / "vna.password"
    password.write_text("s3cret\n")
    dest = {"name": "vna", "protocol": "stow-rs", "url": vna.dicomweb_url, "username": "node",
            "password_file": str(password), "stow_batch": 20}
    with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[dest]) as node:
        cli = [sys.executable, "-m", "dicom_node.cli"]
        echo = subprocess.run([*cli, "echo", "vna", "--config", str(node.config_path)],
                              capture_output=True, text=True, timeout=60, check=False)
        assert echo.returncode == 0 and "the DICOMweb service answers" in echo.stdout, echo.stdout + echo.stderr
        anonymous = subprocess.run([*cli, "echo", vna.dicomweb_url, "--config", str(node.config_path)],
                                   capture_output=True, text=True, timeout=60, check=False)
        assert anonymous.returncode == 1 and "HTTP 401" in anonymous.stdout, anonymous.stdout + anonymous.stderr
        items = _send_and_deliver(node, tmp_path)
    stored = {x["MainDicomTags"]["SOPInstanceUID"] for s in vna.all_series() for x in vna.instances_of_series(s["ID"])}
    assert stored == {i.sop_instance_uid for i in items}
    delivered = [line for line in (node.data_dir / "audit.jsonl").read_text().splitlines() if '"delivery"' in line]
    assert delivered and all('"protocol":"stow-rs"' in line and '"error":null' in line for line in delivered)


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


# -- DICOM TLS with dcmtk --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from tests.tls_certs import OPENSSL, make_pki

    from .peers import in_ci

    if OPENSSL is None:
        reason = "openssl command not installed (makes the test certificates; .ci/install-test-deps.sh installs it)"
        if in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return make_pki(tmp_path_factory.mktemp("pki"))


def _dcmtk_tls(pair, ca: Path) -> list[str]:  # noqa: ANN001
    """dcmtk's options for TLS with a certificate (``pair``) or anonymous (None), trusting ``ca``."""
    own = ["+tls", str(pair.key), str(pair.cert)] if pair is not None else ["+tla"]
    return [*own, "-pw", "+cf", str(ca)]


def test_dcmtk_stores_and_echoes_over_mutual_tls(tmp_path: Path, models_dir: Path, pki) -> None:  # noqa: ANN001
    tls = {"port": free_port(), "cert_file": pki.server.cert, "key_file": pki.server.key, "ca_file": pki.ca,
           "require_client_cert": True}
    files = _series(tmp_path)[:3]
    with NodeProcess(tmp_path / "node", models_dir=models_dir, tls=tls, rules=[]) as node:
        echo = echoscu(tls["port"], called_ae=node.ae_title, extra_args=_dcmtk_tls(pki.client, pki.ca))
        assert echo.returncode == 0, echo.stdout + echo.stderr
        sent = storescu(tls["port"], files, called_ae=node.ae_title, extra_args=_dcmtk_tls(pki.client, pki.ca))
        assert sent.returncode == 0 and not failed_stores(sent), sent.stdout + sent.stderr
        # refused: no client certificate (anonymous TLS), a certificate of another CA, and plain TCP
        anonymous = echoscu(tls["port"], called_ae=node.ae_title, extra_args=_dcmtk_tls(None, pki.ca))
        untrusted = echoscu(tls["port"], called_ae=node.ae_title, extra_args=_dcmtk_tls(pki.other_client, pki.ca))
        plain = echoscu(tls["port"], called_ae=node.ae_title)
        journal = node.journal()
        stored = {r.sop_instance_uid for r in journal.instances(str(pydicom.dcmread(files[0]).SeriesInstanceUID))}
        journal.close()
        log = node.log()
    assert stored == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    for refused in (anonymous, untrusted, plain):
        assert refused.returncode != 0, refused.stdout + refused.stderr
    assert "TLS handshake failed" in log


def test_the_node_sends_to_dcmtk_over_tls(tmp_path: Path, models_dir: Path, pki) -> None:  # noqa: ANN001
    # storescp with TLS, requiring a client certificate from the test CA (mutual TLS)
    scp_tls = ["+tls", str(pki.server.key), str(pki.server.cert), "-pw", "+cf", str(pki.ca), "-rc"]
    with StoreSCP(tmp_path / "storescp", extra_args=scp_tls, echo_args=_dcmtk_tls(pki.client, pki.ca)) as pacs:
        dest = {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port, "tls": True,
                "tls_ca_file": pki.ca, "tls_server_name": "localhost", "tls_client_cert": True}
        tls = {"cert_file": pki.client.cert, "key_file": pki.client.key}
        with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[dest], tls=tls) as node:
            result = storescu(node.port, _series(tmp_path), called_ae=node.ae_title)
            assert result.returncode == 0 and not failed_stores(result), result.stderr
            node.wait_for(lambda j: [x for x in j.jobs() if x.state == "sent"], what="results sent over TLS")
            journal = node.journal()
            items = journal.outbox()
            journal.close()
        files = pacs.wait_for_files(len(items))
    assert {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files} == \
        {i.sop_instance_uid for i in items}

"""DICOM TLS on the node's listener and its SCU: pynetdicom on both sides, in process, certificates made by the
test (tests/tls_certs.py). dcmtk against the node over TLS: tests/e2e/test_hospital_it.py."""

from __future__ import annotations

import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from dicom_node.config import ConfigError, Destination, NodeConfig, NodeSettings, Peer, TLSSettings, parse_config
from dicom_node.dispatch import Dispatcher, echo
from dicom_node.headers import InstanceHeader, ReceivedInstance, SeriesAttributes
from dicom_node.journal import Journal
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from dicom_node.tls import server_context
from tests.dicom_factory import make_mr_series
from tests.e2e.peers import free_port
from tests.tls_certs import OPENSSL, PKI, make_pki

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed (makes the test certificates)")

NODE_AE = "TLS_NODE"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_mr_series(tmp_path_factory.mktemp("series"), shape=(2, 8, 8), spacing=(1.0, 1.0, 2.0))


class TLSNode:
    """A StorageSCP with a plain and a TLS listener side by side."""

    def __init__(self, folder: Path, pki: PKI, *, peers: list[Peer] | None = None, **tls: Any) -> None:
        settings = dict(port=free_port(), cert_file=pki.server.cert, key_file=pki.server.key, ca_file=pki.ca)
        settings.update(tls)
        self.config = NodeConfig(
            node=NodeSettings(ae_title=NODE_AE, host="127.0.0.1", port=free_port(), data_dir=folder, fsync=False,
                              network_timeout_s=10),
            peers=peers or [], tls=TLSSettings(**settings))
        self.journal = Journal(folder / "journal.sqlite3", fsync=False)
        self.scp = StorageSCP(self.config, Spool(folder / "spool", fsync=False), self.journal,
                              on_released=lambda uids: None)
        self.scp.start()

    def stop(self) -> None:
        self.scp.stop()
        self.journal.close()


@pytest.fixture
def tls_node(tmp_path: Path, pki: PKI) -> Iterator[Callable[..., TLSNode]]:
    nodes: list[TLSNode] = []

    def make(**kwargs: Any) -> TLSNode:
        nodes.append(TLSNode(tmp_path / f"node{len(nodes)}", pki, **kwargs))
        return nodes[-1]

    yield make
    for node in nodes:
        node.stop()


def client(pki: PKI, *, cert: Any = None, ca: Path | None = None, max_version: ssl.TLSVersion | None = None
           ) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or pki.ca)
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    if max_version is not None:  # an old client: TLS 1.0 up to max_version (Python warns that they are deprecated)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = max_version
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def associate(port: int, context: ssl.SSLContext | None, calling: str = "SCANNER") -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    tls_args = (context, "localhost") if context is not None else None
    return ae.associate("127.0.0.1", port, ae_title=NODE_AE, tls_args=tls_args)


def store(assoc: Association, path: Path) -> int:
    try:
        return int(assoc.send_c_store(dcmread(path)).Status)
    finally:
        assoc.release()


def test_store_over_tls_beside_the_plain_port(tls_node: Callable[..., TLSNode], pki: PKI,
                                              series: list[Path]) -> None:
    node = tls_node()
    assoc = associate(node.scp.tls_port, client(pki))
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    assert isinstance(sock, ssl.SSLSocket) and sock.version() in ("TLSv1.2", "TLSv1.3")
    assert store(assoc, series[0]) == 0x0000
    assert store(associate(node.scp.port, None), series[1]) == 0x0000  # the plain port, side by side
    uids = {r.sop_instance_uid for r in node.journal.instances(str(dcmread(series[0]).SeriesInstanceUID))}
    assert uids == {str(dcmread(p).SOPInstanceUID) for p in series}


def test_a_plain_client_on_the_tls_port_gets_nothing_and_cannot_stall_it(
        tls_node: Callable[..., TLSNode], pki: PKI) -> None:
    node = tls_node(handshake_timeout_s=5.0)
    assert not associate(node.scp.tls_port, None).is_established
    # a client that connects and says nothing does not hold the listener: TLS clients are served meanwhile
    with socket.create_connection(("127.0.0.1", node.scp.tls_port)):
        started = time.monotonic()
        assoc = associate(node.scp.tls_port, client(pki))
        assert assoc.is_established and time.monotonic() - started < 3.0
        assoc.release()
    # and a TLS client on the plain port: the handshake fails, no association
    assert not associate(node.scp.port, client(pki)).is_established


def test_mutual_tls_refuses_clients_without_an_accepted_certificate(tls_node: Callable[..., TLSNode],
                                                                    pki: PKI) -> None:
    node = tls_node(require_client_cert=True)
    assert not associate(node.scp.tls_port, client(pki)).is_established  # no client certificate
    assert not associate(node.scp.tls_port, client(pki, cert=pki.other_client)).is_established  # other CA
    assoc = associate(node.scp.tls_port, client(pki, cert=pki.client))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_tls_older_than_1_2_is_refused(tls_node: Callable[..., TLSNode], pki: PKI) -> None:
    node = tls_node()
    context = server_context(node.config.tls)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server_context(node.config.tls.model_copy(update={"min_version": "1.3"})).minimum_version == \
        ssl.TLSVersion.TLSv1_3
    assert not associate(node.scp.tls_port, client(pki, max_version=ssl.TLSVersion.TLSv1_1)).is_established
    assert associate(node.scp.tls_port, client(pki, max_version=ssl.TLSVersion.TLSv1_2)).is_established


def test_per_peer_tls_and_client_certificate_name(tls_node: Callable[..., TLSNode], pki: PKI) -> None:
    node = tls_node(peers=[Peer(ae_title="MR_TLS", tls=True), Peer(ae_title="MR_CERT", tls_common_name="SCANNER_TLS"),
                           Peer(ae_title="MR_WRONG", tls_common_name="SOMEONE_ELSE"), Peer(ae_title="MR_PLAIN")])
    rejected = associate(node.scp.port, None, calling="MR_TLS")
    assert rejected.is_rejected  # A-ASSOCIATE-RJ: this peer must use TLS
    assert associate(node.scp.tls_port, client(pki), calling="MR_TLS").is_established
    assert associate(node.scp.tls_port, client(pki), calling="MR_CERT").is_rejected  # no client certificate
    assert associate(node.scp.tls_port, client(pki, cert=pki.client), calling="MR_CERT").is_established
    assert associate(node.scp.tls_port, client(pki, cert=pki.client), calling="MR_WRONG").is_rejected
    assert associate(node.scp.port, None, calling="MR_PLAIN").is_established
    assert associate(node.scp.tls_port, client(pki), calling="MR_PLAIN").is_established


def _queue(journal: Journal, files: list[Path], destination: str) -> int:
    received = ReceivedInstance("1.9.1", MRImageStorage, "1.2.3", "1.2.3.4.100", "P", InstanceHeader(),
                                SeriesAttributes(series_description="t1", modality="MR"))
    journal.add_instance(received, transfer_syntax="", path="/x", calling_ae="MR1")
    job = journal.add_job(series_uid="1.2.3.4.100", version=1, rule="t1-2d", action="synthesize", model="m")
    items = [(destination, str(p), MRImageStorage, str(dcmread(p).SOPInstanceUID)) for p in files]
    journal.record_outputs(job, [("1.9.9", "sT1")], items)
    return job


def test_the_scu_sends_over_tls_and_presents_its_certificate(tmp_path: Path, tls_node: Callable[..., TLSNode],
                                                             pki: PKI, series: list[Path]) -> None:
    pacs = tls_node(require_client_cert=True)  # a PACS that wants mutual TLS
    dest = Destination(name="pacs", ae_title=NODE_AE, host="127.0.0.1", port=pacs.scp.tls_port, tls=True,
                       tls_ca_file=pki.ca, tls_server_name="localhost", tls_client_cert=True)
    sender_tls = TLSSettings(cert_file=pki.client.cert, key_file=pki.client.key)
    config = NodeConfig(node=NodeSettings(ae_title="SENDER", data_dir=tmp_path, fsync=False), destinations=[dest],
                        tls=sender_tls)
    assert echo(config, dest)[0]
    journal = Journal(tmp_path / "journal.sqlite3", fsync=False)
    try:
        job = _queue(journal, series, "pacs")
        assert Dispatcher(config, journal).send_due() == len(series)
        assert {i.state for i in journal.outbox(job)} == {"sent"}
    finally:
        journal.close()
    # without the client certificate, or trusting another CA, nothing is sent and the log says why
    no_cert = dest.model_copy(update={"tls_client_cert": False})
    ok, message = echo(config.model_copy(update={"destinations": [no_cert]}), no_cert)
    assert not ok
    wrong_ca = dest.model_copy(update={"tls_ca_file": pki.other_ca})
    ok, message = echo(config.model_copy(update={"destinations": [wrong_ca]}), wrong_ca)
    assert not ok and "TLS: CERTIFICATE_VERIFY_FAILED" in message, message
    # a CA file that cannot be read: said, and the outbox item counts a failed try
    unreadable = dest.model_copy(update={"tls_ca_file": tmp_path / "absent.pem"})
    ok, message = echo(config.model_copy(update={"destinations": [unreadable]}), unreadable)
    assert not ok and "TLS set-up failed" in message
    journal = Journal(tmp_path / "journal2.sqlite3", fsync=False)
    try:
        job = _queue(journal, series[:1], "pacs")
        assert Dispatcher(config.model_copy(update={"destinations": [unreadable]}), journal).send_due() == 0
        item = journal.outbox(job)[0]
        assert item.tries == 1 and item.last_error.startswith("TLS set-up failed")
    finally:
        journal.close()
    # a plain destination config against the TLS port fails too
    ok, _ = echo(config, dest.model_copy(update={"tls": False, "tls_client_cert": False}))
    assert not ok


def test_tls_configuration_is_checked(pki: PKI) -> None:
    with pytest.raises(ConfigError, match="needs cert_file and key_file"):
        parse_config("[tls]\nport = 2762\n")
    with pytest.raises(ConfigError, match="require_client_cert needs ca_file"):
        parse_config(f'[tls]\nport = 2762\ncert_file = "{pki.server.cert}"\nkey_file = "{pki.server.key}"\n'
                     "require_client_cert = true\n")
    with pytest.raises(ConfigError, match="peers\\[0\\].tls: the peer must use TLS, but \\[tls\\] has no port"):
        parse_config('[[peers]]\nae_title = "MR"\ntls = true\n')
    with pytest.raises(ConfigError, match="tls_client_cert: \\[tls\\] has no cert_file"):
        parse_config('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 1\ntls = true\n'
                     "tls_client_cert = true\n")

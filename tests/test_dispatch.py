"""Tests for dicom_node.dispatch: outbox delivery to an in-process storage SCP, retries and backoff."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicom_node.config import Destination, DispatchSettings, NodeConfig, NodeSettings
from dicom_node.dispatch import Dispatcher, RetryPolicy, echo
from dicom_node.headers import InstanceHeader, ReceivedInstance, SeriesAttributes
from dicom_node.journal import Journal
from tests.dicom_factory import make_mr_series
from tests.e2e.peers import free_port

SERIES = "1.2.3.4.100"


class DestinationSCP:
    """A pynetdicom storage SCP that keeps what it receives and answers ``status``."""

    def __init__(self, ae_title: str = "PACS", status: int = 0x0000) -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.status = status
        self.received: list[Dataset] = []
        self.calling: list[str] = []
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        ae.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
        self._ae = ae
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_C_ECHO, lambda event: 0x0000)])

    def _store(self, event: evt.Event) -> int:
        self.calling.append(event.assoc.requestor.ae_title)
        if self.status == 0x0000:
            self.received.append(event.dataset)
        return self.status

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_mr_series(tmp_path_factory.mktemp("out"), shape=(3, 8, 8), spacing=(1.0, 1.0, 2.0))


@pytest.fixture(scope="module")
def pacs() -> Iterator[DestinationSCP]:
    server = DestinationSCP()
    yield server
    server.stop()


def make_config(tmp_path: Path, destinations: list[Destination], **dispatch: float) -> NodeConfig:
    settings = dict(max_tries=3, backoff_initial_s=0.2, backoff_max_s=0.5, timeout_s=5.0)
    settings.update(dispatch)
    return NodeConfig(node=NodeSettings(ae_title="NODE", data_dir=tmp_path, fsync=False),
                      destinations=destinations, dispatch=DispatchSettings(**settings))


def dest_for(server: DestinationSCP, name: str = "PACS", **kwargs: str) -> Destination:
    return Destination(name=name, ae_title=server.ae_title, host="127.0.0.1", port=server.port, **kwargs)


def closed_destination(name: str = "DOWN") -> Destination:
    return Destination(name=name, ae_title="DOWN", host="127.0.0.1", port=free_port())


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sqlite3", fsync=False)
    yield j
    j.close()


def queue_job(journal: Journal, files: list[Path], destinations: list[str]) -> int:
    received = ReceivedInstance("1.9.1", MRImageStorage, "1.2.3", SERIES, "P", InstanceHeader(),
                                SeriesAttributes(series_description="t1", modality="MR"))
    journal.add_instance(received, transfer_syntax="", path="/x", calling_ae="MR1")
    job = journal.add_job(series_uid=SERIES, version=1, rule="t1-2d", action="synthesize", model="m")
    items = []
    for name in destinations:
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            items.append((name, str(path), str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    journal.record_outputs(job, [("1.9.9", "sT1")], items)
    return job


def test_delivered_items_are_marked_sent(tmp_path: Path, journal: Journal, files: list[Path],
                                         pacs: DestinationSCP) -> None:
    before = len(pacs.received)
    config = make_config(tmp_path, [dest_for(pacs, calling_ae_title="NODE_OUT")])
    job = queue_job(journal, files, ["PACS"])
    dispatcher = Dispatcher(config, journal)
    assert dispatcher.send_due() == 3
    assert {i.state for i in journal.outbox(job)} == {"sent"}
    assert journal.job(job).state == "sent"
    received = pacs.received[before:]
    assert sorted(str(d.SOPInstanceUID) for d in received) == sorted(
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files)
    assert set(pacs.calling[-3:]) == {"NODE_OUT"}
    assert dispatcher.send_due() == 0  # nothing due any more


def test_destination_down_backs_off_then_fails(tmp_path: Path, journal: Journal, files: list[Path]) -> None:
    down = closed_destination()
    config = make_config(tmp_path, [down])
    job = queue_job(journal, files[:1], ["DOWN"])
    dispatcher = Dispatcher(config, journal)
    for tries, delay in [(1, 0.2), (2, 0.4)]:
        started = time.time()
        assert dispatcher.send_due() == 0
        ended = time.time()
        item = journal.outbox(job)[0]
        assert (item.state, item.tries, item.last_error) == ("pending", tries, "connection failed")
        assert started + delay <= item.next_attempt_at <= ended + delay
        assert dispatcher.send_due() == 0  # not due yet: no new try
        assert journal.outbox(job)[0].tries == tries
        time.sleep(max(0.0, item.next_attempt_at - time.time()) + 0.01)
    assert dispatcher.send_due() == 0
    item = journal.outbox(job)[0]
    assert (item.state, item.tries) == ("failed", 3)
    record = journal.job(job)
    assert record.state == "failed" and "delivery failed" in record.reason


def test_retry_failed_requeues_and_delivers(tmp_path: Path, journal: Journal, files: list[Path],
                                            pacs: DestinationSCP) -> None:
    # the destination was down (wrong port) until it failed for good, then IT fixed the config
    config = make_config(tmp_path, [closed_destination("PACS")], max_tries=1)
    job = queue_job(journal, files, ["PACS"])
    Dispatcher(config, journal).send_due()
    assert journal.job(job).state == "failed"
    assert journal.retry_failed("PACS") == 3
    assert journal.job(job).state == "written"
    fixed = make_config(tmp_path, [dest_for(pacs)])
    assert Dispatcher(fixed, journal).send_due() == 3
    assert journal.job(job).state == "sent"


def test_refused_items_count_a_try_with_the_status(tmp_path: Path, journal: Journal, files: list[Path]) -> None:
    refusing = DestinationSCP(ae_title="FULL", status=0xA700)
    try:
        config = make_config(tmp_path, [dest_for(refusing, name="FULL")])
        job = queue_job(journal, files[:2], ["FULL"])
        assert Dispatcher(config, journal).send_due() == 0
    finally:
        refusing.stop()
    items = journal.outbox(job)
    assert [(i.state, i.tries) for i in items] == [("pending", 1), ("pending", 1)]
    assert all(i.last_error.startswith("status 0xA700") for i in items)
    assert journal.job(job).state == "written"


def test_one_destination_down_does_not_block_another(tmp_path: Path, journal: Journal, files: list[Path],
                                                     pacs: DestinationSCP) -> None:
    config = make_config(tmp_path, [dest_for(pacs), closed_destination()])
    job = queue_job(journal, files[:1], ["PACS", "DOWN"])
    assert Dispatcher(config, journal).send_due() == 1
    states = {i.destination: i.state for i in journal.outbox(job)}
    assert states == {"PACS": "sent", "DOWN": "pending"}
    assert journal.job(job).state == "written"


def test_wrong_called_ae_is_a_rejection(tmp_path: Path, journal: Journal, files: list[Path],
                                        pacs: DestinationSCP) -> None:
    wrong = Destination(name="PACS", ae_title="NOT_PACS", host="127.0.0.1", port=pacs.port)
    job = queue_job(journal, files[:1], ["PACS"])
    Dispatcher(make_config(tmp_path, [wrong]), journal).send_due()
    assert journal.outbox(job)[0].last_error == "association rejected"


def test_unconfigured_destination_and_missing_file(tmp_path: Path, journal: Journal, files: list[Path],
                                                   pacs: DestinationSCP) -> None:
    job = queue_job(journal, files[:1], ["GONE"])
    config = make_config(tmp_path, [dest_for(pacs)])
    Dispatcher(config, journal).send_due()
    item = journal.outbox(job)[0]
    assert item.tries == 1 and item.last_error == "destination 'GONE' is not configured"

    journal.record_outputs(job, [], [("PACS", str(tmp_path / "deleted.dcm"), MRImageStorage, "1.9.9.77")])
    Dispatcher(config, journal).send_due()
    missing = [i for i in journal.outbox(job) if i.sop_instance_uid == "1.9.9.77"][0]
    assert missing.tries == 1 and missing.last_error.startswith("cannot read file")


def test_echo(pacs: DestinationSCP, tmp_path: Path) -> None:
    config = make_config(tmp_path, [dest_for(pacs)])
    ok, message = echo(config, dest_for(pacs))
    assert ok and message == f"C-ECHO PACS@127.0.0.1:{pacs.port}: success"
    ok, message = echo(config, closed_destination())
    assert not ok and "no association" in message and "connection failed" in message


def test_sop_class_the_destination_does_not_accept(tmp_path: Path, journal: Journal, files: list[Path],
                                                   pacs: DestinationSCP) -> None:
    """An object the destination refuses at association time counts a try; the others still go."""
    ds = dcmread(files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.9.9.55"
    capture = tmp_path / "capture.dcm"
    ds.save_as(capture, enforce_file_format=True)
    job = queue_job(journal, [files[0], capture, files[1]], ["PACS"])
    assert Dispatcher(make_config(tmp_path, [dest_for(pacs)]), journal).send_due() == 2
    by_uid = {i.sop_instance_uid: i for i in journal.outbox(job)}
    refused = by_uid.pop("1.9.9.55")
    assert (refused.state, refused.tries) == ("pending", 1)
    assert "not accepted" in refused.last_error
    assert {i.state for i in by_uid.values()} == {"sent"}


#: The dispatcher in a process that is SIGKILLed (os._exit) after the destination acknowledged N objects,
#: in the middle of the association.
KILLED_CHILD = r"""
import os, sys
from pathlib import Path

from pynetdicom.association import Association

from dicom_node.config import Destination, NodeConfig, NodeSettings
from dicom_node.dispatch import Dispatcher
from dicom_node.journal import Journal

journal_path, port, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
real_send = Association.send_c_store
acknowledged = 0

def send_c_store(self, *args, **kwargs):
    global acknowledged
    if acknowledged == n:
        os._exit(9)
    status = real_send(self, *args, **kwargs)
    acknowledged += 1
    return status

Association.send_c_store = send_c_store
config = NodeConfig(node=NodeSettings(ae_title="NODE", data_dir=journal_path.parent, fsync=False),
                    destinations=[Destination(name="PACS", ae_title="PACS", host="127.0.0.1", port=port)])
Dispatcher(config, Journal(journal_path, fsync=False)).send_due()
sys.exit(0)
"""


def test_each_success_is_journaled_before_the_association_ends(tmp_path: Path, files: list[Path]) -> None:
    import subprocess
    import sys

    server = DestinationSCP()
    try:
        journal = Journal(tmp_path / "journal.sqlite3", fsync=False)
        job = queue_job(journal, files, ["PACS"])
        journal.close()
        child = subprocess.run(
            [sys.executable, "-c", KILLED_CHILD, str(tmp_path / "journal.sqlite3"), str(server.port), "2"],
            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60)
        assert child.returncode == 9, child.stderr[-2000:]
        assert len(server.received) == 2

        journal = Journal(tmp_path / "journal.sqlite3", fsync=False)
        try:
            # the two acknowledged objects were recorded as they happened, the third is still due
            assert sorted(i.state for i in journal.outbox(job)) == ["pending", "sent", "sent"]
            assert journal.job(job).state == "written"
            config = make_config(tmp_path, [dest_for(server)])
            assert Dispatcher(config, journal).send_due() == 1  # the restarted node sends only the rest
            assert journal.job(job).state == "sent"
        finally:
            journal.close()
        received = [str(d.SOPInstanceUID) for d in server.received]
        assert sorted(received) == sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files)
        assert len(set(received)) == len(received) == 3  # no duplicate at the PACS
    finally:
        server.stop()


def test_default_retry_policy_outlasts_a_day_long_outage() -> None:
    policy = RetryPolicy.from_settings(DispatchSettings())
    first = now = 1_000_000.0
    tries = 0
    while (when := policy.next_attempt(tries + 1, first, now)) is not None:
        tries += 1
        assert when - now <= DispatchSettings().backoff_max_s  # capped backoff
        now = when
    assert now - first >= 24 * 3600  # still trying a day after the first failure (was: failed after ~21 min)
    assert now - first < 24 * 3600 + DispatchSettings().backoff_max_s
    assert 90 < tries < 110
    assert RetryPolicy(backoff_initial_s=1, backoff_max_s=1, max_tries=3).next_attempt(3, first, first) is None
    assert RetryPolicy(backoff_initial_s=1, backoff_max_s=1e9).next_attempt(10_000, first, first) is not None

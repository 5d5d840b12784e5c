"""Tests for dicom_node.dispatch: outbox delivery to an in-process storage SCP, retries and backoff."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicom_node.cli import main as cli_main
from dicom_node.config import Destination, DispatchSettings, NodeConfig, NodeSettings
from dicom_node.dispatch import Dispatcher, RetryPolicy, echo, proposed_contexts, sendable_syntax
from dicom_node.headers import InstanceHeader, ReceivedInstance, SeriesAttributes
from dicom_node.journal import Journal
from dicom_node.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from tests.dicom_factory import make_mr_series
from tests.e2e.peers import free_port

SERIES = "1.2.3.4.100"


class DestinationSCP:
    """A pynetdicom storage SCP that keeps what it receives and answers ``status``.

    ``syntaxes``: the transfer syntaxes it accepts for MR Image Storage; ``delay_s``: time each C-STORE
    takes; ``peak`` counts the associations it served at the same time."""

    def __init__(self, ae_title: str = "PACS", status: int = 0x0000,
                 syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian,), delay_s: float = 0.0,
                 max_associations: int = 16) -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.status = status
        self.delay_s = delay_s
        self.received: list[Dataset] = []
        self.received_syntaxes: list[str] = []
        self.calling: list[str] = []
        self.implementations: list[tuple[str, str]] = []
        self.open = self.peak = self.requested = 0
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = True
        ae.maximum_associations = max_associations
        ae.add_supported_context(Verification)
        ae.add_supported_context(MRImageStorage, list(syntaxes))
        self._ae = ae
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_ESTABLISHED, self._established), (evt.EVT_RELEASED, self._closed),
            (evt.EVT_ABORTED, self._closed), (evt.EVT_REQUESTED, self._requested)])

    def _requested(self, event: evt.Event) -> None:
        with self._lock:
            self.requested += 1

    def _established(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        with self._lock:
            self.implementations.append((str(requestor.implementation_class_uid),
                                         str(requestor.implementation_version_name)))
            self.open += 1
            self.peak = max(self.peak, self.open)

    def _closed(self, event: evt.Event) -> None:
        with self._lock:
            self.open -= 1

    def _store(self, event: evt.Event) -> int:
        time.sleep(self.delay_s)
        self.calling.append(event.assoc.requestor.ae_title)
        if self.status == 0x0000:
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
            self.received_syntaxes.append(str(event.context.transfer_syntax))
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


def test_an_unreachable_destination_is_tried_once_a_round_and_holds_no_other_up(
        tmp_path: Path, journal: Journal, files: list[Path], pacs: DestinationSCP,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: the oldest due items are claimed first, so a destination that is down with a backlog of
    many claims cost a connection timeout per claim, every round, before any other destination was served."""
    import dicom_node.dispatch as dispatch

    attempts: list[str] = []
    real = dispatch._associate

    def counting(ae: Any, dest: Destination, tls: Any) -> Any:
        attempts.append(dest.name)
        return real(ae, dest, tls)

    monkeypatch.setattr(dispatch, "_associate", counting)
    config = make_config(tmp_path, [closed_destination(), dest_for(pacs)], claim_batch=1)
    down_job = queue_job(journal, files, ["DOWN"])  # 3 items, one claim each; the oldest
    pacs_job = queue_job(journal, files[:1], ["PACS"])
    assert Dispatcher(config, journal).send_due() == 1
    assert attempts.count("DOWN") == 1 and attempts.count("PACS") == 1
    assert [(i.state, i.tries, i.last_error) for i in journal.outbox(down_job)] == [
        ("pending", 1, "connection failed")] * 3
    assert {i.state for i in journal.outbox(pacs_job)} == {"sent"}


def test_a_destination_that_refuses_one_claims_contexts_is_still_tried_for_the_next(
        tmp_path: Path, journal: Journal, files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """An association aborted because the destination accepts none of a claim's presentation contexts (a PACS that
    takes MR but not SEG) says nothing of the next claim's: only a failed connection or a rejection marks the
    destination as unreached for the round."""
    import dicom_node.dispatch as dispatch

    server = DestinationSCP()
    attempts: list[int] = []
    real = dispatch._associate

    def counting(ae: Any, dest: Destination, tls: Any) -> Any:
        attempts.append(len(attempts))
        assoc, connected = real(ae, dest, tls)
        if len(attempts) == 1:  # the first claim's association: as if no context had been accepted
            assoc.release()
            assoc.is_established, assoc.is_aborted = False, True
        return assoc, connected

    monkeypatch.setattr(dispatch, "_associate", counting)
    try:
        config = make_config(tmp_path, [dest_for(server)], claim_batch=1)
        job = queue_job(journal, files[:2], ["PACS"])
        assert Dispatcher(config, journal).send_due() == 1
    finally:
        server.stop()
    assert len(attempts) == 2
    assert sorted(i.state for i in journal.outbox(job)) == ["pending", "sent"]


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


def test_an_item_given_up_is_logged_once_and_posted_to_the_webhook(tmp_path: Path, journal: Journal, files: list[Path],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from dicom_node import notify
    from dicom_node.config import Notification
    from tests.test_notify import Hook

    refusing, hook = DestinationSCP(ae_title="FULL", status=0xA700), Hook()
    notifier = notify.Notifier([Notification(url=hook.url, events=["delivery_failed"])], node="NODE").start()
    notify.install(notifier)
    try:
        config = make_config(tmp_path, [dest_for(refusing, name="FULL")], max_tries=1)
        job = queue_job(journal, files[:2], ["FULL"])
        with caplog.at_level(logging.ERROR, logger="dicom_node.dispatch"):
            assert Dispatcher(config, journal).send_due() == 0
        (body,) = hook.wait(1)
    finally:
        notify.install(None)
        notifier.stop()
        refusing.stop()
        hook.close()
    assert [i.state for i in journal.outbox(job)] == ["failed", "failed"]
    assert (body["event"], body["destination"], body["jobs"], body["objects"]) == ("delivery_failed", "FULL", [job], 2)
    assert body["error"].startswith("status 0xA700")
    assert sorted(body["sop_instance_uids"]) == sorted(i.sop_instance_uid for i in journal.outbox(job))
    (line,) = [r.getMessage() for r in caplog.records]  # one line for the round, not one per object
    assert "2 object(s) of job(s) 1 failed for good to FULL after 1 try" in line and "dicom-node retry FULL" in line


def test_one_destination_down_does_not_block_another(tmp_path: Path, journal: Journal, files: list[Path],
                                                     pacs: DestinationSCP) -> None:
    config = make_config(tmp_path, [dest_for(pacs), closed_destination()])
    job = queue_job(journal, files[:1], ["PACS", "DOWN"])
    assert Dispatcher(config, journal).send_due() == 1
    states = {i.destination: i.state for i in journal.outbox(job)}
    assert states == {"PACS": "sent", "DOWN": "pending"}
    assert journal.job(job).state == "written"


def test_wrong_called_ae_is_a_rejection(tmp_path: Path, journal: Journal, files: list[Path],
                                        pacs: DestinationSCP, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = Destination(name="PACS", ae_title="NOT_PACS", host="127.0.0.1", port=pacs.port)
    job = queue_job(journal, files[:1], ["PACS"])
    Dispatcher(make_config(tmp_path, [wrong]), journal).send_due()
    error = journal.outbox(job)[0].last_error
    # the A-ASSOCIATE-RJ's result, source and reason, in words and as numbers (PS3.8 9.3.4)
    assert error.startswith("association rejected (rejected permanent, source: service user, reason: "
                            "called ae title not recognised"), error
    assert "(result 1, source 1, reason 7)" in error
    ok, message = echo(make_config(tmp_path, [wrong]), wrong)
    assert not ok and "rejected permanent" in message and "called ae title not recognised" in message
    # `dicom-node status` shows it with the outbox
    config_file = tmp_path / "node.toml"
    config_file.write_text(f'[node]\ndata_dir = "{tmp_path}"\n')
    assert cli_main(["status", "--config", str(config_file)]) == 3  # the node is not running
    assert "last error: association rejected (rejected permanent, source: service user, reason: called ae title " \
        "not recognised" in capsys.readouterr().out


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


def test_deliveries_go_over_associations_whose_reactor_leaves_responses_to_their_senders(
        tmp_path: Path, journal: Journal, files: list[Path], pacs: DestinationSCP,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen in the end-to-end tests: pynetdicom's requestor reactor took a C-STORE response its sender waited for,
    and the object failed its try after the 30 s DIMSE timeout (pynetdicom#875; tests/test_reactor.py shows the race
    and its fix). Every association the dispatcher and ``echo`` make is one whose reactor cannot."""
    import dicom_node.dispatch as dispatch
    from dicom_node.reactor import OneReaderAssociation

    kinds: list[type] = []
    real = dispatch._associate

    def recording(ae: Any, dest: Destination, tls: Any) -> Any:
        assoc, connected = real(ae, dest, tls)
        kinds.append(type(assoc))
        return assoc, connected

    monkeypatch.setattr(dispatch, "_associate", recording)
    config = make_config(tmp_path, [dest_for(pacs)])
    job = queue_job(journal, files[:2], ["PACS"])
    assert Dispatcher(config, journal).send_due() == 2
    assert {i.state for i in journal.outbox(job)} == {"sent"}
    assert echo(config, dest_for(pacs))[0]
    assert kinds and all(kind is OneReaderAssociation for kind in kinds)


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
from typing import Any

from pynetdicom.association import Association

from dicom_node.cli import main as cli_main
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
                    destinations=[Destination(name="PACS", ae_title="PACS", host="127.0.0.1", port=port,
                                              max_associations=1)])  # (N counted over one association)
Dispatcher(config, Journal(journal_path, fsync=False), worker="node").send_due()
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
            # another dispatcher leaves the killed one's claim alone until its lease expires
            assert Dispatcher(config, journal).send_due() == 0
            restarted = Dispatcher(config, journal, worker="node")  # the node itself, restarted (NODE_WORKER)
            assert restarted.take_back() == 1
            assert restarted.send_due() == 1  # the restarted node sends only the rest
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


# -- sending what any PACS accepts -------------------------------------------------------------------

def compressed_copy(path: Path, out: Path, syntax: str, uid: str) -> Path:
    """``path`` re-encoded in ``syntax`` (pydicom's encoders) as a new SOP instance."""
    ds = dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.compress(syntax, generate_instance_uid=False)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_proposed_contexts_offer_the_stored_syntax_and_both_little_endian_ones() -> None:
    assert proposed_contexts([(MRImageStorage, ExplicitVRLittleEndian)]) == [
        (MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
    assert proposed_contexts([(MRImageStorage, RLELossless), (MRImageStorage, ExplicitVRLittleEndian)]) == [
        (MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]), (MRImageStorage, [RLELossless])]
    assert proposed_contexts([(MRImageStorage, RLELossless)]) == [
        (MRImageStorage, [RLELossless]), (MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
    assert sendable_syntax({ImplicitVRLittleEndian}, ExplicitVRLittleEndian) == ImplicitVRLittleEndian
    assert sendable_syntax({RLELossless, ExplicitVRLittleEndian}, RLELossless) == RLELossless
    assert sendable_syntax({JPEGLSLossless}, RLELossless) is None


def test_a_destination_accepting_only_implicit_vr_receives_everything(tmp_path: Path, journal: Journal,
                                                                      files: list[Path]) -> None:
    rle = compressed_copy(files[0], tmp_path / "rle.dcm", RLELossless, "1.9.9.61")
    implicit_only = DestinationSCP(ae_title="OLDPACS", syntaxes=(ImplicitVRLittleEndian,))
    try:
        job = queue_job(journal, [*files, rle], ["OLDPACS"])
        assert Dispatcher(make_config(tmp_path, [dest_for(implicit_only, name="OLDPACS")]), journal).send_due() == 4
    finally:
        implicit_only.stop()
    assert {i.state for i in journal.outbox(job)} == {"sent"}
    assert implicit_only.received_syntaxes == [ImplicitVRLittleEndian] * 4
    # the RLE object arrived decompressed, pixel for pixel
    by_uid = {str(d.SOPInstanceUID): d for d in implicit_only.received}
    original = dcmread(files[0]).pixel_array
    assert np.array_equal(by_uid["1.9.9.61"].pixel_array, original)
    assert np.array_equal(by_uid[str(dcmread(files[0]).SOPInstanceUID)].pixel_array, original)


def test_a_destination_accepting_the_stored_syntax_gets_it_unchanged(tmp_path: Path, journal: Journal,
                                                                     files: list[Path]) -> None:
    rle = compressed_copy(files[0], tmp_path / "rle.dcm", RLELossless, "1.9.9.62")
    server = DestinationSCP(ae_title="NEWPACS", syntaxes=(RLELossless, ExplicitVRLittleEndian))
    try:
        queue_job(journal, [rle, files[1]], ["NEWPACS"])
        assert Dispatcher(make_config(tmp_path, [dest_for(server, name="NEWPACS")]), journal).send_due() == 2
    finally:
        server.stop()
    assert sorted(server.received_syntaxes) == sorted([RLELossless, ExplicitVRLittleEndian])


def test_associations_per_destination_are_capped(tmp_path: Path, files: list[Path]) -> None:
    many = make_mr_series(tmp_path / "many", shape=(8, 8, 8), spacing=(1.0, 1.0, 2.0))
    for cap in (1, 3):
        server = DestinationSCP(ae_title="SLOW", delay_s=0.2)
        journal = Journal(tmp_path / f"journal-{cap}.sqlite3", fsync=False)
        try:
            job = queue_job(journal, many, ["SLOW"])
            config = make_config(tmp_path, [dest_for(server, name="SLOW", max_associations=cap)])
            assert Dispatcher(config, journal).send_due() == 8
            assert {i.state for i in journal.outbox(job)} == {"sent"}
        finally:
            journal.close()
            server.stop()
        assert server.peak == cap, (cap, server.peak)
        assert len(server.implementations) == cap  # one association per share


def test_a_destination_refusing_a_further_association_gets_everything_over_one(
        tmp_path: Path, journal: Journal, files: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    """Nothing fails when a PACS takes one association per calling AE and the node may open more: the refused
    spare's share goes over the first, and no spare is tried again for SPARE_RETRY_S."""
    many = make_mr_series(tmp_path / "many", shape=(6, 8, 8), spacing=(1.0, 1.0, 2.0))
    server = DestinationSCP(ae_title="ONEONLY", max_associations=1, delay_s=0.1)  # busy while the others ask
    try:
        config = make_config(tmp_path, [dest_for(server, name="ONEONLY", max_associations=3)])
        dispatcher = Dispatcher(config, journal)
        job = queue_job(journal, many, ["ONEONLY"])
        with caplog.at_level(logging.INFO, logger="dicom_node.dispatch"):
            assert dispatcher.send_due() == 6
        assert {(i.state, i.tries, i.last_error) for i in journal.outbox(job)} == {("sent", 0, "")}
        assert server.requested == 3 and server.peak == 1  # the first, and the two further ones (tried at once)
        assert "refused a further association" in caplog.text
        deadline = time.monotonic() + 10  # the PACS counts an association until its thread has ended
        while server._server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        again = queue_job(journal, files, ["ONEONLY"])
        assert dispatcher.send_due() == len(files)
        assert {i.state for i in journal.outbox(again)} == {"sent"}
        assert server.requested == 4  # one association: no further one tried meanwhile
    finally:
        server.stop()


def test_a_pacs_serving_one_association_at_a_time_gets_everything_over_the_first(
        tmp_path: Path, journal: Journal) -> None:
    """dcmtk's storescp (no --fork) takes a further connection but associates it only after the first association
    ends: the first sends everything meanwhile, the further one finds nothing left, and nothing fails."""
    import json

    from dicom_node.audit import AuditTrail
    from tests.e2e.peers import StoreSCP

    many = make_mr_series(tmp_path / "many", shape=(6, 8, 8), spacing=(1.0, 1.0, 2.0))
    with StoreSCP(tmp_path / "storescp") as scp:
        config = make_config(tmp_path, [Destination(name="ONEATATIME", ae_title=scp.aet, host="127.0.0.1",
                                                    port=scp.port, max_associations=2)])
        job = queue_job(journal, many, ["ONEATATIME"])
        # (the dispatch timeout here, 5 s, is the further association's too: had the first waited for it idle, as
        # a first version did, its own network timeout would have aborted it, and its items failed a try)
        audit = tmp_path / "audit.jsonl"
        assert Dispatcher(config, journal, AuditTrail(audit, "NODE")).send_due() == 6
        assert len(scp.wait_for_files(6, timeout=10)) == 6
    assert {(i.state, i.tries) for i in journal.outbox(job)} == {("sent", 0)}
    deliveries = [e for e in map(json.loads, audit.read_text().splitlines()) if e["event"] == "delivery"]
    assert [(e["sent"], e["failed"]) for e in deliveries] == [(6, 0)]  # all over the first; the other took none


def test_the_scu_announces_the_nodes_implementation(tmp_path: Path, journal: Journal, files: list[Path],
                                                    pacs: DestinationSCP) -> None:
    queue_job(journal, files[:1], ["PACS"])
    Dispatcher(make_config(tmp_path, [dest_for(pacs)]), journal).send_due()
    assert pacs.implementations[-1] == (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)


def test_the_scu_socket_sends_without_nagle(tmp_path: Path, journal: Journal, files: list[Path],
                                            pacs: DestinationSCP) -> None:
    """TCP_NODELAY on the dispatcher's own socket: each C-STORE's last P-DATA fragment leaves at once instead of
    waiting for the peer's delayed ACK."""
    import socket

    from pydicom.filereader import read_file_meta_info

    config = make_config(tmp_path, [dest_for(pacs)])
    job = queue_job(journal, files, ["PACS"])
    items = journal.outbox(job)
    metas = {i.id: read_file_meta_info(i.path) for i in items}
    dest = config.destination("PACS")
    assoc = Dispatcher(config, journal)._open("PACS", dest, items, metas)
    assert assoc is not None and assoc.is_established
    try:
        sock = assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        # one association proposes a context for every SOP class the items need
        assert {str(cx.abstract_syntax) for cx in assoc.accepted_contexts} == {str(m.MediaStorageSOPClassUID)
                                                                               for m in metas.values()}
    finally:
        assoc.release()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_dispatchers_sharing_an_outbox_send_each_object_once(tmp_path: Path, files: list[Path], backend: str,
                                                              request: pytest.FixtureRequest) -> None:
    """Receivers and ``--role dispatcher`` processes share the outbox: each claims its own items, so three
    dispatchers (each its own journal connection, as in its own process) racing over 4 jobs deliver every object
    exactly once."""
    target = tmp_path / "journal.sqlite3" if backend == "sqlite" else request.getfixturevalue("postgres_journal")
    server = DestinationSCP(delay_s=0.01)
    journals = [Journal(target, fsync=False) for _ in range(3)]
    try:
        jobs = []
        for n in range(4):
            uid = f"1.2.3.4.{n}"
            received = ReceivedInstance(f"1.9.{n}", MRImageStorage, "1.2.3", uid, "P", InstanceHeader(),
                                        SeriesAttributes(series_description="t1", modality="MR"))
            journals[0].add_instance(received, transfer_syntax="", path="/x", calling_ae="MR1")
            jobs.append(journals[0].add_job(series_uid=uid, version=1, rule="r", action="synthesize", model="m"))
            journals[0].record_outputs(jobs[-1], [(f"1.9.9.{n}", "sT1")], [
                ("PACS", str(p), MRImageStorage, f"{dcmread(p, stop_before_pixels=True).SOPInstanceUID}.{n}")
                for p in files])
        config = make_config(tmp_path, [dest_for(server)], claim_batch=2)  # small claims: many rounds of racing
        dispatchers = [Dispatcher(config, j) for j in journals]
        barrier = threading.Barrier(len(dispatchers))

        def run(dispatcher: Dispatcher) -> None:
            barrier.wait()
            dispatcher.send_due()

        threads = [threading.Thread(target=run, args=(d,)) for d in dispatchers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len({d.worker for d in dispatchers}) == 1  # one process here; the claims still keep them apart
        assert {journals[0].job(j).state for j in jobs} == {"sent"}
        assert len(server.received) == 4 * len(files)  # each object once (the SOP UIDs repeat across jobs)
    finally:
        server.stop()
        for j in journals:
            j.close()


def test_the_dispatcher_role_delivers_the_outbox_under_its_own_id(tmp_path: Path, files: list[Path],
                                                                  pacs: DestinationSCP) -> None:
    """``serve --role dispatcher`` (dicom_node.delivery): a scan claims and sends what is due, nothing else."""
    from dicom_node.delivery import DeliveryProcess

    config = make_config(tmp_path, [dest_for(pacs)])
    journal = Journal(tmp_path / "journal.sqlite3", fsync=False)
    job = queue_job(journal, files, ["PACS"])
    journal.close()
    process = DeliveryProcess(config)
    try:
        assert process.id.startswith("dispatcher@") and process.dispatcher.worker == process.id
        before = len(pacs.received)
        process.scan()
        assert len(pacs.received) - before == len(files)
        assert process.journal.job(job).state == "sent"
    finally:
        process.stop()
    # its stop ends the delivery under way too (it waited for the whole backlog: review finding)
    assert process.dispatcher.stopping.is_set()


@pytest.mark.parametrize("cap", [1, 2])
def test_items_left_when_every_association_is_lost_fail_a_try_and_go_later(tmp_path: Path, journal: Journal,
                                                                           pacs: DestinationSCP,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           cap: int) -> None:
    """Every association is lost once two objects went: the object each was sending fails a try, and so do those
    no association took (``_fail_left``); all go at the next attempt."""
    many = make_mr_series(tmp_path / "many", shape=(6, 8, 8), spacing=(1.0, 1.0, 2.0))
    before = len(pacs.received)
    sent: list[int] = []
    lock = threading.Lock()
    real_store_one = Dispatcher._store_one

    def store_or_lose(self: Dispatcher, name: str, assoc: Any, *args: Any) -> str | None:
        with lock:
            lose = len(sent) >= 2
            sent.append(0) if not lose else None
        if lose:
            assoc.abort()  # the connection drops while this object goes
            return "connection dropped"
        return real_store_one(self, name, assoc, *args)

    monkeypatch.setattr(Dispatcher, "_store_one", store_or_lose)
    config = make_config(tmp_path, [dest_for(pacs, max_associations=cap)], max_tries=3)
    job = queue_job(journal, many, ["PACS"])
    assert Dispatcher(config, journal).send_due() == 2
    items = journal.outbox(job)
    left = [i for i in items if i.state == "pending"]
    assert len(left) == 4 and all(i.tries == 1 for i in left), [(i.state, i.tries) for i in items]
    errors = sorted(i.last_error for i in left)
    assert errors == ["association lost"] * (4 - cap) + ["connection dropped"] * cap, errors
    monkeypatch.setattr(Dispatcher, "_store_one", real_store_one)
    time.sleep(max(0.0, max(i.next_attempt_at for i in left) - time.time() + 0.05))
    assert Dispatcher(config, journal).send_due() == 4
    assert {i.state for i in journal.outbox(job)} == {"sent"}
    assert len(pacs.received) - before == 6


def test_a_stop_finishes_the_objects_under_way_and_leaves_the_rest(tmp_path: Path, journal: Journal) -> None:
    """A stop waited for the whole backlog to a slow PACS (93 s for 63 objects at 3 s each, past systemd's
    TimeoutStopSec): the objects being sent are finished, the rest is released untried for the next start."""
    many = make_mr_series(tmp_path / "many", shape=(12, 8, 8), spacing=(1.0, 1.0, 2.0))
    server = DestinationSCP(ae_title="SLOW", delay_s=0.3)
    try:
        job = queue_job(journal, many, ["SLOW"])
        config = make_config(tmp_path, [dest_for(server, name="SLOW", max_associations=2)], claim_batch=4)
        dispatcher = Dispatcher(config, journal)
        sending = threading.Thread(target=dispatcher.send_due)
        sending.start()
        deadline = time.monotonic() + 10
        while not server.received and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        dispatcher.stop()
        sending.join(10)
        assert not sending.is_alive() and time.monotonic() - started < 2.0  # at most the objects under way
        items = journal.outbox(job)
        sent = [i for i in items if i.state == "sent"]
        assert 1 <= len(sent) <= 4 and len(sent) == len(server.received)
        assert all(i.state == "pending" and i.tries == 0 for i in items if i.state != "sent")  # untried
        assert Dispatcher(config, journal).send_due() == len(items) - len(sent)  # the next start sends them
    finally:
        server.stop()


def test_a_destination_whose_name_does_not_resolve_fails_a_try_with_that_reason(tmp_path: Path, journal: Journal,
                                                                                 files: list[Path]) -> None:
    """An unresolvable host name was an "unexpected error" with a traceback in the log, and `echo` printed
    "failed: gaierror"."""
    from dicom_node.dispatch import echo

    dest = Destination(name="TYPO", ae_title="PACS", host="pacs.invalid", port=104)
    config = make_config(tmp_path, [dest])
    job = queue_job(journal, files, ["TYPO"])
    assert Dispatcher(config, journal).send_due() == 0
    errors = {i.last_error for i in journal.outbox(job)}
    assert len(errors) == 1 and errors.pop().startswith("host 'pacs.invalid' cannot be resolved"), errors
    ok, message = echo(config, dest)
    assert not ok and "host 'pacs.invalid' cannot be resolved" in message

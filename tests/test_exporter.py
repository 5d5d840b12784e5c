"""Tests for dicom_node.exporter: the Prometheus metrics, read back with the Prometheus text parser."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicom_node.exporter import NodeMetrics, refusal_reason
from dicom_node.health import Check, Health
from dicom_node.journal import Journal
from dicom_node.receipts import LogStatus
from tests.dicom_factory import make_mr_series
from tests.test_journal import GIVE_UP, add, job_with_outbox
from tests.test_scp import NODE_AE
from tests.test_scp import Node as SCPNode


def samples(metrics: NodeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, parsed by the Prometheus text parser: (name, sorted labels) → value."""
    text = metrics.exposition().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sqlite3", fsync=False)
    yield j
    j.close()


def test_refusal_reasons_are_the_status_meanings() -> None:
    assert refusal_reason(0x0000) is None and refusal_reason(0xB000) is None and refusal_reason(0xB007) is None
    assert refusal_reason(0xA700) == refusal_reason(0xA701) == "out_of_resources"
    assert refusal_reason(0xA900) == "dataset_mismatch"
    assert refusal_reason(0xC000) == refusal_reason(0xC211) == "cannot_understand"
    assert refusal_reason(0x0122) == "status_0x0122"


def test_store_statuses_and_step_timings_are_counted(journal: Journal, tmp_path: Path) -> None:
    metrics = NodeMetrics(journal, tmp_path, lambda: [])
    for status in (0x0000, 0x0000, 0xB000, 0xA700, 0xC000, 0xC000):
        metrics.store_status(status)
    metrics.observe_job({"load": 0.2, "write": 3.0, "total": 4.0})
    metrics.observe_job({"load": 0.3, "total": 700.0})
    values = samples(metrics)
    assert values[("dicom_node_instances_received_total", ())] == 3
    assert values[("dicom_node_instances_refused_total", (("reason", "out_of_resources"),))] == 1
    assert values[("dicom_node_instances_refused_total", (("reason", "cannot_understand"),))] == 2
    assert values[("dicom_node_instances_refused_total", (("reason", "dataset_mismatch"),))] == 0
    assert values[("dicom_node_job_step_duration_seconds_count", (("step", "load"),))] == 2
    assert values[("dicom_node_job_step_duration_seconds_sum", (("step", "load"),))] == pytest.approx(0.5)
    assert values[("dicom_node_job_step_duration_seconds_bucket", (("le", "0.25"), ("step", "load")))] == 1
    assert values[("dicom_node_job_step_duration_seconds_bucket", (("le", "600.0"), ("step", "total")))] == 1
    assert values[("dicom_node_job_step_duration_seconds_bucket", (("le", "+Inf"), ("step", "total")))] == 2


def test_journal_states_outbox_and_disk_at_scrape_time(journal: Journal, tmp_path: Path) -> None:
    health = Health({"scp_listening": Check(True, ""), "disk_space": Check(False, "low")}, 0.0)
    metrics = NodeMetrics(journal, tmp_path, lambda: ["PACS", "ARCHIVE", "SPARE"], health=lambda: health)
    job, ids = job_with_outbox(journal, ("PACS", "ARCHIVE"), n=2)
    add(journal, "1.9.5", series="2.2")
    journal.mark_sent([i.id for i in journal.outbox(job) if i.destination == "ARCHIVE"])
    pacs = [i.id for i in journal.outbox(job) if i.destination == "PACS"]
    journal.mark_failed_try(pacs[:1], "down", next_attempt=GIVE_UP)
    time.sleep(0.2)
    values = samples(metrics)
    assert values[("dicom_node_series", (("state", "routed"),))] == 1
    assert values[("dicom_node_series", (("state", "receiving"),))] == 1
    assert values[("dicom_node_series", (("state", "ignored"),))] == 0
    assert values[("dicom_node_jobs", (("state", "written"),))] == 1
    assert values[("dicom_node_jobs", (("state", "failed"),))] == 0
    assert values[("dicom_node_follow_ups", (("state", "failed"),))] == 0
    assert values[("dicom_node_instances_stored", ())] == 2
    items = {labels: v for (name, labels), v in values.items() if name == "dicom_node_outbox_items"}
    assert items[(("destination", "PACS"), ("state", "pending"))] == 1
    assert items[(("destination", "PACS"), ("state", "failed"))] == 1
    assert items[(("destination", "ARCHIVE"), ("state", "sent"))] == 2
    assert items[(("destination", "SPARE"), ("state", "pending"))] == 0  # configured, nothing queued yet
    age = {dict(labels)["destination"]: v for (name, labels), v in values.items()
           if name == "dicom_node_outbox_oldest_pending_age_seconds"}
    queued = min(i.queued_at for i in journal.outbox(job) if i.state == "pending")
    assert age["ARCHIVE"] == 0 and age["SPARE"] == 0
    assert 0.2 <= age["PACS"] <= time.time() - queued + 0.01
    assert values[("dicom_node_disk_free_bytes", ())] > 0
    assert values[("dicom_node_health_check", (("check", "scp_listening"),))] == 1
    assert values[("dicom_node_health_check", (("check", "disk_space"),))] == 0


def test_the_receipt_log_is_read_at_scrape_time(journal: Journal, tmp_path: Path) -> None:
    status = [LogStatus(open=2, settling=1, failing=(), last_error="", settle_failures=0, files=3,
                        oldest_file_age_s=4.5), 0]
    metrics = NodeMetrics(journal, tmp_path, list, receipts=lambda: (status[0], status[1]))
    values = samples(metrics)
    assert values[("dicom_node_receipt_segments", (("state", "open"),))] == 2
    assert values[("dicom_node_receipt_segments", (("state", "settling"),))] == 1
    assert values[("dicom_node_receipt_segments", (("state", "failing"),))] == 0
    assert values[("dicom_node_receipt_segment_files", ())] == 3
    assert values[("dicom_node_receipt_oldest_segment_age_seconds", ())] == 4.5
    assert values[("dicom_node_receipt_settle_failures_total", ())] == 0
    assert values[("dicom_node_receipt_objects_replayed_total", ())] == 0
    status[:] = [LogStatus(open=0, settling=0, failing=("a.log", "b.log"), last_error="OSError: gone",
                           settle_failures=5, files=2, oldest_file_age_s=90.0), 7]
    values = samples(metrics)
    assert values[("dicom_node_receipt_segments", (("state", "failing"),))] == 2
    assert values[("dicom_node_receipt_settle_failures_total", ())] == 5
    assert values[("dicom_node_receipt_objects_replayed_total", ())] == 7
    # a node without a receipt log (fsync or receipt_log off) exports none of them
    assert not [k for k in samples(NodeMetrics(journal, tmp_path, list)) if k[0].startswith("dicom_node_receipt")]


def test_two_nodes_in_one_process_keep_their_own_metrics(journal: Journal, tmp_path: Path) -> None:
    first, second = NodeMetrics(journal, tmp_path, list), NodeMetrics(journal, tmp_path, list)
    first.store_status(0)
    assert samples(first)[("dicom_node_instances_received_total", ())] == 1
    assert samples(second)[("dicom_node_instances_received_total", ())] == 0


def test_the_scp_reports_each_answered_status(tmp_path: Path, journal: Journal) -> None:
    node = SCPNode(tmp_path / "node", [])
    metrics = NodeMetrics(journal, tmp_path, list)  # the counters come from the SCP; the gauges are not read here
    node.scp.on_store_status = metrics.store_status
    try:
        good = make_mr_series(tmp_path / "src", shape=(2, 16, 16))
        truncated = tmp_path / "truncated.dcm"
        truncated.write_bytes(good[0].read_bytes()[:-300])
        other = dcmread(good[1])
        other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        other.SeriesInstanceUID = "not a uid"
        mismatched = tmp_path / "mismatch.dcm"
        other.save_as(mismatched)
        ae = AE(ae_title="SCANNER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title=NODE_AE)
        assert assoc.is_established
        statuses = [assoc.send_c_store(p).Status for p in (*good, good[0], truncated, mismatched)]
        assoc.release()
    finally:
        node.stop()
    assert statuses == [0x0000, 0x0000, 0x0000, 0xC000, 0xA900]
    values = samples(metrics)
    assert values[("dicom_node_instances_received_total", ())] == 3  # a re-send is answered Success too
    assert values[("dicom_node_instances_refused_total", (("reason", "cannot_understand"),))] == 1
    assert values[("dicom_node_instances_refused_total", (("reason", "dataset_mismatch"),))] == 1


def test_every_serving_process_of_the_data_directory_is_a_sample(journal: Journal, tmp_path: Path) -> None:
    """The receiver's /metrics lists every process sharing its data directory (a worker's own /metrics port too)."""
    from dicom_node.lock import ProcessLock

    metrics = NodeMetrics(journal, tmp_path, list)
    assert not [k for k in samples(metrics) if k[0] == "dicom_node_process_up"]
    locks = [ProcessLock(tmp_path, "receiver"), ProcessLock(tmp_path, "worker")]
    locks[0].acquire(role="receiver", started=1.0)
    locks[1].acquire(role="worker", started=2.0, worker="worker@h:9", metrics_port=9101)
    try:
        up = {dict(labels)["role"]: dict(labels) for (name, labels), v in samples(metrics).items()
              if name == "dicom_node_process_up" and v == 1}
    finally:
        for lock in locks:
            lock.release()
    assert up["worker"]["worker"] == "worker@h:9" and up["worker"]["metrics_port"] == "9101"
    assert up["receiver"]["pid"] == str(os.getpid()) and up["receiver"]["worker"] == ""

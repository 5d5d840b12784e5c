"""The node running unattended: retention deletes what was delivered and keeps what was not; the disk
watermark refuses a scanner's objects with 0xA700. dcmtk as the scanner and the PACS, the node as a process."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from dicom_node import cli
from tests.dicom_factory import make_mr_series, make_study

from .node_proc import NodeProcess, synthesis_rule
from .peers import failed_stores, free_port, storescu

SHAPE, SPACING = (8, 24, 24), (1.0, 1.0, 4.0)
#: a few seconds instead of days
RETENTION = {"delivered_days": 2.0 / 86400, "not_processed_days": 2.0 / 86400, "sweep_interval_s": 0.5}


def _send(node: NodeProcess, files: list[Path]) -> None:
    result = storescu(node.port, files, called_ae=node.ae_title)
    assert result.returncode == 0 and not failed_stores(result), result.stderr


def _uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def test_retention_deletes_what_was_delivered_keeps_what_was_not_and_a_resend_is_processed(
        tmp_path: Path, store_scp, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    study = make_study()
    delivered = make_mr_series(tmp_path / "t1", shape=SHAPE, spacing=SPACING, study=study, series_description="t1")
    ignored = make_mr_series(tmp_path / "loc", shape=(2, 16, 16), study=study, series_description="localizer",
                             series_number=1)
    undelivered = make_mr_series(tmp_path / "flair", shape=SHAPE, spacing=SPACING, study=study,
                                 series_description="flair", series_number=3)
    destinations = [{"name": "pacs", "ae_title": store_scp.aet, "host": "127.0.0.1", "port": store_scp.port},
                    {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()}]  # never up
    rules = [synthesis_rule("T1", "^t1$", "pacs"), synthesis_rule("FLAIR", "^flair$", "down")]
    with NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=destinations, rules=rules,
                     retention=RETENTION) as node:
        _send(node, delivered + ignored + undelivered)
        uid, ignored_uid, undelivered_uid = _uid(delivered), _uid(ignored), _uid(undelivered)
        node.wait_for(lambda j: (s := j.series(uid)) and s.purged_at and (i := j.series(ignored_uid)) and i.purged_at,
                      timeout=60, what="the delivered and the ignored series purged")
        n_sent = len(store_scp.wait_for_files(1))
        time.sleep(1.5)  # more sweeps, past the undelivered series' age too
        journal = node.journal()
        try:
            series = journal.series(uid)
            [job] = [j for j in journal.jobs_in_study(series.study_uid) if j.series_uid == uid]
            assert series.purged_instances == len(delivered) and series.n_instances == 0
            assert job.state == "sent" and job.purged_at > 0
            assert {(i.destination, i.state) for i in journal.outbox(job.id)} == {("pacs", "sent")}
            assert not (node.data_dir / "outputs" / f"job-{job.id:06d}").exists()
            kept = journal.series(undelivered_uid)
            assert kept.purged_at == 0 and kept.n_instances == len(undelivered)
            assert all(Path(i.path).is_file() for i in journal.instances(undelivered_uid))
            pending = [i for i in journal.outbox() if i.destination == "down"]
            assert pending and all(i.state == "pending" and Path(i.path).is_file() for i in pending)
        finally:
            journal.close()
        spooled = list((node.data_dir / "spool").rglob("*.dcm"))
        assert len(spooled) == len(undelivered)  # only the undelivered series is left in the spool

        assert cli.main(["status", "--config", str(node.config_path)]) == 0
        out = capsys.readouterr().out
        assert f"({len(delivered) + len(ignored)} deleted by retention, from 2 series)" in out

        # the scanner sends the deleted series again: received as new, processed and delivered again
        _send(node, delivered)
        node.wait_for(lambda j: [x for x in j.jobs() if x.series_uid == uid and x.version == 2 and x.state == "sent"],
                      timeout=60, what="the series sent again processed and delivered as version 2")
        assert len(store_scp.wait_for_files(2 * n_sent)) == 2 * n_sent
    assert "retention: deleted series 't1'" in node.log()


def test_low_disk_is_refused_with_out_of_resources(tmp_path: Path, models_dir: Path) -> None:
    src = make_mr_series(tmp_path / "src", shape=(3, 16, 16), series_description="t1")
    # more free space than any disk has: the node refuses from the first object on
    limits = {"min_free_mb": 1e12, "resume_free_mb": 1e12}
    with NodeProcess(tmp_path / "node", models_dir=models_dir, limits=limits) as node:
        result = storescu(node.port, src, called_ae=node.ae_title, extra_args=["-v"])
        journal = node.journal()
        try:
            assert journal.counts()["instances"]["total"] == 0
        finally:
            journal.close()
        log = node.log()
    # storescu reports each refusal (its exit status is 0 with -nh)
    assert result.stderr.count("Received Store Response (Refused: OutOfResources)") == len(src), result.stderr
    assert not list((node.data_dir / "spool").rglob("*.dcm"))
    assert log.count("disk low:") == 1 and "every C-STORE is refused (0xA700 out of resources)" in log

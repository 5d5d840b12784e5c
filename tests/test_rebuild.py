"""Rebuilding the journal from the spool after the journal was lost."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.journal import Journal
from dicom_node.rebuild import REBUILT_NOTE, unknown_files
from dicom_node.spool import Spool
from tests.dicom_factory import make_mr_series, make_study
from tests.e2e.node_proc import config_toml


def _receive(journal: Journal, spool: Spool, paths: list[Path]) -> None:
    """File objects as the SCP does (through its own functions)."""
    from dicom_node.headers import describe
    from dicom_node.scp import parse_instance, stored_digest

    for path in paths:
        data = path.read_bytes()
        ds = parse_instance(data)
        stored = spool.write(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), data)
        journal.add_instance(describe(ds), transfer_syntax=str(ds.file_meta.TransferSyntaxUID), path=str(stored),
                             calling_ae="SCANNER", sha256=stored_digest(stored) or "")


def _rows(journal: Journal) -> dict[str, tuple]:
    rows = {}
    for series in journal.all_series(limit=1000):
        for inst in journal.instances(series.series_uid):
            # the series' attributes come from its first instance (which one is first may differ)
            attrs = dataclasses.replace(series.attributes, sop_instance_uid="")
            rows[inst.sop_instance_uid] = (inst.series_uid, inst.sop_class_uid, inst.transfer_syntax, inst.path,
                                           inst.sha256, inst.header, series.study_uid, series.patient_id,
                                           series.description, attrs)
    return rows


@pytest.mark.parametrize("reprocess", [False, True])
def test_rebuild_restores_every_series_and_instance(tmp_path: Path, reprocess: bool,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    study = make_study()
    files = (make_mr_series(tmp_path / "a", shape=(4, 8, 8), study=study, series_description="t1_tse_tra")
             + make_mr_series(tmp_path / "b", shape=(3, 8, 8), study=study, series_description="t2_cor")
             + make_mr_series(tmp_path / "c", shape=(2, 8, 8), series_description="flair"))
    data = tmp_path / "data"
    journal = Journal(data / "journal.sqlite3", fsync=False)
    spool = Spool(data / "spool", fsync=False)
    _receive(journal, spool, files)
    before = _rows(journal)
    journal.close()
    assert len(before) == 9
    for path in data.glob("journal.sqlite3*"):
        path.unlink()  # the journal is lost

    empty = Journal(data / "journal.sqlite3", fsync=False)
    assert len(unknown_files(empty, spool.root)) == 9
    empty.close()
    config = tmp_path / "node.toml"
    config.write_text(config_toml({"node": {"data_dir": str(data), "fsync": False}}))
    argv = ["journal", "rebuild", "--config", str(config)] + (["--reprocess"] if reprocess else [])
    assert main(argv) == 0

    journal = Journal(data / "journal.sqlite3", fsync=False)
    try:
        after = _rows(journal)
        assert after == before  # every instance, its series, path, digest and header attributes
        assert not unknown_files(journal, spool.root)
        states = {s.state for s in journal.all_series()}
        notes = {s.note for s in journal.all_series()}
        assert len(journal.all_series()) == 3
        assert states == ({"receiving"} if reprocess else {"ignored"})
        assert notes == ({""} if reprocess else {REBUILT_NOTE})
        # and a second run finds nothing left to add
    finally:
        journal.close()
    assert main(["journal", "rebuild", "--config", str(config)]) == 0


def test_rebuild_is_refused_while_a_node_serves_the_data_directory(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Found in review: beside a running node, a rebuild marked the series still arriving as ignored."""
    from dicom_node.lock import NodeLock

    data = tmp_path / "data"
    spool = Spool(data / "spool", fsync=False)
    spool.write("1.2.3", "1.2.3.4", "1.2.3.4.5", b"not read")
    config = tmp_path / "node.toml"
    config.write_text(config_toml({"node": {"data_dir": str(data), "fsync": False}}))
    serving = NodeLock(data)
    serving.acquire(ports={"dicom": 11112, "tls": None})
    try:
        assert main(["journal", "rebuild", "--config", str(config)]) == 1
        assert "stop it first" in capsys.readouterr().err
    finally:
        serving.release()
    assert not (data / "journal.sqlite3").exists()  # not even opened


def test_start_warns_about_spool_files_the_journal_does_not_know(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from dicom_node.config import NodeConfig, NodeSettings
    from dicom_node.service import Node

    files = make_mr_series(tmp_path / "a", shape=(2, 8, 8))
    data = tmp_path / "data"
    spool = Spool(data / "spool", fsync=False)
    for i, path in enumerate(files):
        spool.write("1.2.3", "1.2.3.4", f"1.2.3.4.{i}", path.read_bytes())
    node = Node(NodeConfig(node=NodeSettings(data_dir=data, fsync=False, host="127.0.0.1"), rules=[],
                                inference={"models_dir": tmp_path}))
    caplog.set_level(logging.WARNING)
    node._check_spool()
    node.journal.close()
    assert "the spool holds 2 file(s) the journal" in caplog.text
    assert "dicom-node journal rebuild" in caplog.text

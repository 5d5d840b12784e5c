"""Tests for dicom_node.spool: layout, atomic replacement, fsync of file and directories."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from dicom_node import spool as spool_module
from dicom_node.spool import Spool, SpoolPathError, path_component


def test_write_files_under_study_series_sop(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    path = spool.write("1.2.3", "1.2.3.4", "1.2.3.4.5", b"DICM-data")
    assert path == tmp_path / "spool" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert path.read_bytes() == b"DICM-data"
    assert path == spool.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert sorted(p.name for p in path.parent.iterdir()) == ["1.2.3.4.5.dcm"]  # no temporary left


def test_a_folder_removed_by_retention_is_made_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    first = spool.write("1.2.3", "1.2.3.4", "1.2.3.4.5", b"first")
    first.unlink()  # a retention sweep deletes the series and its empty folders ...
    first.parent.rmdir()
    first.parent.parent.rmdir()
    again = spool.write("1.2.3", "1.2.3.4", "1.2.3.4.5", b"again")  # ... while the spool remembers the folder
    assert again == first and again.read_bytes() == b"again"


def test_unsafe_uid_characters_cannot_escape_the_root(tmp_path: Path) -> None:
    root = tmp_path / "data" / "spool"
    spool = Spool(root, fsync=False)
    hostile = ["..", "../../etc", "a/b", "/abs", ".", "", "1+1", "1_1", "1/1", "1.2.3\x00", "1..2", "x" * 300]
    written: dict[str, Path] = {}
    for k, uid in enumerate(hostile):
        path = spool.write(uid, uid, uid, f"object {k}".encode())
        assert path.resolve().is_relative_to(root.resolve()), (uid, path)
        study, series, name = path.relative_to(root).parts
        assert study == series == name.removesuffix(".dcm") == path_component(uid)
        assert study.startswith("h-") and len(study) == 42 and study[2:].isalnum()
        written[uid] = path
    assert len(set(written.values())) == len(hostile)  # no two share a file (1+1, 1_1 and 1/1 included)
    for k, uid in enumerate(hostile):
        assert written[uid].read_bytes() == f"object {k}".encode()  # nothing overwritten
    # nothing was written outside the spool
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["spool"]
    assert list(tmp_path.iterdir()) == [tmp_path / "data"]
    # a UID is used as it is
    assert spool.path_for("1.2.3", "1.2.3.4", "1.2.840.01.5").relative_to(root).parts == (
        "1.2.3", "1.2.3.4", "1.2.840.01.5.dcm")
    assert path_component("1." * 40) != "1." * 40  # too long (and an empty last component) for a UID


def test_a_symlink_out_of_the_spool_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "spool" / "1.2").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SpoolPathError):
        spool.write("1.2", "3", "4", b"x")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_rewrite_replaces_the_earlier_copy(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    first = spool.write("1", "2", "3", b"old content that is longer")
    second = spool.write("1", "2", "3", b"new")
    assert first == second and second.read_bytes() == b"new"
    assert [p.name for p in second.parent.iterdir()] == ["3.dcm"]


def test_large_payload_is_written_whole(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = Spool(tmp_path, fsync=False).write("1", "2", "3", data)
    assert path.read_bytes() == data


def test_fsync_file_and_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else str(fd))
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", spy)
    root = tmp_path / "spool"
    spool = Spool(root, fsync=True)
    path = spool.write("1", "2", "3", b"x")
    if not os.path.exists("/proc/self/fd"):
        assert len(synced) >= 2
        return
    # the new study and series directories are made durable in their parents, the file's data is
    # synced before the rename, and the directory after it
    assert str(root) in synced and str(root / "1") in synced
    assert any(s.endswith(".tmp") for s in synced)
    assert synced[-1] == str(path.parent)
    synced.clear()
    spool.write("1", "2", "4", b"y")  # known directory: only the file and its directory
    assert len(synced) == 2 and synced[-1] == str(path.parent)


def test_no_fsync_when_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(spool_module.os, "fsync", lambda fd: calls.append(fd))
    Spool(tmp_path, fsync=False).write("1", "2", "3", b"x")
    assert calls == []


def test_failed_write_leaves_no_final_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path, fsync=False)

    def full_disk(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module.os, "write", full_disk)
    with pytest.raises(OSError):
        spool.write("1", "2", "3", b"x")
    assert not spool.path_for("1", "2", "3").exists()
    assert list((tmp_path / "1" / "2").iterdir()) == []  # the temporary is removed too


def test_concurrent_writers_to_one_series(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for n in range(20):
                spool.write("1", "2", f"{k}.{n}", f"{k}-{n}".encode())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    files = list((tmp_path / "1" / "2").iterdir())
    assert len(files) == 80 and all(f.suffix == ".dcm" for f in files)


def test_the_folders_a_spool_remembers_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One entry per series ever received, for the life of the process: a node running for years only grew."""
    monkeypatch.setattr(spool_module, "KNOWN_DIRS_KEPT", 3)
    spool = Spool(tmp_path / "spool", fsync=False)
    paths = [spool.write("1.2", f"1.3.{k}", "1.4", b"x") for k in range(5)]
    assert list(spool._known_dirs) == [p.parent for p in paths[2:]]  # the most recent, in order
    assert spool.write("1.2", "1.3.0", "1.5", b"y").parent == paths[0].parent  # forgotten: checked and made again
    assert list(spool._known_dirs) == [paths[3].parent, paths[4].parent, paths[0].parent]

"""P5 throughput: a mixed stream of studies (scout, 2D FLAIR, real MPRAGE each) from 4 senders at once, to a node
with the default rules and Orthanc as destination, once per ``[inference] workers`` setting.

Every study is a copy of the same three series with its own patient, study, series, SOP Instance and Frame of
Reference UIDs (the node would otherwise take a re-sent instance as the one it already has). Sender ``s`` sends
studies ``s``, ``s + 4``, ... one after the other, one association per study. Times come from the node's journal:
a study's turnaround runs from its last instance received to its last job settled as sent (results acknowledged
by Orthanc); the run's length from the first instance received to the last job settled.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from dicom_node.journal import Journal
from tests.dicom_factory import AXIAL_IOP, make_mr_volume_image, write_mr_series
from tests.e2e.peers import Orthanc

from .data import SHARED_MPRAGE, scout_series
from .node import BenchNode
from .send import Send, send, write_profile

SENDERS = 4
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


@dataclass(frozen=True)
class Throughput:
    workers: int
    layout: str                    # "threads": one node, ``workers`` threads; "processes": a receiver and ``workers``
                                   # worker processes (``serve --role worker``, one thread each) sharing its journal
    studies: int
    seconds: float                 # first instance received -> last job settled
    turnarounds: list[float]       # per study: last instance received -> last job settled
    instances_sent: int
    instances_journaled: int
    jobs: int
    jobs_sent: int
    outbox_items: int
    orthanc_instances: int
    failed_senders: int

    @property
    def studies_per_hour(self) -> float:
        return 3600.0 * self.studies / self.seconds

    @property
    def p95(self) -> float:
        ordered = sorted(self.turnarounds)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]

    @property
    def median(self) -> float:
        return statistics.median(self.turnarounds)

    @property
    def lossless(self) -> bool:
        return (not self.failed_senders and self.instances_journaled == self.instances_sent
                and self.jobs_sent == self.jobs and self.orthanc_instances == self.outbox_items)


def _flair(out_dir: Path) -> Path:
    """A generated axial 2D FLAIR: 24 slices of 256 × 256, 0.9 × 0.9 × 5 mm."""
    image = make_mr_volume_image((24, 256, 256), (0.9, 0.9, 5.0), iop=AXIAL_IOP, seed=5)
    write_mr_series(image, out_dir, series_description="t2_tirm_tra_dark-fluid_FLAIR", series_number=3,
                    header={"MRAcquisitionType": "2D", "ImageType": ["ORIGINAL", "PRIMARY", "M", "NORM"]})
    return out_dir


def _copy_study(series: list[Path], out_dir: Path, n: int) -> int:
    """Study ``n``: every file of ``series`` with new UIDs (consistent within the study); the files written."""
    study_uid, patient = str(generate_uid()), f"BENCH-P5-{n:03d}"
    new_uids: dict[str, str] = {}
    written = 0
    for folder in series:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            try:
                ds = pydicom.dcmread(path)
            except pydicom.errors.InvalidDicomError:
                continue  # a README or licence next to the images
            for keyword in _UID_KEYWORDS:
                old = str(ds.get(keyword, ""))
                if old:
                    setattr(ds, keyword, new_uids.setdefault(old, str(generate_uid())))
            ds.StudyInstanceUID, ds.PatientID, ds.PatientName = study_uid, patient, patient
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            target = out_dir / f"{written:05d}.dcm"
            ds.save_as(target, enforce_file_format=True)
            written += 1
    return written


def make_studies(out_dir: Path, count: int) -> tuple[list[Path], int, int, str]:
    """``count`` study folders (scout, 2D FLAIR and MPRAGE each), the instances in all, the series per study and
    what they are."""
    scout, scout_what = scout_series(out_dir / "scout")
    flair = _flair(out_dir / "flair")
    series = [scout, flair]
    what = f"{scout_what}; generated 2D FLAIR (24 × 256²)"
    if SHARED_MPRAGE.is_dir():
        series.append(SHARED_MPRAGE)
        what += f"; {SHARED_MPRAGE.name} (shared data)"
    else:
        what += "; no MPRAGE (shared data absent)"
    folders, total = [], 0
    for n in range(count):
        folder = out_dir / "studies" / f"study-{n:03d}"
        folder.mkdir(parents=True)
        total += _copy_study(series, folder, n)
        folders.append(folder)
    return folders, total, len(series), what


def _send_all(folders: list[Path], profile: Path, port: int, ae_title: str) -> list[Send]:
    """SENDERS threads, each sending its share of the studies one after the other."""
    results: list[Send] = []
    lock = threading.Lock()

    def sender(s: int) -> None:
        for folder in folders[s::SENDERS]:
            result = send(folder, profile, port, called_ae=ae_title, calling_ae=f"SCANNER{s}", timeout=3600)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=sender, args=(s,)) for s in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _settled(expected_series: int) -> Callable[[Journal], bool]:
    """Every series received, routed (or ignored), and every job settled."""
    def done(journal: Journal) -> bool:
        series = journal.all_series(limit=100000)
        return (len(series) >= expected_series and all(s.state in ("routed", "ignored") for s in series)
                and all(j.state in ("sent", "failed") for j in journal.jobs(limit=100000)))
    return done


def _measure(journal: Journal, workers: int, studies: int, sent: int) -> dict[str, object]:
    series = journal.all_series(limit=100000)
    jobs = journal.jobs(limit=100000)
    turnarounds = []
    for study_uid in {s.study_uid for s in series}:
        last = max(s.last_received for s in series if s.study_uid == study_uid)
        settled = [j.updated_at for j in journal.jobs_in_study(study_uid)]
        if settled:
            turnarounds.append(max(settled) - last)
    first = min(s.first_received for s in series)
    return dict(workers=workers, studies=studies, seconds=max(j.updated_at for j in jobs) - first,
                turnarounds=turnarounds, instances_sent=sent,
                instances_journaled=journal.counts()["instances"]["total"], jobs=len(jobs),
                jobs_sent=sum(j.state == "sent" for j in jobs), outbox_items=len(journal.outbox()))


def _workers(tmp_path: Path, node: BenchNode, models_dir: Path, pacs: dict[str, object], n: int) -> list[BenchNode]:
    """``n`` worker processes on the receiver's data directory, started (models warm) before anything is sent."""
    workers = [BenchNode(tmp_path / f"worker-{i}", models_dir=models_dir, destinations=[pacs], role="worker",
                         data_dir=node.data_dir, inference={"workers": 1}) for i in range(n)]
    for worker in workers:
        worker.start()
    return workers


def throughput(folders: list[Path], instances: int, series_per_study: int, models_dir: Path, workers: int,
               log: Callable[[str], None] = print, layout: str = "threads") -> Throughput:
    """Send every study folder (SENDERS at once) to a fresh node and Orthanc; wait until every job settled."""
    with tempfile.TemporaryDirectory(prefix="bench-p5-") as tmp:
        tmp_path = Path(tmp)
        profile = write_profile(folders[0], tmp_path / "storescu.cfg")
        with Orthanc(workdir=tmp_path / "orthanc") as orthanc:
            pacs = {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
            processes = layout == "processes"
            with BenchNode(tmp_path / "node", models_dir=models_dir, destinations=[pacs],
                           role="receiver" if processes else "all", inference={"workers": workers}) as node:
                started = _workers(tmp_path, node, models_dir, pacs, workers) if processes else []
                try:
                    results = _send_all(folders, profile, node.port, node.ae_title)
                    node.wait_for(_settled(series_per_study * len(folders)), timeout=7200, poll=1.0,
                                  what="every job settled")
                finally:
                    for worker in started:
                        worker.stop()
                for r in results:
                    if not r.ok:
                        log(f"P5 sender failed (rc {r.returncode}): {(r.failures or [r.output[-500:]])[0]}")
                journal = node.journal()
                try:
                    measured = _measure(journal, workers, len(folders), instances)
                finally:
                    journal.close()
            in_orthanc = int(orthanc.get("/statistics")["CountInstances"])
    result = Throughput(**measured, layout=layout, orthanc_instances=in_orthanc,  # type: ignore[arg-type]
                        failed_senders=sum(not r.ok for r in results))
    log(f"P5 {layout} workers={workers}: {result.studies} studies in {result.seconds:.0f} s "
        f"({result.studies_per_hour:.0f}/h), turnaround median {result.median:.1f} s, p95 {result.p95:.1f} s, "
        f"{result.jobs_sent}/{result.jobs} jobs sent, Orthanc holds {in_orthanc} of {result.outbox_items}")
    return result

"""Tests for dicom_node.dashboard: the page from a journal, every received value escaped."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dicom_node.dashboard import PageContext, esc, job_stage_and_elapsed, render
from dicom_node.headers import InstanceHeader, ReceivedInstance, SeriesAttributes
from dicom_node.journal import JobState, Journal, OutputFile, SeriesState
from tests.test_journal import GIVE_UP

EVIL = '<script>alert("x")</script>&<img src=x onerror=alert(1)>'


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sqlite3", fsync=False)
    yield j
    j.close()


def _series(journal: Journal, study: str, series: str, *, patient: str, accession: str, description: str,
            n: int = 2, now: float = 1000.0) -> None:
    attrs = SeriesAttributes(series_description=description, modality="MR", series_number=3,
                             accession_number=accession, study_date="20240315", study_description="MRT Schaedel")
    for k in range(n):
        received = ReceivedInstance(f"{series}.{k}", "1.2.840.10008.5.1.4.1.1.4", study, series, patient,
                                    InstanceHeader(), attrs)
        journal.add_instance(received, transfer_syntax="", path=f"/s/{series}.{k}", calling_ae="MR1", now=now + k)


class _Tags(HTMLParser):
    """The tags and attributes a browser would build (to prove that no received value became markup)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Tags:
    parser = _Tags()
    parser.feed(page)
    return parser


def _processed_and_failed(journal: Journal) -> tuple[int, int]:
    _series(journal, "1.1", "1.1.1", patient="PAT-A", accession="ACC-A", description="t1_tse_sag")
    version = journal.close_series("1.1.1")
    done = journal.add_job(series_uid="1.1.1", version=version, rule="t1-2d", action="synthesize", model="synth-t1")
    journal.claim("job", done, "worker@test:1", 60)
    files = [OutputFile("sT1", f"/o/{k}.dcm", "1.9.1", "1.2", f"1.9.1.{k}") for k in range(3)]
    files.append(OutputFile("T1_VOLUME", "/o/t1.mha"))
    items = [(dest, f.path, f.sop_class_uid, f.sop_instance_uid) for dest in ("pacs", "archive") for f in files[:3]]
    journal.record_outputs(done, [("1.9.1", "sT1")], items, files=files, output_name="sT12DT1")
    journal.set_job_timings(done, {"load": 0.5, "total": 12.5})
    outbox = journal.outbox(done)
    journal.mark_sent([i.id for i in outbox if i.destination == "pacs"])
    journal.mark_failed_try([i.id for i in outbox if i.destination == "archive"][:1],
                            f"association rejected {EVIL}", next_attempt=GIVE_UP)

    _series(journal, "2.1", "2.1.1", patient=EVIL, accession="ACC-<B>", description=EVIL, now=2000.0)
    version = journal.close_series("2.1.1")
    failed = journal.add_job(series_uid="2.1.1", version=version, rule="t1-2d", action="synthesize",
                             model="synth-t1")
    journal.claim("job", failed, "worker@test:1", 60)
    journal.set_job_state(failed, JobState.FAILED, f"inconsistent geometry: gap between slice 2 and 3 {EVIL}")
    return done, failed


def test_received_values_never_become_markup(journal: Journal) -> None:
    _processed_and_failed(journal)
    page = render(journal, PageContext(actions=True, csrf="tok"))
    assert "<script" not in page and "<img" not in page
    tags = _parse(page)
    assert not [t for t, _ in tags.tags if t in ("script", "img")]
    assert not [a for _, attrs in tags.tags for a in attrs if a.startswith("on")]
    text = "".join(tags.text)
    assert EVIL in text  # shown as what it is
    assert esc(EVIL) in page


def test_a_processed_study_with_its_outputs_and_deliveries(journal: Journal) -> None:
    done, failed = _processed_and_failed(journal)
    page = render(journal, PageContext(), now=5000.0)
    first, second = page.index('data-study="2.1"'), page.index('data-study="1.1"')
    assert first < second  # the newest study first
    study = page[second:]
    assert '<span class="patient-id">PAT-A</span>' in study and '<span class="accession">ACC-A</span>' in study
    assert '<span class="study-date">2024-03-15</span>' in study and "MRT Schaedel" in study
    row = study[study.index(f'data-job="{done}"'):]
    assert "t1-2d" in row and "synth-t1" in row and "12.5 s" in row
    output = re.search(r'<tr class="output" data-kind="sT1">(.*?)</tr>', row).group(1)
    assert "<td>3</td>" in output  # three objects, the kept volume not listed
    assert '<span class="sent">3 sent</span>' in output
    assert '<span class="pending">2 pending</span> <span class="failed">1 failed</span>' in output
    assert "after 1 tries: association rejected" in output
    assert 'data-kind="T1_VOLUME"' not in page
    failed_row = page[page.index(f'data-job="{failed}"'):]
    assert "inconsistent geometry: gap between slice 2 and 3" in failed_row
    assert '<div class="reason">' in failed_row


def test_a_job_s_follow_ups_are_shown_beside_it(journal: Journal) -> None:
    done, _ = _processed_and_failed(journal)
    journal.record_outputs(done, [], [], follow_ups=["agreement", "other"])
    agreement, other = journal.follow_ups(done)
    journal.claim("follow_up", agreement.id, "worker@test:1", 60)
    journal.fail_follow_up(agreement.id, f"RuntimeError: registration diverged {EVIL}")
    page = render(journal, PageContext(), now=5000.0)
    assert "<script" not in page
    assert "follow-ups: failed 1, queued 1" in page
    row = page[page.index(f'data-job="{done}"'):]
    row = row[:row.index("</tr>")]
    assert ('<div class="follow-up" data-follow-up="agreement">agreement: <span class="state-failed">failed</span> '
            f'<span class="reason">RuntimeError: registration diverged {esc(EVIL)}</span></div>') in row
    assert '<div class="follow-up" data-follow-up="other">other: <span class="state-queued">queued</span></div>' in row
    assert f'#{done} v1<br><span class="state-sent">sent</span>' in row  # the job itself did not fail


def test_actions_only_for_an_authenticated_reader(journal: Journal) -> None:
    done, _ = _processed_and_failed(journal)
    read_only = render(journal, PageContext())
    assert "<form" in read_only and 'action="/actions/' not in read_only
    page = render(journal, PageContext(actions=True, csrf="t0ken"))
    forms = [attrs for tag, attrs in _parse(page).tags if tag == "form" and attrs.get("method") == "post"]
    assert {f["action"] for f in forms} == {"/actions/retry", "/actions/reprocess"}
    assert page.count('action="/actions/reprocess"') == 2  # one per stored series
    assert page.count('action="/actions/retry"') == 1  # the job with a delivery that failed for good
    assert f'name="job_id" value="{done}"' in page
    assert page.count('name="csrf" value="t0ken"') == 3


def test_search_and_empty_page(journal: Journal) -> None:
    _processed_and_failed(journal)
    page = render(journal, PageContext(search="acc-a"))
    assert 'data-study="1.1"' in page and 'data-study="2.1"' not in page
    assert 'value="acc-a"' in page
    # found in review: the page refreshed itself every 30 s, its URL (?q=, a patient ID) logged each time by a
    # proxy in front; a search's page is not refreshed
    assert 'http-equiv="refresh"' not in page and 'http-equiv="refresh"' in render(journal, PageContext())
    none = render(journal, PageContext(search='"><b>'))
    assert 'id="no-studies"' in none and 'value="&quot;&gt;&lt;b&gt;"' in none


def test_ignored_series_says_why(journal: Journal) -> None:
    _series(journal, "3.1", "3.1.1", patient="P", accession="", description="localizer")
    journal.close_series("3.1.1")
    journal.set_series_state("3.1.1", SeriesState.IGNORED, "no rule matched")
    page = render(journal, PageContext())
    assert "no rule matched" in page and "not processed" in page


def test_stage_and_elapsed_of_each_state(journal: Journal) -> None:
    _series(journal, "4.1", "4.1.1", patient="P", accession="", description="t1")
    version = journal.close_series("4.1.1")
    job = journal.add_job(series_uid="4.1.1", version=version, rule="r", action="synthesize", model="m")
    record = journal.job(job)
    assert job_stage_and_elapsed(record, {}, record.created_at + 5) == ("waiting for a worker", "5.0 s")
    journal.claim("job", job, "worker@test:1", 60)
    record = journal.job(job)
    stage = job_stage_and_elapsed(record, {job: ("synthesize", record.updated_at + 60)}, record.updated_at + 90)
    assert stage == ("synthesize (30.0 s)", "90.0 s")
    journal.set_job_timings(job, {"total": 400.0})
    journal.set_job_state(job, JobState.SENT)
    assert job_stage_and_elapsed(journal.job(job), {}, 0) == ("done", "6.7 min")


def test_every_serving_process_is_listed(journal: Journal, tmp_path: Path) -> None:
    """Receivers and workers sharing the data directory, as their process locks record them; values escaped."""
    from dicom_node.lock import ProcessLock, processes

    locks = [ProcessLock(tmp_path, "receiver"), ProcessLock(tmp_path, "worker")]
    locks[0].acquire(role="receiver", started=4000.0, ports={"dicom": 11112, "tls": None})
    locks[1].acquire(role="worker", started=4900.0, worker="worker@<host>:7")
    try:
        page = render(journal, PageContext(processes=processes(tmp_path)), now=5000.0)
    finally:
        for lock in locks:
            lock.release()
    section = page[page.index('<details id="processes">'):]
    assert "processes: 2" in section
    assert re.search(r"<td>receiver</td>.*<td>dicom 11112</td><td>16\.7 min</td>", section)
    assert "<td>worker@&lt;host&gt;:7</td><td>100.0 s</td>" in section
    assert 'id="processes"' not in render(journal, PageContext())  # none recorded: no section

"""The dashboard page (``/``): recent studies, their series, each series' jobs (with their follow-ups: optional
steps run on their own), outputs and deliveries.

Rendered from the journal on each request, as plain HTML with no script. Every value that came from a received
object or from the journal is escaped (:func:`esc`): patient IDs, descriptions and error texts are untrusted input.
"""

from __future__ import annotations

import html
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from .health import Health
from .journal import (
    FollowUpRecord,
    FollowUpState,
    JobRecord,
    JobState,
    Journal,
    OutboxItem,
    OutboxState,
    SeriesRecord,
    SeriesState,
)

#: Output kinds a job keeps on disk for a later step, never sends (not listed as outputs).
KEPT_KINDS = frozenset({"T1_VOLUME", "LABEL_VOLUME"})


def esc(value: object) -> str:
    """``value`` as HTML text (quotes too, so it may stand in an attribute)."""
    return html.escape(str(value), quote=True)


@dataclass(frozen=True)
class PageContext:
    """What the page needs besides the journal."""

    search: str = ""
    limit: int = 50
    #: the forms of the retry and reprocess actions are shown (actions configured and the reader authenticated)
    actions: bool = False
    #: the CSRF token the action forms carry
    csrf: str = ""
    health: Health | None = None
    #: running jobs: job id → (the step running now, when it started)
    stages: Mapping[int, tuple[str, float]] | None = None
    #: a line shown on top (e.g. why the actions are off)
    notice: str = ""
    #: the serving processes of the data directory (receivers, workers, ...), as :func:`dicom_node.lock.processes`
    processes: Sequence[Mapping[str, object]] = ()


def _when(ts: float | None) -> str:
    return "-" if not ts else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _study_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else value


def _seconds(value: float) -> str:
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def job_stage_and_elapsed(job: JobRecord, stages: Mapping[int, tuple[str, float]], now: float) -> tuple[str, str]:
    """(the stage to show, the elapsed time) of a job: what it does now and for how long, or how long it took."""
    if job.state == JobState.QUEUED:
        return "waiting for a worker", _seconds(now - job.created_at)
    if job.state == JobState.RUNNING:
        step, since = stages.get(job.id, ("running", job.updated_at))
        return f"{step} ({_seconds(now - since)})", _seconds(now - job.updated_at)
    total = job.timings.get("total")
    took = _seconds(total) if total is not None else _seconds(max(job.updated_at - job.created_at, 0.0))
    stage = {JobState.WRITTEN: "delivering", JobState.SENT: "done", JobState.FAILED: "failed"}.get(job.state, "")
    return stage, took


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .3em 0; }
.health { padding: .4em .6em; border-radius: 4px; display: inline-block; margin-bottom: .6em; }
.ok { background: #e3f4e3; } .failing { background: #fbe1e1; }
.study { border: 1px solid #bbb; border-radius: 6px; margin: 1em 0; padding: .5em .8em; }
.study h2 { font-size: 1.1em; margin: .2em 0 .4em 0; }
table { border-collapse: collapse; width: 100%; margin: .3em 0; }
th, td { border-bottom: 1px solid #ddd; padding: .2em .4em; text-align: left; vertical-align: top; font-size: .9em; }
th { background: #f3f3f3; }
.state-failed, .failed { color: #b00020; font-weight: bold; }
.state-sent, .state-done { color: #1b7a1b; } .state-running, .state-written, .state-queued { color: #8a5a00; }
.follow-up { font-size: .85em; margin-top: .2em; }
.reason { color: #b00020; }
.muted { color: #777; }
form.inline { display: inline; margin: 0; }
.notice { background: #fff6d5; padding: .4em .6em; border-radius: 4px; }
"""


def render(journal: Journal, page: PageContext, now: float | None = None) -> str:
    """The whole page."""
    now = time.time() if now is None else now
    stages = page.stages or {}
    series = journal.recent_studies(page.limit, page.search or None)
    studies: dict[str, list[SeriesRecord]] = defaultdict(list)
    for record in series:
        studies[record.study_uid].append(record)
    counts = journal.counts()
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # a search's page is not refreshed: its URL holds the patient ID, which a proxy in front logs each time
        "" if page.search else '<meta http-equiv="refresh" content="30">',
        "<title>dicom-node</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>dicom-node</h1>",
    ]
    if page.health is not None:
        state = "ok" if page.health.ok else "failing"
        failed = "; ".join(page.health.failed())
        parts.append(f'<div class="health {state}" id="health">health: {state}'
                     f'{": " + esc(failed) if failed else ""}</div>')
    jobs_line = ", ".join(f"{esc(k)} {v}" for k, v in sorted(counts["jobs"].items())) or "none"
    follow_ups = counts.get("follow_ups", {})
    follow_ups_line = (" · follow-ups: " + ", ".join(f"{esc(k)} {v}" for k, v in sorted(follow_ups.items()))
                       if follow_ups else "")
    parts.append(f'<p class="muted">instances {counts["instances"]["total"]} · jobs: {jobs_line}{follow_ups_line}</p>')
    if page.notice:
        parts.append(f'<p class="notice">{esc(page.notice)}</p>')
    if page.processes:
        parts.append(_processes(page.processes, now))
    parts.append(
        '<form method="get" action="/" role="search">'
        '<label>Patient ID or accession number <input type="search" name="q" '
        f'value="{esc(page.search)}"></label> <button type="submit">Search</button>'
        + (' <a href="/">all</a>' if page.search else "") + "</form>"
    )
    if not studies:
        parts.append('<p id="no-studies">No studies' + (f" match {esc(page.search)!s}" if page.search else "")
                     + ".</p>")
    for study_uid, records in studies.items():
        parts.append(_study(journal, study_uid, records, page, stages, now))
    parts.append("</body></html>")
    return "\n".join(parts)


def _processes(processes: Sequence[Mapping[str, object]], now: float) -> str:
    """The serving processes: role, where, since when, and a worker's claim id or a receiver's ports."""
    rows = []
    for p in processes:
        ports = p.get("ports")
        listening = sorted(ports.items()) if isinstance(ports, Mapping) else []
        what = p.get("worker") or ", ".join(f"{esc(k)} {esc(v)}" for k, v in listening if v) or "-"
        started = p.get("started")
        since = _seconds(max(now - float(started), 0.0)) if isinstance(started, (int, float)) else "-"
        rows.append(f"<tr><td>{esc(p.get('role', '?'))}</td><td>{esc(p.get('host', '-'))}</td>"
                    f"<td>{esc(p.get('pid', '-'))}</td><td>{esc(what)}</td><td>{since}</td></tr>")
    return ('<details id="processes"><summary>processes: ' + str(len(rows)) + "</summary>"
            "<table><tr><th>role</th><th>host</th><th>pid</th><th>worker id / ports</th><th>up</th></tr>"
            + "".join(rows) + "</table></details>")


def _study(journal: Journal, study_uid: str, records: Sequence[SeriesRecord], page: PageContext,
           stages: Mapping[int, tuple[str, float]], now: float) -> str:
    first = records[0].attributes
    patient = next((r.patient_id for r in records if r.patient_id), "")
    accession = next((r.attributes.accession_number for r in records if r.attributes.accession_number), "")
    jobs_by_series: dict[str, list[JobRecord]] = defaultdict(list)
    for job in journal.jobs_in_study(study_uid):
        jobs_by_series[job.series_uid].append(job)
    out = [
        f'<section class="study" data-study="{esc(study_uid)}">',
        f'<h2>Patient <span class="patient-id">{esc(patient or "-")}</span> · accession '
        f'<span class="accession">{esc(accession or "-")}</span> · '
        f'<span class="study-date">{esc(_study_date(first.study_date) or "-")}</span>'
        f'{" · " + esc(first.study_description) if first.study_description else ""}</h2>',
        "<table><thead><tr><th>series</th><th>received</th><th>state</th><th>rule / model</th><th>job</th>"
        "<th>stage</th><th>elapsed</th><th>outputs and delivery</th></tr></thead><tbody>",
    ]
    for record in records:
        jobs = jobs_by_series.get(record.series_uid, [])
        rows = max(len(jobs), 1)
        series_cell = (f'<td rowspan="{rows}">{esc(record.description or "(no description)")}'
                       f'<br><span class="muted">#{record.attributes.series_number} · {esc(record.modality)} · '
                       f'{record.n_instances} instances · v{record.version}</span>'
                       f'{_reprocess_form(record, page)}</td>'
                       f'<td rowspan="{rows}">{esc(_when(record.last_received))}<br>'
                       f'<span class="muted">from {esc(record.calling_ae or "?")}</span></td>')
        note = f'<br><span class="muted">{esc(record.note)}</span>' if record.note else ""
        state_cell = f'<td rowspan="{rows}" class="state-{esc(record.state)}">{esc(record.state)}{note}</td>'
        if not jobs:
            why = "" if record.state != SeriesState.IGNORED else "not processed"
            out.append(f"<tr>{series_cell}{state_cell}<td colspan=5 class=muted>{why}</td></tr>")
            continue
        for i, job in enumerate(jobs):
            lead = series_cell + state_cell if i == 0 else ""
            out.append(f'<tr data-job="{job.id}">{lead}{_job_cells(journal, job, page, stages, now)}</tr>')
    out.append("</tbody></table></section>")
    return "\n".join(out)


def _job_cells(journal: Journal, job: JobRecord, page: PageContext, stages: Mapping[int, tuple[str, float]],
               now: float) -> str:
    stage, elapsed = job_stage_and_elapsed(job, stages, now)
    reason = f'<div class="reason">{esc(job.reason)}</div>' if job.reason and job.state == JobState.FAILED else (
        f'<div class="muted">{esc(job.reason)}</div>' if job.reason else "")
    attempts = f' <span class="muted">(run {job.attempts})</span>' if job.attempts > 1 else ""
    follow_ups = "".join(_follow_up(f) for f in journal.follow_ups(job.id))
    return (f"<td>{esc(job.rule)}<br><span class=muted>{esc(job.model or '-')}</span></td>"
            f'<td>#{job.id} v{job.version}<br><span class="state-{esc(job.state)}">{esc(job.state)}</span>'
            f"{attempts}{reason}{follow_ups}</td>"
            f"<td>{esc(stage)}</td><td>{esc(elapsed)}</td>"
            f"<td>{_outputs(journal, job, page)}</td>")


def _follow_up(follow_up: FollowUpRecord) -> str:
    """One follow-up of a job (an optional step run on its own): its state, and why it failed or wrote nothing.
    A failed one is shown as such beside the job; the job's own state does not change."""
    failed = follow_up.state == FollowUpState.FAILED
    note = (f' <span class="{"reason" if failed else "muted"}">{esc(follow_up.reason)}</span>'
            if follow_up.reason else "")
    return (f'<div class="follow-up" data-follow-up="{esc(follow_up.step)}">{esc(follow_up.step)}: '
            f'<span class="state-{esc(follow_up.state)}">{esc(follow_up.state)}</span>{note}</div>')


def _outputs(journal: Journal, job: JobRecord, page: PageContext) -> str:
    files = [f for f in journal.output_files(job.id) if f.kind not in KEPT_KINDS]
    items = journal.outbox(job.id)
    if not files and not items:
        return '<span class="muted">-</span>'
    kind_of = {f.path: f.kind for f in files}
    kinds = list(dict.fromkeys(f.kind for f in files))
    objects = defaultdict(int)
    for f in files:
        objects[f.kind] += 1
    by_kind_dest: dict[tuple[str, str], list[OutboxItem]] = defaultdict(list)
    destinations: list[str] = []
    for item in items:
        kind = kind_of.get(item.path, "other")
        if kind not in kinds:
            kinds.append(kind)
        by_kind_dest[(kind, item.destination)].append(item)
        if item.destination not in destinations:
            destinations.append(item.destination)
    head = "".join(f"<th>{esc(d)}</th>" for d in destinations)
    rows = []
    for kind in kinds:
        cells = "".join(f"<td>{_delivery(by_kind_dest.get((kind, d), []))}</td>" for d in destinations)
        rows.append(f'<tr class="output" data-kind="{esc(kind)}"><td>{esc(kind)}</td>'
                    f"<td>{objects.get(kind, 0)}</td>{cells}</tr>")
    retry = ""
    if any(i.state == OutboxState.FAILED for i in items) and page.actions:
        retry = (f'<form class="inline" method="post" action="/actions/retry">'
                 f'<input type="hidden" name="job_id" value="{job.id}">'
                 f'<input type="hidden" name="csrf" value="{esc(page.csrf)}">'
                 f'<button type="submit">Retry delivery</button></form>')
    no_dest = "" if destinations else '<span class="muted">kept on disk (no destination)</span>'
    return (f"<table><thead><tr><th>output</th><th>objects</th>{head}</tr></thead><tbody>{''.join(rows)}"
            f"</tbody></table>{no_dest}{retry}")


def _delivery(items: Sequence[OutboxItem]) -> str:
    if not items:
        return '<span class="muted">-</span>'
    states = defaultdict(int)
    for item in items:
        states[item.state] += 1
    parts = []
    for state in (OutboxState.SENT, OutboxState.PENDING, OutboxState.FAILED):
        if states.get(state):
            parts.append(f'<span class="{esc(state)}">{states[state]} {esc(state)}</span>')
    errors = [i for i in items if i.last_error and i.state != OutboxState.SENT]
    if errors:
        worst = max(errors, key=lambda i: i.tries)
        parts.append(f'<div class="reason">after {worst.tries} tries: {esc(worst.last_error)}</div>')
    return " ".join(parts)


def _reprocess_form(record: SeriesRecord, page: PageContext) -> str:
    if not page.actions or record.state == SeriesState.RECEIVING:
        return ""
    return (f'<form class="inline" method="post" action="/actions/reprocess">'
            f'<input type="hidden" name="series_uid" value="{esc(record.series_uid)}">'
            f'<input type="hidden" name="csrf" value="{esc(page.csrf)}">'
            f'<br><button type="submit">Reprocess</button></form>')


def render_message(title: str, message: str, ok: bool) -> str:
    """The page an action answers with: what happened, and the way back."""
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>dicom-node</title>"
            f"<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>"
            f'<p class="{"ok" if ok else "failing"} health" id="result">{esc(message)}</p>'
            '<p><a href="/">back to the dashboard</a></p></body></html>')

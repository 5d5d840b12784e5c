"""Running the node unattended: /health and /metrics scraped, the dashboard in Debian's headless chromium, and its
retry and reprocess actions, on a node process that received a study it processed, one that failed and one whose
delivery failed. dcmtk is the scanner, Orthanc the PACS, a dcmtk storescp the archive (down, then up).

The dashboard's screenshot is kept: under ``$DICOM_NODE_ARTIFACTS`` when set, else ``tests/artifacts/`` (ignored
by git); the test prints where.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import MRImageStorage
from pynetdicom import AE

from tests.dicom_factory import make_mr_series, make_study

from .node_proc import SYNTH_MODEL, NodeProcess, synthesis_rule
from .peers import StoreSCP, failed_stores, storescu, tools_verdict

PASSWORD = "dashboard-secret-42"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("DICOM_NODE_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts")
SHAPE, SPACING = (6, 24, 24), (2.0, 2.0, 4.0)
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(node: NodeProcess, path: str, *, form: dict[str, str] | None = None,
          password: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(node.http_url + path, data=None if form is None else urlencode(form).encode())
    if password is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"admin:{password}".encode()).decode())
    try:
        with _NO_PROXY.open(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metrics(node: NodeProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = _http(node, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Debian's chromium, headless (the sandbox needs user namespaces a CI container may not have)."""
    command = [str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--hide-scrollbars", f"--user-data-dir={profile}", *args, url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _send_corrupt(node: NodeProcess, good: Path, tmp_path: Path) -> int:
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-300])
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    status = int(assoc.send_c_store(truncated).Status)
    assoc.release()
    return status


def test_health_metrics_dashboard_and_its_actions(tmp_path: Path, orthanc, models_dir: Path) -> None:  # noqa: ANN001
    verdict = tools_verdict([] if os.access(CHROMIUM, os.X_OK) else [CHROMIUM])  # skip here, fail in CI
    if verdict is not None:
        (pytest.fail if verdict[0] == "fail" else pytest.skip)(verdict[1])
    archive = StoreSCP(tmp_path / "archive", aet="ARCHIVE")  # its port is known; started later
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    pacs = {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    down = {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}
    good = make_mr_series(tmp_path / "good", shape=SHAPE, spacing=SPACING, series_description="t1_good",
                          study=make_study(patient_id="PAT-GOOD", accession_number="ACC-GOOD"))
    gap = make_mr_series(tmp_path / "gap", shape=SHAPE, spacing=SPACING, series_description="t1_good gap",
                         omit_slices=(2,), study=make_study(patient_id="PAT-FAIL", accession_number="ACC-FAIL"))
    archived = make_mr_series(tmp_path / "arch", shape=SHAPE, spacing=SPACING, series_description="t1_archive",
                              study=make_study(patient_id="PAT-ARCH", accession_number="ACC-ARCH"))
    node = NodeProcess(tmp_path / "node", models_dir=models_dir, destinations=[pacs, down],
                       rules=[synthesis_rule("t1", "^t1_good", "pacs", output_name="sT1TEST"),
                              synthesis_rule("t1-archive", "^t1_archive", "archive", output_name="sT1TEST")],
                       dispatch={"max_tries": 1}, node={"fsync": False},
                       http={"admin_password_file": str(password_file)})
    with node:
        for files in (good, gap, archived):
            sent = storescu(node.port, files, called_ae=node.ae_title)
            assert sent.returncode == 0 and not failed_stores(sent), sent.stderr
        assert _send_corrupt(node, good[0], tmp_path) == 0xC000
        jobs = node.wait_for(lambda j: [x for x in j.jobs() if x.state in ("sent", "failed")]
                             if len([x for x in j.jobs() if x.state in ("sent", "failed")]) == 3 else None,
                             what="three jobs settled", timeout=120)
        by_rule = {(j.rule, j.state): j for j in jobs}
        processed = by_rule[("t1", "sent")]
        failed = by_rule[("t1", "failed")]
        undelivered = by_rule[("t1-archive", "failed")]
        assert "gap between slice" in failed.reason
        assert undelivered.reason == "delivery failed after the last try"
        # the failed job's "not processed" page goes to the PACS too. The job is marked failed before the page
        # is written and queued: wait for the page's outbox item, then until nothing is left to send
        node.wait_for(lambda j: j.outbox(failed.id) and not [i for i in j.outbox() if i.state == "pending"],
                      what="the failed job's page queued and the outbox settled", timeout=60)
        journal = node.journal()
        outbox = {j.id: journal.outbox(j.id) for j in (processed, undelivered)}
        to_pacs = [i for i in journal.outbox() if i.destination == "pacs" and i.state == "sent"]
        journal.close()

        # -- /health ----------------------------------------------------------------------------
        status, body = _http(node, "/health")
        health = json.loads(body)
        assert status == 200 and health["status"] == "ok", health
        assert health["checks"]["scp_listening"]["ok"] and health["checks"]["journal_writable"]["ok"]

        # -- /metrics: the Prometheus text parser reads what was received, processed and delivered ----------
        values = _metrics(node)
        assert values[("dicom_node_instances_received_total", ())] == len(good) + len(gap) + len(archived)
        assert values[("dicom_node_instances_refused_total", (("reason", "cannot_understand"),))] == 1
        assert values[("dicom_node_instances_stored", ())] == len(good) + len(gap) + len(archived)
        assert values[("dicom_node_series", (("state", "routed"),))] == 3
        assert values[("dicom_node_jobs", (("state", "sent"),))] == 1
        assert values[("dicom_node_jobs", (("state", "failed"),))] == 2
        # the two jobs that wrote their outputs were timed, step by step
        assert values[("dicom_node_job_step_duration_seconds_count", (("step", "total"),))] == 2
        assert values[("dicom_node_job_step_duration_seconds_count", (("step", "load"),))] == 2
        assert values[("dicom_node_job_step_duration_seconds_sum", (("step", "total"),))] > 0
        assert values[("dicom_node_outbox_items", (("destination", "pacs"), ("state", "sent")))] == \
            len(to_pacs) > len(outbox[processed.id]) > 0
        assert values[("dicom_node_outbox_items", (("destination", "archive"), ("state", "failed")))] == \
            len(outbox[undelivered.id]) > 0
        assert values[("dicom_node_outbox_oldest_pending_age_seconds", (("destination", "archive"),))] == 0
        assert values[("dicom_node_disk_free_bytes", ())] > 0

        # -- the dashboard in headless chromium ----------------------------------------------------
        profile = tmp_path / "chromium"
        url = node.http_url.replace("http://", f"http://admin:{PASSWORD}@") + "/"
        dom = _chromium(url, profile, "--dump-dom").stdout
        studies = {m.group(1): m.group(0)
                   for m in re.finditer(r'<span class="patient-id">([^<]*)</span>.*?</section>', dom, re.S)}
        assert set(studies) == {"PAT-GOOD", "PAT-FAIL", "PAT-ARCH"}
        done = studies["PAT-GOOD"]
        assert '<span class="accession">ACC-GOOD</span>' in done and "2024-03-15" in done
        assert "t1_good" in done and SYNTH_MODEL in done and "done" in done
        output = re.search(r'<tr class="output" data-kind="sT1">(.*?)</tr>', done, re.S).group(1)
        assert f'<span class="sent">{len(outbox[processed.id])} sent</span>' in output
        assert "gap between slice 2 and 3" in studies["PAT-FAIL"] and 'class="reason"' in studies["PAT-FAIL"]
        assert f'<span class="failed">{len(outbox[undelivered.id])} failed</span>' in studies["PAT-ARCH"]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        screenshot = ARTIFACTS / "dashboard.png"
        screenshot.unlink(missing_ok=True)
        _chromium(url, profile, f"--screenshot={screenshot}", "--window-size=1400,1000")
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
        print(f"dashboard screenshot: {screenshot}")
        searched = _chromium(url + "?q=acc-fail", profile, "--dump-dom").stdout
        assert "PAT-FAIL" in searched and "PAT-GOOD" not in searched and "PAT-ARCH" not in searched

        # -- the actions: refused without the password, done with it and the page's token -------------
        token = re.search(r'name="csrf" value="([0-9a-f]{64})"', dom).group(1)
        retry = {"job_id": str(undelivered.id), "csrf": token}
        assert _http(node, "/actions/retry", form=retry)[0] == 401
        assert _http(node, "/actions/retry", form=retry, password="wrong-password")[0] == 401
        assert _http(node, "/actions/retry", form={"job_id": str(undelivered.id)}, password=PASSWORD)[0] == 403
        assert node.wait_for(lambda j: j.job(undelivered.id).state == "failed", what="still failed")
        archive.start()
        try:
            status, body = _http(node, "/actions/retry", form=retry, password=PASSWORD)
            assert status == 200 and "queued again" in body
            node.wait_for(lambda j: j.job(undelivered.id).state == "sent", what="retried delivery", timeout=60)
            assert len(archive.files()) == len(outbox[undelivered.id])
        finally:
            archive.stop()

        series_uid = processed.series_uid
        reprocess = {"series_uid": series_uid, "csrf": token}
        assert _http(node, "/actions/reprocess", form=reprocess)[0] == 401
        status, body = _http(node, "/actions/reprocess", form=reprocess, password=PASSWORD)
        assert status == 200 and f"series {series_uid} version 2: job" in body, body
        again = node.wait_for(lambda j: [x for x in j.jobs() if x.series_uid == series_uid and x.version == 2
                                         and x.state in ("sent", "failed")], what="reprocessed job", timeout=60)[0]
        assert again.state == "sent" and again.id != processed.id
        assert orthanc.wait_for_series("^sT1TEST v2$", timeout=60)  # the new version, beside the first
        assert len(orthanc.find_series("^sT1TEST$")) == 1
    assert "dashboard: retry by admin from 127.0.0.1" in node.log()
    assert "dashboard: reprocess by admin from 127.0.0.1" in node.log()
    shutil.rmtree(profile, ignore_errors=True)

"""Tests for dicom_node.cli: config check, route --dry-run, status, echo, retry, exit codes."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicom_node import __version__
from dicom_node.cli import build_parser, main
from dicom_node.config import config_path, default_rules
from dicom_node.dispatch import RetryPolicy
from dicom_node.headers import InstanceHeader, ReceivedInstance, SeriesAttributes
from dicom_node.journal import Journal
from dicom_node.lock import NodeLock
from tests.dicom_factory import make_mr_series, make_study
from tests.e2e.peers import free_port
from tests.onnx_fixtures import link_bundled_segmenter, make_synthesis_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    for model_id in sorted({r.model for r in default_rules() if r.model}):  # every model the built-in rules use
        make_synthesis_model(folder, model_id=model_id)
    link_bundled_segmenter(folder)
    return folder


def write_config(tmp_path: Path, models_dir: Path, extra: str = "", port: int = 104) -> Path:
    """A configuration for the commands; without an ``[http]`` table in ``extra`` the node has no HTTP server, so
    that whatever listens on this machine's default port 8080 cannot make `status` think the node runs."""
    if "[http]" not in extra:
        extra += "\n[http]\nport = 0\n"
    path = tmp_path / "node.toml"
    path.write_text(
        f"""
[node]
ae_title = "NODE"
data_dir = "{tmp_path / 'data'}"

[[peers]]
ae_title = "MR1"

[[destinations]]
name = "PACS"
ae_title = "PACS"
host = "127.0.0.1"
port = {port}

[inference]
models_dir = "{models_dir}"
{extra}""",
        encoding="utf-8",
    )
    return path


# -- config check ------------------------------------------------------------------------------

def test_config_check_good_file(tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", "--config", str(write_config(tmp_path, models_dir))]) == 0
    out = capsys.readouterr().out
    assert f"node: NODE on 0.0.0.0:11112, data in {tmp_path / 'data'}" in out
    assert "peers: MR1@any host" in out
    assert "destination PACS: PACS@127.0.0.1:104" in out
    assert f"models in {models_dir}: brainchop-aparc-aseg, synth-t1, synth-t1-aahead-scout" in out
    assert "segmenter: brainchop-aparc-aseg\n" in out
    assert "rule t1-2d: /t1/i → synthesize synth-t1-t1-2d as sT12DT1, to PACS [ok]" in out
    assert out.rstrip().endswith("configuration is valid")


def test_config_check_reports_disabled_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "no-models"
    empty.mkdir()
    config = write_config(tmp_path, empty)
    assert main(["config", "check", "--config", str(config)]) == 1  # valid, but not ready for service
    captured = capsys.readouterr()
    out = captured.out
    assert "rule flair-3d:" in out and "[DISABLED: model 'synth-t1' not installed]" in out
    assert "configuration is valid; 6 rule(s) disabled" in out
    assert captured.err.startswith(f"NOT READY: 6 rule(s) disabled: model not installed in {empty}")
    assert main(["config", "check", "--config", str(config), "--allow-missing"]) == 0
    assert "accepted with --allow-missing: 6 rule(s) disabled" in capsys.readouterr().out


def test_config_check_fails_without_a_destination(tmp_path: Path, models_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f'[inference]\nmodels_dir = "{models_dir}"\n', encoding="utf-8")
    assert main(["config", "check", "--config", str(path)]) == 1
    assert "no [[destinations]]: results would only be kept on disk" in capsys.readouterr().err
    assert main(["config", "check", "--config", str(path), "--allow-missing"]) == 0


def test_config_check_loads_the_tls_certificate(tmp_path: Path, models_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "absent.pem"
    config = write_config(tmp_path, models_dir, f'\n[tls]\nport = 2762\ncert_file = "{missing}"\n'
                                                f'key_file = "{missing}"\n')
    assert main(["config", "check", "--config", str(config)]) == 1
    assert "[tls] certificate or key cannot be loaded" in capsys.readouterr().err


def test_config_check_warns_of_secrets_others_can_read_and_peers_that_do_not_resolve(
        tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found in review: a PACS password file left 644, or a peer's host mistyped (no association under that AE title
    is ever admitted, which shows only in the log when a modality tries), passed the check silently. Warnings: the
    node works, and a Kubernetes secret is mounted 644 unless told otherwise."""
    secret = tmp_path / "vna.password"
    secret.write_text("s3cret\n", encoding="utf-8")
    secret.chmod(0o644)
    config = write_config(tmp_path, models_dir, f"""
[[destinations]]
name = "VNA"
protocol = "stow-rs"
url = "http://127.0.0.1:8042/dicom-web"
username = "node"
password_file = "{secret}"

[[peers]]
ae_title = "CT1"
host = "no-such-host.invalid"

[[peers]]
ae_title = "CT2"
host = "127.0.0.1"
""")
    assert main(["config", "check", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert (f"warning: destination VNA: password_file {secret} is readable by every user (mode 644): chmod o-r "
            "(0600 for the node's user, or 0640 with its group)") in err
    assert "warning: peer CT1: host 'no-such-host.invalid' does not resolve" in err
    assert "CT2" not in err
    secret.chmod(0o640)  # root:dicom-node 0640, as the README has node.toml: no warning
    assert main(["config", "check", "--config", str(config)]) == 0
    assert "password_file" not in capsys.readouterr().err


def test_config_check_waits_for_a_slow_name_service_only_so_long(tmp_path: Path, models_dir: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs before every start (the unit's ExecStartPre): peers' hosts are looked up at once, and a name
    service that does not answer costs the start RESOLVE_WAIT_S, not a resolver timeout per peer."""
    import time

    import dicom_node.cli as cli

    monkeypatch.setattr(cli, "RESOLVE_WAIT_S", 0.5)
    monkeypatch.setattr(cli, "_resolves", lambda host: time.sleep(5) or True)
    peers = "".join(f'\n[[peers]]\nae_title = "CT{i}"\nhost = "ct{i}.example"\n' for i in range(8))
    config = write_config(tmp_path, models_dir, peers)
    t0 = time.monotonic()
    assert main(["config", "check", "--config", str(config)]) == 0
    assert time.monotonic() - t0 < 3
    err = capsys.readouterr().err
    assert "warning: peer host(s) ct0.example, ct1.example" in err and "not checked: the name service did not " \
           "answer within 0.5 s" in err


def test_config_check_example_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", "--config", str(REPO / "deploy" / "node.example.toml")]) == 0
    assert "configuration is valid" in capsys.readouterr().out


def test_config_check_bad_file_names_the_field(tmp_path: Path, models_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_config(tmp_path, models_dir, '[[rules]]\nname = "r"\nseries_description = "t1"\nmodel = "m"\n'
                                             'output_name = "x"\ndestinations = ["PACS2"]\n')
    assert main(["config", "check", "--config", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(bad) in captured.err and "rules[0].destinations: unknown destination 'PACS2'" in captured.err


def test_config_check_wrong_type_and_syntax(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nport = "eleven"\n', encoding="utf-8")
    assert main(["config", "check", "--config", str(path)]) == 2
    assert "node.port" in capsys.readouterr().err
    path.write_text("[node\n", encoding="utf-8")
    assert main(["config", "check", "--config", str(path)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["config", "check", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "cannot read configuration" in capsys.readouterr().err


def test_module_entry_point_exit_code(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nae_title = "' + "A" * 20 + '"\n', encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "config", "check", "--config", str(path)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "node.ae_title" in result.stderr


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dicom-node {__version__}"


# -- route --dry-run ---------------------------------------------------------------------------

def test_route_dry_run(tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "dicom"
    study = make_study()
    t1 = make_mr_series(folder / "a", shape=(4, 16, 16), spacing=(1.0, 1.0, 4.0), series_number=2, study=study)
    make_mr_series(folder / "b", shape=(4, 16, 16), spacing=(1.0, 1.0, 4.0), series_number=9, study=study,
                   series_description="localizer")
    (folder / "README.txt").write_text("not DICOM", encoding="utf-8")
    config = write_config(tmp_path, models_dir)
    assert main(["route", "--config", str(config), "--dry-run", str(folder)]) == 0
    out = capsys.readouterr().out
    uid = dcmread(t1[0], stop_before_pixels=True).SeriesInstanceUID
    assert f"series 2 't1_fl2d_sag' (4 instances, {uid})" in out
    assert "  assembly: whole: 4 slices, evenly spaced, no gap" in out
    assert "  rule 'aahead-scout': no (SeriesDescription 't1_fl2d_sag' does not match /^aa_?head_?scout/i)" in out
    assert "  rule 't1-2d': MATCH" in out
    assert "  → rule 't1-2d': synthesize sT12DT1 with model synth-t1-t1-2d" in out
    assert "series 9 'localizer'" in out and "  → not processed: no rule matches" in out
    assert "(1 non-DICOM file(s) skipped)" in out


def test_route_dry_run_skips_a_file_whose_header_it_cannot_read(tmp_path: Path, models_dir: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Found in review: one file with InstanceNumber "1e999" (which the SCP refuses) ended the whole dry run."""
    folder = tmp_path / "dicom"
    paths = make_mr_series(folder, shape=(4, 16, 16), spacing=(1.0, 1.0, 4.0))
    bad = dcmread(paths[0])
    bad.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.777"
    bad.save_as(folder / "bad.dcm")
    (folder / "bad.dcm").write_bytes((folder / "bad.dcm").read_bytes().replace(
        b"\x20\x00\x13\x00IS\x02\x001 ", b"\x20\x00\x13\x00IS\x06\x001e999 "))  # as a sender may encode it
    assert main(["route", "--config", str(write_config(tmp_path, models_dir)), "--dry-run", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "(4 instances," in out and "(1 non-DICOM file(s) skipped)" in out


def test_route_dry_run_explains_a_missing_model_and_a_gap(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "dicom"
    make_mr_series(folder, shape=(6, 16, 16), spacing=(1.0, 1.0, 4.0), omit_slices=[2])
    empty = tmp_path / "no-models"
    empty.mkdir()
    assert main(["route", "--config", str(write_config(tmp_path, empty)), "--dry-run", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "  assembly: NOT whole: " in out and "gap" in out
    assert "  → not processed: model 'synth-t1-t1-2d' not installed (rule 't1-2d')" in out


def test_route_dry_run_takes_the_models_as_the_node_does(tmp_path: Path, models_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A segmenter that is a synthesis model disables volumetry in the node (service.prepare_models): the dry run
    must not say MATCH for what the node would not process."""
    folder = tmp_path / "dicom"
    make_mr_series(folder, shape=(4, 16, 16), spacing=(1.0, 1.0, 4.0))
    config = write_config(tmp_path, models_dir, extra='segmenter = "synth-t1-t1-2d"\n')
    assert main(["route", "--config", str(config), "--dry-run", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "  → not processed: model 'synth-t1-t1-2d' not installed (rule 't1-2d')" in out


def test_route_needs_dry_run_and_a_folder(tmp_path: Path, models_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = str(write_config(tmp_path, models_dir))
    assert main(["route", "--config", config, str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert main(["route", "--config", config, "--dry-run", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["route", "--config", config, "--dry-run", str(empty)]) == 0
    assert "no DICOM series found" in capsys.readouterr().out


# -- status and retry --------------------------------------------------------------------------

def _journal_with_work(data_dir: Path) -> None:
    journal = Journal(data_dir / "journal.sqlite3", fsync=False)
    for k, series in enumerate(("1.1", "1.1", "1.2")):
        received = ReceivedInstance(f"1.9.{k}", "1.2.840.10008.5.1.4.1.1.4", "1", series, "P", InstanceHeader(),
                                    SeriesAttributes(series_description=f"desc {series}", modality="MR"))
        journal.add_instance(received, transfer_syntax="", path="/x", calling_ae="MR1")
    journal.close_series("1.1")
    job = journal.add_job(series_uid="1.1", version=1, rule="t1-2d", action="synthesize", model="synth-t1")
    journal.record_outputs(job, [("1.7", "sT1")], [("PACS", "/o/1.dcm", "1.2", "1.7.1"),
                                                   ("PACS", "/o/2.dcm", "1.2", "1.7.2")])
    ids = [i.id for i in journal.outbox(job)]
    journal.mark_sent(ids[:1])
    journal.mark_failed_try(ids[1:], "association rejected",
                            next_attempt=RetryPolicy(max_tries=1, backoff_initial_s=1, backoff_max_s=1).next_attempt)
    journal.close()


def test_status_prints_counts(tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, models_dir)
    _journal_with_work(tmp_path / "data")
    assert main(["status", "--config", str(config)]) == 3  # not running comes first; the failures are printed
    out = capsys.readouterr().out
    assert "node: NOT RUNNING" in out
    assert "NEEDS ATTENTION: 1 job(s) failed in the last 24 h; 1 delivery item(s) failed for good" in out
    assert "instances received: 3" in out
    assert "series: receiving 1, routed 1" in out
    assert "jobs:   failed 1" in out
    assert "rule t1-2d v1: failed - delivery failed after the last try" in out
    assert "'desc 1.1'" in out and "2 inst  routed" in out
    assert "PACS: 1 failed (tries up to 1, last error: association rejected)" in out
    assert "PACS: 1 sent" in out


def _journal_with_a_job(data_dir: Path) -> tuple[Journal, int]:
    """A journal with one closed series of one instance and a queued synthesis job of it: (journal, job id)."""
    journal = Journal(data_dir / "journal.sqlite3", fsync=False)
    received = ReceivedInstance("1.9.1", "1.2.840.10008.5.1.4.1.1.4", "1", "1.1", "P", InstanceHeader(),
                                SeriesAttributes(series_description="t1", modality="MR"))
    journal.add_instance(received, transfer_syntax="", path="/x", calling_ae="MR1")
    journal.close_series("1.1")
    return journal, journal.add_job(series_uid="1.1", version=1, rule="t1-2d", action="synthesize", model="synth-t1")


def test_status_shows_each_job_s_follow_ups(tmp_path: Path, models_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, models_dir)
    journal, job = _journal_with_a_job(tmp_path / "data")
    journal.record_outputs(job, [("1.7", "sT1")], [], follow_ups=["agreement", "other"])
    first, second = journal.follow_ups(job)
    journal.claim("follow_up", first.id, "worker@test:1", 60)
    journal.fail_follow_up(first.id, "RuntimeError: registration diverged")
    journal.close()
    assert main(["status", "--config", str(config)]) == 3  # not running; a failed follow-up fails no job
    out = capsys.readouterr().out
    assert "follow-ups (optional steps of written jobs): failed 1, queued 1" in out
    assert ("v1: sent - no destination configured: outputs kept on disk only (optional step failed: agreement: "
            "RuntimeError: registration diverged)") in out
    assert "      follow-up agreement: FAILED - RuntimeError: registration diverged\n" in out
    assert "      follow-up other: queued\n" in out
    assert main(["status", "--config", str(config), "--json"]) == 3
    (listed,) = json.loads(capsys.readouterr().out)["jobs"]
    assert [(f["step"], f["state"], f["attempts"]) for f in listed["follow_ups"]] == [("agreement", "failed", 1),
                                                                                      ("other", "queued", 0)]


def test_status_without_journal(tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--config", str(write_config(tmp_path, models_dir))]) == 3  # not running
    assert "no journal at" in capsys.readouterr().out


def test_retry_requeues_failed_deliveries(tmp_path: Path, models_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, models_dir)
    _journal_with_work(tmp_path / "data")
    assert main(["retry", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith("1 delivery item(s) queued again")
    journal = Journal(tmp_path / "data" / "journal.sqlite3")
    assert journal.counts()["outbox"] == {"sent": 1, "pending": 1}
    journal.close()


def test_retry_of_a_destination_that_is_not_configured_is_an_error(tmp_path: Path, models_dir: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Found in review: `retry TYPO` said "0 queued" and exited 0."""
    config = write_config(tmp_path, models_dir)
    _journal_with_work(tmp_path / "data")
    assert main(["retry", "--config", str(config), "PACSS"]) == 1
    assert "no destination named 'PACSS'" in capsys.readouterr().err


def test_reprocess_marks_stored_series_and_says_what(tmp_path: Path, models_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, models_dir)
    _journal_with_work(tmp_path / "data")  # series 1.1 routed (its job's delivery failed), 1.2 still receiving
    journal = Journal(tmp_path / "data" / "journal.sqlite3")
    journal._query("INSERT INTO follow_ups(job_id, step, state, reason, created_at, updated_at)"  # an optional step
                   " VALUES (1, 'agreement', 'failed', 'RuntimeError: boom', 0, 0) RETURNING id")  # that failed
    journal.close()
    assert main(["status", "--config", str(config)]) == 3  # not running (comes before the failed job)
    assert "(optional step failed: agreement: RuntimeError: boom)" in capsys.readouterr().out
    assert main(["reprocess", "--config", str(config), "--patient", "P"]) == 0
    out = capsys.readouterr().out
    assert "'desc 1.1' (1.1): version 2" in out and "1 series marked for reprocessing" in out
    journal = Journal(tmp_path / "data" / "journal.sqlite3")
    assert [(s.series_uid, s.state, s.version) for s in journal.all_series()] == [
        ("1.2", "receiving", 0), ("1.1", "complete", 2)]
    journal.close()
    assert main(["reprocess", "--config", str(config), "--series", "1.1"]) == 1  # already waiting to be routed
    assert "no stored series to reprocess" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one selector, not two
        main(["reprocess", "--config", str(config), "--series", "1.1", "--study", "1"])
    with pytest.raises(SystemExit):
        main(["reprocess", "--config", str(config)])


# -- echo --------------------------------------------------------------------------------------

@pytest.fixture
def verification_scp() -> Iterator[int]:
    port = free_port()
    ae = AE(ae_title="PACS")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0x0000)])
    yield port
    server.shutdown()


def test_echo_unknown_destination(tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["echo", "--config", str(write_config(tmp_path, models_dir)), "ARCHIVE"]) == 1  # 2: invalid config
    err = capsys.readouterr().err
    assert "unknown destination 'ARCHIVE' (known: PACS; or give AE@host:port or a DICOMweb URL)" in err


def test_echo_configured_and_adhoc(tmp_path: Path, models_dir: Path, verification_scp: int,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = str(write_config(tmp_path, models_dir, port=verification_scp))
    assert main(["echo", "--config", config, "PACS"]) == 0
    assert f"C-ECHO PACS@127.0.0.1:{verification_scp}: success" in capsys.readouterr().out
    assert main(["echo", "--config", config, f"PACS@127.0.0.1:{verification_scp}"]) == 0
    capsys.readouterr()
    assert main(["echo", "--config", config, f"PACS@127.0.0.1:{free_port()}"]) == 1
    assert "connection failed" in capsys.readouterr().out


def test_echo_adhoc_over_ipv6(tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found in review: ``AE@[::1]:port`` was refused as an unknown destination (the host part stopped at the first
    colon); an IPv6 address is given in brackets, as in a URL."""
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6")
    probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback on this machine: {exc}")
    finally:
        probe.close()
    ae = AE(ae_title="PACS")
    ae.add_supported_context(Verification)
    server = ae.start_server(("::1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0x0000)])
    try:
        config = str(write_config(tmp_path, models_dir))
        assert main(["echo", "--config", config, f"PACS@[::1]:{port}"]) == 0
        assert f"C-ECHO PACS@[::1]:{port}: success" in capsys.readouterr().out
    finally:
        server.shutdown()


# -- an unusable journal -----------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unusable_journal_is_one_clear_line(tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str],
                                            damage: str) -> None:
    config = write_config(tmp_path, models_dir)
    path = tmp_path / "data" / "journal.sqlite3"
    if damage == "garbage":
        path.parent.mkdir(parents=True)
        path.write_bytes(b"this is not a database " * 100)
    else:
        _journal_with_work(tmp_path / "data")
        journal = Journal(path, fsync=False)  # enough rows for several pages, checkpointed into the file
        for k in range(400):
            received = ReceivedInstance(f"1.8.{k}", "1.2", "1", "1.1", "P", InstanceHeader(instance_number=k),
                                        SeriesAttributes(series_description="d", modality="MR"))
            journal.add_instance(received, transfer_syntax="", path="/x" * 40, calling_ae="MR1")
        journal.close()
        size = path.stat().st_size
        with path.open("r+b") as f:
            f.truncate(size // 2)
    assert main(["status", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"dicom-node: journal {path} cannot be used: ")
    assert "restore the file from a backup" in lines[0]
    # serve refuses to start the same way: exit code 1, one line, no traceback
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"journal {path} cannot be used" in result.stderr.strip().splitlines()[-1]


def test_config_check_refuses_a_synthesis_model_as_segmenter(tmp_path: Path, models_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, models_dir, 'segmenter = "synth-t1"\n')
    assert main(["config", "check", "--config", str(config)]) == 1  # rules disabled: not ready
    out = capsys.readouterr().out
    assert "segmenter: synth-t1 [NOT A SEGMENTATION MODEL: rules with volumetry disabled]" in out
    assert "rule aahead-scout: " in out and "[DISABLED: model 'synth-t1' not installed]" in out


# -- status: running or not, --json, exit codes --------------------------------------------------

def _journal_without_failures(data_dir: Path) -> None:
    journal = Journal(data_dir / "journal.sqlite3", fsync=False)
    received = ReceivedInstance("1.9.1", "1.2.840.10008.5.1.4.1.1.4", "1", "1.1", "P", InstanceHeader(),
                                SeriesAttributes(series_description="desc", modality="MR"))
    journal.add_instance(received, transfer_syntax="", path="/x", calling_ae="MR1")
    journal.close()


def test_status_tells_running_from_not_running_and_exits_accordingly(
        tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(write_config(tmp_path, models_dir, "\n[http]\nport = 0\n"))  # the lock alone tells it runs
    _journal_without_failures(tmp_path / "data")
    assert main(["status", "--config", config]) == 3
    assert capsys.readouterr().out.startswith("node: NOT RUNNING")
    lock = NodeLock(tmp_path / "data")
    lock.acquire(ports={"dicom": 11112, "tls": None})
    try:
        assert main(["status", "--config", config]) == 0
        assert capsys.readouterr().out.startswith(f"node: RUNNING (process {os.getpid()}, DICOM port 11112)")
        assert main(["status", "--config", config, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["node"]["running"] is True and report["node"]["pid"] == os.getpid()
        assert report["counts"]["instances"] == {"total": 1} and report["problems"] == []
        assert report["series"][0]["description"] == "desc"
    finally:
        lock.release()
    assert main(["status", "--config", config, "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["node"]["running"] is False


def test_status_json_lists_failures_within_the_window(tmp_path: Path, models_dir: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = str(write_config(tmp_path, models_dir, "\n[http]\nport = 0\n"))  # the lock alone tells it runs
    _journal_with_work(tmp_path / "data")
    # not running comes first, failures or not (found in review: monitoring read a stopped node as "failures")
    assert main(["status", "--config", config, "--json"]) == 3
    capsys.readouterr()
    lock = NodeLock(tmp_path / "data")
    lock.acquire(ports={"dicom": 11112, "tls": None})
    try:
        assert main(["status", "--config", config, "--json"]) == 1
    finally:
        lock.release()
    report = json.loads(capsys.readouterr().out)
    failed, = report["failures"]["jobs"]
    assert failed["rule"] == "t1-2d" and failed["reason"] == "delivery failed after the last try"
    assert report["failures"]["deliveries_failed"] == 1
    assert main(["retry", "--config", config]) == 0
    capsys.readouterr()
    assert main(["status", "--config", config, "--json", "--since", "0"]) == 3  # none left; not running
    assert json.loads(capsys.readouterr().out)["problems"] == []


def test_retry_is_audited_with_the_user(tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(write_config(tmp_path, models_dir))
    _journal_with_work(tmp_path / "data")
    assert main(["retry", "--config", config, "PACS"]) == 0
    event, = [json.loads(line) for line in (tmp_path / "data" / "audit.jsonl").read_text().splitlines()]
    assert event["event"] == "operator" and event["action"] == "retry"
    assert event["by"] == getpass.getuser() and event["destination"] == "PACS" and event["items"] == 1


# -- the configuration file: --config, $DICOM_NODE_CONFIG, /etc/dicom-node/node.toml -----------------

def test_config_path_order(tmp_path: Path) -> None:
    default = tmp_path / "etc" / "node.toml"
    assert config_path(None, {}, default) is None  # embedded defaults
    default.parent.mkdir()
    default.write_text("")
    assert config_path(None, {}, default) == default
    assert config_path(None, {"DICOM_NODE_CONFIG": "/srv/node.toml"}, default) == Path("/srv/node.toml")
    assert config_path("mine.toml", {"DICOM_NODE_CONFIG": "/srv/node.toml"}, default) == Path("mine.toml")


def test_config_from_the_environment(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DICOM_NODE_CONFIG", str(write_config(tmp_path, models_dir)))
    assert main(["config", "check"]) == 0
    assert "node: NODE on 0.0.0.0:11112" in capsys.readouterr().out
    monkeypatch.setenv("DICOM_NODE_CONFIG", str(tmp_path / "missing.toml"))
    assert main(["status"]) == 2
    assert "missing.toml: cannot read configuration: No such file or directory" in capsys.readouterr().err


# -- errors are one line, before the models are loaded ---------------------------------------------

def _serve(config: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_serve_on_a_busy_port_is_one_line(tmp_path: Path, models_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, models_dir)
        config.write_text(config.read_text().replace('ae_title = "NODE"\n', f'ae_title = "NODE"\nport = {port}\n'
                                                                           'host = "127.0.0.1"\n', 1))
        result = _serve(config)
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert line == (f"dicom-node: [node] port {port} on 127.0.0.1 cannot be used: Address already in use "
                    "(another program listens there?)")
    assert not (tmp_path / "data" / "journal.sqlite3").exists()  # refused before anything was opened


def test_serve_with_an_unusable_data_dir_is_one_line(tmp_path: Path, models_dir: Path) -> None:
    (tmp_path / "data").write_text("a file where the data directory should be")
    result = _serve(write_config(tmp_path, models_dir))
    assert result.returncode == 1
    assert _one_line(result.stderr) == f"dicom-node: data_dir {tmp_path / 'data'} cannot be used: File exists"


def test_a_second_node_on_the_same_data_dir_is_refused(tmp_path: Path, models_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, models_dir)
    config.write_text(config.read_text().replace('ae_title = "NODE"\n', f'ae_title = "NODE"\nport = {free_port()}\n'
                                                                       'host = "127.0.0.1"\n', 1))
    lock = NodeLock(tmp_path / "data")
    (tmp_path / "data").mkdir()
    lock.acquire()
    try:
        assert main(["serve", "--config", str(config)]) == 1
    finally:
        lock.release()
    assert _one_line(capsys.readouterr().err) == (
        f"dicom-node: another node (process {os.getpid()}) is serving data directory {tmp_path / 'data'}")


def test_port_sharing_is_refused_outside_the_receiver_role(tmp_path: Path, models_dir: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """[node] reuse_port turns off the port-taken check: an all node (or a worker) with it would split a scanner's
    associations with whatever else listens there."""
    config = write_config(tmp_path, models_dir)
    config.write_text(config.read_text().replace('ae_title = "NODE"\n', f'ae_title = "NODE"\nport = {free_port()}\n'
                                                                       'host = "127.0.0.1"\nreuse_port = true\n', 1))
    assert main(["serve", "--config", str(config)]) == 1
    assert "[node] reuse_port lets receivers of one data directory share their DICOM ports" in capsys.readouterr().err


def test_report_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "missing.dcm")]) == 1
    assert _one_line(capsys.readouterr().err) == f"dicom-node: {tmp_path / 'missing.dcm'}: no such file"
    image = make_mr_series(tmp_path, shape=(1, 8, 8))[0]
    assert main(["report", str(image)]) == 1
    assert _one_line(capsys.readouterr().err).startswith(f"dicom-node: {image}: not a structured report (")


def test_an_unexpected_error_is_one_line(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    def broken(_args: object) -> int:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("dicom_node.cli.cmd_status", broken)
    monkeypatch.delenv("DICOM_NODE_DEBUG", raising=False)
    assert main(["status", "--config", str(write_config(tmp_path, models_dir))]) == 1
    assert _one_line(capsys.readouterr().err) == (
        "dicom-node: status failed: RuntimeError: disk on fire (DICOM_NODE_DEBUG=1 shows the traceback)")
    monkeypatch.setenv("DICOM_NODE_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["status", "--config", str(write_config(tmp_path, models_dir))])


def test_every_command_and_option_has_help() -> None:
    def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    assert helps.get(name), f"{path} {name}: no help"
                    yield from walk(sub, f"{path} {name}")

    commands = list(walk(build_parser(), "dicom-node"))
    assert len(commands) >= 10
    for path, parser in commands:
        assert parser.description, f"{path}: no description"
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{path} {'/'.join(action.option_strings) or action.dest}: no help"


def test_status_says_whether_the_node_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    from dicom_node.cli import status_report
    from dicom_node.config import load_config
    from dicom_node.service import Node
    from tests.e2e.peers import free_port

    models = tmp_path / "no-models"
    models.mkdir()
    config_path = write_config(tmp_path, models, f'\n[http]\nport = {free_port()}\n', port=free_port())
    config = load_config(config_path)
    assert main(["status", "--config", str(config_path)]) == 3
    assert capsys.readouterr().out.startswith("node: NOT RUNNING")
    node = Node(config.model_copy(update={"node": config.node.model_copy(update={"port": free_port(),
                                                                                   "host": "127.0.0.1"})}))
    node.start()
    try:
        deadline = time.monotonic() + 10
        while not node.health().ok and time.monotonic() < deadline:
            time.sleep(0.05)
        assert main(["status", "--config", str(config_path)]) == 0  # /health answers (no lock: not serve)
        assert capsys.readouterr().out.startswith("node: RUNNING (process ?), healthy; data in ")
        node.scp.stop()
        assert main(["status", "--config", str(config_path)]) == 1
        out = capsys.readouterr().out
        assert "node: RUNNING (process ?), UNHEALTHY: scp_listening: not listening on " in out
        assert "NEEDS ATTENTION: UNHEALTHY: scp_listening" in out
    finally:
        node.stop()
    off = load_config(write_config(tmp_path, models, "\n[http]\nport = 0\n"))
    report = status_report(off, 5, 24)
    assert report["node"]["health_url"] is None and report["node"]["running"] is False


def test_status_reads_the_journal_without_changing_it(tmp_path: Path, models_dir: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`status` opens the journal read-only: it neither upgrades an older one (review finding: it ran the
    migrations, so an older node then refused its own journal) nor writes to a current one."""
    import hashlib
    import sqlite3

    config = str(write_config(tmp_path, models_dir))
    _journal_with_work(tmp_path / "data")
    files = sorted((tmp_path / "data").glob("journal.sqlite3*"))

    def digest() -> list[str]:
        return [hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.exists()]

    before = digest()
    assert main(["status", "--config", config, "--json"]) == 3  # not running
    assert json.loads(capsys.readouterr().out)["counts"]["instances"] == {"total": 3}
    assert digest() == before
    db = sqlite3.connect(tmp_path / "data" / "journal.sqlite3")
    db.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    db.commit()
    db.close()
    assert main(["status", "--config", config]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "schema version 3, written by an older dicom-node" in err[0]
    db = sqlite3.connect(tmp_path / "data" / "journal.sqlite3")
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "3"  # not upgraded
    db.close()


def _serve_args(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_serve_all_refuses_the_celery_executor_in_one_line(tmp_path: Path, models_dir: Path) -> None:
    config = write_config(tmp_path, models_dir, extra='\n[executor]\nkind = "celery"\n')
    result = _serve_args(config)
    assert result.returncode == 1
    assert _one_line(result.stderr) == ('dicom-node: [executor] kind = "celery" runs the jobs on worker processes: '
                                        'start this node with --role receiver, and the workers with --role worker '
                                        '(or set kind = "thread")')


def test_a_celery_worker_without_its_broker_password_file_is_one_line(tmp_path: Path, models_dir: Path) -> None:
    missing = tmp_path / "redis.password"
    config = write_config(tmp_path, models_dir,
                          extra=f'\n[executor]\nkind = "celery"\nbroker_password_file = "{missing}"\n')
    result = _serve_args(config, "--role", "worker")
    assert result.returncode == 1
    assert _one_line(result.stderr) == (f"dicom-node: [executor] broker_password_file {missing}: cannot read it: "
                                        "No such file or directory")


def test_a_worker_whose_metrics_port_is_taken_is_one_line(tmp_path: Path, models_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _serve_args(write_config(tmp_path, models_dir), "--role", "worker", "--metrics-port", str(port))
    assert result.returncode == 1
    assert _one_line(result.stderr) == (f"dicom-node: the worker's metrics port {port} on 127.0.0.1 cannot be used: "
                                        "Address already in use (another program listens there?)")


def test_status_that_cannot_be_read_is_unknown_not_failures(tmp_path: Path, models_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Run by a user who cannot read the data directory, status exited 1, the code for "running, with failures"."""
    import dicom_node.cli as cli

    def denied(*args: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "data" / "node.lock"))

    monkeypatch.setattr(cli, "status_report", denied)
    assert main(["status", "--config", str(write_config(tmp_path, models_dir))]) == 4
    err = capsys.readouterr().err
    assert "status unknown" in err and "node.lock" in err


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.toml"
    path.write_bytes(b'[node]\nae_title = "N\xe9UD"\n')
    assert main(["config", "check", "--config", str(path)]) == 2
    assert f"{path}: cannot read configuration: not UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_metrics_port_out_of_range_is_refused_by_the_parser(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--metrics-port", port])
    assert exit_.value.code == 2 and "not a port number" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--metrics-port", "0"]).metrics_port == 0  # "0: none", as its help


def test_status_needs_attention_once_a_destination_has_failed_for_alert_after_s(
        tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A PACS down kept status at exit 0 (and the dashboard "ok") for retry_for_s, a day: nothing alerted until
    the results were given up."""
    config = write_config(tmp_path, models_dir, extra="[dispatch]\nalert_after_s = 60\n")
    journal, job = _journal_with_a_job(tmp_path / "data")
    journal.record_outputs(job, [("1.7", "sT1")], [("PACS", "/o/1.dcm", "1.2", "1.7.1")])
    ids = [i.id for i in journal.outbox(job)]
    policy = RetryPolicy(retry_for_s=86400, backoff_initial_s=10, backoff_max_s=10)
    journal.mark_failed_try(ids, "association rejected", next_attempt=policy.next_attempt)
    assert main(["status", "--config", str(config), "--json"]) == 3  # (not running)
    assert not [p for p in json.loads(capsys.readouterr().out)["problems"] if "failing for" in p]  # just now
    with journal._tx() as db:
        db.execute("UPDATE outbox SET first_failed_at = first_failed_at - 120")
    journal.close()
    main(["status", "--config", str(config), "--json"])
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert any(p.startswith("deliveries to PACS failing for 2 min (1 item(s) waiting; last error: association "
                            "rejected)") for p in problems), problems


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root (to chown a directory)")
def test_root_is_told_to_run_maintenance_as_the_data_directorys_owner(tmp_path: Path, models_dir: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`journal rebuild` run as root created journal.sqlite3 owned by root (0600): the node, running as its service
    user, then could not start."""
    config = write_config(tmp_path, models_dir)
    _journal_with_work(tmp_path / "data")
    (tmp_path / "data" / "spool").mkdir()
    before = sorted(p.name for p in (tmp_path / "data").iterdir())
    os.chown(tmp_path / "data", 65534, 65534)
    try:
        for command in (["journal", "rebuild"], ["retry"]):
            assert main([*command, "--config", str(config)]) == 1, command
            err = capsys.readouterr().err
            assert "run this command as that user" in err and "sudo -u" in err, err
        assert sorted(p.name for p in (tmp_path / "data").iterdir()) == before  # nothing created as root
    finally:
        os.chown(tmp_path / "data", 0, 0)


def test_config_check_finds_what_would_keep_serve_from_starting(tmp_path: Path, models_dir: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """config check passed (exit 0), then serve failed: a dashboard password file that cannot be read, an audit
    path that cannot be created, a STOW-RS password file that cannot be read (every delivery failed)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    extra = (f'[http]\nport = {free_port()}\nadmin_password_file = "{tmp_path / "absent"}"\n'
             f'[audit]\npath = "{blocker / "audit.jsonl"}"\n'
             f'[[destinations]]\nname = "VNA"\nprotocol = "stow-rs"\nurl = "https://vna.lan/dicom-web"\n'
             f'username = "node"\npassword_file = "{tmp_path / "vna.password"}"\n')
    assert main(["config", "check", "--config", str(write_config(tmp_path, models_dir, extra))]) == 1
    err = capsys.readouterr().err
    assert f"[http] admin_password_file {tmp_path / 'absent'} cannot be read" in err
    assert f"[audit] path {blocker / 'audit.jsonl'} cannot be written" in err
    assert f"destination VNA: password_file {tmp_path / 'vna.password'} cannot be read" in err


def test_config_check_refuses_an_expired_certificate_and_warns_before(tmp_path: Path, models_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """An expired TLS certificate was accepted without a word (peers refuse it)."""
    import time as time_module

    from dicom_node import cli
    from tests.tls_certs import OPENSSL, make_pki

    if OPENSSL is None:
        pytest.skip("openssl not installed")
    pki = make_pki(tmp_path / "pki")  # valid for 2 days
    config = write_config(tmp_path, models_dir, f'\n[tls]\nport = {free_port()}\ncert_file = "{pki.server.cert}"\n'
                                                f'key_file = "{pki.server.key}"\n')
    now = time_module.time()
    assert main(["config", "check", "--config", str(config)]) == 0
    assert "expires on" in capsys.readouterr().err  # within 30 days: a warning, not a refusal
    monkeypatch.setattr(cli.time, "time", lambda: now + 10 * 86400)
    assert main(["config", "check", "--config", str(config)]) == 1
    assert f"[tls] certificate {pki.server.cert} expired on" in capsys.readouterr().err

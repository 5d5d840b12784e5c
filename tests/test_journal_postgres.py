"""The shared journal on PostgreSQL: ``[journal]`` in the config, processes racing for the same work, ``status``
read-only, the password. A real PostgreSQL 15 (tests/postgres.py); every test of tests/test_journal.py runs on it too.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import ConfigError, parse_config
from dicom_node.journal import (
    SCHEMA_VERSION,
    JobState,
    Journal,
    JournalError,
    journal_exists,
    journal_location,
    open_journal,
)
from dicom_node.journal_sql import PostgresTarget
from tests.e2e.peers import free_port
from tests.postgres import PASSWORD
from tests.test_journal import SERIES, add, job_with_outbox

WORKERS = 4


def _config(tmp_path: Path, dsn: str, password: str | None = PASSWORD, **node: Any) -> Any:
    return parse_config(_config_text(tmp_path, dsn, password, **node))


def _config_text(tmp_path: Path, dsn: str, password: str | None = PASSWORD, **node: Any) -> str:
    lines = ["[node]", f'data_dir = "{tmp_path / "data"}"', "fsync = false"]
    lines += [f"{k} = {v!r}" for k, v in node.items()]
    lines += ["[journal]", 'backend = "postgresql"', f'dsn = "{dsn}"']
    if password is not None:
        secret = tmp_path / "journal.password"
        secret.write_text(password + "\n")
        secret.chmod(0o600)
        lines.append(f'password_file = "{secret}"')
    return "\n".join(lines) + "\n"


@pytest.fixture
def journals(postgres_journal: PostgresTarget) -> Iterator[Callable[[], Journal]]:
    opened: list[Journal] = []

    def make() -> Journal:
        opened.append(Journal(postgres_journal, fsync=False))
        return opened[-1]

    yield make
    for j in opened:
        j.close()


def _race(n: int, work: Callable[[int], None]) -> None:
    """Run ``work(i)`` for i < n in threads that start together; re-raise the first failure."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]


# -- [journal] in the configuration ------------------------------------------------------------------

def test_journal_section_defaults_to_the_embedded_sqlite(tmp_path: Path) -> None:
    config = parse_config(f'[node]\ndata_dir = "{tmp_path}"\n')
    assert config.journal.backend == "sqlite" and config.journal.dsn is None
    assert journal_location(config) == str(tmp_path / "journal.sqlite3") and not journal_exists(config)
    journal = open_journal(config)
    try:
        assert journal.dialect == "sqlite" and journal_exists(config)
    finally:
        journal.close()


@pytest.mark.parametrize(("section", "problem"), [
    ('backend = "postgresql"', 'journal: dsn: backend = "postgresql" needs a dsn'),
    ('backend = "postgresql"\ndsn = "host=db password=hunter2"', "journal: dsn: holds a password"),
    ('backend = "postgresql"\ndsn = "postgresql://node:hunter2@db/dicom"', "journal: dsn: holds a password"),
    ('dsn = "host=db"', 'journal: dsn: only for backend = "postgresql"'),
    ('backend = "mysql"', "journal.backend: Input should be 'sqlite' or 'postgresql'"),
])
def test_bad_journal_sections_are_refused(section: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"[journal]\n{section}\n")
    assert problem in str(caught.value) and "hunter2" not in str(caught.value)


def test_the_example_documents_the_journal_section() -> None:
    from dicom_node.config import JournalSettings, load_config
    from tests.test_config import EXAMPLE, test_example_documents_every_field

    assert load_config(EXAMPLE).journal == JournalSettings()
    test_example_documents_every_field("journal", JournalSettings)


def test_every_process_opens_the_same_journal_from_the_same_config(postgres_dsn: str, tmp_path: Path) -> None:
    config = _config(tmp_path, postgres_dsn)
    assert journal_exists(config) and journal_location(config) == postgres_dsn
    receiver, worker = open_journal(config), open_journal(config)
    try:
        assert receiver.dialect == worker.dialect == "postgresql"
        add(receiver, "1.9.1")
        assert [i.sop_instance_uid for i in worker.instances(SERIES)] == ["1.9.1"]
        assert not (tmp_path / "data" / "journal.sqlite3").exists()  # nothing in data_dir
    finally:
        receiver.close()
        worker.close()


def test_a_wrong_password_is_a_clear_error_that_never_shows_it(postgres_dsn: str, tmp_path: Path) -> None:
    with pytest.raises(JournalError) as caught:
        open_journal(_config(tmp_path, postgres_dsn, password="not-the-password"))
    message = str(caught.value)
    assert "cannot connect" in message and "password authentication failed" in message
    assert "not-the-password" not in message and postgres_dsn in message
    missing = _config(tmp_path, postgres_dsn)
    (tmp_path / "journal.password").unlink()
    with pytest.raises(JournalError, match="password_file .* cannot read it"):
        open_journal(missing)


def test_status_opens_it_read_only_and_never_creates_or_writes(postgres_dsn: str, tmp_path: Path) -> None:
    import psycopg

    config = _config(tmp_path, postgres_dsn)
    with pytest.raises(JournalError, match="schema version 0, written by an older dicom-node"):
        open_journal(config, read_only=True)  # an empty database: status creates nothing
    node = open_journal(config)
    job, _ = job_with_outbox(node, ("PACS",), 1)
    status = open_journal(config, read_only=True)
    try:
        assert status.job(job).state == JobState.WRITTEN and status.counts()["outbox"] == {"pending": 1}
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            status.probe_write()
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            status.claim("job", job, "status", 30)
    finally:
        status.close()
        node.close()


def test_status_command_reads_a_postgresql_journal(postgres_dsn: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main

    path = tmp_path / "node.toml"
    path.write_text(_config_text(tmp_path, postgres_dsn))
    node = open_journal(parse_config(path.read_text()))
    job_with_outbox(node, ("PACS",), 1)
    node.close()
    assert main(["status", "--config", str(path), "--json"]) == 3  # no node running here
    report = json.loads(capsys.readouterr().out)
    assert report["journal"] == postgres_dsn and report["counts"]["outbox"] == {"pending": 1}
    assert PASSWORD not in json.dumps(report)


def test_a_journal_of_a_newer_version_is_refused(journals: Callable[[], Journal]) -> None:
    journal = journals()
    journal._query("UPDATE meta SET value='99' WHERE key='schema_version' RETURNING value")
    with pytest.raises(JournalError, match="schema version 99, written by a newer dicom-node"):
        journals()
    assert journal._query("SELECT value FROM meta WHERE key='schema_version'")[0][0] == "99"  # left as it was


def test_processes_starting_together_create_the_schema_once(journals: Callable[[], Journal]) -> None:
    opened: list[Journal] = []
    _race(WORKERS, lambda i: opened.append(journals()))
    assert len(opened) == WORKERS
    assert opened[0]._query("SELECT value FROM meta WHERE key='schema_version'")[0][0] == str(SCHEMA_VERSION)


# -- processes racing for the same work: each piece is taken exactly once -----------------------------

def test_racing_workers_claim_each_job_exactly_once(journals: Callable[[], Journal]) -> None:
    setup = journals()
    add(setup, "1.9.1")
    jobs = [setup.add_job(series_uid=SERIES, version=1, rule="r", action="synthesize", model="m") for _ in range(40)]
    mine: dict[int, list[int]] = {i: [] for i in range(WORKERS)}
    workers = [journals() for _ in range(WORKERS)]

    def work(i: int) -> None:
        journal = workers[i]
        while (task := journal.next_queued()) is not None:
            if journal.claim(task[0], task[1], f"w{i}", 30) is not None:
                mine[i].append(task[1])

    _race(WORKERS, work)
    claimed = Counter(job for ids in mine.values() for job in ids)
    assert sorted(claimed) == jobs and set(claimed.values()) == {1}
    assert {j.state for j in setup.jobs(limit=100)} == {JobState.RUNNING}


def test_an_expired_claim_is_taken_over_once_by_racing_workers(journals: Callable[[], Journal]) -> None:
    setup = journals()
    add(setup, "1.9.1")
    job = setup.add_job(series_uid=SERIES, version=1, rule="r", action="synthesize", model="m")
    dead = setup.claim("job", job, "w-dead", 0.0)  # its worker died at once: the lease is over
    assert dead is not None
    workers = [journals() for _ in range(WORKERS)]
    won: list[Any] = []

    def work(i: int) -> None:
        workers[i].recover_jobs(max_attempts=5, own=None)
        won.append(workers[i].claim("job", job, f"w{i}", 30))

    _race(WORKERS, work)
    (winner,) = [c for c in won if c is not None]
    assert winner.attempt == 2 and winner.worker in {f"w{i}" for i in range(WORKERS)}
    assert (setup.job(job).state, setup.job(job).attempts) == ("running", 2)
    assert setup._query("SELECT worker FROM jobs WHERE id=?", (job,))[0][0] == winner.worker
    assert not dead_renewed(setup, job, dead)


def dead_renewed(journal: Journal, job: int, claim: Any) -> bool:
    return journal.renew("job", job, claim, 30)


def test_racing_dispatchers_send_each_item_once_and_settle_every_job(journals: Callable[[], Journal]) -> None:
    setup = journals()
    add(setup, "1.9.1")
    jobs = []
    for k in range(10):
        job = setup.add_job(series_uid=SERIES, version=1, rule="r", action="synthesize", model="m")
        setup.record_outputs(job, [(f"1.8.{k}", "sT1")], [(dest, f"/o/{k}-{n}.dcm", "1.2", f"1.8.{k}.{n}")
                                                         for dest in ("PACS", "ARCHIVE") for n in range(3)])
        jobs.append(job)
    dispatchers = [journals() for _ in range(WORKERS)]
    sent: dict[int, list[int]] = {i: [] for i in range(WORKERS)}

    def work(i: int) -> None:
        journal = dispatchers[i]
        while (claim := journal.claim_outbox(f"d{i}", 30, limit=2)) is not None:
            for item in claim.items:  # one commit per object, as the C-STORE dispatcher does
                journal.mark_sent([item.id], durable=False, claim=claim)
                sent[i].append(item.id)

    _race(WORKERS, work)
    counted = Counter(item for ids in sent.values() for item in ids)
    assert len(counted) == 60 and set(counted.values()) == {1}
    assert [setup.job(j).state for j in jobs] == [JobState.SENT] * 10  # no settle lost between dispatchers


def test_racing_receivers_file_each_instance_once(journals: Callable[[], Journal]) -> None:
    receivers = [journals() for _ in range(WORKERS)]
    new: dict[int, list[str]] = {i: [] for i in range(WORKERS)}

    def work(i: int) -> None:  # the same new series and the same instances, from every receiver at once
        for k in range(15):
            if add(receivers[i], f"1.9.{k}"):
                new[i].append(f"1.9.{k}")

    _race(WORKERS, work)
    filed = Counter(uid for uids in new.values() for uid in uids)
    assert len(filed) == 15 and set(filed.values()) == {1}
    series = receivers[0].series(SERIES)
    assert series is not None and series.n_instances == 15 and series.state == "receiving"


def test_a_role_without_create_uses_a_journal_another_role_made(postgres_server: Any, postgres_dsn: str) -> None:
    """Production may keep DDL to the database's owner: a node whose role may only read and write the tables opens
    the current journal without trying to create anything."""
    import psycopg

    owner = Journal(PostgresTarget(postgres_dsn, PASSWORD), fsync=False)
    owner.close()
    database = postgres_dsn.rsplit("dbname=", 1)[1]
    with psycopg.connect(postgres_server.admin_dsn.replace("dbname=postgres", f"dbname={database}"),
                         autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS dml_only")
        admin.execute("CREATE ROLE dml_only LOGIN PASSWORD 'dml'")
        admin.execute(f"GRANT CONNECT ON DATABASE {database} TO dml_only")
        admin.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO dml_only")
        admin.execute("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO dml_only")
    node = Journal(PostgresTarget(postgres_dsn.replace("user=node", "user=dml_only"), "dml"), fsync=False)
    try:
        job, ids = job_with_outbox(node, ("PACS",), 1)
        node.mark_sent(ids)
        assert node.job(job).state == JobState.SENT
    finally:
        node.close()


CLAIMER = """
import json, sys
from dicom_node.config import load_config
from dicom_node.journal import open_journal
journal = open_journal(load_config(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()  # start together
won = []
while (task := journal.next_queued()) is not None:
    if journal.claim(task[0], task[1], sys.argv[2], 30) is not None:
        won.append(task[1])
claim = journal.claim_outbox(sys.argv[2], 30, limit=1000)
journal.close()
print(json.dumps({"jobs": won, "items": [i.id for i in claim.items] if claim else []}), flush=True)
"""


def test_two_processes_given_the_same_config_share_the_work(postgres_dsn: str, tmp_path: Path) -> None:
    """Two processes opening the journal through open_journal(config), racing for the same jobs and outbox items."""
    import os
    import subprocess
    import sys

    path = tmp_path / "node.toml"
    path.write_text(_config_text(tmp_path, postgres_dsn))
    setup = open_journal(parse_config(path.read_text()))
    job, items = job_with_outbox(setup, ("PACS",), 3)
    jobs = [setup.add_job(series_uid=SERIES, version=2, rule="r", action="synthesize", model="m") for _ in range(30)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    processes = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(path), f"p{i}"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env) for i in range(2)]
    try:
        assert [p.stdout.readline().strip() for p in processes] == ["ready", "ready"]  # type: ignore[union-attr]
        for p in processes:
            p.stdin.write("go\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        results = [json.loads(p.communicate(timeout=60)[0]) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
        setup.close()
    assert [p.returncode for p in processes] == [0, 0]
    claimed = Counter(j for r in results for j in r["jobs"])
    assert sorted(claimed) == jobs and set(claimed.values()) == {1}
    assert sorted(i for r in results for i in r["items"]) == items  # each item in one share only


def test_a_node_on_a_shared_journal_claims_under_its_own_id(tmp_path: Path, postgres_dsn: str) -> None:
    """On PostgreSQL, nodes of other machines share the journal: a node's runs are its own (host and pid), never
    the SQLite node's ``NODE_WORKER``, which a node starting elsewhere would take back as its own at once."""
    from dicom_node.journal import NODE_WORKER
    from dicom_node.service import Node

    node = Node(_config(tmp_path, postgres_dsn, port=free_port()))
    try:
        assert node.shared_journal and node.claim_id != NODE_WORKER == "node"
        assert node.claim_id == node.runner.worker and f":{os.getpid()}" in node.claim_id
    finally:
        node.journal.close()
    sqlite = Node(parse_config(f'[node]\ndata_dir = "{tmp_path / "other"}"\nfsync = false\nport = {free_port()}\n'))
    try:
        assert not sqlite.shared_journal and sqlite.claim_id == NODE_WORKER == sqlite.runner.worker
    finally:
        sqlite.journal.close()


def test_connecting_again_changes_the_connection_epoch(journals: Callable[[], Journal]) -> None:
    """The receipt log replays a segment whose rows may have gone with a restarted server (tests/test_receipts.py):
    it learns of it from this number."""
    journal = journals()
    assert journal.connection_epoch() == 0
    journal.sync()
    assert journal.connection_epoch() == 0
    journal._db.db.close()  # type: ignore[attr-defined]  # as a server restart or a dropped network leaves it
    journal.sync()  # connected again
    assert journal.connection_epoch() == 1

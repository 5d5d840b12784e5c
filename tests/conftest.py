"""Shared test helpers: the read-only test data folder next to the repository."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared test data not found at {SHARED_DATA} (../shared/data)"
)

SYNTHSEG = SHARED_DATA / "labels" / "synthseg"


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A command run in a test (``dicom_node.cli.main``) sets up the root logger with a handler on the test's
    captured stderr, closed when the test ends: a later test's background threads (pynetdicom's) then logged to a
    closed stream ("Logging error" in the CI log). The root logger's handlers and level are put back after each
    test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def priors():  # noqa: ANN201 - inference.training.generator.Priors (torch is imported only where it is used)
    """SynthSeg's generation labels, classes and T1 priors (skips without ../shared/data or torch)."""
    pytest.importorskip("torch")
    from inference.training import generator

    if not SYNTHSEG.is_dir():
        pytest.skip(f"SynthSeg label maps not found at {SYNTHSEG} (../shared/data)")
    return generator.load_priors(SYNTHSEG)


@pytest.fixture(scope="session")
def postgres_server():  # noqa: ANN201 - tests.postgres.PostgresServer (psycopg is imported only where it is used)
    """A PostgreSQL 15 server on 127.0.0.1 for the whole session (skips without Debian's postgresql-15 or psycopg)."""
    from tests.postgres import PostgresServer, unavailable

    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def postgres_dsn(postgres_server) -> str:  # noqa: ANN001
    """The conninfo of a new, empty database of :func:`postgres_server` for one test (no password in it: the role
    logs in with ``tests.postgres.PASSWORD``)."""
    return postgres_server.create_database()


@pytest.fixture
def postgres_journal(postgres_dsn: str):  # noqa: ANN201 - dicom_node.journal_sql.PostgresTarget
    """A new, empty database as a journal's target (its conninfo and password)."""
    from dicom_node.journal_sql import PostgresTarget
    from tests.postgres import PASSWORD

    return PostgresTarget(postgres_dsn, PASSWORD)


@pytest.fixture
def held_synthesis(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - (started, release) threading.Events
    """Every job's synthesis step waits (up to 30 s) until the test sets ``release``; ``started`` is set when one
    begins: a run that is still going when the test stops its worker."""
    import threading

    import dicom_node.jobs

    started, release = threading.Event(), threading.Event()
    synthesize = dicom_node.jobs.synthesize_step

    def held(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        started.set()
        release.wait(30)
        return synthesize(*args, **kwargs)

    monkeypatch.setattr(dicom_node.jobs, "synthesize_step", held)
    yield started, release
    release.set()

"""The journal's database seam: one connection to SQLite or PostgreSQL, with one SQL text for both.

:class:`dicom_node.journal.Journal` writes its SQL once, in the dialect both databases share, plus a few
spellings translated here (:func:`for_sqlite`, :func:`for_postgresql`): ``?`` and ``:name`` parameters,
``GREATEST``/``STRING_AGG``/``STRPOS`` (SQLite: ``MAX``/``GROUP_CONCAT``/``instr``), ``JSON_TEXT(column,
'key')`` (a key of a JSON text column) and row locks (``FOR UPDATE [SKIP LOCKED]``, which SQLite does not
need: its writers are serialised by ``BEGIN IMMEDIATE``). Rows answer ``row["column"]`` and ``row[0]`` on both.

Transactions: SQLite ``BEGIN IMMEDIATE`` (one writer at a time, as before); PostgreSQL ``BEGIN`` at READ
COMMITTED, where the journal's read-then-write statements lock the rows they read (``FOR UPDATE``). psycopg is
imported only when a PostgreSQL journal is opened (it is in the ``scale`` extra).
"""

from __future__ import annotations

import functools
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Protocol

Dialect = Literal["sqlite", "postgresql"]

_LOCKS = re.compile(r"\s+FOR UPDATE( SKIP LOCKED)?")
_JSON_TEXT = re.compile(r"JSON_TEXT\((\w+(?:\.\w+)?), '(\w+)'\)")
_NAMED = re.compile(r"(?<![:\w]):(\w+)")


@functools.lru_cache(maxsize=512)
def for_sqlite(sql: str) -> str:
    """The journal's SQL as SQLite spells it."""
    sql = _LOCKS.sub("", sql)
    sql = _JSON_TEXT.sub(r"json_extract(\1, '$.\2')", sql)
    return sql.replace("GREATEST(", "MAX(").replace("STRING_AGG(", "GROUP_CONCAT(").replace("STRPOS(", "instr(")


@functools.lru_cache(maxsize=512)
def for_postgresql(sql: str) -> str:
    """The journal's SQL as psycopg takes it: ``%s``/``%(name)s`` parameters (a literal ``%`` doubled)."""
    sql = _JSON_TEXT.sub(r"(\1::jsonb ->> '\2')", sql.replace("%", "%%"))
    return _NAMED.sub(r"%(\1)s", sql.replace("?", "%s"))


def _value(v: Any) -> Any:
    return v.value if isinstance(v, Enum) else v


def _params(params: Sequence[Any] | dict[str, Any]) -> Sequence[Any] | dict[str, Any]:
    if isinstance(params, dict):
        return {k: _value(v) for k, v in params.items()}
    return [_value(v) for v in params]


class Row(tuple):  # type: ignore[type-arg]
    """A PostgreSQL row as :class:`sqlite3.Row` is one: by position and by column name; ``dict(row)`` works."""

    _index: dict[str, int]

    def __new__(cls, values: Iterable[Any], index: dict[str, int]) -> Row:
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        return super().__getitem__(self._index[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self._index)


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What :class:`dicom_node.journal.Journal` needs of its database: statements, transactions, closing."""

    dialect: Dialect
    #: what the journal is, for messages: a file's path, or a PostgreSQL conninfo without its password
    where: str

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def begin(self, *, durable: bool) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...


class SQLiteConnection:
    """The embedded journal: one SQLite file in WAL mode (see :class:`dicom_node.journal.Journal`)."""

    dialect: Dialect = "sqlite"

    def __init__(self, path: Path, *, read_only: bool) -> None:
        self.where = str(path)
        target = f"file:{path}?mode=ro" if read_only else str(path)
        self.db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, uri=read_only)
        self.db.row_factory = sqlite3.Row
        self.synchronous = "FULL"
        self._relaxed = False

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        return self.db.execute(for_sqlite(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.db.executemany(for_sqlite(sql), rows)

    def begin(self, *, durable: bool) -> None:
        """``durable=False``: committed without waiting for the disk (synchronous NORMAL in WAL mode): it
        survives a crash or SIGKILL of the node, not a power loss or kernel crash right after it."""
        self._relaxed = not durable and self.synchronous != "NORMAL"
        if self._relaxed:
            self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._restore()
            raise

    def commit(self) -> None:
        try:
            self.db.execute("COMMIT")
        finally:
            self._restore()

    def rollback(self) -> None:
        try:
            self.db.execute("ROLLBACK")
        finally:
            self._restore()

    def _restore(self) -> None:
        if self._relaxed:
            self._relaxed = False
            self.db.execute(f"PRAGMA synchronous={self.synchronous}")

    def close(self) -> None:
        self.db.close()


@dataclass(frozen=True)
class PostgresTarget:
    """A PostgreSQL journal: libpq conninfo or URL (no password in it), and the password (from
    ``[journal] password_file``) or None (libpq's ``PGPASSWORD``/``PGPASSFILE``, or no password)."""

    dsn: str
    password: str | None = None


def _row_factory(cursor: Any) -> Any:
    names = [c.name for c in cursor.description or ()]
    index = {name: i for i, name in enumerate(names)}
    return lambda values: Row(values, index)


class PostgresConnection:
    """A shared journal in PostgreSQL: autocommit connection with explicit ``BEGIN``/``COMMIT``, so a
    statement outside :meth:`begin` is its own transaction, as in SQLite. ``read_only``: every transaction is
    read-only (``default_transaction_read_only``), set by the server for the session."""

    dialect: Dialect = "postgresql"

    def __init__(self, target: PostgresTarget, *, read_only: bool, fsync: bool = True) -> None:
        """``fsync=False`` (``[node] fsync``): no commit waits for the WAL flush (``synchronous_commit`` off)."""
        import psycopg  # the scale extra; not needed by the embedded journal

        self._psycopg = psycopg
        self.target, self.read_only, self.fsync = target, read_only, fsync
        self.where = self.describe(target)
        self._closed = False
        #: how many times it connected again (:meth:`_live`)
        self.epoch = 0
        self.db = self._connect()

    @staticmethod
    def describe(target: PostgresTarget) -> str:
        """The journal for messages: its conninfo, any password in it replaced by ``***``."""
        return _without_password(target.dsn)

    def _connect(self) -> Any:
        extra: dict[str, Any] = {"application_name": "dicom-node"}
        if self.target.password is not None:
            extra["password"] = self.target.password
        if self.read_only:
            extra["options"] = "-c default_transaction_read_only=on"
        db = self._psycopg.connect(self.target.dsn, autocommit=True, connect_timeout=10, **extra)
        db.row_factory = _row_factory
        return db

    def _live(self) -> Any:
        """The connection, made again when the last one broke (the server restarted, the network dropped): the
        call that found it broken failed, the next one works again."""
        if (self.db.broken or self.db.closed) and not self._closed:
            self.db = self._connect()
            self.epoch += 1
        return self.db

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        return self._live().execute(for_postgresql(sql), _params(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = [_params(r) for r in rows]
        if rows:
            with self.db.cursor() as cur:
                cur.executemany(for_postgresql(sql), rows)

    def begin(self, *, durable: bool) -> None:
        """``durable=False``: this transaction's commit does not wait for the WAL flush (``synchronous_commit``
        off), the same trade as SQLite's NORMAL: a server crash right after may lose it, nothing else."""
        self._live().execute("BEGIN")
        if not (durable and self.fsync):
            self.db.execute("SET LOCAL synchronous_commit = off")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        if not (self.db.broken or self.db.closed):
            self.db.execute("ROLLBACK")

    def close(self) -> None:
        self._closed = True
        self.db.close()


def _without_password(dsn: str) -> str:
    """The conninfo for messages: any password in it is replaced by ``***``."""
    dsn = re.sub(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)
    return re.sub(r"(?i)^(postgres(?:ql)?://[^:/@]*:)[^@]*@", r"\1***@", dsn)


def unavailable_errors() -> tuple[type[BaseException], ...]:
    """The database errors that say the journal cannot be used now (locked past its busy timeout, a disk I/O
    error, the server gone, the connection closed), as opposed to a fault of what was being written."""
    errors: tuple[type[BaseException], ...] = (sqlite3.OperationalError, sqlite3.InterfaceError,
                                               sqlite3.ProgrammingError)  # (closed: "Cannot operate on a closed")
    try:
        import psycopg
    except ImportError:
        return errors
    return (*errors, psycopg.OperationalError, psycopg.InterfaceError)


def connection_errors() -> tuple[type[BaseException], ...]:
    """The database errors of both backends (psycopg's when it is installed)."""
    try:
        import psycopg
    except ImportError:
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)

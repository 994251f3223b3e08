"""The service's SQL database: engine set-up, the shared declarative base, and migrations.

Every table of the service (jobs and their events, datasets, models) is declared on
:class:`Base`; the schema is created and upgraded by Alembic (``dicebox/migrations``), so a
newer dicebox opens an older database and keeps its data. SQLite (a file in
``DICEBOX_HOME``, the default) and PostgreSQL run the same code.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

MIGRATIONS = Path(__file__).with_name("migrations")
# A database created by create_all before migrations existed holds exactly this revision.
FIRST_REVISION = "0001"


class Base(DeclarativeBase):
    pass


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL has ``timestamptz``; SQLite has no datetime type at all, and SQLAlchemy stores a
    naive string there. Normalising to naive UTC on the way in and re-attaching UTC on the way
    out gives aware datetimes everywhere, and keeps SQLite's string comparisons (lease expiry,
    pagination cursors) correct because every stored value has the same format and zone.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not accepted; use timezone-aware UTC")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


# SQLite's result codes (sqlite3.SQLITE_FULL, SQLITE_READONLY) and PostgreSQL's SQLSTATEs
# for "no room left" (disk_full) and "read-only" (read_only_sql_transaction).
_SQLITE_STORAGE_ERRNOS = {13: errno.ENOSPC, 8: errno.EROFS}
_POSTGRES_STORAGE_ERRNOS = {"53100": errno.ENOSPC, "25006": errno.EROFS}


def storage_errno(exc: BaseException) -> int | None:
    """ENOSPC when a database error (SQLAlchemy's, or the driver's own) means the database's
    disk is full, EROFS when the database cannot be written; None for anything else."""
    orig = getattr(exc, "orig", exc)
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        return _SQLITE_STORAGE_ERRNOS.get(code & 0xFF)  # extended codes keep the primary below
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return _POSTGRES_STORAGE_ERRNOS.get(sqlstate) if isinstance(sqlstate, str) else None


def now() -> datetime:
    return datetime.now(timezone.utc)


def iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``. SQLite files get their directory created, WAL journaling (readers
    do not block the writer) and a busy timeout, so concurrent writers wait instead of failing
    with "database is locked"."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {}).setdefault("timeout", 30)
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


class Transactions:
    """Short transactions on one engine, the same way for every store.

    ``write()`` is a read-modify-write transaction. On SQLite it starts with ``BEGIN
    IMMEDIATE``, which takes the database's single write lock up front (waiting out the busy
    timeout if someone else holds it). The default deferred ``BEGIN`` would first read under a
    shared lock and then try to upgrade it, and two transactions doing that at once either
    both read the same row (two claims of one job) or fail with "database is locked" instead
    of waiting. SQLite has no row locks, so serialising writers is what makes every
    check-then-update atomic. On PostgreSQL a normal READ COMMITTED transaction is used, and
    rows are locked where it matters with :meth:`lock` (``SELECT ... FOR UPDATE``).
    """

    def __init__(self, engine: Engine) -> None:
        self.dialect = engine.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"engine: unsupported dialect {self.dialect!r} (sqlite or postgresql)")
        # expire_on_commit=False: objects are turned into dicts after commit, without another
        # round trip to reload them.
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            if self.dialect == "sqlite":
                connection = session.connection()
                raw = connection.connection.driver_connection
                # The stdlib driver begins transactions lazily (before the first DML), so
                # nothing is open yet; skip if an engine-level recipe has already begun one.
                if not getattr(raw, "in_transaction", False):
                    connection.exec_driver_sql("BEGIN IMMEDIATE")
            yield session

    def lock(self, stmt):
        """``stmt`` with row locks where the backend has them (SQLite is serialised by write)."""
        return stmt.with_for_update() if self.dialect == "postgresql" else stmt


def _alembic_config(engine: Engine):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def migrate(engine: Engine) -> None:
    """Brings the schema to the newest revision (creating it in an empty database).

    A database whose ``jobs`` table was made by ``create_all`` before migrations existed is
    stamped with the first revision first, then upgraded like any other.
    """
    from alembic import command

    config = _alembic_config(engine)
    tables = set(inspect(engine).get_table_names())
    if "jobs" in tables and "alembic_version" not in tables:
        command.stamp(config, FIRST_REVISION)
    command.upgrade(config, "head")


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    config = _alembic_config(None)  # type: ignore[arg-type]
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head

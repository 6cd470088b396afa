"""The ledger: where the demo warehouse and finance record their effects.

One row per (target, purchase id). The first delivery writes the effect; a repeated one
changes nothing but ``deliveries`` (an upsert), so at-least-once delivery gives
exactly-once effects and the duplicates stay visible. Any SQLAlchemy URL works
(``LEDGER_URL``); SQLite runs in WAL mode with a busy timeout so that several worker
processes can write, and with synchronous=FULL because an effect must be durable before
its ack lets the pump prune the log.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateTable

from .config import Settings
from .targets import TARGETS

BUSY_TIMEOUT_MS = 30_000
_DDL_LOCK = 0x6C6564676572  # the advisory lock the creators of the table take ("ledger")

metadata = MetaData()
effects = Table(
    "ledger_effects",
    metadata,
    Column("target", String(64), primary_key=True),
    Column("purchase_id", String(64), primary_key=True),
    Column("deliveries", Integer, nullable=False),  # how often the task arrived
    Column("detail", Text, nullable=False),  # the effect, as JSON, from the first delivery
    Column("first_at", Float, nullable=False),
    Column("last_at", Float, nullable=False),
)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
    finally:
        cur.close()


def sqlite_file(url: str) -> str | None:
    """The absolute path of the file a SQLite ledger URL names, else None (another
    database, in memory, or a ``file:`` URI filename, which SQLite reads itself)."""
    parsed = make_url(url)
    path = parsed.database
    if parsed.get_backend_name() != "sqlite" or path in (None, "", ":memory:"):
        return None
    return None if path.startswith("file:") else os.path.abspath(path)


class Ledger:
    """A handle on one ledger database. Use ``Ledger.for_url`` in forked processes."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        path = sqlite_file(url)
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.engine: Engine = create_engine(url)
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            with self.engine.begin() as conn:
                if self.dialect == "postgresql":
                    # Several workers may create it at the same moment, and PostgreSQL's
                    # IF NOT EXISTS is not safe against itself (one of two fails on
                    # pg_type): one creator at a time, for this transaction.
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _DDL_LOCK})
                conn.execute(CreateTable(effects, if_not_exists=True))
        except BaseException:
            self.engine.dispose()  # no pooled connection left open behind the error
            raise
        self._upsert = _upsert_statement(self.dialect)

    def record(self, target: str, purchase_id: str, detail: Mapping[str, Any]) -> None:
        """Record the effect once; count every delivery."""
        now = time.time()
        row = {
            "target": target,
            "purchase_id": purchase_id,
            "deliveries": 1,
            "detail": json.dumps(detail, sort_keys=True, separators=(",", ":")),
            "first_at": now,
            "last_at": now,
        }
        if self._upsert is not None:
            with self.engine.begin() as conn:
                conn.execute(self._upsert, row)
            return
        try:  # any other database: insert, and count a duplicate when the key exists
            with self.engine.begin() as conn:
                conn.execute(insert(effects), row)
        except IntegrityError:
            key = (effects.c.target == target) & (effects.c.purchase_id == purchase_id)
            bump = {"deliveries": effects.c.deliveries + 1, "last_at": now}
            with self.engine.begin() as conn:
                conn.execute(update(effects).where(key).values(**bump))

    def deliveries(self, purchase_id: str) -> dict[str, int]:
        """{target: deliveries} for one purchase (absent target: not done yet)."""
        stmt = select(effects.c.target, effects.c.deliveries).where(
            effects.c.purchase_id == purchase_id
        )
        with self.engine.connect() as conn:
            return {t: d for t, d in conn.execute(stmt)}

    def snapshot(self, targets: tuple[str, ...] = TARGETS) -> dict[str, dict[str, int]]:
        """{target: {purchase_id: deliveries}}; ``targets`` are present even when empty."""
        out: dict[str, dict[str, int]] = {t: {} for t in targets}
        stmt = select(effects.c.target, effects.c.purchase_id, effects.c.deliveries)
        with self.engine.connect() as conn:
            for target, pid, n in conn.execute(stmt):
                out.setdefault(target, {})[pid] = n
        return out

    def detail(self, target: str, purchase_id: str) -> dict[str, Any] | None:
        key = (effects.c.target == target) & (effects.c.purchase_id == purchase_id)
        with self.engine.connect() as conn:
            raw = conn.execute(select(effects.c.detail).where(key)).scalar_one_or_none()
        return None if raw is None else dict(json.loads(raw))

    def close(self) -> None:
        self.engine.dispose()


def _upsert_statement(dialect: str) -> Any:
    """INSERT ... ON CONFLICT DO UPDATE deliveries + 1, built once (SQLite, PostgreSQL);
    None for databases without it."""
    if dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        stmt: Any = sqlite.insert(effects)
    elif dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        stmt = postgresql.insert(effects)
    else:
        return None
    return stmt.on_conflict_do_update(
        index_elements=["target", "purchase_id"],
        set_={"deliveries": effects.c.deliveries + 1, "last_at": stmt.excluded.last_at},
    )


_lock = threading.Lock()
_ledgers: dict[tuple[int, str], Ledger] = {}


def ledger_for(url: str) -> Ledger:
    """This process's ledger handle for ``url`` (keyed by pid: never shared over fork)."""
    key = (os.getpid(), url)
    with _lock:
        ledger = _ledgers.get(key)
        if ledger is None:
            ledger = _ledgers[key] = Ledger(url)
        return ledger


def status_of(purchase_id: str, url: str | None = None) -> dict[str, str]:
    """{"warehouse": "pending"|"done", "finance": ...} for one purchase, from ``url``
    (default ``LEDGER_URL``): what GET /purchases/{id} shows."""
    done = ledger_for(url or Settings.from_env().ledger_url).deliveries(purchase_id)
    return {t: "done" if t in done else "pending" for t in TARGETS}

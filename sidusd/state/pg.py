"""The shared state in PostgreSQL (psycopg 3, imported here only: ``state.backend: postgresql``).

Tables (created by :func:`migrate_sql`, ``CREATE TABLE IF NOT EXISTS`` and a version row):

* ``sidus_hosts(mac, doc)``, ``sidus_profiles(name, doc)``, ``sidus_images(name, doc)``: the
  documents of the inventory file and of ``images:``, one JSON document per row;
* ``sidus_revision``: one row, bumped by a trigger on every change of those three tables, and
  the same trigger sends ``NOTIFY sidus_state, '<revision>'`` (any writer, psql too, is pushed);
* ``sidus_events``: append-only boot records and events (id, t, server, kind, mac, body).

An admin's change of the hosts (``sidusctl hosts ...`` on any rack server) is
:func:`awrite_hosts`: one transaction, writers one at a time (the revision row locked).

The packet path never comes here: :mod:`sidusd.state.service` reads on its own task.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .snapshot import StateSnapshot

SCHEMA_VERSION = 1
CHANNEL = "sidus_state"

_TABLES = [
    "CREATE TABLE IF NOT EXISTS sidus_schema (version integer NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sidus_revision (id boolean PRIMARY KEY DEFAULT true CHECK (id),"
    " revision bigint NOT NULL)",
    "INSERT INTO sidus_revision (id, revision) VALUES (true, 0) ON CONFLICT (id) DO NOTHING",
    "CREATE TABLE IF NOT EXISTS sidus_profiles (name text PRIMARY KEY, doc jsonb NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sidus_hosts (mac text PRIMARY KEY, doc jsonb NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sidus_images (name text PRIMARY KEY, doc jsonb NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sidus_events (id bigserial PRIMARY KEY, t double precision NOT NULL,"
    " server text NOT NULL, kind text NOT NULL, mac text, body jsonb NOT NULL)",
    "CREATE INDEX IF NOT EXISTS sidus_events_mac ON sidus_events (mac, t)",
    """CREATE OR REPLACE FUNCTION sidus_bump() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r bigint;
BEGIN
  UPDATE sidus_revision SET revision = revision + 1 RETURNING revision INTO r;
  PERFORM pg_notify('sidus_state', r::text);
  RETURN NULL;
END $$""",
]
_STATE_TABLES = ("sidus_profiles", "sidus_hosts", "sidus_images")


def migrate_sql() -> list[str]:
    """The statements that bring an empty (or older) database to :data:`SCHEMA_VERSION`."""
    out = list(_TABLES)
    for t in _STATE_TABLES:
        out.append(f"DROP TRIGGER IF EXISTS sidus_bump ON {t}")
        out.append(f"CREATE TRIGGER sidus_bump AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {t}"
                   " FOR EACH STATEMENT EXECUTE FUNCTION sidus_bump()")
    return out


def psycopg() -> Any:
    """The psycopg module, or a StartupError naming the package to install."""
    try:
        import psycopg as mod
    except ImportError:
        from sidusd.errors import StartupError
        raise StartupError("state.backend: postgresql needs psycopg 3 (pip install 'sidusd[postgresql]', "
                           "or Debian's python3-psycopg)") from None
    return mod


def connect(dsn: str, timeout_s: float) -> Any:
    """A blocking connection (autocommit) for the start, migrations and the tools."""
    return psycopg().connect(dsn, autocommit=True, connect_timeout=max(1, int(timeout_s)))


async def aconnect(dsn: str, timeout_s: float) -> Any:
    """An asyncio connection (autocommit) for the watcher and the flusher."""
    return await psycopg().AsyncConnection.connect(dsn, autocommit=True, connect_timeout=max(1, int(timeout_s)))


def migrate(conn: Any) -> None:
    """Create what is missing (idempotent; one transaction, serialized by an advisory lock)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(7319019)")
        for stmt in migrate_sql():
            conn.execute(stmt)
        row = conn.execute("SELECT max(version) FROM sidus_schema").fetchone()
        if row[0] is None:
            conn.execute("INSERT INTO sidus_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
        elif row[0] < SCHEMA_VERSION:
            conn.execute("UPDATE sidus_schema SET version = %s", (SCHEMA_VERSION,))


_LOAD = ("SELECT (SELECT revision FROM sidus_revision),"
         " (SELECT coalesce(jsonb_object_agg(name, doc), '{}') FROM sidus_profiles),"
         " (SELECT coalesce(jsonb_agg(doc ORDER BY mac), '[]') FROM sidus_hosts),"
         " (SELECT coalesce(jsonb_object_agg(name, doc), '{}') FROM sidus_images)")


def _snapshot(row: Sequence[Any]) -> StateSnapshot:
    rev, profiles, hosts, images = row
    return StateSnapshot(revision=int(rev), profiles=profiles, hosts=hosts, images=images)


def load(conn: Any) -> StateSnapshot:
    """One consistent read (a single statement: one MVCC snapshot)."""
    return _snapshot(conn.execute(_LOAD).fetchone())


async def aload(conn: Any) -> StateSnapshot:
    cur = await conn.execute(_LOAD)
    return _snapshot(await cur.fetchone())


def _events_args(events: Iterable[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["t"], e["server"], e["kind"], e.get("mac"), json.dumps(e.get("body", {}))) for e in events]


async def ainsert_events(conn: Any, events: list[dict[str, Any]]) -> None:
    """One batch of events in one statement (``executemany`` pipelines the rows)."""
    async with conn.cursor() as cur:
        await cur.executemany("INSERT INTO sidus_events (t, server, kind, mac, body) VALUES (%s, %s, %s, %s, %s)",
                              _events_args(events))


# -- writes (the tools, the tests; h19ctl's fan-out) -------------------------------

def put_host(conn: Any, doc: dict[str, Any]) -> None:
    conn.execute("INSERT INTO sidus_hosts (mac, doc) VALUES (%s, %s) ON CONFLICT (mac) DO UPDATE SET doc = %s",
                 (doc["mac"].lower(), json.dumps(doc), json.dumps(doc)))


def delete_host(conn: Any, mac: str) -> None:
    conn.execute("DELETE FROM sidus_hosts WHERE mac = %s", (mac.lower(),))


def put_profile(conn: Any, name: str, doc: dict[str, Any]) -> None:
    conn.execute("INSERT INTO sidus_profiles (name, doc) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE SET doc = %s",
                 (name, json.dumps(doc), json.dumps(doc)))


def put_image(conn: Any, name: str, doc: dict[str, Any]) -> None:
    conn.execute("INSERT INTO sidus_images (name, doc) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE SET doc = %s",
                 (name, json.dumps(doc), json.dumps(doc)))


HostWrites = tuple[list[dict[str, Any]], list[str]]     # (host documents to put, MACs to remove)
_LOCK_REVISION = "SELECT revision FROM sidus_revision FOR UPDATE"
# a host's row is found by its document's MAC normalized as the inventory does (lower case, ':')
_DELETE_HOSTS = ("DELETE FROM sidus_hosts WHERE mac = ANY(%(macs)s)"
                 " OR replace(lower(doc->>'mac'), '-', ':') = ANY(%(macs)s)")
# their old rows deleted first (same transaction): a plain INSERT, one statement trigger, not two
_PUT_HOSTS = "INSERT INTO sidus_hosts (mac, doc) SELECT m, d::jsonb FROM unnest(%s::text[], %s::text[]) AS u(m, d)"


async def awrite_hosts(conn: Any, plan: Callable[[StateSnapshot], HostWrites]) -> StateSnapshot:
    """Change the hosts in one transaction: lock the revision row (one writer at a time), read the
    state, ``plan`` the change from it (an exception there rolls back: nothing written), replace the
    rows of the changed and removed hosts (two statements: the trigger bumps and notifies).
    Returns the state as committed (read on ``conn`` after the commit)."""
    async with conn.transaction():
        await conn.execute(_LOCK_REVISION)
        puts, removed = plan(await aload(conn))
        macs = sorted({*removed, *(d["mac"] for d in puts)})
        if macs:
            await conn.execute(_DELETE_HOSTS, {"macs": macs})
        if puts:
            await conn.execute(_PUT_HOSTS, ([d["mac"] for d in puts], [json.dumps(d) for d in puts]))
    return await aload(conn)

"""Create and upgrade the job database's schema, one numbered step at a time.

Every `JobStore` calls `upgrade_schema` when it opens a database, so a shared PostgreSQL
database is set up by whichever process reaches it first and upgraded in place when a newer
version of the program opens it. The `schema_version` table records the step reached. The
whole check-and-upgrade runs in one transaction under a lock (SQLite: `BEGIN IMMEDIATE`;
PostgreSQL: a transaction-level advisory lock), so processes opening a fresh database at the
same moment neither race nor see half a schema; on both backends DDL is transactional.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine, inspect, select, text

from dpo_engine.jobs.models import Base, SchemaVersionRow

# Version 1: the jobs and workers tables. Version 2: jobs.submitted_by (who queued the job).
# Version 3: jobs.processes (how many processes, one per GPU on a GPU, the job launches).
LATEST_VERSION = 3
UPGRADES: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE jobs ADD COLUMN submitted_by VARCHAR(256)",),
    3: ("ALTER TABLE jobs ADD COLUMN processes INTEGER NOT NULL DEFAULT 1",),
}
_PG_LOCK_KEY = 0x64706F6B  # any constant shared by every process using this schema


class SchemaTooNew(RuntimeError):
    """The database was upgraded by a newer version of the program."""


def stored_version(conn: Connection) -> int:
    """The version recorded in the database: 0 when empty, 1 for a database made before versioning."""
    tables = set(inspect(conn).get_table_names())
    if SchemaVersionRow.__tablename__ in tables:
        version = conn.scalar(select(SchemaVersionRow.version).where(SchemaVersionRow.id == 1))
        if version is not None:
            return int(version)
    return 1 if "jobs" in tables else 0


def upgrade_schema(engine: Engine) -> int:
    """Bring the database to `LATEST_VERSION` (creating it when empty); returns the version."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        version = stored_version(conn)
        if version > LATEST_VERSION:
            raise SchemaTooNew(
                f"the job database is at schema version {version}, newer than this program's "
                f"{LATEST_VERSION}; upgrade dpo-kernels-studio on this machine"
            )
        if version == LATEST_VERSION:
            return version
        if version == 0:
            Base.metadata.create_all(conn)
        else:
            Base.metadata.create_all(conn, tables=[SchemaVersionRow.__table__])
            for step in range(version + 1, LATEST_VERSION + 1):
                for statement in UPGRADES[step]:
                    conn.execute(text(statement))
        row = conn.scalar(select(SchemaVersionRow.id).where(SchemaVersionRow.id == 1))
        table = SchemaVersionRow.__table__
        if row is None:
            conn.execute(table.insert().values(id=1, version=LATEST_VERSION))
        else:
            conn.execute(table.update().where(table.c.id == 1).values(version=LATEST_VERSION))
    return LATEST_VERSION

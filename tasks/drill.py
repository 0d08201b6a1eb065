"""Tasks that stage a drill: marker rows, the simulated disaster, and the check afterwards."""

from __future__ import annotations

from datetime import datetime, timezone

from dr.database import connect
from dr.errors import InvalidInput
from dr.runtime import Ref
from tasks.common import dr_task

MARKERS = "dr_drill_markers"


def _refuse_production(ref: Ref) -> None:
    if ref.rt().target.production:
        raise InvalidInput(f"drills damage data on purpose and are refused for production ({ref.service} {ref.environment})")


@dr_task(retries=1)
def ensure_local_platform(ref: Ref) -> str:
    """Bring the local platform up if this environment runs on it (no-op elsewhere)."""
    rt = ref.rt()
    if rt.target.platform != "local":
        return "not local"
    from dr.platforms.local import lifecycle

    st = lifecycle.up(rt.config, rt.target)
    return f"{st.server['name']} on {st.server['host']}:{st.server['port']}"


@dr_task
def insert_markers(ref: Ref, drill: str, kind: str, n: int) -> datetime:
    """Insert `n` marker rows of a kind ("keep" must survive, "lost" must not); returns the commit time."""
    _refuse_production(ref)
    rt = ref.rt()
    with connect(rt.servers.connection(rt.target.server, rt.target.database)) as c:
        c.execute(f"CREATE TABLE IF NOT EXISTS {MARKERS} (id bigserial PRIMARY KEY, drill text NOT NULL, "
                  "kind text NOT NULL, note text NOT NULL, created_at timestamptz NOT NULL DEFAULT clock_timestamp())")
        c.execute(f"INSERT INTO {MARKERS} (drill, kind, note) SELECT %s, %s, 'row ' || g FROM generate_series(1, %s) g",
                  (drill, kind, n))
    return datetime.now(timezone.utc)


@dr_task
def corrupt_data(ref: Ref, drill: str) -> datetime:
    """The simulated data loss: delete this drill's kept markers and an app table's rows."""
    _refuse_production(ref)
    rt = ref.rt()
    with connect(rt.servers.connection(rt.target.server, rt.target.database)) as c:
        c.execute(f"DELETE FROM {MARKERS} WHERE drill = %s AND kind = 'keep'", (drill,))
        c.execute("DELETE FROM audit_events")
    return datetime.now(timezone.utc)


@dr_task
def drop_live_server(ref: Ref) -> datetime:
    """The simulated server loss: delete the live server."""
    _refuse_production(ref)
    rt = ref.rt()
    rt.servers.delete_server(rt.target.server)
    return datetime.now(timezone.utc)


@dr_task
def count_markers(ref: Ref, drill: str) -> dict[str, int]:
    """How many of this drill's markers of each kind the live database holds."""
    rt = ref.rt()
    with connect(rt.servers.connection(rt.target.server, rt.target.database)) as c:
        rows = c.execute(f"SELECT kind, count(*) FROM {MARKERS} WHERE drill = %s GROUP BY kind", (drill,)).fetchall()
    return {k: n for k, n in rows}

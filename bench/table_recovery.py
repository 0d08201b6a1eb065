"""Table-level recovery against the whole-database path, on the same PTR server.

    python bench/table_recovery.py --size 1gb [--reps 3] [--table audit_events] [--damage delete|update]

A benchmark, not a test. It builds the sample database (bench/recovery_speed.py's `Bench`: a
PostgreSQL 18 server with WAL archiving, the prose-like sample at the asked size), picks the table
nearest to 20 % of the database (or `--table`), and in every repetition:

1. damages it after a time T (`delete`: DELETE without WHERE; `update`: 5 % of its rows rewritten)
   and then writes, after T, to the other tables as the app would (new candidates and applications,
   updated candidates): the writes that whole-database recovery loses;
2. makes ONE point-in-time restore of the server at T (the first repetition; later ones damage the
   live database again and reuse it: the PTR server still holds the rows at T), not timed;
3. times the table path: `dr.tables.compare.compare` (the "what this changes" report, with the
   reconciliation pack streamed into the store) + `dr.tables.apply.apply_tables` (the one-transaction
   replacement, verification included) — everything the data-loss flow does between the PTR server
   and "validate" with `--tables`;
4. times the whole-database path on the same PTR server: `take_backup` of the PTR server into the
   store + `restore_backup` into the live server (`jobs=2`, checksum, manifest, statistics, swap) —
   what the flow does between the PTR server and "validate" without `--tables`.

It prints both medians, the RTO ratio (goal: the table path at least 3x faster) and the rows written
after T outside the recovered table that the table path keeps and the whole-database path loses
(counted from what the benchmark wrote, and as the report states them). The approval wait and
the steps both paths share (safety backup, PTR server, app, validation) are not timed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.recovery_speed import MB, Bench  # noqa: E402

GOAL = 3.0
#: rows the "app" writes after T outside the recovered table, per repetition
NEW_CANDIDATES, NEW_APPLICATIONS, UPDATED_CANDIDATES = 2000, 3000, 1000


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def pick_table(b: Bench, asked: str | None) -> tuple[str, int]:
    sizes = dict(b.sql("SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c JOIN pg_namespace n ON "
                       "n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'", b.database))
    if asked:
        return asked, sizes[asked]
    total = b.database_bytes()
    name = min(sizes, key=lambda t: abs(sizes[t] / total - 0.2))
    return name, sizes[name]


#: what `--damage update` rewrites in 5 % of the rows of each table
UPDATES = {"audit_events": "action = 'damaged'", "applications": "status = 'withdrawn'",
           "candidates": "last_name = 'Damaged'", "courses": "title = 'Damaged'", "providers": "name = 'Damaged'"}


def damage(b: Bench, table: str, how: str, rep: int) -> int:
    """Damage the table after T (a DELETE without WHERE, or a faulty update of 5 % of it); returns the rows touched."""
    if how == "delete":
        q = f"WITH d AS (DELETE FROM {table} RETURNING 1) SELECT count(*) FROM d"
    else:
        q = f"WITH u AS (UPDATE {table} SET {UPDATES[table]} WHERE id % 20 = {rep % 20} RETURNING 1) SELECT count(*) FROM u"
    return int(b.sql(q, b.database)[0][0])


def write_after_t(b: Bench, rep: int) -> int:
    """What the app writes after T outside the damaged table; returns the rows written."""
    tag = f"r{rep}-{int(time.time())}"
    b.sql(f"INSERT INTO candidates (email, first_name, last_name, date_of_birth, profile) "
          f"SELECT 'bench-{tag}-' || g || '@example.org', 'Bench', 'Later', date '2000-01-01', '{{}}' "
          f"FROM generate_series(1, {NEW_CANDIDATES}) g", b.database)
    b.sql(f"INSERT INTO applications (candidate_id, course_id, status, personal_statement) "
          f"SELECT c.id, 1 + c.id % 100, 'draft', 'written after T' FROM candidates c "
          f"WHERE c.email LIKE 'bench-{tag}-%' LIMIT {NEW_APPLICATIONS}", b.database)
    b.sql(f"INSERT INTO applications (candidate_id, course_id, status, personal_statement) "
          f"SELECT 1 + g % 400, 1 + g % 100, 'submitted', 'written after T' FROM generate_series(1, "
          f"{max(0, NEW_APPLICATIONS - NEW_CANDIDATES)}) g", b.database)
    b.sql(f"UPDATE candidates SET last_name = 'Updated {tag}' WHERE id <= {UPDATED_CANDIDATES}", b.database)
    return NEW_CANDIDATES + NEW_APPLICATIONS + UPDATED_CANDIDATES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1gb")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--table", help="the table to recover (default: the one nearest to 20 %% of the database)")
    ap.add_argument("--damage", choices=("delete", "update"), default="delete")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)

    from dr.backup import take_backup
    from dr.database import drop_database
    from dr.restore import restore_backup
    from dr.tables.apply import apply_tables
    from dr.tables.carry import carried_name, carry_out, read_carried, write_carried
    from dr.tables.compare import compare
    from dr.tables.pack import pack_name, write_pack

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dr-bench-tables-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    b = Bench(workdir, args.size, os.cpu_count() or 1, log)
    ptr_name = None
    try:
        data = b.up()
        table, table_bytes = pick_table(b, args.table)
        db_bytes = data["database_bytes"]
        log(f"database {db_bytes / MB:.0f} MB; recovering {table}: {table_bytes / MB:.0f} MB "
            f"({table_bytes / db_bytes:.0%} of the database)")
        b.settle()  # empties the WAL archive: only before the base backup the PTR server starts from
        b.servers.take_base_backup(b.server)
        time.sleep(1.2)
        t = datetime.now(timezone.utc).replace(microsecond=0)
        time.sleep(1.2)
        table_s, whole_s, kept_rows, report_kept, loads, steps, whole_loads = [], [], [], [], [], [], []
        for rep in range(args.reps):
            touched = damage(b, table, args.damage, rep)
            written = write_after_t(b, rep)
            if ptr_name is None:
                ptr_name = f"{b.server}-ptr-bench"
                b.servers.point_in_time_restore(b.server, ptr_name, t)
                log(f"PTR server {ptr_name} at {t:%H:%M:%S} UTC")
            live = b.conn
            ptr = b.servers.connection(ptr_name, b.database)
            b.settle()
            loads.append(os.getloadavg()[0])
            # the table path
            started = time.perf_counter()
            name = pack_name("apply", "dev", f"bench-{rep}", datetime.now(timezone.utc))
            kept = carried_name("apply", "dev", f"bench-{rep}", datetime.now(timezone.utc))

            def keep_and_pack(w, r, rep=rep, name=name, kept=kept):  # as tasks/tables.py's compare task does
                carried = carry_out(w, r)
                write_carried(b.store, kept, carried, incident=f"bench-{rep}", server=b.server, database=b.database)
                carried.close()
                write_pack(b.store, name, w, r, incident=f"bench-{rep}", service="apply", environment="development",
                           server=b.server, safety_backup=None)

            report = compare(live, ptr, [table], restore_time=f"{t:%H:%M:%S} UTC", on_compared=keep_and_pack)
            compared = time.perf_counter()
            assert not report.blockers, report.blockers
            carried = read_carried(b.store, kept)  # as tasks/tables.py's apply task does
            result = apply_tables(live, ptr, [table], approved=report.digests(), record=lambda txid, oid: None,
                                  carried=carried)
            carried.close()
            table_s.append(time.perf_counter() - started)
            steps.append((compared - started, result.seconds))
            kept_rows.append(written)
            report_kept.append(report.rows_kept())
            methods = ", ".join(f"{x.table} {x.method}" for x in report.tables if x.role != "needed")
            log(f"rep {rep + 1}: {touched} rows of {table} damaged; load {loads[-1]:.1f}; table path {table_s[-1]:.2f} s "
                f"(compare + pack {compared - started:.2f} s, apply {result.seconds:.2f} s: {methods}; "
                f"{result.summary()}; {result.compared}; {result.timings})")
            # the whole-database path on the same PTR server
            b.settle()
            whole_loads.append(os.getloadavg()[0])
            started = time.perf_counter()
            backup = take_backup(b.servers, b.store, b.tools, server=ptr_name, database=b.database,
                                 name=f"bench_ptr_{rep}_{int(time.time())}.pgdump.zst", kind="ptr")
            restore_backup(b.servers, b.store, b.tools, server=b.server, database=b.database,
                           backup=backup.info.name, jobs=2, swap=True)
            whole_s.append(time.perf_counter() - started)
            log(f"rep {rep + 1}: load {whole_loads[-1]:.1f}; whole-database path {whole_s[-1]:.2f} s "
                f"(backup {backup.seconds:.2f} s)")
            for (old,) in b.sql("SELECT datname FROM pg_database WHERE datname LIKE '%\\_replaced\\_%'"):
                drop_database(b.admin, old)
            b.store.delete_backup(backup.info.name)
        tm, wm = statistics.median(table_s), statistics.median(whole_s)
        ratio = wm / tm
        print(f"\nsize {args.size}: database {db_bytes / MB:.0f} MB; recovered {table} {table_bytes / MB:.0f} MB "
              f"({table_bytes / db_bytes:.0%}), damage: {args.damage}; {args.reps} reps; {os.cpu_count()} cores; "
              f"1-min load average at the starts: table path {', '.join(f'{x:.1f}' for x in loads)}; "
              f"whole-database path {', '.join(f'{x:.1f}' for x in whole_loads)}")
        print(f"table path (compare + pack + one-transaction apply)   median {tm:6.2f} s  "
              f"(min {min(table_s):.2f}; compare+pack {statistics.median(s[0] for s in steps):.2f} s, "
              f"apply {statistics.median(s[1] for s in steps):.2f} s)")
        print(f"whole-database path (PTR backup + restore + swap)     median {wm:6.2f} s  (min {min(whole_s):.2f})")
        print(f"{'PASS' if ratio >= GOAL else 'FAIL'}  RTO ratio {ratio:.2f}x (goal >= {GOAL:.0f}x)")
        print(f"rows kept that the whole-database path loses: {statistics.median(kept_rows):.0f} per repetition "
              f"written after T outside {table} ({NEW_CANDIDATES} candidates and {NEW_APPLICATIONS} applications "
              f"inserted, {UPDATED_CANDIDATES} candidates updated); the report stated net "
              f"{statistics.median(report_kept):.0f} rows (net row counts: updates are not counted)")
    finally:
        if ptr_name:
            try:
                b.servers.delete_server(ptr_name)
            except Exception:
                pass
        if not args.keep:
            from bench.recovery_speed import _down

            _down(workdir)
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

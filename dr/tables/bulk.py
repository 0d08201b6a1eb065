"""Replace a whole table in bulk: TRUNCATE + COPY ... FREEZE from the PTR server, indexes rebuilt once,
foreign keys checked once.

When most of a table's rows change (a DELETE without WHERE, a batch job that rewrote the table),
putting them back one by one is the slowest way: every row maintains every index and every
foreign key is checked per row (a lookup and a FOR KEY SHARE lock on the parent row, which dirties
and WAL-logs the parent's pages). Measured at 1 GB: loading 964,500 rows into an emptied table
took 30 s with its foreign key in place, 9 s without it, 6.5 s with neither indexes nor keys, whose
builds then took 1.4 s and the key's check 1.5-2.8 s.

So, inside the recovery's ONE transaction, when its role owns the tables concerned (ALTER TABLE
needs ownership; nothing needs superuser), a table chosen for bulk replacement is:

1. stripped, after recording their exact definitions (`pg_get_constraintdef`, `pg_get_indexdef`),
   comments, CLUSTER and REPLICA IDENTITY marks: the foreign keys from and to it are dropped, then
   its primary key, unique and exclusion constraints, then its other indexes;
2. emptied with `TRUNCATE ONLY` and loaded with its rows at T straight from the PTR server
   (`COPY ... TO STDOUT` into `COPY ... FROM STDIN WITH (FREEZE)`, binary, no file; frozen rows
   need no hint-bit writes or freezing vacuum later, as in the whole-database restore);
3. given back every constraint and index as recorded (each index built once; a duplicate key
   fails the primary key's or unique constraint's build, naming it), every foreign key re-added
   `NOT VALID` and then `VALIDATE`d (one join per key instead of one lookup per row), and the
   recorded comments and marks; then the catalog is read again and must hold exactly the recorded
   definitions.

DDL is transactional in PostgreSQL: any failure (a duplicate, a broken key, a lost session)
rolls the transaction back and the table, its rows, indexes and constraints are exactly as before.

What other sessions see: TRUNCATE and the constraint changes take ACCESS EXCLUSIVE locks, on the
table and (for dropping and re-adding foreign keys) on the tables its keys link it to, until
COMMIT: other sessions cannot even read them for the duration of the transaction (the app is
stopped and the maintenance page is on in the data-loss scenario). TRUNCATE is not MVCC-safe: a
transaction whose snapshot was taken before the COMMIT and that had not read the table yet sees
it empty afterwards (again, none should exist with the app stopped). A publication that publishes
TRUNCATE sends it and the new rows to its subscribers. The table's sequences are not reset
(no RESTART IDENTITY) and move only forward, as on the row-by-row path.

A table is not replaced in bulk (it is replaced row by row, and the report says why) when the role
does not own it or a table whose foreign key references it, lacks REFERENCES on a table it
references, or when the table is partitioned, a partition, has inheritance children, forces
row-level security, or has an index that is invalid, in another tablespace, with statistics
targets, or that other objects depend on (a view grouping by its primary key).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from dr.tables.catalog import Catalog, TableInfo

#: replace a table in bulk when at least this share of its rows changes (measured at 1 GB: a row put
#: back one by one costs ~3x a row reloaded in bulk, index builds and key checks included)
BULK_SHARE = 0.25
#: ... and it holds at least this many rows (below, row by row takes well under a second anyway and
#: needs no ACCESS EXCLUSIVE lock)
BULK_MIN_ROWS = 10_000
ROWS, BULK = "rows", "bulk"

_TABLE = """
SELECT c.relkind::text, c.relispartition, c.relforcerowsecurity,
       EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid),
       pg_has_role(current_user, c.relowner, 'USAGE'), pg_get_userbyid(c.relowner)
FROM pg_class c WHERE c.oid = %s
"""
#: the foreign keys from and to the tables (a partition's clone of a key goes with its parent's)
_FOREIGN_KEYS = """
SELECT co.oid, co.conname, co.conrelid, co.confrelid, pg_get_constraintdef(co.oid), co.convalidated,
       obj_description(co.oid, 'pg_constraint'), pg_has_role(current_user, c.relowner, 'USAGE'),
       pg_get_userbyid(c.relowner), has_table_privilege(co.confrelid, 'REFERENCES'),
       coalesce((SELECT array_agg(DISTINCT t.tgenabled::text) FROM pg_trigger t WHERE t.tgconstraint = co.oid),
                '{}'),
       c.relnamespace::regnamespace::text, c.relname, p.relnamespace::regnamespace::text, p.relname
FROM pg_constraint co JOIN pg_class c ON c.oid = co.conrelid JOIN pg_class p ON p.oid = co.confrelid
WHERE co.contype = 'f' AND (co.conrelid = ANY(%s::oid[]) OR co.confrelid = ANY(%s::oid[]))
  AND coalesce((to_jsonb(co) ->> 'conparentid')::oid, 0) = 0
ORDER BY co.conrelid, co.conname
"""
#: a table's primary key, unique and exclusion constraints
_CONSTRAINTS = """
SELECT co.oid, co.conname, pg_get_constraintdef(co.oid), obj_description(co.oid, 'pg_constraint'), co.conindid
FROM pg_constraint co WHERE co.conrelid = %s AND co.contype IN ('p', 'u', 'x') ORDER BY co.contype, co.conname
"""
#: a table's indexes
_INDEXES = """
SELECT i.indexrelid, c.relname, pg_get_indexdef(i.indexrelid), i.indisvalid AND i.indisready AND i.indislive,
       i.indisclustered, i.indisreplident, c.reltablespace <> 0, obj_description(i.indexrelid, 'pg_class'),
       EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = i.indexrelid AND a.attnum > 0
               AND coalesce(a.attstattarget::int, -1) >= 0)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s ORDER BY c.relname
"""
#: objects other than those we drop and put back that depend on the indexes or constraints
_DEPENDENTS = """
SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid) FROM pg_depend d
WHERE ((d.refclassid = 'pg_class'::regclass AND d.refobjid = ANY(%(idx)s::oid[]))
    OR (d.refclassid = 'pg_constraint'::regclass AND d.refobjid = ANY(%(con)s::oid[])))
  AND NOT (d.classid = 'pg_class'::regclass AND d.objid = ANY(%(idx)s::oid[]))
  AND NOT (d.classid = 'pg_constraint'::regclass AND d.objid = ANY(%(con)s::oid[] || %(fks)s::oid[]))
ORDER BY 1
"""


@dataclass(frozen=True)
class ForeignKeyDef:
    oid: int
    name: str
    table: sql.Identifier
    definition: str
    validated: bool
    comment: str | None


@dataclass(frozen=True)
class ConstraintDef:
    name: str
    definition: str
    comment: str | None


@dataclass(frozen=True)
class IndexDef:
    name: str
    definition: str
    clustered: bool
    replica_identity: bool
    comment: str | None
    constraint: bool  # built by its constraint (primary key, unique, exclusion)


@dataclass
class Plan:
    """What a bulk replacement of some tables drops and puts back, recorded from the catalog."""

    tables: list[TableInfo]
    foreign_keys: list[ForeignKeyDef] = field(default_factory=list)
    constraints: dict[str, list[ConstraintDef]] = field(default_factory=dict)  # table -> its p/u/x
    indexes: dict[str, list[IndexDef]] = field(default_factory=dict)  # table -> every index
    blockers: dict[str, list[str]] = field(default_factory=dict)  # table -> why it cannot go in bulk

    def snapshot(self) -> dict[str, object]:
        """The definitions, for the check after the rebuild."""
        return {"fks": sorted((f.name, f.table.as_string(None), f.definition, f.validated, f.comment)
                              for f in self.foreign_keys),
                "constraints": {t: sorted((c.name, c.definition, c.comment) for c in cs)
                                for t, cs in self.constraints.items()},
                "indexes": {t: sorted((i.name, i.definition, i.clustered, i.replica_identity, i.comment)
                                      for i in ix) for t, ix in self.indexes.items()}}


def plan_bulk(c: psycopg.Connection, cat: Catalog, tables: list[str]) -> Plan:
    """Read what replacing `tables` in bulk drops and puts back; `blockers` says which cannot be."""
    infos = [cat.tables[t] for t in tables]
    plan = Plan(infos)
    oids = [i.oid for i in infos]
    for info in infos:
        why = plan.blockers.setdefault(info.name, [])
        kind, is_partition, force_rls, has_children, owned, owner = c.execute(_TABLE, (info.oid,)).fetchone()
        if kind != "r" or is_partition or has_children:
            why.append("it is partitioned, a partition or has inheritance children")
        if force_rls:
            why.append("it forces row-level security")
        if not owned:
            why.append(f"{cat.user} does not own it (owner {owner}; GRANT {owner} TO {cat.user})")
    for (oid, name, child, parent, definition, validated, comment, owns_child, child_owner, references, states,
         cschema, cname, pschema, pname) in c.execute(_FOREIGN_KEYS, (oids, oids)).fetchall():
        plan.foreign_keys.append(ForeignKeyDef(oid, name, sql.Identifier(cschema, cname), definition, validated,
                                               comment))
        mine = [i.name for i in infos if i.oid in (child, parent)]
        if not owns_child:
            for t in mine:
                plan.blockers[t].append(f"{cat.user} does not own {cschema}.{cname}, whose foreign key {name} must be "
                                        f"dropped and re-added (owner {child_owner}; GRANT {child_owner} TO {cat.user})")
        if not references:
            for t in mine:
                plan.blockers[t].append(f"{cat.user} lacks REFERENCES on {pschema}.{pname} to re-add foreign key {name}")
        if set(states) - {"O"}:
            for t in mine:
                plan.blockers[t].append(f"the triggers of foreign key {name} are not in their default state")
    fk_oids = [f.oid for f in plan.foreign_keys]
    for info in infos:
        why = plan.blockers[info.name]
        cons = c.execute(_CONSTRAINTS, (info.oid,)).fetchall()
        plan.constraints[info.name] = [ConstraintDef(n, d, cm) for _, n, d, cm, _ in cons]
        backing = {r[4] for r in cons}
        idx = c.execute(_INDEXES, (info.oid,)).fetchall()
        plan.indexes[info.name] = [IndexDef(n, d, cl, ri, cm, oid in backing)
                                   for oid, n, d, _ok, cl, ri, _ts, cm, _st in idx]
        for oid, n, _d, ok, _cl, _ri, tablespace, _cm, stats in idx:
            if not ok:
                why.append(f"its index {n} is not valid")
            if tablespace:
                why.append(f"its index {n} is in another tablespace")
            if stats:
                why.append(f"its index {n} has statistics targets")
        deps = [r[0] for r in c.execute(_DEPENDENTS, {"idx": [r[0] for r in idx], "con": [r[0] for r in cons],
                                                       "fks": fk_oids}).fetchall()]
        if deps:
            why.append(f"other objects depend on its indexes or keys: {', '.join(deps)}")
    return plan


def drop(c: psycopg.Connection, plan: Plan) -> None:
    """Drop the foreign keys, then the constraints and indexes of the plan's tables."""
    for fk in plan.foreign_keys:
        c.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(fk.table, sql.Identifier(fk.name)))
    for info in plan.tables:
        for con in plan.constraints[info.name]:
            c.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(info.ident, sql.Identifier(con.name)))
        for ix in plan.indexes[info.name]:
            if not ix.constraint:
                c.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(info.schema, ix.name)))


def rebuild(c: psycopg.Connection, plan: Plan) -> list[str]:
    """Put back what `drop` dropped, exactly as recorded; returns the foreign keys validated."""
    for info in plan.tables:
        for con in plan.constraints[info.name]:
            c.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(info.ident, sql.Identifier(con.name))
                      + sql.SQL(con.definition))
            if con.comment is not None:
                c.execute(sql.SQL("COMMENT ON CONSTRAINT {} ON {} IS {}").format(
                    sql.Identifier(con.name), info.ident, sql.Literal(con.comment)))
        for ix in plan.indexes[info.name]:
            if not ix.constraint:
                c.execute(sql.SQL(ix.definition))
            name = sql.Identifier(info.schema, ix.name)
            if ix.comment is not None and not ix.constraint:
                c.execute(sql.SQL("COMMENT ON INDEX {} IS {}").format(name, sql.Literal(ix.comment)))
            if ix.clustered:
                c.execute(sql.SQL("ALTER TABLE {} CLUSTER ON {}").format(info.ident, sql.Identifier(ix.name)))
            if ix.replica_identity:
                c.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX {}").format(
                    info.ident, sql.Identifier(ix.name)))
    validated = []
    for fk in plan.foreign_keys:
        definition = fk.definition if fk.definition.endswith("NOT VALID") else fk.definition + " NOT VALID"
        c.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(fk.table, sql.Identifier(fk.name))
                  + sql.SQL(definition))
        if fk.comment is not None:
            c.execute(sql.SQL("COMMENT ON CONSTRAINT {} ON {} IS {}").format(
                sql.Identifier(fk.name), fk.table, sql.Literal(fk.comment)))
    for fk in plan.foreign_keys:
        if fk.validated:  # one join over the table per key, instead of one lookup per row
            c.execute(sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(fk.table, sql.Identifier(fk.name)))
            validated.append(fk.name)
    return validated


def rebuilt_as_recorded(c: psycopg.Connection, cat: Catalog, plan: Plan) -> list[str]:
    """What differs between the catalog now and the definitions recorded before `drop` (empty: identical)."""
    again = plan_bulk(c, cat, [i.name for i in plan.tables])
    before, after = plan.snapshot(), again.snapshot()
    return [f"{k}: before {before[k]!r}, after {after[k]!r}" for k in before if before[k] != after[k]]


__all__ = ["BULK", "BULK_MIN_ROWS", "BULK_SHARE", "ROWS", "Plan", "drop", "plan_bulk", "rebuild",
           "rebuilt_as_recorded"]

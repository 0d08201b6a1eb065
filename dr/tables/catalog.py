"""What the catalog of one database says about its user tables, read in one go.

Everything table-level recovery decides (the closure, the column lists it copies, the
privileges it needs) comes from here; nothing is assumed about the schema. Identifiers are
kept as (schema, name) and composed with `psycopg.sql.Identifier`, never formatted in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from dr.errors import InvalidInput

#: user tables: ordinary and partitioned, outside the system schemas and extensions
_TABLES = """
SELECT c.oid, n.nspname, c.relname, c.relkind::text, c.relispartition,
       (SELECT pn.nspname || '.' || p.relname FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
          JOIN pg_namespace pn ON pn.oid = p.relnamespace WHERE i.inhrelid = c.oid LIMIT 1),
       pg_get_userbyid(c.relowner), pg_has_role(current_user, c.relowner, 'USAGE'),
       has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT'),
       has_table_privilege(c.oid, 'UPDATE'), has_table_privilege(c.oid, 'DELETE')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                  AND d.deptype = 'e')
ORDER BY 2, 3
"""
_COLUMNS = """
SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated::text, a.attidentity::text
FROM pg_attribute a WHERE a.attrelid = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""
_CONSTRAINTS = """
SELECT co.conname, co.contype::text, co.conrelid, co.confrelid,
       ARRAY(SELECT a.attname FROM unnest(co.conkey) WITH ORDINALITY k(n, i)
             JOIN pg_attribute a ON a.attrelid = co.conrelid AND a.attnum = k.n ORDER BY k.i),
       ARRAY(SELECT a.attname FROM unnest(co.confkey) WITH ORDINALITY k(n, i)
             JOIN pg_attribute a ON a.attrelid = co.confrelid AND a.attnum = k.n ORDER BY k.i),
       co.confdeltype::text, co.confupdtype::text, co.condeferrable,
       (to_jsonb(co) ->> 'conparentid')::oid
FROM pg_constraint co WHERE co.contype IN ('p', 'f') AND co.conrelid = ANY(%s)
ORDER BY co.conname
"""
_TRIGGERS = """
SELECT t.tgrelid, t.tgname, t.tgenabled::text, coalesce((to_jsonb(t) ->> 'tgparentid')::oid, 0) <> 0
FROM pg_trigger t WHERE NOT t.tgisinternal AND t.tgrelid = ANY(%s) ORDER BY t.tgrelid, t.tgname
"""
#: sequences a table owns (serial, identity) and those its column defaults call (nextval)
_SEQUENCES = """
SELECT DISTINCT x.tbl, sn.nspname, s.relname, has_sequence_privilege(s.oid, 'SELECT'),
       has_sequence_privilege(s.oid, 'UPDATE')
FROM (SELECT d.refobjid AS tbl, d.objid AS seq FROM pg_depend d
      WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
        AND d.refobjid = ANY(%s)
      UNION
      SELECT ad.adrelid, d.refobjid FROM pg_attrdef ad
      JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid AND d.refclassid = 'pg_class'::regclass
      WHERE ad.adrelid = ANY(%s)) x
JOIN pg_class s ON s.oid = x.seq AND s.relkind = 'S' JOIN pg_namespace sn ON sn.oid = s.relnamespace
ORDER BY 1, 2, 3
"""
_DATABASE = """
SELECT current_user, d.oid, current_database(), has_database_privilege(current_database(), 'TEMP'),
       current_setting('server_version_num')::int / 10000
FROM pg_database d WHERE d.datname = current_database()
"""

#: what `confdeltype` means, as the report says it
ON_DELETE = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}


def display(schema: str, table: str) -> str:
    """`schema.table`, the way manifests and reports name a table."""
    return f"{schema}.{table}"


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    generated: bool  # GENERATED ALWAYS AS (...) STORED: recomputed on insert, never written
    identity: str  # "" | "a" (GENERATED ALWAYS) | "d" (BY DEFAULT)


@dataclass(frozen=True)
class ForeignKey:
    """One foreign key: `child(columns)` references `parent(parent_columns)`."""

    name: str
    child: str
    columns: tuple[str, ...]
    parent: str
    parent_columns: tuple[str, ...]
    on_delete: str  # a key of ON_DELETE
    deferrable: bool

    @property
    def action(self) -> str:
        return ON_DELETE.get(self.on_delete, self.on_delete)

    def describe(self) -> str:
        return (f"{self.name}: {self.child}({', '.join(self.columns)}) → {self.parent}({', '.join(self.parent_columns)}) "
                f"ON DELETE {self.action}")


@dataclass(frozen=True)
class Trigger:
    relation: str  # the table (or partition) it is defined on
    name: str
    enabled: str  # pg_trigger.tgenabled: O (origin), A (always), R (replica only), D (disabled)
    cloned: bool  # a partition's copy of its parent's trigger

    @property
    def fires(self) -> bool:
        """Whether it fires in an ordinary session (session_replication_role = origin)."""
        return self.enabled in ("O", "A")


@dataclass(frozen=True)
class Sequence:
    schema: str
    name: str
    can_read: bool
    can_update: bool

    @property
    def display(self) -> str:
        return display(self.schema, self.name)

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


@dataclass(frozen=True)
class TableInfo:
    oid: int
    schema: str
    table: str
    kind: str  # "r" ordinary, "p" partitioned
    partition_of: str | None
    owner: str
    owned: bool  # the current user is the owner or a member of the owning role
    privileges: frozenset[str]
    columns: tuple[Column, ...] = ()
    primary_key: tuple[str, ...] = ()
    triggers: tuple[Trigger, ...] = ()  # on the table and, for a partitioned table, on its partitions
    sequences: tuple[Sequence, ...] = ()
    partitions: tuple[str, ...] = ()  # every partition, at any depth

    @property
    def name(self) -> str:
        return display(self.schema, self.table)

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table)

    @property
    def writable(self) -> tuple[str, ...]:
        """The columns an INSERT or UPDATE may name (generated columns are computed by the server)."""
        return tuple(c.name for c in self.columns if not c.generated)

    @property
    def identity_always(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.identity == "a")

    @property
    def firing_triggers(self) -> tuple[Trigger, ...]:
        return tuple(t for t in self.triggers if t.fires)

    def shape(self) -> tuple[tuple[str, str, bool], ...]:
        """Column names, types and generated flags in order: what must match between two servers."""
        return tuple((c.name, c.type, c.generated) for c in self.columns)


@dataclass
class Catalog:
    """The user tables of one database and the foreign keys between them."""

    user: str
    database: str
    database_oid: int
    can_temp: bool
    server_version: int
    tables: dict[str, TableInfo] = field(default_factory=dict)
    foreign_keys: list[ForeignKey] = field(default_factory=list)

    def resolve(self, name: str) -> str:
        """The table a person named: `schema.table`, or a bare name that only one schema holds.

        Raises:
            InvalidInput: no such table, a bare name found in several schemas, or a partition.
        """
        if not isinstance(name, str) or not name.strip():
            raise InvalidInput("an empty table name was given")
        name = name.strip()
        if name in self.tables:
            found = name
        else:
            matches = [k for k, t in self.tables.items() if t.table == name]
            if not matches:
                raise InvalidInput(f"no table {name!r} in {self.database}; its tables: "
                                   + ", ".join(sorted(t.table for t in self.tables.values() if not t.partition_of)))
            if len(matches) > 1:
                raise InvalidInput(f"table {name!r} is in several schemas ({', '.join(sorted(matches))}): "
                                   "name it as schema.table")
            found = matches[0]
        info = self.tables[found]
        if info.partition_of:
            raise InvalidInput(f"{found} is a partition of {info.partition_of}: choose {info.partition_of} "
                               "(table-level recovery works on whole tables)")
        return found

    def references_from(self, table: str) -> list[ForeignKey]:
        """The foreign keys of `table` (it is the child), other than references to itself."""
        return [fk for fk in self.foreign_keys if fk.child == table and fk.parent != table]

    def references_to(self, table: str) -> list[ForeignKey]:
        """The foreign keys of other tables that reference `table`."""
        return [fk for fk in self.foreign_keys if fk.parent == table and fk.child != table]


def read_catalog(c: psycopg.Connection) -> Catalog:
    """Read the catalog of the connection's database (in the connection's current transaction)."""
    user, db_oid, dbname, can_temp, version = c.execute(_DATABASE).fetchone()
    cat = Catalog(user=user, database=dbname, database_oid=int(db_oid), can_temp=bool(can_temp),
                  server_version=int(version))
    rows = c.execute(_TABLES).fetchall()
    by_oid: dict[int, dict] = {}
    for oid, schema, table, kind, _is_part, parent, owner, owned, s, i, u, d in rows:
        privs = frozenset(p for p, ok in (("SELECT", s), ("INSERT", i), ("UPDATE", u), ("DELETE", d)) if ok)
        by_oid[oid] = dict(oid=oid, schema=schema, table=table, kind=kind, partition_of=parent, owner=owner,
                           owned=bool(owned), privileges=privs, columns=[], primary_key=(), triggers=[], sequences=[])
    oids = list(by_oid)
    names = {oid: display(v["schema"], v["table"]) for oid, v in by_oid.items()}
    for rel, name, typ, generated, identity in c.execute(_COLUMNS, (oids,)).fetchall():
        by_oid[rel]["columns"].append(Column(name, typ, generated == "s", identity or ""))
    for conname, contype, rel, frel, cols, fcols, deltype, _upd, deferrable, parentid in \
            c.execute(_CONSTRAINTS, (oids,)).fetchall():
        if contype == "p":
            by_oid[rel]["primary_key"] = tuple(cols)
        elif not parentid and frel in names:  # a partition's clone of its parent's key is not a key of its own
            cat.foreign_keys.append(ForeignKey(conname, names[rel], tuple(cols), names[frel], tuple(fcols), deltype,
                                               bool(deferrable)))
    for rel, name, enabled, cloned in c.execute(_TRIGGERS, (oids,)).fetchall():
        by_oid[rel]["triggers"].append(Trigger(names[rel], name, enabled, bool(cloned)))
    for rel, schema, name, can_read, can_update in c.execute(_SEQUENCES, (oids, oids)).fetchall():
        by_oid[rel]["sequences"].append(Sequence(schema, name, bool(can_read), bool(can_update)))
    # a partitioned table answers for its partitions: their triggers and sequences act on its rows
    children: dict[str, list[str]] = {}
    for v in by_oid.values():
        if v["partition_of"]:
            children.setdefault(v["partition_of"], []).append(display(v["schema"], v["table"]))

    def all_partitions(name: str) -> list[str]:
        out = []
        for p in children.get(name, []):
            out += [p, *all_partitions(p)]
        return out

    by_name = {names[oid]: v for oid, v in by_oid.items()}
    for name, v in by_name.items():
        parts = all_partitions(name) if v["kind"] == "p" else []
        triggers, seqs = list(v["triggers"]), list(v["sequences"])
        for p in parts:
            triggers += by_name[p]["triggers"]
            seqs += [s for s in by_name[p]["sequences"] if s not in seqs]
        v.update(columns=tuple(v["columns"]), triggers=tuple(triggers), sequences=tuple(seqs), partitions=tuple(parts))
        cat.tables[name] = TableInfo(**v)
    return cat

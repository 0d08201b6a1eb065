"""Which tables move together, worked out from the foreign keys in the catalog.

Choosing a table pulls in two kinds of others:

- **dependent** tables reference a replaced table (directly or through others). The rows the
  recovery removes or changes may be referenced by their rows: through ON DELETE CASCADE they
  would go with them, through SET NULL / SET DEFAULT they would change, and through NO ACTION /
  RESTRICT the key would break. So a dependent table is replaced too: it comes back exactly as
  at T, like the chosen one.
- **needed** tables are referenced by a replaced table's rows (directly or through other needed
  tables). The restored rows need the rows they reference; if the live database lost some of
  them, those rows (and only those) come back from the PTR server. Nothing else in a needed table
  changes: its writes after T are kept.

The operator may narrow the closure (`-name`): an excluded table is left exactly as it is. The
narrowing is checked against the data before anything changes, and refused, naming the
constraint and the rows, if the recovery would break a key of the excluded table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dr.errors import InvalidInput
from dr.tables.catalog import Catalog, ForeignKey

CHOSEN, DEPENDENT, NEEDED = "chosen", "dependent", "needed"

_WHY_DEPENDENT = {
    "CASCADE": "its rows that reference rows the recovery removes would be deleted with them",
    "SET NULL": "its references to rows the recovery removes would be set to NULL",
    "SET DEFAULT": "its references to rows the recovery removes would be set to their default",
    "NO ACTION": "its rows that reference rows the recovery removes would break the key",
    "RESTRICT": "its rows that reference rows the recovery removes would break the key",
}


def parse_choice(tables: list[str] | str | None) -> tuple[list[str], list[str]]:
    """Split the `tables` parameter into (chosen, excluded) names.

    Accepts a list or a comma-separated string; a name starting with `-` narrows the closure.

    Raises:
        InvalidInput: nothing chosen, or a name with characters no table name has here.
    """
    import re

    if tables is None:
        return [], []
    items = [tables] if isinstance(tables, str) else list(tables)
    chosen: list[str] = []
    excluded: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidInput(f"tables must be names, not {item!r}")
        for raw in item.split(","):
            name = raw.strip()
            if not name:
                continue
            target = excluded if name.startswith("-") else chosen
            name = name.lstrip("-").strip()
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?", name):
                raise InvalidInput(f"invalid table name {name!r}: use table or schema.table (letters, digits, _)")
            if name not in target:
                target.append(name)
    if not chosen:
        raise InvalidInput("tables: name at least one table to recover (a leading '-' only narrows the closure)")
    return chosen, excluded


@dataclass(frozen=True)
class Member:
    """One table of the closure (or one the operator excluded from it), with the reason it is in."""

    table: str
    role: str  # chosen | dependent | needed
    reason: str
    via: tuple[ForeignKey, ...] = ()


@dataclass
class Closure:
    """The chosen tables and everything their foreign keys tie to them, in dependency order."""

    chosen: list[str]
    members: dict[str, Member] = field(default_factory=dict)
    excluded: dict[str, Member] = field(default_factory=dict)  # narrowed out: what they would have been
    order: list[str] = field(default_factory=list)  # members, parents before children

    @property
    def replaced(self) -> list[str]:
        """Chosen and dependent tables, parents first: they come back exactly as at T."""
        return [t for t in self.order if self.members[t].role in (CHOSEN, DEPENDENT)]

    @property
    def needed(self) -> list[str]:
        """Tables that only get back the rows the replaced ones need, parents first."""
        return [t for t in self.order if self.members[t].role == NEEDED]

    def lines(self) -> list[str]:
        out = [f"{t} ({self.members[t].role}): {self.members[t].reason}" for t in self.order]
        out += [f"{t} (EXCLUDED by the operator; would be {m.role}): {m.reason}" for t, m in self.excluded.items()]
        return out

    def markdown(self) -> str:
        rows = ["| table | in as | why |", "|---|---|---|"]
        rows += [f"| {t} | {self.members[t].role} | {self.members[t].reason} |" for t in self.order]
        rows += [f"| {t} | excluded (would be {m.role}) | {m.reason} |" for t, m in self.excluded.items()]
        return "\n".join(rows)


def _dependency_order(cat: Catalog, tables: list[str]) -> list[str]:
    """Parents before children (Kahn); tables in a cycle of keys keep name order at the end."""
    inside = set(tables)
    parents = {t: {fk.parent for fk in cat.references_from(t) if fk.parent in inside} for t in tables}
    order: list[str] = []
    ready = sorted(t for t in tables if not parents[t])
    while ready:
        t = ready.pop(0)
        order.append(t)
        for child in sorted(tables):
            if child not in order and child not in ready and t in parents[child]:
                parents[child].discard(t)
                if not parents[child]:
                    ready.append(child)
        ready.sort()
    return order + sorted(t for t in tables if t not in order)


def work_out_closure(cat: Catalog, chosen_names: list[str], excluded_names: list[str] = ()) -> Closure:
    """The closure of the chosen tables in this catalog, less the tables the operator excluded.

    Raises:
        InvalidInput: an unknown table, a table both chosen and excluded, or an exclusion that
            names a table outside the closure.
    """
    chosen = list(dict.fromkeys(cat.resolve(n) for n in chosen_names))
    excluded = list(dict.fromkeys(cat.resolve(n) for n in excluded_names))
    both = sorted(set(chosen) & set(excluded))
    if both:
        raise InvalidInput(f"{', '.join(both)} cannot be both chosen and excluded")
    cl = Closure(chosen=chosen)
    for t in chosen:
        cl.members[t] = Member(t, CHOSEN, "chosen by the operator")
    # the tables that reference replaced ones are replaced too (recursively)
    queue = list(chosen)
    while queue:
        parent = queue.pop(0)
        for fk in cat.references_to(parent):
            child = fk.child
            if child in cl.members:
                continue
            reason = (f"references {parent} through {fk.name} (ON DELETE {fk.action}): "
                      f"{_WHY_DEPENDENT.get(fk.action, 'its rows depend on them')}; replaced with the PTR rows too")
            member = Member(child, DEPENDENT, reason, (fk,))
            if child in excluded:
                cl.excluded.setdefault(child, member)
                continue
            cl.members[child] = member
            queue.append(child)
    # the tables the replaced (and needed) rows reference: only their missing rows come back
    queue = list(cl.members)
    while queue:
        child = queue.pop(0)
        for fk in cat.references_from(child):
            parent = fk.parent
            if parent in cl.members:
                continue
            member = Member(parent, NEEDED,
                            f"rows of {child} reference it through {fk.name}: the referenced rows the live "
                            "database lost after T come back; its other rows and writes after T are kept", (fk,))
            if parent in excluded:
                cl.excluded.setdefault(parent, member)
                continue
            cl.members[parent] = member
            queue.append(parent)
    stray = [t for t in excluded if t not in cl.excluded]
    if stray:
        raise InvalidInput(f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} not in the closure of "
                           f"{', '.join(chosen)} (which is: {', '.join(sorted(cl.members))}): nothing to exclude")
    cl.order = _dependency_order(cat, list(cl.members))
    return cl


def missing_privileges(cat: Catalog, cl: Closure) -> list[str]:
    """The privileges the recovery needs on the live database that its user lacks, each with why."""
    out: list[str] = []
    if not cat.can_temp:
        out.append(f"TEMPORARY on database {cat.database} (rows from the PTR server are staged in temporary tables)")
    for t in cl.order:
        info = cat.tables[t]
        need = ("SELECT", "INSERT", "UPDATE", "DELETE") if cl.members[t].role != NEEDED else ("SELECT", "INSERT")
        lacking = [p for p in need if p not in info.privileges]
        if lacking:
            out.append(f"{', '.join(lacking)} on {t}")
        for s in info.sequences:
            if not s.can_read:
                out.append(f"SELECT on sequence {s.display} (to keep {t}'s ids from going back)")
        firing = info.firing_triggers
        if firing and not info.owned:
            out.append(f"ownership of {t} (owner {info.owner}; GRANT {info.owner} TO {cat.user}): its triggers "
                       f"{', '.join(tr.name for tr in firing)} must not fire on restored rows, and only the owner "
                       "may disable them for the transaction")
    for t in cl.excluded:
        if "SELECT" not in cat.tables[t].privileges:
            out.append(f"SELECT on {t} (to check that excluding it breaks no key)")
    return out

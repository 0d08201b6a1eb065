"""Table-level point-in-time recovery: bring back only the damaged tables from a PTR server.

The data-loss scenario normally swaps the whole database back to time T, losing every write
made after T in every table. With `--tables`, it replaces only the rows of the chosen tables
(and of the tables their foreign keys tie to them) with the rows the PTR server holds, in one
transaction on the live database, and keeps every other table's writes.

- `catalog`: what the catalog says about the tables (columns, keys, foreign keys, triggers,
  sequences, privileges), read once per server.
- `closure`: which tables must move together, and why each is in (`Closure`).
- `compare`: what the recovery would change, by primary key (`ChangeReport`), computed on the
  live server against rows streamed from the PTR server.
- `apply`: the replacement itself, in one transaction, checked before commit.
- `pack`: the reconciliation pack of the post-T writes the replacement discards, and putting
  them back (`dr reconcile`).
"""

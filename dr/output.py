"""People-facing output of the CLI (diagnostics go to logging, not here)."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Sequence

from dr.commands import redact


def say(text: str = "") -> None:
    print(redact(text), flush=True)


def error(text: str) -> None:
    """The one line a refused or failed command ends with (stderr)."""
    print(redact(f"error: {text}"), file=sys.stderr, flush=True)


def note(text: str) -> None:
    """A line about how the command runs, not its result (stderr, so that stdout stays the result)."""
    print(redact(text), file=sys.stderr, flush=True)


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> None:
    rows = [[("" if v is None else str(v)) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    say("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    say("  ".join("-" * w for w in widths))
    for r in rows:
        say("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def kv(pairs: dict[str, Any], indent: int = 0) -> None:
    width = max((len(k) for k in pairs), default=0)
    for k, v in pairs.items():
        if isinstance(v, dict):
            say(" " * indent + f"{k}:")
            kv(v, indent + 2)
        else:
            say(" " * indent + f"{k.ljust(width)}  {v}")


def as_json(obj: Any) -> None:
    say(json.dumps(obj, indent=2, default=str))

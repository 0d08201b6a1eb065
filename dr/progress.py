"""Progress of long byte streams: bytes done of a total, rate and ETA, reported at intervals."""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger("dr.progress")

#: called with (bytes done, estimated total or None, bytes per second)
ProgressHook = Callable[[int, int | None, float], None]

#: hooks every `Progress` also reports to (the CLI adds its progress bar here)
GLOBAL_HOOKS: list[ProgressHook] = []


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class Progress:
    """Counts bytes and reports every `interval` seconds to the log and to hooks."""

    def __init__(self, label: str, total: int | None = None, *, interval: float = 5.0,
                 hooks: list[ProgressHook] | None = None):
        self.label, self.total, self.interval = label, total, interval
        self.hooks = list(hooks or []) + GLOBAL_HOOKS
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.report()

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-6)

    def describe(self) -> str:
        rate = self.rate()
        text = f"{self.label}: {human_bytes(self.done)}"
        if self.total:
            pct = min(100.0, 100.0 * self.done / self.total)
            eta = max(0.0, (self.total - self.done) / rate) if rate > 0 else float("inf")
            text += f" of ~{human_bytes(self.total)} ({pct:.0f}%), ETA {eta:.0f} s"
        return text + f", {human_bytes(rate)}/s"

    def report(self) -> None:
        log.info("%s", self.describe())
        for hook in self.hooks:
            try:
                hook(self.done, self.total, self.rate())
            except Exception:  # a progress display must never break a restore
                log.debug("progress hook failed", exc_info=True)


def terminal_bar(stream=None, width: int = 30) -> ProgressHook:
    """A progress bar on a terminal: `[######......]  45%  120.0 MB of ~260.0 MB  40.0 MB/s  ETA 3 s`."""
    import sys

    out = stream or sys.stderr

    def hook(done: int, total: int | None, rate: float) -> None:
        if total:
            frac = min(1.0, done / total)
            bar = "#" * int(frac * width) + "." * (width - int(frac * width))
            eta = (total - done) / rate if rate > 0 and total > done else 0
            text = f"[{bar}] {frac * 100:3.0f}%  {human_bytes(done)} of ~{human_bytes(total)}  {human_bytes(rate)}/s  ETA {eta:.0f} s"
        else:
            text = f"{human_bytes(done)}  {human_bytes(rate)}/s"
        out.write("\r" + text.ljust(100))
        out.flush()

    return hook

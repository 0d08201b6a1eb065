"""Who holds a recovery slot, and the proof that a holder is dead.

A run that takes an environment's recovery slot records on itself (as Prefect flow-run
labels) the lease it holds and the process that holds it: host name, boot id, pid and the
pid's start time. A run waiting for the slot can then prove a holder dead without waiting
for its lease to expire: its flow run is in a final state, or it ran on this host (same host
name and boot) and that process is gone (no such pid, or the pid now belongs to a process
started at another time: pids are reused).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Optional

LABEL_SLOT = "dr.slot"
LABEL_LEASE = "dr.slot-lease"
LABEL_HOST = "dr.host"
LABEL_BOOT = "dr.boot"
LABEL_PID = "dr.pid"
LABEL_PID_START = "dr.pid-start"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22), '' if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # the command name (field 2) may hold spaces and parentheses: split after its closing one
    return stat.rsplit(")", 1)[-1].split()[19]


def this_process() -> dict[str, str]:
    """The labels naming this process."""
    pid = os.getpid()
    return {LABEL_HOST: socket.gethostname(), LABEL_BOOT: _boot_id(), LABEL_PID: str(pid),
            LABEL_PID_START: _start_time(pid)}


def process_gone(labels: dict[str, Any]) -> Optional[str]:
    """Why the holder's process is provably gone, or None when it may live (or runs on another host)."""
    host, pid = labels.get(LABEL_HOST), labels.get(LABEL_PID)
    if not host or not pid or host != socket.gethostname():
        return None
    boot = labels.get(LABEL_BOOT) or ""
    if boot and _boot_id() and boot != _boot_id():
        return f"it ran on {host} before the machine restarted"
    try:
        pid_n = int(pid)
    except ValueError:
        return None
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return f"its process {pid} on {host} is gone"
    except PermissionError:
        pass  # a process of another user has that pid: its start time tells whether it is the holder
    started = labels.get(LABEL_PID_START) or ""
    if started and _start_time(pid_n) and _start_time(pid_n) != started:
        return f"its process {pid} on {host} is gone (the pid now belongs to another process)"
    return None

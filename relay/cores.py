"""How many cores this process may use: the CPU set it is pinned to, and a container's CPU
quota (cgroup v2 `cpu.max`), whichever is smaller. `os.cpu_count()` sees neither."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
# Past this many, more delivery processes mostly queue for SQLite's one writer at a time.
MAX_AUTO_PROCESSES = 8


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return max(1, cores)


def auto_delivery_processes() -> int:
    """`delivery.processes = "auto"`: one per two cores, at least one. The front door
    takes about a third of a message's CPU and the HTTP side, the event process and SQLite's
    fsyncs want their share; delivery processes beyond that take turns at SQLite's one write
    lock instead of working. On two cores (bench/throughput.py, alternating rounds) one
    delivery process did 10% more than two, at 2.6 ms of CPU per message against 2.9."""
    return max(1, min(usable_cores() // 2, MAX_AUTO_PROCESSES))


def auto_http_processes() -> int:
    """`http.processes = "auto"`: one per core, at most four. A burst of pixel fetches is
    aiohttp's request handling nearly all; the event process writes them at a lower
    priority, so answering comes first when the cores are busy."""
    return max(1, min(usable_cores(), 4))

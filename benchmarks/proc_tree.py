"""A command's process tree and its memory, read from /proc (Ray's processes are children of the driver)."""

from __future__ import annotations

import os
from pathlib import Path


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def title(pid: int) -> str:
    """A process's name as `ps` shows it: Ray's workers retitle themselves `ray::<Actor>`."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = args[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split()[0]
    rest = [a.decode(errors="replace") for a in args[1:] if a]
    name = rest[1] if rest[:1] == ["-m"] and len(rest) > 1 else (rest[0] if rest else "")
    return Path(first).name + (f" {Path(name).name}" if name else "")


def pss_by_title(pids: list[int]) -> dict[str, float]:
    """Summed PSS in MB per process title (e.g. `ray::RayTrainWorker`, `raylet`)."""
    out: dict[str, float] = {}
    for pid in pids:
        name = title(pid)
        out[name] = out.get(name, 0.0) + pss_bytes(pid) / 2**20
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))

"""A command's process tree and its memory, read from /proc (Ray's processes are children of the driver)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def _stat(path: str) -> tuple[str, list[str]]:
    """A /proc stat file: the name (between parentheses; it may hold spaces) and the fields after it
    (fields[0] is the state, fields[1] the parent, fields[3] the session, fields[11:13] user and
    system CPU ticks)."""
    text = Path(path).read_text()
    return text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat(f"/proc/{entry}/stat")[1][1])
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
    """A process's name as `ps` shows it, shortened: Ray's workers retitle themselves
    `ray::<Actor>.<method running>` (kept: `ray::<Actor>`); an interpreter is named with its script
    or module (`python log_monitor.py`, `python benchmarks.gpu`)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = args[0].decode(errors="replace")
    if not first:
        return "?"  # exited: a zombie has no command line
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0]
    name, rest = "", [a.decode(errors="replace") for a in args[1:] if a]
    for i, arg in enumerate(rest):
        if arg in ("-m", "-c"):
            name = rest[i + 1] if arg == "-m" and i + 1 < len(rest) else arg
            break
        if not arg.startswith("-"):
            name = arg
            break
    return Path(first).name + (f" {Path(name).name}" if name else "")


TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) each thread of `pid` has used so far, with the thread's name
    (torch's and Ray's threads name themselves: `pt_autograd_0`, `ray_import_thr`...); {} once gone."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            name, fields = _stat(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / TICKS_PER_S)  # utime, stime
    return out


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid` still running (zombies left out): Ray's daemons stay in the session
    of the process that started them, also once it has exited and they were re-parented."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                state, _, _, session = _stat(f"/proc/{entry}/stat")[1][:4]
                if int(session) == sid and state != "Z":
                    found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def kill(pids: list[int], sig: int = signal.SIGKILL) -> None:
    """Send `sig` to each of `pids`, those already gone skipped."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def busy_cpu_s() -> float | None:
    """CPU-seconds the whole machine has been busy (all processes, kernel included; not idle or
    waiting on I/O), from /proc/stat; None where there is none. Over a timed epoch, divided by its
    items: what an item costs in CPU wherever it was spent (decode workers, Ray's daemons, the consumer),
    a figure that drifts less than items/s on a shared VM."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICKS_PER_S  # less idle and iowait


def cores_busy(window_s: float = 1.0) -> float | None:
    """How many cores were busy on average over the next `window_s` (None without /proc/stat): the
    machine now, where the 1-minute load still carries the last minute."""
    start = busy_cpu_s()
    time.sleep(window_s)
    return None if start is None else (busy_cpu_s() - start) / window_s


def pss_by_title(pids: list[int]) -> dict[str, float]:
    """Summed PSS in MB per process title (e.g. `ray::RayTrainWorker`, `raylet`)."""
    out: dict[str, float] = {}
    for pid in pids:
        name = title(pid)
        out[name] = out.get(name, 0.0) + pss_bytes(pid) / 2**20
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


class Sampler(threading.Thread):
    """Peak count and summed PSS of a process and all its descendants, every `every_s` at most.

    Reading PSS makes the kernel walk each process's page tables: for a Ray tree, whose processes map
    the object store's gigabytes, one sample took ~40 ms of CPU (measured on 2 cores), so sampling every
    0.2 s slowed a streamed epoch by 8 %. The wait is therefore at least `QUIET` times the last sample's
    CPU: the sampler takes at most ~2 % of a core, whatever it measures. `cpu_s`: its CPU in all.
    """

    QUIET = 50

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.every_s = pid, every_s
        self.peak_processes = self.peak_pss = self.samples = 0
        self.cpu_s = 0.0
        self.procs: list[int] = []  # the tree at the last sample
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.thread_time()
            self.sample()
            cost = time.thread_time() - start
            self.cpu_s += cost
            self.samples += 1
            self.stop.wait(max(self.every_s, self.QUIET * cost))

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(timeout=10)

    def sample(self) -> None:
        """One reading of the tree (a subclass adds what else it watches)."""
        procs = self.procs = descendants(self.root)
        self.peak_processes = max(self.peak_processes, len(procs))
        self.peak_pss = max(self.peak_pss, sum(pss_bytes(p) for p in procs))


@dataclass
class SampledRun:
    output: str  # stdout and stderr together
    returncode: int
    start_unix: float
    wall_s: float
    load_before: float
    peak_pss: int
    peak_processes: int


def settle(below: float = 1.0, max_s: float = 180.0) -> None:
    """Wait (at most `max_s`) for the 1-minute load to fall below `below`: a run started right after
    another one would otherwise be measured in the first one's load (the average lags by a minute)."""
    deadline = time.time() + max_s
    if os.getloadavg()[0] >= below:
        print(f"[bench] waiting up to {max_s:.0f} s for the 1-minute load ({os.getloadavg()[0]:.2f}) to fall below {below}",
              flush=True)
    while os.getloadavg()[0] >= below and time.time() < deadline:
        time.sleep(5)


def run_sampled(args: list[str], **popen: object) -> SampledRun:
    """Run a command to its end while sampling its process tree's peak memory (after the load settles)."""
    settle()
    load_before = os.getloadavg()[0]
    start = time.time()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    with Sampler(proc.pid) as sampler:
        output, _ = proc.communicate()
        wall = time.time() - start
    return SampledRun(output, proc.returncode, start, wall, load_before, sampler.peak_pss, sampler.peak_processes)

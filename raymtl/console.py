"""What the user sees while raymtl runs: a quiet console, a progress bar, one-line errors, a log file.

By default Ray's own INFO/WARNING output, worker logs and Python warnings stay off the terminal
(`ray_logging`, `configure`); `--verbose` lets them through. Training progress crosses from the
rank-0 worker to the driver through a small named actor (or, for a run training in the driver's
own process, a board right there): the worker sends its latest step at most every `SEND_EVERY_S`
without waiting for an answer (`ProgressSender`), the driver drains it on a thread and draws one tqdm bar per epoch (`progress`). Everything shown also goes to
`raymtl.log` in the run folder, with full tracebacks; a failure prints as one line naming its
root cause (`error_line`), however deep inside Ray it was raised.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from raymtl import storage
from raymtl.config import ConfigError, Experiment, global_batch, worker_range

LOG_FILE = "raymtl.log"
NAMESPACE = "raymtl"
SEND_EVERY_S = 0.5  # worker -> driver progress updates, at most this often
POLL_S = 0.5  # the driver drains the progress board this often
BAD_IMAGE_HINT = "set data.skip_bad_images: true to drop unreadable rows instead"

_file_log = logging.getLogger("raymtl.logfile")  # the run's log file only, never the terminal
_file_log.propagate = False
_file_log.addHandler(logging.NullHandler())  # no log file yet: drop, never Python's stderr fallback
_state: dict[str, Any] = {"verbose": False, "log_path": None, "bar": None}


# ---------------------------------------------------------------- console mode and log file


def configure(verbose: bool = False) -> None:
    """Quiet (default) or verbose console for this driver process; call before Ray starts.

    Quiet: Python warnings go to the log file only; Ray Data's own error logs are off (the failure
    still reaches the user, as `error_line`).
    """
    _state["verbose"] = verbose
    _file_log.setLevel(logging.DEBUG)
    if not verbose:
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "CRITICAL")  # its errors reach the user as our line
        logging.captureWarnings(True)
        warnings_log = logging.getLogger("py.warnings")
        warnings_log.propagate = False
        for handler in _file_log.handlers:
            warnings_log.addHandler(handler)


def is_verbose() -> bool:
    """Whether the user asked for Ray's own output (`--verbose`)."""
    return _state["verbose"]


def ray_logging() -> dict[str, Any]:
    """`ray.init` keyword arguments for the console mode: Ray's logs and worker output only with --verbose."""
    verbose = is_verbose()
    return {"logging_level": logging.INFO if verbose else logging.ERROR, "log_to_driver": verbose}


def open_log(run_dir: str) -> str:
    """Log to `run_dir/raymtl.log` (a local temp file when `run_dir` is a URI); returns its path."""
    if storage.is_uri(run_dir):
        path = os.path.join(tempfile.gettempdir(), f"raymtl-{os.path.basename(run_dir.rstrip('/'))}.log")
    else:
        path = os.path.join(storage.normalize(run_dir), LOG_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
    for name in (_file_log.name, "py.warnings", "raymtl", "ray"):
        # One handler per logger: Ray restyles the handlers of its own logger.
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger(name).addHandler(handler)
    _file_log.setLevel(logging.DEBUG)
    _state["log_path"] = path
    _file_log.info("raymtl %s", " ".join(sys.argv[1:]))
    return path


def say(message: str) -> None:
    """Print a line for the user (above a live progress bar) and keep it in the log file."""
    bar = _state["bar"]
    if bar is not None and not bar.disable:
        bar.write(message, file=sys.stdout)
    else:
        print(message, flush=True)
    _file_log.info("%s", message)


# ---------------------------------------------------------------- errors


def root_cause(error: BaseException) -> BaseException:
    """The exception a failure started from, under Ray's wrappers (worker groups, tasks, actors).

    The first raymtl ConfigError met on the way down wins: its message was written for users.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    last = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if not _is_ray_wrapper(current):
            last = current
            if isinstance(current, ConfigError):
                return current
        current = _inner(current)
    return last


def _is_ray_wrapper(error: BaseException) -> bool:
    return type(error).__module__.split(".")[0] == "ray"


def _inner(error: BaseException) -> BaseException | None:
    failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError: rank -> error
    if failures:
        return failures[min(failures)]
    for attr in ("controller_failure", "cause"):  # ControllerError, RayTaskError / RayActorError
        inner = getattr(error, attr, None)
        if isinstance(inner, BaseException):
            return inner
    return error.__cause__ or error.__context__


def error_line(error: BaseException) -> str:
    """`raymtl: error: <root cause>`, on one line, with the bad-image hint and the log's path."""
    cause = root_cause(error)
    raised = _raised_in(str(cause)) if _is_ray_wrapper(cause) else None
    if raised:  # the original did not survive pickling (Ray keeps its traceback text only)
        kind, text = raised
        text = text if kind.startswith("raymtl.") else f"{kind.rsplit('.', 1)[-1]}: {text}"
    else:
        text = " ".join(str(cause).split()) or type(cause).__name__
        if not isinstance(cause, ConfigError):
            text = f"{type(cause).__name__}: {text}"
    if "cannot read image" in text and "skip_bad_images" not in text:
        text += f" ({BAD_IMAGE_HINT})"
    if _state["log_path"]:
        text += f" [full log: {_state['log_path']}]"
    return f"raymtl: error: {text}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", re.M)


def _raised_in(traceback_text: str) -> tuple[str, str] | None:
    """(exception type, message) raised in a remote traceback: raymtl's own first, else the first."""
    found = _RAISED.findall(_ANSI.sub("", traceback_text))
    ours = [f for f in found if f[0].startswith("raymtl.")]
    return (ours or found or [None])[0]


def log_error(error: BaseException) -> None:
    """The full traceback (with Ray's wrapped worker tracebacks) into the log file."""
    _file_log.error("%s", "".join(traceback.format_exception(error)))


# ---------------------------------------------------------------- progress: worker side


def board_name(run_dir: str) -> str:
    return f"progress:{run_dir}"


class ProgressSender:
    """Rank 0's end of the progress channel: fire-and-forget pushes, at most every SEND_EVERY_S.

    Without a board (a Tune trial, or a run started without `progress`) every call is a no-op.
    """

    def __init__(self, run_dir: str):
        self.name = board_name(run_dir)
        self._board: Any = None
        self._looked = False
        self._last = 0.0

    def step(self, epoch: int, step: int, steps: int, task: str, loss: Any) -> None:
        """`loss`: the task's `Ewma`, read (a device sync on a GPU) only when the step is sent."""
        now = time.monotonic()
        if step < steps and now - self._last < SEND_EVERY_S:
            return
        self._last = now
        self._push({"kind": "step", "epoch": epoch, "step": step, "steps": steps, "task": task,
                    "loss": loss.value, "time": now})

    def epoch(self, row: dict) -> None:
        self._push({"kind": "epoch", "row": row})

    def _push(self, event: dict) -> None:
        if not self._looked:
            self._looked = True
            self._board = _board_push(self.name)
        if self._board is not None:
            self._board(event)


def _board_push(name: str) -> Callable[[dict], Any] | None:
    """The `push` of the driver's board: in this process (a run training here), else its named
    actor's (fire-and-forget); None without a board."""
    if name in _local_boards:
        return _local_boards[name].push
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray.get_actor(name, namespace=NAMESPACE).push.remote
    except ValueError:
        return None


# ---------------------------------------------------------------- progress: driver side


class Board:
    """The events rank 0 pushed since the driver's last drain."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def push(self, event: dict) -> None:
        self.events.append(event)

    def drain(self) -> list[dict]:
        events, self.events = self.events, []
        return events


_local_boards: dict[str, Board] = {}  # a run training in the driver's process pushes here directly


@contextmanager
def progress(exp: Experiment, run_dir: str, *, local: bool = False) -> Iterator[None]:
    """While the body trains `exp`, draw its progress on the driver: from a board actor (Ray
    already started), or with `local` (the run trains in this process) from a board right here."""
    name = board_name(run_dir)
    if local:
        board = _local_boards[name] = Board()
        drain = board.drain
    else:
        import ray

        actor = ray.remote(num_cpus=0)(Board).options(name=name, namespace=NAMESPACE, get_if_exists=True).remote()
        drain = lambda: ray.get(actor.drain.remote(), timeout=10)  # noqa: E731
    view = ProgressView(exp)
    stop = threading.Event()

    def poll() -> None:
        while True:
            stopping = stop.wait(POLL_S)
            try:
                view.show(drain())
            except Exception as e:  # noqa: BLE001 -- a lost update must never fail the training
                _file_log.debug("progress poll: %r", e)
            if stopping:
                return

    thread = threading.Thread(target=poll, name="raymtl-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)
        view.close()
        if local:
            del _local_boards[name]
        else:
            ray.kill(actor)


class ProgressView:
    """One tqdm bar per epoch (steps, current task, its smoothed loss, samples/s, ETA), a line per epoch."""

    def __init__(self, exp: Experiment, out: Any = None):
        tr = exp.training
        self.epochs = tr.total_epochs
        self.samples_per_step = global_batch(tr, worker_range(tr)[1])  # an elastic run's at its most workers
        self.out = out or sys.stderr
        self.bar: Any = None
        self.epoch = -1
        self.start: tuple[int, float] = (0, 0.0)  # (step, worker time) of the epoch's first event
        self.logged_tenth = -1

    def show(self, events: list[dict]) -> None:
        for event in events:
            if event["kind"] == "step":
                self._step(event)
            else:
                self._epoch_done(event["row"])

    def _step(self, ev: dict) -> None:
        from tqdm import tqdm

        if ev["epoch"] != self.epoch:
            self.close()
            self.epoch, self.start, self.logged_tenth = ev["epoch"], (ev["step"], ev["time"]), -1
            isatty = getattr(self.out, "isatty", lambda: False)()
            self.bar = tqdm(total=ev["steps"], initial=ev["step"], desc=f"epoch {ev['epoch'] + 1}/{self.epochs}",
                            unit="step", file=self.out, disable=not isatty, dynamic_ncols=True, leave=True)
            _state["bar"] = self.bar
        step0, t0 = self.start
        rate = (ev["step"] - step0) * self.samples_per_step / (ev["time"] - t0) if ev["time"] > t0 else 0.0
        loss = f"{ev['loss']:.3f}" if ev["loss"] is not None else "-"
        status = f"{ev['task']} loss~{loss}, {rate:.0f} samples/s" + (", validating" if ev["step"] == ev["steps"] else "")
        self.bar.set_postfix_str(status, refresh=False)
        self.bar.update(ev["step"] - self.bar.n)
        tenth = 10 * ev["step"] // max(1, ev["steps"])
        if tenth > self.logged_tenth:
            self.logged_tenth = tenth
            _file_log.info("epoch %d step %d/%d  %s", ev["epoch"] + 1, ev["step"], ev["steps"], status)

    def _epoch_done(self, row: dict) -> None:
        self.close()
        parts = [f"epoch {row['epoch']}/{self.epochs}"]
        if "val/mean_loss" in row:
            parts.append(f"val loss {row['val/mean_loss']:.4f}, score {row['val/mean_score']:.4f}")
        if "perf/epoch_s" in row:
            parts.append(f"{row['perf/epoch_s']:.1f} s")
        if "perf/samples_per_s" in row:
            parts.append(f"{row['perf/samples_per_s']:.0f} samples/s")
        say("  ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            _state["bar"] = None

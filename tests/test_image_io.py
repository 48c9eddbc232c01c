"""Image reads: URIs and http(s) URLs read concurrently, results in row order, failures named."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raymtl.config import ConfigError, DataSpec, TaskSpec, ViewSpec, load_experiment
from raymtl.data import image_io
from raymtl.data.task_info import TaskInfo
from raymtl.data.transforms import BadImageError, Preprocessor

SIZE = 8
N = 16


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 12), (value, 255 - value, 7)).save(out, format="PNG")
    return out.getvalue()


class _Server(ThreadingHTTPServer):
    """Serves /<i>.png (a solid colour of red value 10*i) after a short delay; counts requests in flight."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = self.requests = 0
        self.bodies = {f"/{i}.png": _png(10 * i) for i in range(N)}


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        s = self.server
        with s.lock:
            s.in_flight += 1
            s.requests += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
        time.sleep(0.05)  # a remote store's round trip: lets concurrent requests overlap
        with s.lock:  # before the reply: a client's next request cannot overlap its last one
            s.in_flight -= 1
        body = s.bodies.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    thread = threading.Thread(target=s.serve_forever, daemon=True)
    thread.start()
    yield s
    s.shutdown()
    s.server_close()


def _url(s: _Server, name: str) -> str:
    return f"http://127.0.0.1:{s.server_address[1]}/{name}"


def _prep(concurrency: int, on_bad: str = "raise") -> Preprocessor:
    task = TaskSpec("color", train=None, image_column="image")
    info = TaskInfo("color", "multiclass", ["a"], N, 0, has_image=True, has_text=False)
    data = DataSpec(image_size=SIZE, views=[ViewSpec("full")], read_concurrency=concurrency)
    return Preprocessor(task, info, data, with_labels=False, on_bad=on_bad)


def _red(view: np.ndarray) -> np.ndarray:
    """Each row's red value (0-255): the uint8 NHWC view's first pixel."""
    assert view.dtype == np.uint8
    return view[:, 0, 0, 0].astype(int)


def test_http_images_are_read_concurrently_and_come_back_in_row_order(server):
    order = np.random.default_rng(0).permutation(N)
    out = _prep(concurrency=8)(pd.DataFrame({"image": [_url(server, f"{i}.png") for i in order]}))
    np.testing.assert_array_equal(_red(out["view_full"]), 10 * order)
    assert server.requests == N
    assert server.max_in_flight > 1  # reads overlapped
    assert server.max_in_flight <= 8  # bounded by data.read_concurrency


def test_one_read_at_a_time_with_concurrency_one(server):
    out = _prep(concurrency=1)(pd.DataFrame({"image": [_url(server, f"{i}.png") for i in range(4)]}))
    np.testing.assert_array_equal(_red(out["view_full"]), 10 * np.arange(4))
    assert server.max_in_flight == 1


def test_a_failed_read_names_its_url(server):
    urls = [_url(server, f"{i}.png") for i in range(6)]
    urls[3] = _url(server, "gone.png")
    with pytest.raises(BadImageError, match=r"task 'color': cannot read image '.*/gone\.png' in column 'image'.*404"):
        _prep(concurrency=4)(pd.DataFrame({"image": urls}))
    out = _prep(concurrency=4, on_bad="mark")(pd.DataFrame({"image": urls}))
    assert [bool(e) for e in out["error"]] == [False, False, False, True, False, False]
    assert "gone.png" in out["error"][3]
    np.testing.assert_array_equal(_red(out["view_full"])[[0, 1, 2, 4, 5]], [0, 10, 20, 40, 50])


def test_read_all_keeps_order_and_returns_each_failure_in_place(tmp_path):
    paths = []
    for i in range(40):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(bytes([i]))
        paths.append(str(p))
    paths[7] = str(tmp_path / "missing.bin")
    results = list(image_io.read_all(paths, concurrency=3))
    assert isinstance(results[7], FileNotFoundError)
    assert [r[0] for i, r in enumerate(results) if i != 7] == [i for i in range(40) if i != 7]
    assert list(image_io.read_all([], concurrency=3)) == []


def test_threaded_reads_hand_their_free_heap_back_when_a_batch_ends(server, monkeypatch):
    """Reader threads allocate in their own malloc arenas: each batch of threaded reads ends with
    `release_free_memory`, also when its consumer stops early (a bad image raised); reads on the
    calling thread need none."""
    urls = [_url(server, f"{i}.png") for i in range(12)]
    calls = []
    monkeypatch.setattr(image_io, "release_free_memory", lambda: calls.append(1))
    assert len(list(image_io.read_all(urls, concurrency=4))) == 12
    assert len(calls) == 1
    reads = image_io.read_all(urls, concurrency=4)
    next(reads)
    reads.close()
    assert len(calls) == 2
    list(image_io.read_all(urls, concurrency=1))
    assert len(calls) == 2
    monkeypatch.undo()
    image_io.release_free_memory()  # the real one runs here (glibc: malloc_trim; else nothing)


def test_local_files_are_read_on_the_calling_thread_until_their_reads_wait(tmp_path, monkeypatch):
    """A local file from the page cache needs no reader thread; a process whose local reads wait (a
    network mount) reads them on the pool from then on, results still in order."""
    paths = []
    for i in range(30):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(bytes([i]))
        paths.append(str(p))
    monkeypatch.setattr(image_io, "local_reads", image_io.LocalReads())  # a fresh process
    threads: list[str] = []
    delay = {"s": 0.0}
    read = image_io.storage.read_bytes

    def timed_read(path: str) -> bytes:
        threads.append(threading.current_thread().name)
        time.sleep(delay["s"])
        return read(path)

    monkeypatch.setattr(image_io.storage, "read_bytes", timed_read)
    here = threading.current_thread().name
    assert [r[0] for r in image_io.read_all(paths[:10], concurrency=4)] == list(range(10))
    assert threads == [here] * 10 and not image_io.local_reads.wait

    threads.clear()
    delay["s"] = 0.01  # a network mount: 10 ms a read
    assert [r[0] for r in image_io.read_all(paths[10:30], concurrency=4)] == list(range(10, 30))
    on_caller = threads.count(here)
    assert image_io.local_reads.wait
    assert 1 <= on_caller <= 12  # until the median of the last reads was slow (16 timed, 10 of them quick)
    assert all(t.startswith("raymtl-image-read") for t in threads[on_caller:])

    threads.clear()
    list(image_io.read_all(paths[:8], concurrency=4))
    assert here not in threads  # the process remembers: straight to the pool
    threads.clear()
    list(image_io.read_all(paths[:8], concurrency=1))
    assert threads == [here] * 8  # concurrency 1: always on the calling thread


def test_read_concurrency_must_be_positive():
    with pytest.raises(ConfigError, match="read_concurrency"):
        load_experiment({"name": "x", "tasks": [{"name": "t", "train": "t.parquet", "image_column": "image"}],
                              "data": {"read_concurrency": 0}})

"""Image reads: URIs and http(s) URLs read concurrently, results in row order, failures named."""

from __future__ import annotations

import dataclasses
import http.client
import io
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raymtl import storage, urls
from raymtl.config import ConfigError, DataSpec, TaskSpec, ViewSpec, load_experiment
from raymtl.data import image_io
from raymtl.data.task_info import TaskInfo
from raymtl.data.transforms import BadImageError, Preprocessor
from raymtl.predict.plan import Input
from raymtl.train.failures import is_permanent

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


def _prep(concurrency: int, on_bad: str = "raise", retried: bool = True) -> Preprocessor:
    task = TaskSpec("color", train=None, image_column="image")
    info = TaskInfo("color", "multiclass", ["a"], N, 0, has_image=True, has_text=False)
    data = DataSpec(image_size=SIZE, views=[ViewSpec("full")], read_concurrency=concurrency)
    return Preprocessor(task, info, data, with_labels=False, on_bad=on_bad, retried=retried)


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


class _Replies:
    """A scripted HTTP layer (`urls._request`, no network): each GET of a path gets the next (status, Retry-After)
    of its script, the last one repeating; a 200 carries a PNG of red value 10 * its digit. Counts the requests
    and records the backoff's waits instead of sleeping."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[tuple[int, str | None]]] = {}
        self.requests: Counter[str] = Counter()
        self.waits: list[float] = []

    def request(self, parts, timeout: float) -> tuple[int, str, http.client.HTTPMessage, bytes]:
        self.requests[parts.path] += 1
        script = self.scripts.get(parts.path, [(200, None)])
        status, retry_after = script[min(self.requests[parts.path], len(script)) - 1]
        headers = http.client.HTTPMessage()
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        body = _png(10 * int(parts.path[1:].removesuffix(".png"))) if status == 200 else b""
        return status, http.client.responses[status], headers, body


@pytest.fixture
def replies(monkeypatch) -> _Replies:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):  # a proxy of the box running the tests
        monkeypatch.delenv(name, raising=False)
    fake = _Replies()
    monkeypatch.setattr(urls, "_request", fake.request)
    monkeypatch.setattr(storage, "RETRY", dataclasses.replace(storage.RETRY, sleep=fake.waits.append))
    return fake


def _cdn(i: int) -> str:
    return f"https://cdn.example/{i}.png"


@pytest.mark.parametrize("on_bad", ["mark", "skip"])
def test_a_throttled_or_unavailable_read_is_retried_and_its_row_kept(replies, on_bad):
    replies.scripts["/2.png"] = [(503, None), (200, None)]
    replies.scripts["/4.png"] = [(429, "1"), (429, "1"), (200, None)]
    out = _prep(concurrency=4, on_bad=on_bad)(pd.DataFrame({"image": [_cdn(i) for i in range(6)]}))
    np.testing.assert_array_equal(_red(out["view_full"]), 10 * np.arange(6))  # no row dropped
    if on_bad == "mark":
        assert list(out["error"]) == [""] * 6
    assert replies.requests["/2.png"] == 2 and replies.requests["/4.png"] == 3
    backoff, *retry_after = sorted(replies.waits)
    assert 0.25 <= backoff <= 0.5 and retry_after == [1.0, 1.0]  # half to all of base_delay_s; the server's word


def test_a_missing_image_is_bad_at_once_without_a_retry(replies):
    replies.scripts["/3.png"] = [(404, None)]
    out = _prep(concurrency=4, on_bad="mark")(pd.DataFrame({"image": [_cdn(i) for i in range(5)]}))
    assert [bool(e) for e in out["error"]] == [False, False, False, True, False]
    assert "HTTP 404" in out["error"][3] and "/3.png" in out["error"][3]
    assert replies.requests["/3.png"] == 1 and replies.waits == []


@pytest.mark.parametrize("on_bad", ["mark", "skip", "raise"])  # training marks bad rows with skip_bad_images
def test_a_read_that_keeps_failing_fails_the_task_as_retryable_not_as_a_bad_image(replies, on_bad):
    """In training, after the retries the decode fails with an error naming the URL and its last status; no row
    is marked or dropped, and it is no data error: `training.max_failures` resumes the run from its checkpoint."""
    replies.scripts["/1.png"] = [(503, None)]
    with pytest.raises(storage.TransientReadError) as raised:
        _prep(concurrency=4, on_bad=on_bad)(pd.DataFrame({"image": [_cdn(i) for i in range(4)]}))
    assert "https://cdn.example/1.png" in str(raised.value) and "HTTP 503" in str(raised.value)
    assert not is_permanent(raised.value)
    policy = storage.RETRY
    assert replies.requests["/1.png"] == policy.attempts
    assert len(replies.waits) == policy.attempts - 1 and sum(replies.waits) <= policy.max_total_wait_s


def test_prediction_writes_a_read_that_keeps_failing_as_its_rows_error(replies):
    """Prediction has no checkpoint to retry from: its preprocessor (an input's, from the plan) keeps the row
    with its error, rows in = rows out."""
    replies.scripts["/1.png"] = [(503, None)]
    prep = Input("image", "image", ("color",)).preprocessor(DataSpec(image_size=SIZE, read_concurrency=4))
    out = prep(pd.DataFrame({"image": [_cdn(i) for i in range(4)]}))
    assert [bool(e) for e in out["error"]] == [False, True, False, False]
    assert "cannot read image" in out["error"][1] and "HTTP 503" in out["error"][1]
    assert replies.requests["/1.png"] == storage.RETRY.attempts


def test_retry_after_is_honoured_up_to_the_cap_and_the_waits_are_bounded(replies, monkeypatch):
    replies.scripts["/7.png"] = [(429, "3"), (503, "120"), (200, None)]
    assert storage.read_bytes(_cdn(7)) == _png(70)
    assert replies.waits == [3.0, storage.RETRY.max_delay_s]

    replies.waits.clear()
    monkeypatch.setattr(storage, "RETRY", dataclasses.replace(storage.RETRY, max_total_wait_s=12.0))
    replies.scripts["/8.png"] = [(503, "10")]
    with pytest.raises(storage.TransientReadError, match=r"failed 3 times over 12\.0 s"):
        storage.read_bytes(_cdn(8))
    assert replies.waits == [10.0, 2.0]  # the last wait cut to what the budget had left


@pytest.mark.parametrize("error, transient", [
    (OSError("When reading information for key 'a.png' in bucket 'b': AWS Error SLOW_DOWN during HeadObject "
             "operation: Please reduce your request rate."), True),
    (OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 28, Timeout was reached"), True),
    (OSError("AWS Error UNKNOWN (HTTP status 503) during GetObject operation: No response body."), True),
    (OSError("google::cloud::Status(UNAVAILABLE: Retry policy exhausted in GetObjectMetadata)"), True),
    (OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body."), False),
    (OSError("AWS Error UNKNOWN (HTTP status 400) during HeadObject operation: No response body."), False),
    (FileNotFoundError("Path does not exist 'b/a.png'"), False),
    (urls.GetError("HTTP 503 Service Unavailable: https://x/a.png", transient=True), True),
    (urls.GetError("HTTP 403 Forbidden: https://x/a.png"), False),
])
def test_object_store_failures_that_may_pass_are_told_from_the_image_s_own(error, transient):
    assert storage.is_transient(error) is transient


def test_a_local_file_that_is_missing_is_not_retried(tmp_path, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(storage, "RETRY", dataclasses.replace(storage.RETRY, sleep=waits.append))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "gone.png"))
    assert waits == []

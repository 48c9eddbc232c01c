"""http(s) reads: one kept-alive connection per host and thread, reopened when the server closed it,
redirects followed, failures naming the URL and saying whether a retry may help."""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from raymtl import storage, urls


class _Server(ThreadingHTTPServer):
    """HTTP/1.1 (keep-alive) server of /<i> -> b"body <i>"; counts the connections it accepts."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.connections = self.requests = 0
        self.drop_after_reply = False  # close the connection without telling the client (an idle timeout)

    def process_request(self, request, client_address) -> None:
        self.connections += 1
        super().process_request(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        self.server.requests += 1
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/7")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.endswith("/busy"):  # a throttled CDN: come back in 7 s
            self.send_response(503)
            self.send_header("Retry-After", "7")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        name = self.path.rsplit("/", 1)[-1]  # a proxy is asked for the whole URL
        found = name.isdigit()
        body = f"body {name}".encode() if found else b"no"
        self.send_response(200 if found else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = self.server.drop_after_reply

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(monkeypatch) -> Iterator[_Server]:
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):  # a proxy of the box running the tests
        monkeypatch.delenv(name, raising=False)
    s = _Server()
    thread = threading.Thread(target=s.serve_forever, daemon=True)
    thread.start()
    urls._local.__dict__.clear()  # no connection kept from another test's server
    yield s
    urls._local.__dict__.clear()
    s.shutdown()
    s.server_close()


def _url(s: _Server, path: str) -> str:
    return f"http://127.0.0.1:{s.server_address[1]}/{path}"


def test_reads_of_one_host_share_one_connection(server):
    assert [storage.read_bytes(_url(server, str(i))) for i in range(10)] == [f"body {i}".encode() for i in range(10)]
    assert server.requests == 10 and server.connections == 1


def test_a_connection_the_server_closed_is_reopened_once(server):
    server.drop_after_reply = True  # every reply's connection dies silently: each next read finds it closed
    assert [urls.get(_url(server, str(i))) for i in range(4)] == [f"body {i}".encode() for i in range(4)]
    assert server.connections == 4


def test_redirects_are_followed_and_failures_name_the_url(server):
    assert urls.get(_url(server, "moved")) == b"body 7"
    with pytest.raises(OSError, match=r"HTTP 404 Not Found: http://127\.0\.0\.1:\d+/missing") as missing:
        urls.get(_url(server, "missing"))
    assert not missing.value.transient
    with pytest.raises(urls.GetError, match=r"HTTP 503 Service Unavailable: http://127\.0\.0\.1:\d+/busy") as busy:
        urls.get(_url(server, "busy"))
    assert busy.value.transient and busy.value.retry_after == 7.0
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    urls._local.__dict__.clear()
    with pytest.raises(OSError, match=rf"ConnectionRefusedError .*: http://127\.0\.0\.1:{port}/1") as refused:
        urls.get(f"http://127.0.0.1:{port}/1")
    assert refused.value.transient


def test_each_thread_keeps_its_own_connection(server):
    def read() -> None:
        for i in range(5):
            assert urls.get(_url(server, str(i))) == f"body {i}".encode()

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.requests == 15 and server.connections == 3


def test_a_proxy_from_the_environment_is_used(server, monkeypatch):
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.server_address[1]}")
    assert urls.get("http://catalogue.invalid/images/3") == b"body 3"  # a host only the proxy reaches
    with pytest.raises(urls.GetError, match=r"HTTP 503 .*: http://catalogue\.invalid/busy") as busy:
        urls.get("http://catalogue.invalid/busy")
    assert busy.value.transient and busy.value.retry_after == 7.0


@pytest.mark.parametrize("header, seconds", [("7", 7.0), (" 120 ", 120.0), ("-3", None), ("soon", None), (None, None)])
def test_retry_after_in_seconds(header, seconds):
    assert urls._seconds(header) == seconds


def test_retry_after_as_a_date():
    assert 25 <= urls._seconds(email.utils.formatdate(time.time() + 30, usegmt=True)) <= 30
    assert urls._seconds(email.utils.formatdate(time.time() - 30, usegmt=True)) == 0.0  # already past

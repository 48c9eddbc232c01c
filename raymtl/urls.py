"""http(s) reads over kept-alive connections, one per host and reader thread.

A catalogue's image URLs (a CDN, presigned object-store URLs) mostly share one host. urllib opens a
new connection for every URL: a TCP handshake, and for https a TLS one, before each image, which on
a 20-60 ms link doubles or triples the time per read and costs CPU on both ends. Here each reader
thread keeps one HTTP/1.1 connection per host and reuses it; a connection the server has closed
meanwhile is reopened once (GET is idempotent). Proxies from the environment (`https_proxy`...)
are honoured by handing such URLs to urllib.
"""

from __future__ import annotations

import http.client
import threading
from urllib.parse import urljoin, urlsplit
from urllib.request import ProxyHandler, build_opener, getproxies, proxy_bypass

TIMEOUT_S = 60.0
MAX_REDIRECTS = 5
_REDIRECTS = {301, 302, 303, 307, 308}
_MAX_HOSTS = 32  # connections one thread keeps open at most
_local = threading.local()


def get(url: str, timeout: float = TIMEOUT_S) -> bytes:
    """The body of a GET of `url` (redirects followed); failures raise OSError naming the URL."""
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if _proxied(parts.scheme, parts.hostname or ""):  # urlopen's opener keeps the proxies of its first use
            with build_opener(ProxyHandler(getproxies())).open(url, timeout=timeout) as response:
                return response.read()
        status, reason, location, body = _request(parts, timeout)
        if status == 200:
            return body
        if status in _REDIRECTS and location:
            url = urljoin(url, location)
            continue
        raise OSError(f"HTTP {status} {reason}: {url}")
    raise OSError(f"more than {MAX_REDIRECTS} redirects: {url}")


def _request(parts, timeout: float) -> tuple[int, str, str | None, bytes]:
    """(status, reason, Location header, body) over this thread's connection to the URL's host."""
    key = (parts.scheme.lower(), parts.netloc)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    reused = key in _connections()
    while True:
        conn = _connection(key, timeout)
        try:
            conn.request("GET", target, headers={"User-Agent": "raymtl"})
            response = conn.getresponse()
            body = response.read()
        except (http.client.HTTPException, OSError) as e:
            _drop(key)
            if reused and not isinstance(e, TimeoutError):
                reused = False  # the server closed the idle connection (a reset, an EOF): once more on a fresh one
                continue
            raise OSError(f"{e.__class__.__name__} {e}: {parts.geturl()}") from e
        if response.will_close:
            _drop(key)
        return response.status, response.reason, response.getheader("Location"), body


def _connections() -> dict[tuple[str, str], http.client.HTTPConnection]:
    if not hasattr(_local, "connections"):
        _local.connections = {}
    return _local.connections


def _connection(key: tuple[str, str], timeout: float) -> http.client.HTTPConnection:
    connections = _connections()
    if key not in connections:
        if len(connections) >= _MAX_HOSTS:
            _drop(next(iter(connections)))
        scheme, netloc = key
        if scheme == "https":
            connections[key] = http.client.HTTPSConnection(netloc, timeout=timeout)
        else:
            connections[key] = http.client.HTTPConnection(netloc, timeout=timeout)
    return connections[key]


def _drop(key: tuple[str, str]) -> None:
    conn = _connections().pop(key, None)
    if conn is not None:
        conn.close()


def _proxied(scheme: str, host: str) -> bool:
    return scheme.lower() in getproxies() and not proxy_bypass(host)

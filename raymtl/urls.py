"""http(s) reads over kept-alive connections, one per host and reader thread.

A catalogue's image URLs (a CDN, presigned object-store URLs) mostly share one host. urllib opens a
new connection for every URL: a TCP handshake, and for https a TLS one, before each image, which on
a 20-60 ms link doubles or triples the time per read and costs CPU on both ends. Here each reader
thread keeps one HTTP/1.1 connection per host and reuses it; a connection the server has closed
meanwhile is reopened once (GET is idempotent). Proxies from the environment (`https_proxy`...)
are honoured by handing such URLs to urllib.

Failures raise `GetError`, which says whether a later try may succeed (`transient`: throttling, a 5xx,
a dropped connection, a timeout) and how long the server asked to wait (Retry-After): the caller
(`raymtl.storage.read_bytes`) retries those and keeps the rest (404, 403...) as the image's fault.
"""

from __future__ import annotations

import email.utils
import http.client
import socket
import threading
import time
from urllib.error import HTTPError, URLError
from urllib.parse import urljoin, urlsplit
from urllib.request import ProxyHandler, build_opener, getproxies, proxy_bypass

TIMEOUT_S = 60.0
MAX_REDIRECTS = 5
_REDIRECTS = {301, 302, 303, 307, 308}
_MAX_HOSTS = 32  # connections one thread keeps open at most
# Replies that say "not now" rather than "not this URL": timeout, too early, throttled, server-side faults.
TRANSIENT_STATUSES = frozenset({408, 425, 429, *range(500, 600)})
_local = threading.local()


class GetError(OSError):
    """A failed GET, naming the URL. `transient`: a later try may succeed; `retry_after`: the seconds
    the server asked to wait (its Retry-After), None when it sent none that parses."""

    def __init__(self, message: str, transient: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)  # defaults: an unpickled copy is rebuilt from the message, then its attributes
        self.transient = transient
        self.retry_after = retry_after


def get(url: str, timeout: float = TIMEOUT_S) -> bytes:
    """The body of a GET of `url` (redirects followed); failures raise `GetError`."""
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if _proxied(parts.scheme, parts.hostname or ""):
            return _get_proxied(url, timeout)
        status, reason, headers, body = _request(parts, timeout)
        if status == 200:
            return body
        if status in _REDIRECTS and headers.get("Location"):
            url = urljoin(url, headers["Location"])
            continue
        raise _status_error(status, reason, headers.get("Retry-After"), url)
    raise GetError(f"more than {MAX_REDIRECTS} redirects: {url}")


def _get_proxied(url: str, timeout: float) -> bytes:
    """A GET through the environment's proxy by urllib (an opener per call: urlopen's keeps the proxies of its
    first use)."""
    try:
        with build_opener(ProxyHandler(getproxies())).open(url, timeout=timeout) as response:
            return response.read()
    except HTTPError as e:
        raise _status_error(e.code, e.reason, e.headers.get("Retry-After"), url) from e
    except (http.client.HTTPException, OSError) as e:
        cause = e.reason if isinstance(e, URLError) and isinstance(e.reason, BaseException) else e
        raise GetError(f"{cause.__class__.__name__} {cause}: {url}", transient=_transient(cause)) from e


def _status_error(status: int, reason: str, retry_after: str | None, url: str) -> GetError:
    return GetError(f"HTTP {status} {reason}: {url}", status in TRANSIENT_STATUSES, _seconds(retry_after))


def _seconds(retry_after: str | None) -> float | None:
    """A Retry-After header (delay-seconds or an HTTP date) as seconds from now; None when absent or unreadable."""
    value = (retry_after or "").strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())  # a date without a zone is read as local time


def _transient(error: BaseException) -> bool:
    """Whether a transport failure may pass: a reset or refused connection, a timeout, a truncated reply, a
    name lookup the resolver could not answer now (not a name that does not exist, nor a TLS failure)."""
    if isinstance(error, socket.gaierror):
        return error.errno == socket.EAI_AGAIN
    return isinstance(error, (ConnectionError, TimeoutError, http.client.IncompleteRead))


def _request(parts, timeout: float) -> tuple[int, str, http.client.HTTPMessage, bytes]:
    """(status, reason, headers, body) over this thread's connection to the URL's host."""
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
            raise GetError(f"{e.__class__.__name__} {e}: {parts.geturl()}", transient=_transient(e)) from e
        if response.will_close:
            _drop(key)
        return response.status, response.reason, response.headers, body


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

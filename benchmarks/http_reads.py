"""Image URL reads: a new connection per image (urllib) against raymtl's kept-alive connections.

    python -m benchmarks.http_reads --json benchmarks/results/http_reads.json

A catalogue on a CDN or behind presigned URLs is read over https. A new connection per image costs
a TCP handshake and a TLS one (round trips, and CPU on both ends: key exchange, certificate
checks, a fresh TLS context) before each read; raymtl keeps one connection per host and reader
thread (`raymtl.urls`). Here a server process on 127.0.0.1 serves `--items` of the ingest
benchmark's JPEGs (its catalogue, generated there once) over http and over https (a self-signed certificate the client trusts),
HTTP/1.1 with keep-alive as an object store does; the client reads them all with `--threads`
reads in flight (a decode task's `data.read_concurrency`), once per way. Loopback has no round
trip, so what this shows is the CPU: client CPU-ms per image (what a decode task's slot pays
beside the ~7 ms of decoding), the server's, and the connections opened. On a real link each new
connection also waits 1 (http) or 2-3 (https) extra round trips.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.request import urlopen

from benchmarks.ingest import catalogue

ROOT = Path(__file__).resolve().parent.parent


def write_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the client trusts it through SSL_CERT_FILE)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def serve(folder: Path, port_file: Path, cert: Path | None, key: Path | None) -> None:
    """Serve `folder` on 127.0.0.1 (https when given a certificate), HTTP/1.1; counts connections."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Handler(SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # socketserver's 5 drops connections under many reads in flight
        connections = 0

        def process_request(self, request, client_address) -> None:
            Server.connections += 1
            super().process_request(request, client_address)

    server = Server(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
    if cert is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)  # handshakes in the connection's thread, not the accept loop
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    port_file.with_suffix(".tmp").write_text(str(server.server_address[1]))
    port_file.with_suffix(".tmp").rename(port_file)
    start_cpu = time.process_time()

    def report(*_) -> None:  # the parent asks for the counts before it stops the server
        counts = {"connections": Server.connections, "cpu_s": time.process_time() - start_cpu}
        port_file.with_suffix(".part").write_text(json.dumps(counts))
        port_file.with_suffix(".part").rename(port_file.with_suffix(".json"))

    signal.signal(signal.SIGUSR1, report)
    server.serve_forever()


def read_all(urls: list[str], threads: int, way: str) -> dict:
    """Read every URL with `threads` in flight; wall, client CPU, bytes."""
    from raymtl import urls as kept_alive

    def new_connection(url: str) -> bytes:
        with urlopen(url, timeout=60) as response:
            return response.read()

    read = new_connection if way == "new_connection" else kept_alive.get
    cpu, start = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        nbytes = sum(len(b) for b in pool.map(read, urls))
    return {"seconds": time.perf_counter() - start, "client_cpu_s": time.process_time() - cpu, "bytes": nbytes}


def measure(folder: Path, names: list[str], scheme: str, way: str, threads: int, work: Path) -> dict:
    cert = key = None
    if scheme == "https":
        cert, key = work / "cert.pem", work / "key.pem"
    port_file = work / f"port-{scheme}-{way}"
    args = [sys.executable, "-m", "benchmarks.http_reads", "--serve", str(folder), "--port-file", str(port_file)]
    server = subprocess.Popen(args + (["--cert", str(cert), "--key", str(key)] if cert else []), cwd=ROOT)
    try:
        while not port_file.exists():
            time.sleep(0.05)
        base = f"{scheme}://127.0.0.1:{port_file.read_text()}"
        load = os.getloadavg()[0]
        run = read_all([f"{base}/{n}" for n in names], threads, way)
        server.send_signal(signal.SIGUSR1)
        counts = port_file.with_suffix(".json")
        while not counts.exists():
            time.sleep(0.05)
        served = json.loads(counts.read_text())
    finally:
        server.terminate()
        server.wait()
    n = len(names)
    return {"items": n, "items_per_s": round(n / run["seconds"], 1),
            "client_cpu_ms_per_item": round(1e3 * run["client_cpu_s"] / n, 3),
            "server_cpu_ms_per_item": round(1e3 * served["cpu_s"] / n, 3), "connections": served["connections"],
            "kb_per_item": round(run["bytes"] / n / 1e3, 1), "load_1min_before": round(load, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--threads", type=int, default=32, help="reads in flight (data.read_concurrency)")
    p.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "raymtl-ingest",
                   help="the ingest benchmark's catalogue folder (its images are made there if missing)")
    p.add_argument("--json", type=Path)
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cert", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--key", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(args.serve, args.port_file, args.cert, args.key)
    names = catalogue(args.data_dir, args.items, os.cpu_count() or 1)
    result = {"benchmark": "http_reads", "items": args.items, "threads": args.threads, "cpu_count": os.cpu_count(),
              "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cert, _ = write_certificate(work)
        os.environ["SSL_CERT_FILE"] = str(cert)  # read by every default TLS context the client makes
        for scheme in ("http", "https"):
            for way in ("new_connection", "kept_alive"):
                run = measure(args.data_dir, names, scheme, way, args.threads, work)
                result["runs"][f"{scheme}_{way}"] = run
                print(scheme, way, run, flush=True)
    for scheme in ("http", "https"):
        new, kept = result["runs"][f"{scheme}_new_connection"], result["runs"][f"{scheme}_kept_alive"]
        result[f"{scheme}_client_cpu_saved_ms_per_item"] = round(
            new["client_cpu_ms_per_item"] - kept["client_cpu_ms_per_item"], 3)
    result["load_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Image URL reads: a new connection per image (urllib) against raymtl's kept-alive connections.

    python -m benchmarks.http_reads --json benchmarks/results/http_reads.json

A catalogue on a CDN or behind presigned URLs is read over https. A new connection per image costs
a TCP handshake and a TLS one (round trips, and CPU on both ends: key exchange, certificate
checks, a fresh TLS context) before each read; raymtl keeps one connection per host and reader
thread (`raymtl.urls`). Here the ingest benchmark's server process on 127.0.0.1 serves `--items` of the ingest
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
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.request import urlopen

from benchmarks.ingest import catalogue, image_server
from raymtl import urls


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


def read_all(addresses: list[str], threads: int, way: str) -> dict:
    """Read every URL with `threads` in flight; wall, client CPU, bytes."""

    def new_connection(url: str) -> bytes:
        with urlopen(url, timeout=60) as response:
            return response.read()

    read = new_connection if way == "new_connection" else urls.get
    cpu, start = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        nbytes = sum(len(b) for b in pool.map(read, addresses))
    return {"seconds": time.perf_counter() - start, "client_cpu_s": time.process_time() - cpu, "bytes": nbytes}


def measure(folder: Path, names: list[str], scheme: str, way: str, threads: int, work: Path) -> dict:
    tls = {"cert": work / "cert.pem", "key": work / "key.pem"} if scheme == "https" else {}
    with image_server(folder, work / f"port-{scheme}-{way}", **tls) as (port, counts):
        load = os.getloadavg()[0]
        run = read_all([f"{scheme}://127.0.0.1:{port}/{n}" for n in names], threads, way)
        served = counts()
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
    args = p.parse_args()
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

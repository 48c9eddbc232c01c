"""Ingest alone: decoded items/s of raymtl's data path against the box's decode limit, no model step.

    python -m benchmarks.ingest --json benchmarks/results/ingest.json [--items 20000] [--data-dir DIR] [--epochs 1]
                                [--modes ...] [--rounds 1]

A generated catalogue of real JPEG files (600-1,000 px, smooth shapes under pixel noise so they do not
compress to nothing; cached in --data-dir between runs, read into the page cache before each mode),
split over 3 tasks; every mode turns each image into two 224 px uint8 views (full + centre crop 0.6), as fast
as it can, on the same cores:

  pil_limit      the decode + crop + resize work alone, one process per core: the box's limit
  dataloader     a torch DataLoader (workers = cores, pinned where CUDA is), the same PIL work to uint8
  stream         raymtl's own data path, `data.cache: never`: one epoch of the rank's plan, its decode workers
                 warmed first as the training loop warms them while it builds its model (`warm_s`), and
                 the seconds to its first batch
  stream_remote  the same images over HTTP from a local server (127.0.0.1) that adds --delay-ms to every
                 request, read concurrently inside each decode task (`data.read_concurrency`)
  stream_quarter `stream` over a quarter of the items: a streamed epoch's peak memory must not grow
                 with the items (memory_bounded = peak PSS of stream / stream_quarter)
  cache_w1/_w2   `data.cache: always`: cache build time, bytes per cached item, then an epoch read by 1
                 and by 2 Ray Train workers (items/s over all workers; peak PSS of the process tree)

With --rounds N the --modes run N times, forward then backward in turn, and each ratio is its median
over the rounds (`ratios_by_round` keeps every round's): both sides of a ratio are then measured within
minutes of each other, while this VM's rates drift by up to 15 % between runs. `cpu_ms_per_item` is the
whole machine's busy CPU over a mode's timed (first) epoch per item: what an item costs wherever it was
spent (decode workers, Ray's daemons, the consumer).

With --epochs N, `dataloader` and `stream` read N epochs in their one process: items/s is still the
first epoch's (a run's start-up in it), `epochs_items_per_s` every epoch's, and the ratio
`stream/dataloader_later_epochs` compares the epochs after the first, what a training run's other
epochs cost (the decode workers started and warm, a DataLoader's workers forked again per epoch).

The raymtl modes read batches as the training loop does, up to the device: on a GPU they are
finished there (normalised float32, as in training); on a CPU-only box they stop at the hand-off to
the device (uint8, as the PIL modes stop), and `cpu_normalise` in the JSON is that finishing work
measured apart (on a CPU it would take the decoders' cores, a GPU does it on the device).
Each mode runs in a fresh subprocess (its own Ray cluster where it uses one); the parent samples the
summed PSS of the child's whole process tree (`proc_tree`) and the 1-minute load before and after.
`library_epoch`, `cached_bytes` and `cpu_normalise` are the only places that know raymtl's data API.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.proc_tree import Sampler, busy_cpu_s, settle

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("color", "pattern", "season")
LABELS = 5
SIZE, CROP, BATCH = 224, 0.6, 64
MODES = ("pil_limit", "dataloader", "stream", "stream_remote", "stream_quarter", "cache_w1", "cache_w2")
FLOAT32_BYTES_PER_ITEM = 2 * 3 * SIZE * SIZE * 4  # two normalised float32 views: the old cached item
TARGETS = {"stream/dataloader": 1.0, "stream/dataloader_later_epochs": 1.0, "stream/pil_limit": 0.85,
           "stream_remote/stream": 0.8, "cached_bytes/float32": 0.26, "pss_w2/pss_w1": 1.3, "memory_bounded": 1.2}


# ---------------------------------------------------------------- the catalogue


def _make_jpeg(args: tuple[int, str]) -> int:
    """Image `i`: blocky random colour field upsampled (shapes, edges) under +-20 pixel noise, q=85."""
    from PIL import Image

    i, path = args
    if os.path.exists(path):
        return 0
    rng = np.random.default_rng(i)
    w, h = (int(x) for x in rng.integers(600, 1001, 2))
    field = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    pixels = np.asarray(field).astype(np.int16) + rng.integers(-20, 21, (h, w, 3), dtype=np.int16)
    tmp = f"{path}.tmp"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp, format="JPEG", quality=85)
    os.replace(tmp, path)
    return 1


def catalogue(data_dir: Path, items: int, cores: int) -> list[str]:
    """The first `items` images (generated once, kept in `data_dir/images`), as relative paths."""
    import multiprocessing as mp

    folder = data_dir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"images/{i // 1000:03d}/{i:07d}.jpg" for i in range(items)]
    for sub in {Path(n).parent for n in names}:
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with mp.get_context("fork").Pool(cores) as pool:
        made = sum(pool.imap_unordered(_make_jpeg, [(i, str(data_dir / n)) for i, n in enumerate(names)], chunksize=16))
    if made:
        print(f"[ingest] generated {made} JPEGs in {time.perf_counter() - start:.0f} s", flush=True)
    return names


def into_page_cache(data_dir: Path, names: list[str]) -> float:
    """Read every image once, so that the mode about to start reads them from memory. This VM pages
    out what was not touched for a minute (DAMON), so between modes the catalogue leaves the page
    cache, and a mode would read part of its first epoch from disk (a pil_limit once ran at half its
    rate). Returns the seconds it took: ~6 s from memory, ~80 s from disk for 20,000 images."""
    start = time.perf_counter()
    for name in names:
        with open(data_dir / name, "rb") as f:
            while f.read(1 << 22):
                pass
    return time.perf_counter() - start


def write_tables(folder: Path, names: list[str], prefix: str) -> dict[str, str]:
    """One parquet table per task, the items dealt round-robin; image column = prefix + name."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for t, task in enumerate(TASKS):
        mine = names[t :: len(TASKS)]
        frame = pd.DataFrame({"id": mine, "image": [prefix + n for n in mine],
                              "label": [f"l{k % LABELS}" for k in range(len(mine))]})
        paths[task] = str(folder / f"{task}.parquet")
        frame.to_parquet(paths[task], index=False)
    return paths


# ---------------------------------------------------------------- plain PIL work (pil_limit, dataloader)


def pil_views(path: str) -> np.ndarray:
    """The decode + crop + resize work of one item, as raymtl does it: uint8 [2, S, S, 3]."""
    from PIL import Image

    with open(path, "rb") as f:
        image = Image.open(io.BytesIO(f.read()))
    image.draft("RGB", (int(np.ceil(SIZE / CROP)),) * 2)
    image = image.convert("RGB")
    out = np.empty((2, SIZE, SIZE, 3), np.uint8)
    w, h = image.size
    for k, crop in enumerate((1.0, CROP)):
        side = max(1, round(min(w, h) * crop))
        left, top = (w - side) // 2, (h - side) // 2
        out[k] = np.asarray(image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.BILINEAR))
    return out


def _pil_chunk(paths: list[str]) -> int:
    for p in paths:
        pil_views(p)
    return len(paths)


def run_pil_limit(paths: list[str], cores: int) -> dict:
    import multiprocessing as mp

    chunks = [paths[i : i + 32] for i in range(0, len(paths), 32)]
    with mp.get_context("fork").Pool(cores) as pool:
        pool.map(_pil_chunk, [paths[:cores]] * cores)  # processes up, PIL imported
        start, busy = time.perf_counter(), busy_cpu_s()
        done = sum(pool.imap_unordered(_pil_chunk, chunks))
        seconds = time.perf_counter() - start
    return {"items": done, "seconds": seconds, "cpu_s": _since(busy)}


def run_dataloader(paths: list[str], cores: int, epochs: int = 1) -> dict:
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Items(Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.from_numpy(pil_views(paths[i]))

    pinned = torch.cuda.is_available()
    loader = DataLoader(Items(), batch_size=BATCH, shuffle=True, num_workers=cores, pin_memory=pinned, drop_last=True)
    rates, cpu = [], None
    for epoch in range(epochs):
        start, done, busy = time.perf_counter(), 0, busy_cpu_s()
        for batch in loader:
            done += len(batch)
        rates.append((done, time.perf_counter() - start))
        cpu = _since(busy) if epoch == 0 else cpu
    return {"items": rates[0][0], "seconds": rates[0][1], "cpu_s": cpu, "pinned": pinned, **per_epoch(rates)}


def _since(busy: float | None) -> float | None:
    return None if busy is None else busy_cpu_s() - busy


def per_epoch(rates: list[tuple[int, float]]) -> dict:
    """Every epoch's items/s, where a mode read more than one (`--epochs`)."""
    return {"epochs_items_per_s": [round(n / s, 1) for n, s in rates]} if len(rates) > 1 else {}


# ---------------------------------------------------------------- raymtl


def experiment(tables: dict[str, str], cache: str, workers: int = 1):
    from raymtl.config import load_experiment

    return load_experiment({
        "name": "ingest",
        "tasks": [{"name": t, "train": p, "image_column": "image", "label_column": "label", "id_column": "id"}
                  for t, p in tables.items()],
        "data": {"image_size": SIZE, "views": [{"name": "full"}, {"name": "crop", "crop": CROP}], "cache": cache},
        "training": {"batch_size": BATCH, "num_workers": workers},
    })


def library_epoch(inputs, exp, infos, rank: int, world: int, cache=None) -> tuple[int, float | None]:
    """One epoch of rank `rank`'s plan read through raymtl's data path as the loop reads it: items read,
    and the seconds to the first batch (streamed, the decode workers' start-up: once per run).
    On a GPU the batches are finished on it as in training; on a CPU they stop at the hand-off."""
    import torch

    from raymtl.data.plan import train_steps
    from raymtl.data.schedule import TaskSchedule
    from raymtl.data.datasets import decode_slots
    from raymtl.data.device_inputs import DeviceInputs
    from raymtl.train.batches import TaskBatches, batches_per_epoch

    class Handoff(DeviceInputs):
        """A GPU-less box's stand-in for the device: batches as the data path hands them over (uint8
        pixels, integer ids), without the device's own finishing work (float32 NCHW), which here would
        take the decoders' cores; `cpu_normalise` measures that apart."""

        def finish(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
            return tensor

    tr = exp.training
    schedule = TaskSchedule(batches_per_epoch(infos, tr.batch_size, world), exp.seed, 0, tr.sampler, tr.temperature).steps()
    plan = train_steps(schedule, {t: i.n_train for t, i in infos.items()}, tr.batch_size,
                       seed=exp.seed, epoch=0, rank=rank, world=world, shuffle=exp.data.shuffle)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    done, start, first = 0, time.perf_counter(), None
    slots = decode_slots(world, tr.cpus_per_worker) if cache is None else 0  # as the training loop
    handoff = DeviceInputs(exp.data, device) if device.type == "cuda" else Handoff(exp.data, device)
    batches = TaskBatches(inputs, "train", plan, handoff, cache, slots=slots)
    for _task, batch in batches:
        first = time.perf_counter() - start if first is None else first
        done += len(batch["label"]) if batch is not None else 0
    batches.close()
    return done, first


def cpu_normalise(repeats: int = 20) -> dict:
    """The training device's finishing work (`DeviceInputs`) done on this CPU for one batch: what the
    stream modes leave out on a GPU-less box, measured apart."""
    import torch

    from raymtl.config import DataSpec
    from raymtl.data.device_inputs import DeviceInputs

    pixels = np.random.default_rng(0).integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)
    pixels.flags.writeable = False  # as read zero-copy from the object store
    device_inputs = DeviceInputs(DataSpec(image_size=SIZE), "cpu")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        device_inputs({"view_full": pixels, "view_crop": pixels})
        times.append(time.perf_counter() - start)
    return {"what": f"DeviceInputs on the CPU for one {BATCH}-item batch (full + crop, {SIZE} px, read-only uint8 in, "
                    f"float32 NCHW out), median of {repeats}: the device's work, which the stream modes leave out on a "
                    "GPU-less box (every mode stops at uint8)",
            "median_s_per_batch": round(float(np.median(times)), 4), "torch_threads": torch.get_num_threads(),
            "load": round(os.getloadavg()[0], 2)}


def cached_bytes(inputs) -> int:
    """Bytes of every cached chunk's arrays (read zero-copy: nothing is copied to count them)."""
    from raymtl.data.datasets import DecodedCache

    return sum(a.nbytes for parts in DecodedCache(inputs.cached).parts.values() for d in parts for a in d.arrays.values())


class _Rank:
    """A training rank's stand-in: a Ray worker holding the rank's CPU (as a Train worker does) that
    reads its plan's epochs through the data path."""

    def __init__(self) -> None:
        import raymtl.train.batches  # noqa: F401 -- torch: a training rank has it loaded before its first batch

    def epoch(self, inputs, exp, infos) -> tuple[int, float | None]:
        return library_epoch(inputs, exp, infos, 0, 1)


def run_stream(tables: dict[str, str], cores: int, epochs: int = 1) -> dict:
    """Streamed epochs after the run's setup, the decode workers warmed first as the training loop
    warms them while it builds its model (`warm_s`: their start-up, waited for here).

    The node is the one the DataLoader gets: `cores` CPUs for decoding, and one more for the rank
    that consumes (a Ray worker holding it, as a Train worker holds its CPU), so that decode tasks
    follow the cores as on a node whose Ray CPUs are its cores. (A local cluster started on a box of
    fewer than 4 cores offers 4, `ensure_ray`: decode would then run more processes than cores.)
    """
    import ray

    from raymtl import preflight
    from raymtl.data.datasets import build_inputs, decode_slots, warm_decoders
    from raymtl.ray_runtime import ensure_ray

    exp = experiment(tables, "never")
    start = time.perf_counter()
    infos = preflight.check(exp)
    cpus_per_rank = exp.training.cpus_per_worker
    ensure_ray(num_cpus=cores + int(cpus_per_rank))
    inputs = build_inputs(exp, infos)
    built = time.perf_counter()
    rank = ray.remote(num_cpus=cpus_per_rank)(_Rank).remote()
    ray.get(warm_decoders(inputs, decode_slots(1, cpus_per_rank)) + [rank.__ray_ready__.remote()])
    ready = time.perf_counter()
    rates, firsts, cpu = [], [], None
    for epoch in range(epochs):
        begin, busy = time.perf_counter(), busy_cpu_s()
        done, first = ray.get(rank.epoch.remote(inputs, exp, infos))
        rates.append((done, time.perf_counter() - begin))
        firsts.append(first)
        cpu = _since(busy) if epoch == 0 else cpu
    extra = {**per_epoch(rates), "epochs_first_batch_s": firsts} if epochs > 1 else {}
    return {"items": rates[0][0], "seconds": rates[0][1], "cpu_s": cpu, "setup_s": built - start,
            "warm_s": ready - built, "first_batch_s": firsts[0], "decode_cpus": cores, **extra}


def _cache_worker(config: dict) -> None:
    import ray.train

    from raymtl.data.datasets import DecodedCache

    ctx = ray.train.get_context()
    start = time.perf_counter()
    done, _ = library_epoch(config["inputs"], config["exp"], config["infos"], ctx.get_world_rank(),
                            ctx.get_world_size(), DecodedCache(config["inputs"].cached))
    seconds = time.perf_counter() - start
    Path(config["out_dir"], f"rank{ctx.get_world_rank()}.json").write_text(json.dumps({"items": done, "seconds": seconds}))


def run_cache(tables: dict[str, str], workers: int, storage: str) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raymtl import preflight
    from raymtl.data.datasets import build_inputs
    from raymtl.ray_runtime import ensure_ray

    exp = experiment(tables, "always", workers)
    infos = preflight.check(exp)
    ensure_ray()
    start = time.perf_counter()
    inputs = build_inputs(exp, infos, cache=True)
    built = time.perf_counter() - start
    n_items = sum(i.n_train for i in infos.values())
    nbytes = cached_bytes(inputs)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 2)) // (2 * workers))
    Path(storage).mkdir(parents=True, exist_ok=True)
    TorchTrainer(
        _cache_worker,
        train_loop_config={"inputs": inputs, "exp": exp, "infos": infos, "out_dir": storage},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=f"ingest-cache-w{workers}", storage_path=storage),
    ).fit()
    ranks = [json.loads(Path(storage, f"rank{r}.json").read_text()) for r in range(workers)]
    return {"items": sum(r["items"] for r in ranks), "seconds": max(r["seconds"] for r in ranks), "build_s": built,
            "bytes_per_item": nbytes / n_items, "workers": workers}


# ---------------------------------------------------------------- the slow image server (stream_remote)


def serve(data_dir: Path, port_file: Path, delay_s: float = 0.0, cert: Path | None = None,
          key: Path | None = None) -> None:
    """Serve `data_dir` on 127.0.0.1, HTTP/1.1 with keep-alive as an object store or a CDN serves
    (https when given a certificate), each request delayed by `delay_s` (a store's round trip).
    SIGUSR1 writes the connections accepted and the CPU spent serving next to `port_file` (.json)."""
    import ssl
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Slow(SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            time.sleep(delay_s)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    class Server(ThreadingHTTPServer):
        # socketserver's listen backlog is 5: with more reads in flight the kernel drops connections
        # and each dropped one waits out a 1 s SYN retry, which a real object store never imposes
        request_queue_size = 1024
        daemon_threads = True
        connections = 0

        def process_request(self, request, client_address) -> None:
            Server.connections += 1
            super().process_request(request, client_address)

    server = Server(("127.0.0.1", 0), partial(Slow, directory=str(data_dir)))
    if cert is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)  # handshakes in the connection's thread, not the accept loop
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    start_cpu = time.process_time()

    def report(*_) -> None:
        counts = {"connections": Server.connections, "cpu_s": time.process_time() - start_cpu}
        port_file.with_suffix(".part").write_text(json.dumps(counts))
        port_file.with_suffix(".part").rename(port_file.with_suffix(".json"))

    signal.signal(signal.SIGUSR1, report)
    port_file.with_suffix(".tmp").write_text(str(server.server_address[1]))
    port_file.with_suffix(".tmp").rename(port_file)
    server.serve_forever()


@contextlib.contextmanager
def image_server(data_dir: Path, port_file: Path, delay_ms: float = 0.0, cert: Path | None = None,
                 key: Path | None = None) -> Iterator[tuple[int, Callable[[], dict]]]:
    """`serve` in a subprocess for the block: (its port, a call returning its connections and CPU so far)."""
    tls = ["--cert", str(cert), "--key", str(key)] if cert is not None else []
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.ingest", "--serve", str(data_dir), "--port-file",
                               str(port_file), "--delay-ms", str(delay_ms), *tls], cwd=ROOT)

    def counts() -> dict:
        server.send_signal(signal.SIGUSR1)
        while not port_file.with_suffix(".json").exists():
            time.sleep(0.05)
        return json.loads(port_file.with_suffix(".json").read_text())

    try:
        while not port_file.exists():
            time.sleep(0.05)
        yield int(port_file.read_text()), counts
    finally:
        server.terminate()
        server.wait()


# ---------------------------------------------------------------- parent: one subprocess per mode


def child(mode: str, spec: dict) -> dict:
    data_dir, names, cores = Path(spec["data_dir"]), spec["names"], spec["cores"]
    work = Path(spec["work"])
    if mode == "pil_limit":
        return run_pil_limit([str(data_dir / n) for n in names], cores)
    if mode == "dataloader":
        return run_dataloader([str(data_dir / n) for n in names], cores, spec["epochs"])
    if mode == "stream":
        return run_stream(write_tables(work / "local", names, f"{data_dir}/"), cores, spec["epochs"])
    if mode == "stream_quarter":
        return run_stream(write_tables(work / "quarter", names[: len(names) // 4], f"{data_dir}/"), cores)
    if mode == "stream_remote":
        return run_stream(write_tables(work / "remote", names, f"http://127.0.0.1:{spec['port']}/"), cores)
    if mode in ("cache_w1", "cache_w2"):
        return run_cache(write_tables(work / "local", names, f"{data_dir}/"), int(mode[-1]), str(work / "runs"))
    raise ValueError(mode)


def run_mode(mode: str, spec: dict, work: Path) -> dict:
    """`mode` in a fresh subprocess, its process tree's peak PSS sampled every 0.2 s, or less often where
    a sample costs more (`proc_tree.Sampler`: a Ray tree's samples would otherwise slow the Ray modes),
    started once the load has settled and the catalogue is in the page cache (`into_page_cache`)."""
    spec_file, out_file = work / f"{mode}.spec.json", work / f"{mode}.out.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    settle()  # not in the previous mode's load
    cached_s = into_page_cache(Path(spec["data_dir"]), spec["names"])
    load_before = os.getloadavg()[0]
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.ingest", "--child", mode, "--spec", str(spec_file),
                             "--out", str(out_file)], cwd=ROOT, env=env)
    with Sampler(proc.pid, every_s=0.2) as sampler:
        rc = proc.wait()
    if rc != 0:
        return {"error": f"exit status {rc}", "load_before": load_before, "load_after": os.getloadavg()[0]}
    result = json.loads(out_file.read_text())
    if result.get("cpu_s") is not None:
        result["cpu_ms_per_item"] = 1000 * result["cpu_s"] / result["items"]
    result.update(items_per_s=result["items"] / result["seconds"], peak_pss_mb=sampler.peak_pss / 2**20,
                  load_before=load_before, load_after=os.getloadavg()[0], page_cache_read_s=round(cached_s, 1),
                  pss_samples=sampler.samples, sampler_cpu_s=round(sampler.cpu_s, 2))
    return result


def ratios(modes: dict[str, dict]) -> dict[str, float]:
    rate = {m: r["items_per_s"] for m, r in modes.items() if "items_per_s" in r}
    pss = {m: r["peak_pss_mb"] for m, r in modes.items() if "peak_pss_mb" in r}
    out = {}
    for name, (a, b) in {"stream/dataloader": ("stream", "dataloader"), "stream/pil_limit": ("stream", "pil_limit"),
                         "stream_remote/stream": ("stream_remote", "stream")}.items():
        if a in rate and b in rate:
            out[name] = rate[a] / rate[b]
    later = {m: modes.get(m, {}).get("epochs_items_per_s", [])[1:] for m in ("stream", "dataloader")}
    if all(later.values()):
        out["stream/dataloader_later_epochs"] = float(np.mean(later["stream"]) / np.mean(later["dataloader"]))
    if "bytes_per_item" in modes.get("cache_w1", {}):
        out["cached_bytes/float32"] = modes["cache_w1"]["bytes_per_item"] / FLOAT32_BYTES_PER_ITEM
    if "cache_w1" in pss and "cache_w2" in pss:
        out["pss_w2/pss_w1"] = pss["cache_w2"] / pss["cache_w1"]
    if "stream" in pss and "stream_quarter" in pss:
        out["memory_bounded"] = pss["stream"] / pss["stream_quarter"]
    return out


def median_runs(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Each mode's run with the median items/s over the rounds (the lower middle one of an even count)."""
    out = {}
    for mode in rounds[0]:
        runs = [r[mode] for r in rounds]
        done = sorted((r for r in runs if "items_per_s" in r), key=lambda r: r["items_per_s"])
        out[mode] = done[(len(done) - 1) // 2] if done else runs[0]
    return out


def median_ratios(by_round: list[dict[str, float]]) -> dict[str, float]:
    """Each ratio's median over the rounds: both sides of a ratio measured minutes apart in the same
    round, so that the machine's drift over the run (this VM's items/s moved by 15 % between runs) falls
    on both."""
    names = dict.fromkeys(name for r in by_round for name in r)
    return {name: float(np.median([r[name] for r in by_round if name in r])) for name in names}


def print_table(report: dict) -> None:
    print(f"{'mode':<16}{'items/s':>10}{'seconds':>9}{'CPU ms/item':>13}{'peak PSS MB':>13}{'load':>11}")
    for mode, r in report["modes"].items():
        if "error" in r:
            print(f"{mode:<16}  {r['error']}")
            continue
        cpu = f"{r['cpu_ms_per_item']:.2f}" if "cpu_ms_per_item" in r else "-"
        print(f"{mode:<16}{r['items_per_s']:>10.1f}{r['seconds']:>9.1f}{cpu:>13}{r['peak_pss_mb']:>13.0f}"
              f"{r['load_before']:>6.2f}/{r['load_after']:.2f}")
    for name, value in report["ratios"].items():
        print(f"  {name:<32} {value:.2f}   (target {'>=' if name.startswith('stream') else '<='} {TARGETS[name]})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=20_000, help="catalogue images (default 20,000)")
    p.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "raymtl-ingest",
                   help="where the generated JPEGs are kept between runs")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="processes for pil_limit / dataloader")
    p.add_argument("--delay-ms", type=float, default=30.0, help="added to every request of stream_remote")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--epochs", type=int, default=1, help="epochs `dataloader` and `stream` read in their process")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the --modes this many times, in alternating order; ratios are medians over the rounds")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--update", action="store_true",
                   help="keep the other modes of the --json file (same --items) and run only --modes: one run in parts")
    p.add_argument("--note", default="", help="a note kept in the JSON (e.g. a small check)")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cert", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--key", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.update and args.rounds > 1:
        raise SystemExit("--update keeps one run's modes; it cannot merge --rounds")
    if args.serve:
        serve(args.serve, args.port_file, args.delay_ms / 1000, args.cert, args.key)
        return None
    if args.child:
        args.out.write_text(json.dumps(child(args.child, json.loads(args.spec.read_text()))))
        return None
    names = catalogue(args.data_dir, args.items, args.cores)
    nbytes = sum(os.path.getsize(args.data_dir / n) for n in names)
    report: dict[str, Any] = {
        "benchmark": "ingest", "note": args.note, "items": args.items, "cores": args.cores,
        "image_size": SIZE, "views": ["full", f"crop {CROP}"], "batch_size": BATCH, "tasks": len(TASKS),
        "jpeg_kb_mean": nbytes / len(names) / 1e3, "delay_ms": args.delay_ms, "epochs": args.epochs, "targets": TARGETS,
        "modes": {},
    }
    with tempfile.TemporaryDirectory(prefix="raymtl-ingest-") as tmp:
        work = Path(tmp)
        with image_server(args.data_dir, work / "port", args.delay_ms) as (port, _):
            spec = {"data_dir": str(args.data_dir), "names": names, "cores": args.cores, "work": str(work),
                    "port": port, "epochs": args.epochs}
            rounds: list[dict[str, dict]] = []
            for r in range(args.rounds):
                rounds.append({})
                for mode in args.modes if r % 2 == 0 else args.modes[::-1]:
                    rounds[-1][mode] = run_mode(mode, spec, work)
                    print(f"[ingest] round {r + 1} {mode}: {json.dumps(rounds[-1][mode])}", flush=True)
    report["modes"] = median_runs(rounds)
    if args.rounds > 1:
        report["rounds"] = rounds
        report["ratios_by_round"] = [ratios(modes) for modes in rounds]
    import torch

    if not torch.cuda.is_available():
        settle()
        report["cpu_normalise"] = cpu_normalise()
    if args.update and args.json and args.json.exists():
        earlier = json.loads(args.json.read_text())
        if earlier["items"] != args.items:
            raise SystemExit(f"--update: {args.json} has {earlier['items']} items, not {args.items}")
        report["modes"] = {**earlier["modes"], **report["modes"]}
        report["modes"] = {m: report["modes"][m] for m in MODES if m in report["modes"]}
        # what this run does not measure (a diagnostic like `cpu_by_process`, the note) stays as it was
        report = {**earlier, **{k: v for k, v in report.items() if k != "note" or v}}
    report["ratios"] = median_ratios(report["ratios_by_round"]) if args.rounds > 1 else ratios(report["modes"])
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

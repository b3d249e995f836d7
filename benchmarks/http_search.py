"""End-to-end HTTP: `clipsearch serve` over a large synthetic index, loaded from loopback.

    python -m benchmarks.http_search [--vectors 1000000] [--requests 200] [--concurrency 1,8,32]
                                     [--inference fp32|int8|onnx|onnx-int8|auto] [--torch-threads N] [--starts 3]
                                     [--tags 5] [--ready-only] [--quick] [--catalog-dir DIR]

A store of N rows (each with --tags zero-shot tags, as the indexer's defaults store them, so that the facets every
/search counts by default read real labels) and an index of N synthetic CLIP-like 512-d vectors (as `clipsearch
index` would have left them for ViT-B-32) are written to a temp data dir; `clipsearch serve` runs as a subprocess
with ViT-B-32 random weights; a thread pool of HTTP clients on 127.0.0.1 sends bounded numbers of /search requests
at each concurrency: uncached queries (every text new) and cached ones (a few texts repeated). The uncached texts
('a {adjective} {noun} {place}', 1,008 of them, cycled) open like earlier ones, which the ONNX text tower's prefix
cache reuses (app.onnx_text): the server reads CLIPSEARCH_TEXT_PREFIX_CACHE_MB from this process's environment, so
CLIPSEARCH_TEXT_PREFIX_CACHE_MB=0 measures every query from its start token. Each client is one
keep-alive connection that writes the request line and reads the body by its Content-Length (`RawClient`: httpx
added about 1.5 ms per request); it still shares the 2 cores with the server, so the figures are a lower bound.
--inference and --torch-threads set the server's CLIPSEARCH_INFERENCE and CLIPSEARCH_TORCH_THREADS. --quick: 100k
vectors, 40 requests, concurrency 1 and 8, written to http_search-quick.*. Results: benchmarks/results/http_search.*
(other modes: http_search-<mode>.*). The random weights are saved once as a checkpoint file that every start loads,
as a user's downloaded weights; the server is started --starts times (default 3), each timed to its first /readyz
200, and the load runs against the last start once its labels snapshot is in memory (--ready-only: the starts only,
written to *-ready.*). After each start's labels are in memory and its warm-up is done (/readyz warm_up) it times
that start's first three queries (new texts, cutoff=auto as the web UI asks), what the start's warm-up saves
(CLIPSEARCH_WARM_UP=false in this process's environment turns it off for an A/B). Each row also gives the p50 of the
service's own took_ms, which leaves out HTTP and the client. Building the 1M catalog takes minutes: --catalog-dir
DIR keeps it (weights, store, index and the ONNX exports) in DIR and reuses it when a later run asks for the same
catalog, which makes A/B runs of two codes cheap; a reused catalog's first start is then not the exporting one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from sqlalchemy import insert

from app.config import Settings
from app.index import VectorIndex, choose_kind, nlist_for, training_size_for
from app.store import ImageRow, ImageTagRow, Meta, Store, TagKind, utcnow, vector_to_bytes
from benchmarks.common import reusable_dir, write_record, write_results
from benchmarks.index_scale import DIM, clip_like

ADJ = ["red", "small", "old", "shiny", "wet", "bright", "dark", "wooden", "striped", "broken", "tall", "quiet"]
NOUN = ["car", "dog", "bicycle", "house", "boat", "tree", "street", "kitchen", "mountain", "bird", "child", "bridge"]
WEIGHTS_FILE = "vit-b-32-random.pt"
#: rows written (and vectors added) at a time when building a catalog: 100k rows and their vectors, about 0.3 GB
CATALOG_CHUNK = 100_000
PLACE = ["at night", "in the snow", "near the sea", "in a city", "on a table", "under a bridge", "in the rain"]


def unique_queries() -> itertools.cycle:  # type: ignore[type-arg]
    combos = [f"a {a} {n} {p}" for a in ADJ for n in NOUN for p in PLACE]  # 1,008 distinct texts
    np.random.default_rng(1).shuffle(combos)
    return itertools.cycle(combos)


def save_weights(path: Path, model: str) -> Path:
    """``model`` with random weights saved once as a checkpoint file: every start then loads the same weights
    (as a user's downloaded checkpoint), which the ONNX modes' export cache and launch record need."""
    import open_clip
    import torch

    torch.save(open_clip.create_model(model, pretrained=None).state_dict(), path)
    return path


def add_tags(store: Store, n: int, per_image: int, rng: np.random.Generator) -> None:
    """``per_image`` zero-shot tags on each of the ``n`` images, as the indexer stores them by default
    (CLIPSEARCH_TAG_TOP_K=5 over the 1,000 ImageNet labels; names here are placeholders), and a
    safe-search flag on 1 % of them."""
    if per_image <= 0:
        return
    names = [f"label {i:03d}" for i in range(1000)]
    with store.engine.begin() as conn:
        for start in range(0, n, 20_000):
            count = min(n, start + 20_000) - start
            # distinct labels per image: a random offset and stride over the 1,000 names
            first = rng.integers(0, 1000, count)
            stride = rng.integers(1, 1000 // per_image, count)
            rows = [
                {"image_id": start + j + 1, "kind": TagKind.TAG.value, "label": names[(f + k * s) % 1000],
                 "score": 0.5}
                for j, (f, s) in enumerate(zip(first.tolist(), stride.tolist(), strict=True))
                for k in range(per_image)
            ]  # fmt: skip
            rows += [
                {"image_id": start + j + 1, "kind": TagKind.FLAG.value, "label": "nudity", "score": 0.9}
                for j in np.flatnonzero(rng.random(count) < 0.01).tolist()
            ]
            conn.execute(insert(ImageTagRow), rows)
        # as Store.save_tags marks every write of labels (app.labels keys its snapshot, and the saved copy, by it)
        conn.execute(insert(Meta), [{"key": "tags_generation", "value": uuid.uuid4().hex}])


def build_catalog(data_dir: Path, n: int, model: str, pretrained: str = "", tags_per_image: int = 0) -> float:
    """Rows (with ``tags_per_image`` tags each, and each row's vector, as the indexer stores it: the store is what
    the index is rebuilt from, and what "more like this" and the automatic cut-off's sample read) + index as the
    indexer leaves them for ``model`` with ``pretrained`` weights; returns seconds spent."""
    t0 = time.perf_counter()
    settings = Settings(data_dir=data_dir)
    store = Store(settings.effective_database_url)
    now = utcnow()
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((max(64, n // 200), DIM), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    kind = choose_kind(n, "auto", settings.ivf_min_vectors)
    # the indexer's rule: lists from the catalog size, trained on up to 256 points per list
    sample = clip_like(min(n, training_size_for(nlist_for(n))), rng, centers)
    index = VectorIndex.create(DIM, kind, sample if kind != "flat" else None, count=n)
    stored_model = f"{model}|{pretrained}" if pretrained else model
    for start in range(0, n, CATALOG_CHUNK):
        vectors = clip_like(min(n, start + CATALOG_CHUNK) - start, rng, centers)
        ids = np.arange(start + 1, start + len(vectors) + 1, dtype=np.int64)
        with store.engine.begin() as conn:
            conn.execute(
                insert(ImageRow),
                [
                    {
                        "id": int(image_id),
                        "path": f"/catalog/{(image_id - 1) // 1000:04d}/{image_id - 1:07d}.jpg",
                        "sha256": f"{image_id - 1:064x}",
                        "size": 100_000,
                        "mtime": 1.7e9 + image_id - 1,
                        "width": 640,
                        "height": 480,
                        "format": "JPEG",
                        "status": "indexed",
                        "model": stored_model,
                        "embedding": vector_to_bytes(vector),
                        "created_at": now,
                        "updated_at": now,
                    }  # fmt: skip
                    for image_id, vector in zip(ids.tolist(), vectors, strict=True)
                ],
            )
        index.add(ids, vectors)
    add_tags(store, n, tags_per_image, rng)
    index.save(settings.index_dir, model=model, pretrained=pretrained)
    store.close()
    return time.perf_counter() - t0


def prepared_catalog(folder: Path | None, n: int, model: str, tags: int) -> tuple[Path, float]:
    """A data dir holding the catalog: a new temp dir, or ``folder``, reused when its record says it holds the same
    catalog (else emptied and built again). Returns it and the build's seconds (0 when reused)."""
    wanted = {"vectors": n, "model": model, "tags": tags, "stored_vectors": True}
    data_dir, reused = reusable_dir(folder, wanted, "catalog.json", "bench-http-")
    if reused:
        print(f"reusing the catalog of {n:,} in {data_dir}", flush=True)
        return data_dir, 0.0
    checkpoint = save_weights(data_dir / WEIGHTS_FILE, model)
    build_s = build_catalog(data_dir, n, model, str(checkpoint), tags)
    print(f"catalog of {n:,} built in {build_s:.1f}s", flush=True)
    write_record(folder, wanted, "catalog.json")
    return data_dir, build_s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RawClient:
    """One keep-alive HTTP/1.1 connection that sends a GET and reads the status and the body: a load generator
    as lean as Python allows. It shares the two cores with the server, so every microsecond it spends is added
    to the latency it measures: httpx took about 1.5 ms more per request here."""

    def __init__(self, base: str) -> None:
        url = urllib.parse.urlsplit(base)
        self.host = url.netloc
        self.sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def get(self, target: str) -> tuple[int, bytes]:
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode("ascii"))
        status = int(self.reader.readline().split()[1])
        length = None
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:  # the service always sends a length; anything else is a broken benchmark
            raise RuntimeError(f"GET {target}: response without Content-Length (status {status})")
        return status, self.reader.read(length)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def search_target(text: str) -> str:
    return "/search?" + urllib.parse.urlencode({"q": text, "k": 20})


def load(base: str, queries, concurrency: int, requests: int, limit_s: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    targets = [search_target(next(queries)) for _ in range(requests)]  # built before the clock starts
    deadline = time.perf_counter() + limit_s
    # list.append is atomic: the worker threads record into these, counted after the run
    latencies: list[float] = []
    statuses: list[int] = []
    bodies: list[bytes] = []

    def one(target: str, client: RawClient) -> None:
        if time.perf_counter() > deadline:
            return
        t0 = time.perf_counter()
        status, body = client.get(target)
        latencies.append((time.perf_counter() - t0) * 1000)
        statuses.append(status)
        if status == 200:
            bodies.append(body)  # parsed after the run, not between requests

    clients = [RawClient(base) for _ in range(concurrency)]
    idle: queue.SimpleQueue[RawClient] = queue.SimpleQueue()
    for client in clients:
        idle.put(client)

    def run(target: str) -> None:
        client = idle.get()  # each connection serves one request at a time
        try:
            one(target, client)
        finally:
            idle.put(client)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(run, target) for target in targets]
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    failed = sum(f.exception() is not None for f in futures)  # a dropped connection, a malformed reply
    took = [json.loads(b)["took_ms"] for b in bodies]
    return {
        "requests": len(latencies) + failed,
        "errors": sum(status != 200 for status in statuses) + failed,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "server_p50_ms": float(np.percentile(took, 50)) if took else float("nan"),
        "qps": len(latencies) / wall,
    }


def start_server(cmd: list[str], env: dict[str, str], base: str, log_file: Path) -> tuple[subprocess.Popen, float]:  # type: ignore[type-arg]
    """A `clipsearch serve` process (its log in ``log_file``) and the seconds from its start to the first
    /readyz 200."""
    started = time.perf_counter()
    with log_file.open("wb") as log:
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    while time.perf_counter() - started < 300:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return server, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}: {log_file.read_text()[-2000:]}")
        time.sleep(0.05)
    server.terminate()
    raise SystemExit("the server did not become ready in 300 s")


def wait_for_ready_field(base: str, field: str, value: str, server: subprocess.Popen) -> float:  # type: ignore[type-arg]
    """Seconds until /readyz reports ``field`` = ``value``: inference 'onnx' (the background export under
    'auto'), labels 'memory' (the labels snapshot), warm_up 'done' (the start's warm-up)."""
    started = time.perf_counter()
    while time.perf_counter() - started < 600:
        if httpx.get(f"{base}/readyz", timeout=5).json().get(field) == value:
            return time.perf_counter() - started
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        time.sleep(0.2)
    raise SystemExit(f"the server's {field} did not become {value} in 600 s")


def stop_server(server: subprocess.Popen) -> None:  # type: ignore[type-arg]
    server.terminate()
    server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--limit-s", type=float, default=120.0, help="time limit per load level")
    parser.add_argument(
        "--inference",
        choices=("fp32", "int8", "onnx", "onnx-int8", "auto"),
        default="fp32",
        help="the server's CLIPSEARCH_INFERENCE (auto, the product's default, is onnx here: a CPU, fixed weights)",
    )
    parser.add_argument(
        "--tags", type=int, default=5, help="zero-shot tags per image (the indexer's default stores up to 5)"
    )
    parser.add_argument("--torch-threads", type=int, default=0, help="the server's threads (0: all cores)")
    parser.add_argument("--starts", type=int, default=3, help="server starts timed to /readyz (load runs on the last)")
    parser.add_argument("--ready-only", action="store_true", help="time the starts only, no load levels")
    parser.add_argument("--quick", action="store_true", help="100k vectors, 40 requests, concurrency 1,8")
    parser.add_argument(
        "--catalog-dir", type=Path, help="build the catalog here once and reuse it (default: a temp dir, removed)"
    )
    args = parser.parse_args()
    if args.quick:
        args.vectors, args.requests, args.concurrency = 100_000, 40, "1,8"
    model = "ViT-B-32"
    data_dir, build_s = prepared_catalog(args.catalog_dir, args.vectors, model, args.tags)
    checkpoint = data_dir / WEIGHTS_FILE
    port = free_port()
    env = dict(os.environ, CLIPSEARCH_DATA_DIR=str(data_dir), CLIPSEARCH_MODEL=model,
               CLIPSEARCH_PRETRAINED=str(checkpoint), CLIPSEARCH_DEVICE="cpu", CLIPSEARCH_INFERENCE=args.inference,
               CLIPSEARCH_TORCH_THREADS=str(args.torch_threads))  # fmt: skip
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    rows: list[dict[str, object]] = []
    ready: list[float] = []
    switched: list[float] = []
    labels_after: list[float] = []
    warmed_after: list[float] = []
    warm_up = os.environ.get("CLIPSEARCH_WARM_UP", "true").lower() not in ("false", "0", "no", "off")
    first_queries: list[list[tuple[float, float]]] = []
    try:
        for start in range(max(1, args.starts)):
            server, seconds = start_server(cmd, env, base, data_dir / f"server-{start + 1}.log")
            ready.append(seconds)
            print(f"start {start + 1}: ready in {seconds:.2f}s (process start, model, index load)", flush=True)
            if args.inference == "auto":  # a first start serves on torch while it exports: let it finish
                switched.append(wait_for_ready_field(base, "inference", "onnx", server))
                print(f"start {start + 1}: on ONNX Runtime {switched[-1]:.2f}s after ready", flush=True)
            labels_after.append(wait_for_ready_field(base, "labels", "memory", server))
            print(f"start {start + 1}: labels in memory {labels_after[-1]:.2f}s after ready", flush=True)
            if warm_up:  # the first queries are timed once the warm-up is done, not while it shares the cores
                warmed_after.append(wait_for_ready_field(base, "warm_up", "done", server))
                print(f"start {start + 1}: warmed up {warmed_after[-1]:.2f}s after ready", flush=True)
            first_queries.append(first_queries_ms(base))
            print(f"start {start + 1}: first queries (ms, client / service) {first_queries[-1]}", flush=True)
            if start + 1 < max(1, args.starts) or args.ready_only:
                stop_server(server)
        if not args.ready_only:
            try:
                rows = run_levels(base, args)
            finally:
                stop_server(server)
    finally:
        if args.catalog_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    starts = ", ".join(f"{r:.2f}" for r in ready)
    lines = [
        f"Service ready with {args.vectors:,} vectors ({args.inference}), seconds from `clipsearch serve` to the "
        f"first /readyz 200, per start: {starts} (the first start of an ONNX mode exports the towers; later ones "
        "start from the export; under auto the first start serves on torch while it exports)."
        + (
            " Seconds from ready to serving on ONNX Runtime, per start: "
            + ", ".join(f"{s:.2f}" for s in switched)
            + "."
            if switched
            else ""
        )
        + f" {args.tags} tags per image; seconds from ready to the labels snapshot in memory, per start: "
        + ", ".join(f"{s:.2f}" for s in labels_after)
        + "."
        + (
            " Seconds from ready to the end of the start's warm-up (/readyz warm_up 'done'), per start: "
            + ", ".join(f"{s:.2f}" for s in warmed_after)
            + "."
            if warmed_after
            else ""
        )
        + " First queries of each start, after that (new texts, cutoff=auto as the web UI asks; ms, client / "
        "service): "
        + "; ".join(", ".join(f"{c:.1f} / {t:.1f}" for c, t in start) for start in first_queries)
        + f" (CLIPSEARCH_WARM_UP={os.environ.get('CLIPSEARCH_WARM_UP', 'true')})"
        + ". server ms: the p50 of the service's own took_ms (the rest is HTTP and the client).",
        "",
        "| vectors | inference | threads | concurrency | queries | requests | errors | p50 ms | p99 ms "
        "| server p50 ms | QPS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['vectors']:,} | {r['inference']} | {r['torch_threads']} | {r['concurrency']} | {r['queries']} | "
            f"{r['requests']} | {r['errors']} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['server_p50_ms']:.1f} | {r['qps']:.1f} |"
        )
    name = "http_search-quick" if args.quick else "http_search"
    if args.inference != "fp32":  # beside the fp32 results, not over them
        name += f"-{args.inference}"
    if args.ready_only:
        name += "-ready"
    write_results(
        name,
        {
            "ready_s": ready[-1],
            "ready_per_start_s": ready,
            "onnx_after_ready_s": switched,
            "labels_after_ready_s": labels_after,
            "first_queries_ms": first_queries,
            "warm_up": os.environ.get("CLIPSEARCH_WARM_UP", "true"),
            "tags_per_image": args.tags,
            "build_s": build_s,
            "rows": rows,
        },
        "\n".join(lines),
    )


#: a start's first queries (every start asks these; a new process has no cache of them; none opens like the
#: warm-up's text, "a photo of a")
FIRST_TEXTS = ("a green tram in the fog", "two horses by a fence", "an empty beach at dawn")


def first_queries_ms(base: str) -> list[tuple[float, float]]:
    """Client and service milliseconds of the first queries a start answers, cutoff=auto as the web UI sends them:
    what the start's warm-up (CLIPSEARCH_WARM_UP) is for."""
    client = RawClient(base)
    timings: list[tuple[float, float]] = []
    try:
        for text in FIRST_TEXTS:
            target = "/search?" + urllib.parse.urlencode({"q": text, "k": 20, "cutoff": "auto"})
            t0 = time.perf_counter()
            status, body = client.get(target)
            if status != 200:
                raise SystemExit(f"GET {target}: status {status}: {body[:200]!r}")
            timings.append(((time.perf_counter() - t0) * 1000, float(json.loads(body)["took_ms"])))
    finally:
        client.close()
    return timings


def run_levels(base: str, args: argparse.Namespace) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    uncached = unique_queries()
    cached = itertools.cycle(["a red car", "a dog on the beach", "mountains at sunrise", "a bowl of fruit"])
    for _ in range(4):  # fill the text cache for the cached runs
        httpx.get(f"{base}/search", params={"q": next(cached), "k": 20}, timeout=30)
    for conc in (int(c) for c in args.concurrency.split(",")):
        for label, queries in (("uncached", uncached), ("cached", cached)):
            result = load(base, queries, conc, args.requests, args.limit_s)
            rows.append(
                {
                    "vectors": args.vectors,
                    "inference": args.inference,
                    "torch_threads": args.torch_threads or "all",
                    "concurrency": conc,
                    "queries": label,
                    **result,
                }
            )
            print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()

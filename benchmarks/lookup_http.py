"""Served near-duplicate look-up: `POST /lookup` through `clipsearch serve`, side by side with the in-process call.

    python -m benchmarks.lookup_http [--catalog 300] [--queries 40] [--model local-dir:/path/to/model]

A catalog of real photos from shared/data is indexed with `clipsearch index` (which also stores the local
features); then the same edited copies (crop, resize + JPEG, flip, border) and unrelated photos are looked up
(a) in this process with DupeService.lookup_bytes and (b) over loopback HTTP against a `clipsearch serve`
subprocess, one request at a time, after warm-up. The server's own per-stage times come from its /metrics
(clipsearch_lookup_stage_seconds). The client shares the cores with the server; the load average is recorded.
Results: benchmarks/results/lookup_http.*
"""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageOps

from app.config import Settings
from benchmarks.common import write_results
from benchmarks.http_search import free_port

SHARED = Path(os.environ.get("CLIPSEARCH_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared")) / "data"
DEFAULT_MODEL = f"local-dir:{SHARED.parent / 'models' / 'clipsearch-tiny-64'}"
EDITS = ("crop_70", "half_jpeg50", "flip", "border")
THREADS = ("", "1")  # torch intra-op threads: the library default, then one
STAGES = ("decode", "prepare", "encode", "candidates", "verify", "total")


def photos(count: int) -> list[Path]:
    """COCO-mini first, then Caltech-101 photos spread over its classes: real photos of varied sizes."""
    coco = sorted((SHARED / "coco-mini" / "images").glob("*.jpg"))
    caltech = sorted((SHARED / "caltech101").glob("*/*.jpg"))
    random.Random(0).shuffle(caltech)
    return (coco + caltech)[:count]


def edit(path: Path, kind: str) -> bytes:
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    width, height = image.size
    quality = 85
    if kind == "crop_70":
        image = image.crop((width * 15 // 100, height * 15 // 100, width * 85 // 100, height * 85 // 100))
    elif kind == "half_jpeg50":
        image, quality = image.resize((max(1, width // 2), max(1, height // 2))), 50
    elif kind == "flip":
        image = ImageOps.mirror(image)
    elif kind == "border":
        image = ImageOps.expand(image, border=max(width, height) // 12, fill=(250, 250, 250))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def queries(catalog: list[Path], held_out: list[Path], count: int) -> list[tuple[str, bytes]]:
    """Edited copies of catalog photos (each edit kind in turn) and, one in five, an unrelated photo."""
    out: list[tuple[str, bytes]] = []
    rng = random.Random(1)
    for i in range(count):
        if i % 5 == 4 and held_out:
            out.append(("unrelated", held_out[i % len(held_out)].read_bytes()))
        else:
            kind = EDITS[i % len(EDITS)]
            out.append((kind, edit(rng.choice(catalog), kind)))
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(values, 50)), "p95_ms": float(np.percentile(values, 95))}


def run_in_process(settings: Settings, work: list[tuple[str, bytes]], warmup: int) -> dict[str, Any]:
    from app.duplicates import DupeService
    from app.search import open_service

    search = open_service(settings)
    dupes = DupeService(settings, search)
    try:
        started = time.perf_counter()
        dupes.start()
        dupes.features.wait(timeout=600)
        ready_s = time.perf_counter() - started
        for _, data in work[:warmup]:
            dupes.lookup_bytes(data)
        latencies: list[float] = []
        stages: dict[str, list[float]] = {s: [] for s in STAGES}
        verdicts: dict[str, int] = {}
        for _, data in work:
            t0 = time.perf_counter()
            report = dupes.lookup_bytes(data)
            latencies.append((time.perf_counter() - t0) * 1000)
            for stage, seconds in report.stages.items():
                stages[stage].append(seconds * 1000)
            stages["total"].append(report.took_ms)
            verdicts[report.verdict.value] = verdicts.get(report.verdict.value, 0) + 1
        return {
            **percentiles(latencies),
            "features_ready_s": ready_s,
            "prepared_at_start": dupes.features.prepared_here,
            "stage_mean_ms": {s: float(np.mean(v)) for s, v in stages.items() if v},
            "verdicts": verdicts,
        }
    finally:
        dupes.close()
        search.store.close()


def run_served(env: dict[str, str], work: list[tuple[str, bytes]], warmup: int, catalog: int) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        started = time.perf_counter()
        with httpx.Client(timeout=60) as client:
            ready_s = features_s = None
            while time.perf_counter() - started < 300:
                try:
                    if ready_s is None and client.get(f"{base}/readyz").status_code == 200:
                        ready_s = time.perf_counter() - started
                        client.post(f"{base}/lookup", files={"file": ("w.jpg", work[0][1], "image/jpeg")})
                    if ready_s is not None:
                        metrics = client.get(f"{base}/metrics").text
                        found = re.search(r"^clipsearch_dupes_feature_images (\S+)", metrics, re.M)
                        if found and float(found[1]) >= catalog:
                            features_s = time.perf_counter() - started
                            break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            if features_s is None:
                raise SystemExit("the server did not get ready with its local features in 300 s")
            for _, data in work[:warmup]:
                client.post(f"{base}/lookup", files={"file": ("q.jpg", data, "image/jpeg")})
            text_before = client.get(f"{base}/metrics").text
            latencies: list[float] = []
            verdicts: dict[str, int] = {}
            for _, data in work:
                t0 = time.perf_counter()
                response = client.post(f"{base}/lookup", files={"file": ("q.jpg", data, "image/jpeg")})
                latencies.append((time.perf_counter() - t0) * 1000)
                response.raise_for_status()
                verdict = response.json()["verdict"]
                verdicts[verdict] = verdicts.get(verdict, 0) + 1
            text_after = client.get(f"{base}/metrics").text
        return {
            **percentiles(latencies),
            "ready_s": ready_s,
            "features_ready_s": features_s,
            "stage_mean_ms": _window_means(text_before, text_after),
            "verdicts": verdicts,
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def _window_means(before: str, after: str) -> dict[str, float]:
    """Mean stage times of the timed requests only: the difference of the server's sums and counts."""

    def parse(text: str) -> dict[tuple[str, str], float]:
        values = {}
        for line in text.splitlines():
            found = re.match(r'clipsearch_lookup_stage_seconds_(sum|count)\{stage="(\w+)"\} (\S+)', line)
            if found:
                values[(found[1], found[2])] = float(found[3])
        return values

    a, b = parse(before), parse(after)
    out = {}
    for (kind, stage), value in b.items():
        if kind == "sum":
            count = b.get(("count", stage), 0) - a.get(("count", stage), 0)
            if count:
                out[stage] = (value - a.get(("sum", stage), 0.0)) / count * 1000
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lookup_http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", type=int, default=300, help="photos in the catalog")
    parser.add_argument("--queries", type=int, default=40, help="timed look-ups per mode")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="CLIP model (default: the trained tiny model)")
    parser.add_argument("--name", default="lookup_http", help="results file name")
    args = parser.parse_args(argv)

    pool = photos(args.catalog + 20)
    catalog_photos, held_out = pool[: args.catalog], pool[args.catalog :]
    work = queries(catalog_photos, held_out, args.queries)
    root = Path(tempfile.mkdtemp(prefix="bench-lookup-"))
    try:
        folder = root / "catalog"
        folder.mkdir()
        for i, photo in enumerate(catalog_photos):
            shutil.copy2(photo, folder / f"{i:05d}_{photo.name}")
        env = dict(
            os.environ,
            CLIPSEARCH_DATA_DIR=str(root / "data"),
            CLIPSEARCH_MODEL=args.model,
            CLIPSEARCH_PRETRAINED="",
            CLIPSEARCH_DEVICE="cpu",
            CLIPSEARCH_TAG_VOCABULARY="none",
            CLIPSEARCH_SAFE_SEARCH_VOCABULARY="none",
        )
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "app.cli", "index", str(folder), "-q"], env=env, check=True)
        index_s = time.perf_counter() - t0
        print(f"indexed {args.catalog} photos (with local features) in {index_s:.1f}s", flush=True)
        settings = Settings(
            data_dir=root / "data",
            model=args.model,
            pretrained="",
            device="cpu",
            tag_vocabulary="none",
            safe_search_vocabulary="none",
        )
        runs: dict[str, dict[str, Any]] = {}
        for threads in THREADS:
            label = threads or "default"
            runs[f"served/{label}"] = run_served(
                {**env, "CLIPSEARCH_TORCH_THREADS": threads or "0"}, work, args.warmup, args.catalog
            )
            print(f"served, torch threads {label}:", runs[f"served/{label}"], flush=True)
        for threads in THREADS:  # after the servers: torch's thread count is global to this process
            label = threads or "default"
            runs[f"in-process/{label}"] = run_in_process(
                settings.with_overrides(torch_threads=int(threads or 0)), work, args.warmup
            )
            print(f"in process, torch threads {label}:", runs[f"in-process/{label}"], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    lines = [
        f"Catalog: {args.catalog} photos from shared/data, model `{args.model}`; {args.queries} look-ups per mode "
        f"(edited copies: {', '.join(EDITS)}; one in five an unrelated photo), one at a time after "
        f"{args.warmup} warm-up look-ups. Served = `clipsearch serve` over loopback HTTP (multipart upload, "
        "JSON answer); in-process = DupeService.lookup_bytes. Local features came from `clipsearch index`.",
        "",
        f"Torch threads: `default` = the library's ({os.cpu_count()} here), `1` = CLIPSEARCH_TORCH_THREADS=1.",
        "",
        "| mode | torch threads | p50 ms | p95 ms | served / in-process (p50, same threads) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, result in runs.items():
        mode, threads = key.split("/")
        ratio = result["p50_ms"] / runs[f"in-process/{threads}"]["p50_ms"]
        lines.append(f"| {mode} | {threads} | {result['p50_ms']:.1f} | {result['p95_ms']:.1f} | {ratio:.2f} |")
    lines += [
        "",
        "Mean time per stage (ms; prepare = query ORB + hashes on a worker thread, overlapping encode = CLIP):",
        "",
        "| mode | torch threads | " + " | ".join(STAGES) + " |",
        "| --- | --- |" + " --- |" * len(STAGES),
    ]
    for key, result in runs.items():
        means = result["stage_mean_ms"]
        mode, threads = key.split("/")
        cells = " | ".join(f"{means.get(s, float('nan')):.1f}" for s in STAGES)
        lines.append(f"| {mode} | {threads} | {cells} |")
    first = runs["served/default"]
    lines += [
        "",
        f"Index run {index_s:.1f} s; served: ready {first['ready_s']:.1f} s, shortlist complete "
        f"{first['features_ready_s']:.1f} s after start; in-process catalog images prepared at start: "
        f"{runs['in-process/default']['prepared_at_start']} (0 = all came from the feature cache).",
    ]
    data = {"catalog": args.catalog, "queries": args.queries, "model": args.model, "index_s": index_s, "runs": runs}
    write_results(args.name, data, "\n".join(lines))


if __name__ == "__main__":
    main()

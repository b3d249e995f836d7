"""Ray ingest vs the local indexer: the same photos, model and batch size, side by side in one run.

    python -m benchmarks.ray_ingest [--images N] [--partition-size P] [--workers 1,2]

- local: Indexer.run on a fresh data dir, with the encoder `clipsearch index` builds (its encode lanes on a CPU);
- ray xN: RayIndexer.run on a fresh data dir with N embedding actors, on a local Ray started once with every core
  (started and warmed up beforehand: a cluster is already running when a job is submitted). Each timed job still
  pays for its own actors (process start, model load), as every real job does. Under the default 'auto' the
  actors run the driver's ONNX image tower, shipped to them;
- ray x1, torch actors: the same with the driver's encoder on torch fp32, so the actors load the model and run
  torch (what every Ray job did before the tower was shipped).
Reported: img/s of each, Ray / local (target: overhead <= 10 %, i.e. ratio >= 0.90), 1 -> 2 workers scaling, and the
lowest cosine between the Ray and the local vectors of each file. Results: benchmarks/results/ray_ingest.json, .md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from app.config import Settings
from app.encoder import Encoder
from app.store import Store
from benchmarks.common import usable_cores, write_results
from benchmarks.ingest import pick_photos
from indexer import Indexer
from indexer.ray_engine import RayIndexer, local_ray_options
from tests.helpers import INSTRUMENT_MODEL


def vectors_by_path(store: Store, model: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for ids, vectors in store.iter_vectors(model):
        records = store.get_many([int(i) for i in ids])
        for image_id, vector in zip(ids, vectors, strict=True):
            out[records[int(image_id)].path] = vector
    return out


def timed_run(
    settings: Settings, encoder: Encoder, folder: Path, workers: int | None, partition_size: int
) -> tuple[float, dict[str, np.ndarray], str]:
    """One fresh ingest of ``folder``: local when ``workers`` is None, else Ray with that many actors."""
    data_dir = Path(tempfile.mkdtemp(prefix="bench-ray-ingest-"))
    run_settings = settings.with_overrides(data_dir=data_dir)
    store = Store(run_settings.effective_database_url)
    try:
        start = time.perf_counter()
        if workers is None:
            summary = Indexer(run_settings, store, encoder, progress=False).run([folder])
        else:
            indexer = RayIndexer(
                run_settings, store, encoder, workers=workers, partition_size=partition_size, progress=False
            )
            summary = indexer.run([folder])
        seconds = time.perf_counter() - start
        assert summary.failed == 0, summary.failures
        backend = getattr(summary, "embed_backend", "") or f"local {encoder.inference}"
        return seconds, vectors_by_path(store, encoder.spec.name), backend
    finally:
        store.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--partition-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", default="1,2", help="embedding actor counts to time, comma-separated")
    args = parser.parse_args()

    settings = Settings(
        model=f"local-dir:{INSTRUMENT_MODEL}",
        device="auto",
        batch_size=args.batch_size,
        tag_vocabulary="none",
        safe_search_vocabulary="none",
    )
    encoder = Encoder.from_settings(settings)
    local_encoder = Encoder.from_settings(settings, indexing=True)  # as `clipsearch index` builds it: its lanes
    torch_encoder = Encoder.from_settings(settings.with_overrides(inference="fp32"))
    photos = pick_photos(args.images)
    folder = Path(tempfile.mkdtemp(prefix="bench-ray-photos-"))
    for i, photo in enumerate(photos):
        os.symlink(photo, folder / f"{i:05d}{photo.suffix.lower()}")
    warmup = Path(tempfile.mkdtemp(prefix="bench-ray-warmup-"))
    for i, photo in enumerate(photos[:16]):
        os.symlink(photo, warmup / f"{i:05d}{photo.suffix.lower()}")

    ray_start = time.perf_counter()
    ray.init(**local_ray_options(num_cpus=usable_cores(), object_store_mb=1024), log_to_driver=False)
    ray_init_s = time.perf_counter() - ray_start
    logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        timed_run(settings, encoder, warmup, 1, args.partition_size)  # worker processes start, import torch
        small_local_s, _, _ = timed_run(settings, local_encoder, warmup, None, args.partition_size)
        small = len(list(warmup.iterdir()))
        local_s, local_vectors, local_backend = timed_run(settings, local_encoder, folder, None, args.partition_size)
        local_marginal = (len(photos) - small) / max(local_s - small_local_s, 1e-9)
        rows: list[dict[str, Any]] = [
            {
                "engine": "local",
                "workers": None,
                "seconds": local_s,
                "img_s": len(photos) / local_s,
                "marginal_img_s": local_marginal,
                "backend": local_backend,
            }
        ]
        runs = [(w, encoder) for w in [int(w) for w in args.workers.split(",")]] + [(1, torch_encoder)]
        small_s = {}
        for driver in (encoder, torch_encoder):  # a job's fixed cost: actor start, model (or tower) load
            small_s[id(driver)] = timed_run(settings, driver, warmup, 1, args.partition_size)[0]
        for workers, driver in runs:
            seconds, ray_vectors, backend = timed_run(settings, driver, folder, workers, args.partition_size)
            assert ray_vectors.keys() == local_vectors.keys()
            min_cos = min(float(ray_vectors[p] @ local_vectors[p]) for p in local_vectors)
            rows.append(
                {
                    "engine": "ray",
                    "workers": workers,
                    "seconds": seconds,
                    "img_s": len(photos) / seconds,
                    "vs_local": local_s / seconds,
                    "marginal_img_s": (
                        (len(photos) - small) / max(seconds - small_s[id(driver)], 1e-9) if workers == 1 else None
                    ),
                    "min_cosine_vs_local": min_cos,
                    "backend": backend,
                    "small_job_seconds": small_s[id(driver)],
                }
            )
            print(rows[-1], flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(warmup, ignore_errors=True)

    ray_rows = [r for r in rows if r["engine"] == "ray"]
    one = next((r for r in ray_rows if r["workers"] == 1), None)
    torch_one = ray_rows[-1]
    lines = [
        f"{len(photos)} photos, clipsearch-tiny-64 (trained, 64 px), batch {args.batch_size}, "
        f"partitions of {args.partition_size}, device {encoder.device.type}",
        "",
        "| engine | embedding workers | model run by | seconds | img/s | Ray / local | 1 -> N workers | img/s past "
        f"the first {small} (marginal) | marginal / local's | min cosine vs local |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| local | - | {local_backend} | {local_s:.1f} | {len(photos) / local_s:.1f} | 1.00 | - | "
        f"{local_marginal:.1f} | 1.00 | - |",
    ]
    for r in ray_rows:
        scaling = f"{one['seconds'] / r['seconds']:.2f}" if one and r is not torch_one else "-"
        marginal = f"{r['marginal_img_s']:.1f}" if r["marginal_img_s"] else "-"
        marginal_ratio = f"{r['marginal_img_s'] / local_marginal:.2f}" if r["marginal_img_s"] else "-"
        lines.append(
            f"| ray | {r['workers']} | {r['backend']} | {r['seconds']:.1f} | {r['img_s']:.1f} | {r['vs_local']:.2f} | "
            f"{scaling} | {marginal} | {marginal_ratio} | {r['min_cosine_vs_local']:.6f} |"
        )
    notes = (
        f"Ray started in {ray_init_s:.1f}s and ran a warm-up job (neither counted); a job of {small} photos after it "
        f"took {small_s[id(encoder)]:.1f}s with the shipped tower and {small_s[id(torch_encoder)]:.1f}s with torch "
        "actors, about the fixed cost every job pays (actor start, model load). Target: Ray / local >= "
        "0.90 (overhead <= 10 %). Without a GPU the actors and the decode tasks share the same cores, so adding "
        "workers only helps when cores are left over. The marginal rate, (N - 16) / (time of N - time of 16), "
        "leaves out what a job pays once, and shows whether the overhead is per job or per image."
    )
    data = {
        "images": len(photos),
        "partition_size": args.partition_size,
        "batch_size": args.batch_size,
        "device": encoder.device.type,
        "ray_init_seconds": ray_init_s,
        "small_job_images": small,
        "small_job_seconds": {
            "local": small_local_s,
            "ray": small_s[id(encoder)],
            "ray_torch": small_s[id(torch_encoder)],
        },
        "rows": rows,
    }
    write_results("ray_ingest", data, "\n".join(lines), notes=notes)


if __name__ == "__main__":
    main()

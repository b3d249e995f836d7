"""The local-features step of `clipsearch index`: what preparing one catalog photo for the near-duplicate look-up
costs (read, full decode, pixel digest, perceptual hashes, work image, ORB, thumbnail).

    python -m benchmarks.index_features [--rounds 3] [--quick]

Two photo sets: a seeded sample of everything under shared/data (mostly small photos: Caltech-101, CIFAR-10,
Fashion-MNIST, COCO), and camera-size JPEGs (12 MP, quality 90, 4:2:0, made from the real photos as
benchmarks/ingest makes them). Side by side in interleaved rounds, medians:
- **baseline**: ``prepare_catalog_image`` with the pixel digest of the whole image at once (one ``tobytes`` of the
  whole picture, then sha256: what clipsearch ran before 2026-11-25);
- **ours**: ``prepare_catalog_image`` as it is (the digest of a large image hashed a band of rows at a time; the same
  digest, checked for every photo);
each on one thread (ms per photo, read and decode included) and on ``--workers`` threads as `clipsearch index` runs
it (photos/s). Also the median cost of each stage on one thread.
Results: benchmarks/results/index_features.json and .md (quick: index_features-quick.*).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import random
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

from PIL import Image

from app.dupes import features
from app.dupes.hashing import ImageHashes
from app.dupes.resample import single_threaded_blas
from app.imaging import decode_image, is_image_path
from benchmarks.common import write_results
from benchmarks.ingest import DATA, camera_photos

MAX_PIXELS = 200_000_000


def whole_image_digest(image: Image.Image) -> str:
    """The baseline pixel digest: the whole image packed at once, then hashed."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def baseline_digest() -> Iterator[None]:
    with mock.patch.object(features, "pixel_digest", whole_image_digest):
        yield


def decode_full(data: bytes) -> Image.Image:
    return decode_image(data, max_pixels=MAX_PIXELS).image


def prepare_file(path: Path) -> features.PreparedImage:
    """What update_feature_cache does for one catalog file."""
    return features.prepare_catalog_image(decode_full(path.read_bytes()))


def megapixels(path: Path) -> float:
    with Image.open(path) as image:
        return image.width * image.height / 1e6


def shared_sample(count: int) -> list[Path]:
    photos = sorted(p for p in DATA.rglob("*") if p.is_file() and is_image_path(p))
    return random.Random(0).sample(photos, min(count, len(photos)))


def one_thread_ms(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        prepare_file(path)
    return (time.perf_counter() - start) / len(paths) * 1000


def threads_rate(paths: list[Path], workers: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(prepare_file, paths))
    return len(paths) / (time.perf_counter() - start)


def stage_ms(paths: list[Path]) -> dict[str, float]:
    """Median ms per photo of each stage, one thread."""
    times: dict[str, list[float]] = {}

    def timed(name: str, work: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        out = work(*args)
        times.setdefault(name, []).append((time.perf_counter() - start) * 1000)
        return out

    for path in paths:
        data = timed("read", path.read_bytes)
        image = timed("decode (full size)", decode_full, data)
        timed("digest, whole image (baseline)", whole_image_digest, image)
        timed("digest (ours: in bands above 16 MB)", features.pixel_digest, image)
        timed("hashes", ImageHashes.of, image)
        grey, scale = timed("work image", features.work_image, image)
        timed("ORB", features.orb_features, grey, scale, features.CATALOG_FEATURES)
        timed("thumbnail", features.thumbnail, grey)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_set(label: str, paths: list[Path], rounds: int, workers: int) -> dict[str, Any]:
    with baseline_digest():
        reference = [prepare_file(p).pixel_digest for p in paths]
    same = [prepare_file(p).pixel_digest for p in paths] == reference
    assert same, "the banded digest differs from the whole-image one"
    ImageHashes.of(Image.new("RGB", (64, 64)))  # imports scipy.fftpack (~0.3 s) before timing
    runs: dict[str, list[float]] = {}
    for _ in range(rounds):
        with baseline_digest():
            runs.setdefault("baseline_ms", []).append(one_thread_ms(paths))
        runs.setdefault("ours_ms", []).append(one_thread_ms(paths))
        with baseline_digest():
            runs.setdefault("baseline_rate", []).append(threads_rate(paths, workers))
        runs.setdefault("ours_rate", []).append(threads_rate(paths, workers))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "photos": label,
        "count": len(paths),
        "mean_megapixels": statistics.mean(megapixels(p) for p in paths),
        "rounds": rounds,
        "workers": workers,
        "same_digests": same,
        **med,
        "one_thread_speedup": med["baseline_ms"] / med["ours_ms"],
        "threads_speedup": med["ours_rate"] / med["baseline_rate"],
        "stages_ms": stage_ms(paths),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--shared", type=int, default=600, help="photos sampled from shared/data")
    parser.add_argument("--camera", type=int, default=32, help="camera-size JPEGs")
    parser.add_argument("--camera-mp", type=float, default=12.0)
    parser.add_argument("--workers", type=int, default=2, help="threads, as CLIPSEARCH_DECODE_WORKERS")
    parser.add_argument("--quick", action="store_true", help="few photos, one round: a smoke run")
    args = parser.parse_args()
    single_threaded_blas()  # as the local-features step of `clipsearch index` runs
    rounds = 1 if args.quick else args.rounds
    rows = [bench_set("shared/data sample", shared_sample(120 if args.quick else args.shared), rounds, args.workers)]
    print(rows[-1], flush=True)
    with camera_photos(8 if args.quick else args.camera, args.camera_mp) as big:
        rows.append(bench_set(f"{args.camera_mp:g} MP JPEGs", big, rounds, args.workers))
    print(rows[-1], flush=True)

    lines = [
        "Preparing catalog photos for the near-duplicate look-up (the local-features step of `clipsearch index`): "
        "baseline = the pixel digest of the whole image at once; ours = a large image's hashed in bands of rows "
        "(the same digests).",
        "",
        "| photos | count | mean MP | baseline ms/photo (1 thread) | ours | speed-up "
        "| baseline photos/s (threads) | ours | speed-up | same digests |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['photos']} | {r['count']} | {r['mean_megapixels']:.2f} | {r['baseline_ms']:.1f} | "
            f"{r['ours_ms']:.1f} | {r['one_thread_speedup']:.2f}x | {r['baseline_rate']:.0f} ({r['workers']}) | "
            f"{r['ours_rate']:.0f} | {r['threads_speedup']:.2f}x | {'yes' if r['same_digests'] else 'NO'} |"
        )
    stages = list(rows[0]["stages_ms"])
    lines += ["", "Median ms per photo of each stage (one thread):", ""]
    lines += ["| stage | " + " | ".join(r["photos"] for r in rows) + " |", "| --- |" + " --- |" * len(rows)]
    lines += [f"| {s} | " + " | ".join(f"{r['stages_ms'][s]:.2f}" for r in rows) + " |" for s in stages]
    name = "index_features-quick" if args.quick else "index_features"
    write_results(name, {"rows": rows, "args": vars(args)}, "\n".join(lines))


if __name__ == "__main__":
    main()

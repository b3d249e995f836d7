"""The metadata store at catalog scale: the reads that every index run and every server start make, side by side
with the plain SQLAlchemy way of making them (what the store did before session 21).

    python -m benchmarks.store_scale [--images 1000000] [--rounds 3] [--store-dir DIR] [--quick]

Builds a SQLite store of --images indexed images as the indexer leaves them (each row with its 512-d vector, its
four perceptual hashes, a sha256 and a model; about 4.3 KB a row, 4.3 GB at 1M) in a temp dir, or in --store-dir,
reused when it holds that many images (A/B runs of two codes on one store). Then, per round, each read both ways:

- file states (every known path: what `clipsearch index` compares a listing against): ``Store.file_states``
  (driver cursor, named tuples, the garbage collector paused) against ORM rows made into frozen dataclasses;
- the duplicate look-up's catalog keys (each feature sync: a server start, the end of an index run):
  ``Store.iter_catalog_keys`` against every record read 500 ids at a time;
- the hash index (the first look-up after a start or an index change): ``HashIndex.from_arrays`` of
  ``Store.hash_arrays`` against ``build_hash_index`` over ``iter_hashes`` (an ``ImageHashes`` per image);
- the images whose tags are stale (every index run): ``Store.ids_to_tag`` (store schema 6's covering index)
  against the same question ordered by id (SQLite then reads every row, as before the index).

The page cache is warm after the build (rounds repeat the reads); a cold cache makes every row read slower.
--quick: 100k images, one round, written to store_scale-quick.*.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import make_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import insert, select

from app.config import Settings
from app.dupes.hashing import HashIndex, ImageHashes
from app.duplicates import catalog_keys, content_key
from app.store import FileState, ImageRow, ImageStatus, Store, utcnow, vector_to_bytes
from benchmarks.common import reusable_dir, write_record, write_results

DIM = 512
CHUNK = 20_000
MODEL = "ViT-B-32"
TAGS_KEY = "k" * 16


#: What the store's file states were before: a frozen dataclass per path (the same fields).
PlainFileState = make_dataclass("PlainFileState", [(name, Any) for name in FileState._fields], frozen=True)


def build_store(folder: Path, n: int) -> float:
    """``n`` indexed images with vectors, hashes, sha256 and current tags keys; returns the seconds spent."""
    started = time.perf_counter()
    store = Store(Settings(data_dir=folder).effective_database_url)
    rng = np.random.default_rng(0)
    now = utcnow()
    for start in range(0, n, CHUNK):
        count = min(n, start + CHUNK) - start
        vectors = rng.standard_normal((count, DIM), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        hashes = rng.integers(-(2**63), 2**63 - 1, (count, 4), dtype=np.int64)
        rows = [
            {
                "id": start + i + 1,
                "path": f"/catalog/{(start + i) // 1000:04d}/{start + i:07d}.jpg",
                "sha256": f"{start + i:064x}",
                "size": 100_000 + i,
                "mtime": 1.7e9 + start + i,
                "width": 640,
                "height": 480,
                "format": "JPEG",
                "status": ImageStatus.INDEXED.value,
                "model": MODEL,
                "embedding": vector_to_bytes(vectors[i]),
                "tags_key": TAGS_KEY,
                "phash": int(hashes[i, 0]),
                "dhash": int(hashes[i, 1]),
                "phash_mirror": int(hashes[i, 2]),
                "dhash_mirror": int(hashes[i, 3]),
                "created_at": now,
                "updated_at": now,
            }
            for i in range(count)
        ]
        with store.engine.begin() as conn:
            conn.execute(insert(ImageRow), rows)
    store.close()
    return time.perf_counter() - started


def prepared_store(folder: Path | None, n: int) -> tuple[Path, float]:
    wanted = {"images": n, "layout": 1}
    data_dir, reused = reusable_dir(folder, wanted, "store.json", "bench-store-")
    if reused:
        print(f"reusing the store of {n:,} images in {data_dir}", flush=True)
        return data_dir, 0.0
    seconds = build_store(data_dir, n)
    print(f"store of {n:,} images built in {seconds:.1f}s", flush=True)
    write_record(folder, wanted, "store.json")
    return data_dir, seconds


# --- the plain ways ------------------------------------------------------------------------------


def plain_file_states(store: Store) -> dict[str, Any]:
    columns: list[Any] = [ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime, ImageRow.sha256]
    columns += [ImageRow.status, ImageRow.model, ImageRow.phash.is_not(None)]
    with store._sessions() as session:
        return {r.path: PlainFileState(*r) for r in session.execute(select(*columns))}


def plain_catalog_keys(store: Store) -> dict[int, str]:
    ids = [image_id for image_id, _ in store.iter_hashes()]
    records = {}
    for start in range(0, len(ids), 500):
        records.update(store.get_many(ids[start : start + 500]))
    return {i: content_key(r) for i, r in records.items() if r.status == ImageStatus.INDEXED}


def plain_ids_to_tag(store: Store, key: str) -> list[int]:
    stmt = Store.ids_to_tag_statement(MODEL, key).where(ImageRow.embedding.is_not(None)).order_by(ImageRow.id)
    with store._sessions() as session:
        return [int(i) for i in session.scalars(stmt)]


def build_hash_index(rows: Iterable[tuple[int, dict[str, int]]], chunk: int = 10_000) -> HashIndex:
    """A HashIndex over (id, stored hashes) rows, such as ``Store.iter_hashes()``, added a chunk of ``ImageHashes``
    at a time: how the service built it before ``HashIndex.from_arrays``."""
    index = HashIndex()
    ids: list[int] = []
    hashes: list[ImageHashes] = []
    for image_id, values in rows:
        ids.append(int(image_id))
        hashes.append(ImageHashes.from_dict(values))
        if len(ids) >= chunk:
            index.add(ids, hashes)
            ids, hashes = [], []
    index.add(ids, hashes)
    return index


# --- the run -------------------------------------------------------------------------------------


def timed(work: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=0, help="catalog size (default 1,000,000; --quick 100,000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--store-dir", type=Path, default=None, help="build the store here and reuse it later")
    parser.add_argument("--quick", action="store_true", help="100k images, one round (store_scale-quick.*)")
    args = parser.parse_args()
    n = args.images or (100_000 if args.quick else 1_000_000)
    rounds = 1 if args.quick else args.rounds
    data_dir, build_s = prepared_store(args.store_dir, n)
    store = Store(Settings(data_dir=data_dir).effective_database_url)
    reads: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "file states (each index run)": (lambda: store.file_states(), lambda: plain_file_states(store)),
        "catalog keys (each feature sync)": (lambda: catalog_keys(store), lambda: plain_catalog_keys(store)),
        "hash index (first look-up)": (
            lambda: HashIndex.from_arrays(*store.hash_arrays()),
            lambda: build_hash_index(store.iter_hashes()),
        ),
        "stale tags, all current (each index run)": (
            lambda: store.ids_to_tag(MODEL, TAGS_KEY),
            lambda: plain_ids_to_tag(store, TAGS_KEY),
        ),
    }
    seconds: dict[str, dict[str, list[float]]] = {name: {"ours": [], "plain": []} for name in reads}
    sizes: dict[str, int] = {}
    try:
        for r in range(rounds):
            for name, (ours, plain) in reads.items():
                order = [("ours", ours), ("plain", plain)] if r % 2 == 0 else [("plain", plain), ("ours", ours)]
                got: dict[str, int] = {}
                for label, work in order:
                    spent, result = timed(work)
                    seconds[name][label].append(spent)
                    got[label] = len(result)
                    del result
                assert got["ours"] == got["plain"], (name, got)  # the same rows both ways
                sizes[name] = got["ours"]
                print(f"round {r + 1}: {name}: ours {seconds[name]['ours'][-1]:.2f}s, "
                      f"plain {seconds[name]['plain'][-1]:.2f}s ({got['ours']:,})", flush=True)  # fmt: skip
    finally:
        store.close()
        if args.store_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)

    rows = []
    lines = [
        f"SQLite store of {n:,} indexed images with vectors and hashes; medians of {rounds} round(s), the order "
        "alternating per round; warm page cache.",
        "",
        "| read | rows | ours s | plain SQLAlchemy s | plain / ours |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in reads:
        ours_s, plain_s = statistics.median(seconds[name]["ours"]), statistics.median(seconds[name]["plain"])
        rows.append({"read": name, "rows": sizes[name], "ours_s": ours_s, "plain_s": plain_s, "seconds": seconds[name]})
        lines.append(f"| {name} | {sizes[name]:,} | {ours_s:.2f} | {plain_s:.2f} | {plain_s / ours_s:.1f}x |")
    notes = (
        "ours: the store's reads (driver cursor, schema 6's covering index, arrays). plain: ORM rows into frozen "
        "dataclasses; every record 500 ids at a time; an ImageHashes per image; the stale-tags question ordered "
        f"by id. The store was built in {build_s:.0f}s (0: reused)."
    )
    name = "store_scale-quick" if args.quick else "store_scale"
    write_results(
        name, {"images": n, "rounds": rounds, "build_s": build_s, "rows": rows}, "\n".join(lines), notes=notes
    )


if __name__ == "__main__":
    main()

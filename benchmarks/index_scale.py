"""Index types at scale: exact flat vs IVF-SQ8 (our choice past the threshold) vs HNSW and IVF-PQ+refine.

    python -m benchmarks.index_scale [--sizes 100000,1000000] [--queries 200]

Synthetic 512-d unit vectors shaped like CLIP embeddings (a mixture of clusters with noise, not uniform noise,
which no ANN index can exploit); queries come from the same distribution and are not in the index. For each
index type and size: build time, bytes per vector (serialised size / n), recall@10 against exact search,
single-query latency p50/p99 and batched (64 queries) time per query. Results: benchmarks/results/index_scale.*
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import faiss
import numpy as np

from app.index import FLAT, IVF_SQ8, VectorIndex, nlist_for, training_size_for
from benchmarks.common import write_results

DIM = 512
HNSW_MAX = 200_000


def clip_like(n: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    assign = rng.integers(0, len(centers), n)
    x = centers[assign] + rng.standard_normal((n, DIM), dtype=np.float32) * 0.035
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def recall_at_10(got: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact, strict=True)]))


def latencies(search, queries: np.ndarray) -> dict[str, float]:  # type: ignore[no-untyped-def]
    single = []
    for q in queries:
        t0 = time.perf_counter()
        search(q[None, :])
        single.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    for i in range(0, len(queries), 64):
        search(queries[i : i + 64])
    batched = (time.perf_counter() - t0) * 1000 / len(queries)
    return {
        "p50_ms": float(np.percentile(single, 50)),
        "p99_ms": float(np.percentile(single, 99)),
        "batched_ms_per_query": batched,
    }


def serialized_bytes(index: faiss.Index) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "i.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path)


def run_size(n: int, n_queries: int, rng: np.random.Generator) -> list[dict[str, object]]:
    centers = rng.standard_normal((max(64, n // 200), DIM), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    data = clip_like(n, rng, centers)
    queries = clip_like(n_queries, rng, centers)
    ids = np.arange(n, dtype=np.int64)
    # The indexer's rule: lists from the catalog size, trained on up to 256 points per list.
    nlist = nlist_for(n)
    sample = data[rng.choice(n, size=min(n, training_size_for(nlist)), replace=False)]

    rows: list[dict[str, object]] = []

    def record(name: str, build_s: float, nbytes: int, search, params: str) -> None:  # type: ignore[no-untyped-def]
        _, got = search(queries)
        lat = latencies(search, queries)
        rows.append(
            {
                "n": n,
                "index": name,
                "params": params,
                "build_s": build_s,
                "bytes_per_vector": nbytes / n,
                "recall_at_10": recall_at_10(got, exact),
                **lat,
            }  # fmt: skip
        )
        print(rows[-1], flush=True)

    t0 = time.perf_counter()
    flat = VectorIndex.create(DIM, FLAT)
    flat.add(ids, data)
    flat_build = time.perf_counter() - t0
    _, exact = flat.search(queries, 10)
    record("flat (exact)", flat_build, serialized_bytes(flat._index), lambda q: flat.search(q, 10), "")

    t0 = time.perf_counter()
    ivf = VectorIndex.create(DIM, IVF_SQ8, sample, count=n)
    ivf.add(ids, data)
    ivf_build = time.perf_counter() - t0
    ivf_bytes = serialized_bytes(ivf._index)
    for nprobe in (8, 16, 32, 64):
        ivf.nprobe = nprobe
        record(
            "ivf-sq8 (ours)",
            ivf_build,
            ivf_bytes,
            lambda q: ivf.search(q, 10),
            f"nlist {nlist}, nprobe {nprobe}",
        )

    if n <= HNSW_MAX:  # HNSW's build (and 2+ KB per vector) is out of reach past this on 2 cores
        t0 = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 80
        hnsw.add(data)
        hnsw_build = time.perf_counter() - t0
        hnsw_bytes = serialized_bytes(hnsw)
        for ef in (32, 64):
            hnsw.hnsw.efSearch = ef
            record("hnsw32 flat", hnsw_build, hnsw_bytes, lambda q: hnsw.search(q, 10), f"efSearch {ef}")

    t0 = time.perf_counter()
    pq = faiss.index_factory(DIM, f"IVF{nlist},PQ64x8,RFlat", faiss.METRIC_INNER_PRODUCT)
    pq.train(sample)
    pq.add(data)
    pq_build = time.perf_counter() - t0
    faiss.extract_index_ivf(pq).nprobe = 32
    pq.k_factor = 4
    record(
        "ivf-pq64+refine",
        pq_build,
        serialized_bytes(pq),
        lambda q: pq.search(q, 10),
        f"nlist {nlist}, nprobe 32, k_factor 4",
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows += run_size(n, args.queries, rng)
    lines = [
        "| n | index | params | build s | bytes/vector | recall@10 | p50 ms | p99 ms | batched ms/query |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['index']} | {r['params']} | {r['build_s']:.1f} | {r['bytes_per_vector']:.0f} | "
            f"{r['recall_at_10']:.3f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['batched_ms_per_query']:.3f} |"
        )
    write_results("index_scale", {"dim": DIM, "threads": faiss.omp_get_max_threads(), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()

"""The on-disk index at scale: memory-mapped IVF shards, text-like and image-like queries, resident memory.

    python -m benchmarks.index_ondisk [--vectors 1000000] [--codecs SQ8,PQ64] [--shards 1,2] [--nprobe 16,32,64,128]

Synthetic 512-d vectors shaped like CLIP embeddings, streamed in chunks (never all in memory; 10M x 512 fp32 would
be 20 GB): a shared mean direction (CLIP vectors sit in a narrow cone), a few thousand cluster centres in a 64-d
subspace with a decaying spectrum (anisotropic), within-cluster noise in that subspace and a little isotropic noise.
"Image-like" queries are drawn like catalog points; "text-like" queries model CLIP's modality gap: they lack the
image mean, carry a constant gap direction of their own and a weaker cluster signal, so their best cosine to the
catalog is about 0.3 (as for real text->image) instead of about 0.85 between images.

The build is the one distributed workers do (app.index_ondisk): train the template on a sample, fill ``--parts``
parts chunk by chunk, merge them into ``--shards`` memory-mapped shards, commit the manifest. Exact top-10 for every
query comes from a chunked brute-force pass over the same chunks.

Each configuration is then served by a fresh process (the service's own load path, ``VectorIndex.load``) after the
shard files were dropped from the page cache (posix_fadvise): it reports VmRSS, split into anonymous memory (heap:
centroids, tables, tombstones) and file-backed pages (the mapped lists actually touched, which the kernel can drop
under memory pressure), after load, after warm-up queries and after the timed queries; cold-cache and warm
single-query latency; and the ids, for recall@10 against exact. Results: benchmarks/results/index_ondisk-<n>.*
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from app.index import VectorIndex, nlist_for, training_size_for
from app.index_ondisk import PartBuilder, commit_shards, merge_parts, train_template
from benchmarks.common import write_results

DIM = 512
RANK = 64
CENTRES = 4000
CHUNK = 50_000
MODEL = {"model": "synthetic-512", "pretrained": ""}


class Catalog:
    """Deterministic CLIP-shaped vectors: chunk ``c`` is always the same, so passes can regenerate it."""

    def __init__(self, seed: int = 0, dim: int = DIM) -> None:
        self.seed, self.dim = seed, dim
        rng = np.random.default_rng([seed, 10**9])
        basis, _ = np.linalg.qr(rng.standard_normal((dim, RANK + 2)))
        self.mean, self.gap, self.basis = basis[:, 0], basis[:, 1], basis[:, 2:].T.astype(np.float32)
        self.spectrum = (1.0 / np.sqrt(np.arange(1, RANK + 1))).astype(np.float32)
        self.spectrum *= np.sqrt(RANK) / np.linalg.norm(self.spectrum)  # unit mean square
        self.centres = self._subspace(rng, CENTRES, 0.8)

    def _subspace(self, rng: np.random.Generator, n: int, norm: float) -> np.ndarray:
        coeff = rng.standard_normal((n, RANK), dtype=np.float32) * self.spectrum * (norm / np.sqrt(RANK))
        return coeff @ self.basis

    def _iso(self, rng: np.random.Generator, n: int, norm: float) -> np.ndarray:
        return rng.standard_normal((n, self.dim), dtype=np.float32) * np.float32(norm / np.sqrt(self.dim))

    def images(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = self.mean + self.centres[rng.integers(0, CENTRES, n)] + self._subspace(rng, n, 0.45)
        x += self._iso(rng, n, 0.3)
        return _normalise(x)

    def texts(self, rng: np.random.Generator, n: int) -> np.ndarray:
        t = 1.1 * self.gap + 0.9 * self.centres[rng.integers(0, CENTRES, n)] + self._subspace(rng, n, 0.45)
        t += self._iso(rng, n, 0.4)
        return _normalise(t)

    def chunk(self, number: int, size: int) -> np.ndarray:
        return self.images(np.random.default_rng([self.seed, number]), size)

    def chunks(self, n: int, chunk: int = CHUNK):  # type: ignore[no-untyped-def]
        """(first id, vectors) for the whole catalog, chunk by chunk."""
        for number, start in enumerate(range(0, n, chunk)):
            yield start, self.chunk(number, min(chunk, n - start))


def _normalise(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def exact_top10(catalog: Catalog, n: int, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-10 (ids, cosines) by inner product, one chunk at a time."""
    best_s = np.full((len(queries), 10), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), 10), -1, dtype=np.int64)
    for start, x in catalog.chunks(n):
        sims = queries @ x.T
        top = np.argpartition(-sims, 10, axis=1)[:, :10]
        s = np.concatenate([best_s, np.take_along_axis(sims, top, axis=1)], axis=1)
        i = np.concatenate([best_i, top + start], axis=1)
        order = np.argsort(-s, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)
    return best_i, best_s


def recall_at_10(got: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact, strict=True)]))


def dir_bytes(directory: Path, names: list[str]) -> int:
    total = 0
    for name in names:
        stem = name.removesuffix(".faiss")
        total += sum(p.stat().st_size for p in directory.glob(f"{stem}.*"))
    return total


def drop_from_page_cache(directory: Path) -> None:
    """Evict this index's files from the page cache (only these files: other processes are not disturbed)."""
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# --- the serving process ---------------------------------------------------------------------------


def memory() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def probe(directory: Path, queries_path: Path, nprobes: list[int], warmup: int) -> dict[str, Any]:
    queries = np.load(queries_path)
    before = memory()
    t0 = time.perf_counter()
    index, manifest = VectorIndex.load(directory, nprobe=nprobes[0], **MODEL)
    load_s = time.perf_counter() - t0
    after_load = memory()
    # cold: the first queries after load, with the shard files out of the page cache
    order = np.random.default_rng(1).permutation(len(queries))[:warmup]
    cold = []
    for q in order:
        t0 = time.perf_counter()
        index.search(queries[q], 10)
        cold.append((time.perf_counter() - t0) * 1000)
    after_warmup = memory()
    runs = []
    for nprobe in nprobes:
        index.nprobe = nprobe
        ids = np.empty((len(queries), 10), dtype=np.int64)
        times = []
        for q in range(len(queries)):
            t0 = time.perf_counter()
            _, got = index.search(queries[q], 10)
            times.append((time.perf_counter() - t0) * 1000)
            ids[q] = got[0]
        runs.append({"nprobe": nprobe, "times_ms": times, "ids": ids.tolist()})
    return {
        "count": manifest.count,
        "description": index.description,
        "load_s": load_s,
        "memory": {"before_load": before, "after_load": after_load, "after_warmup": after_warmup, "end": memory()},
        "cold_ms": cold,
        "runs": runs,
    }


def serve_and_measure(directory: Path, queries_path: Path, nprobes: list[int], warmup: int) -> dict[str, Any]:
    drop_from_page_cache(directory)
    command = [sys.executable, "-m", "benchmarks.index_ondisk", "probe", str(directory), str(queries_path)]
    command += ["--nprobe", ",".join(map(str, nprobes)), "--warmup", str(warmup)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- the build -------------------------------------------------------------------------------------


def build_and_measure(args: argparse.Namespace, catalog: Catalog, codec: str, queries: dict, exact: dict) -> list[dict]:
    n, work = args.vectors, Path(args.work) / codec
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    nlist = args.nlist or nlist_for(n)
    sample_size = training_size_for(nlist)
    sample = catalog.images(np.random.default_rng([catalog.seed, 777]), sample_size)

    t0 = time.perf_counter()
    template = train_template(sample, nlist, codec, niter=args.niter)
    train_s = time.perf_counter() - t0
    del sample
    print(f"[{codec}] trained IVF{nlist} on {sample_size:,} in {train_s:.0f} s", flush=True)

    t0 = time.perf_counter()
    chunks = -(-n // CHUNK)
    per_part = -(-chunks // min(args.parts, chunks)) * CHUNK  # parts end on chunk boundaries
    parts, part = [], None
    for start, x in catalog.chunks(n):
        if part is None:
            part = PartBuilder(template)
        part.add(np.arange(start, start + len(x), dtype=np.int64), x)
        if part.index.ntotal >= per_part or start + len(x) >= n:
            parts.append(part.write(work / f"part-{len(parts):03d}.faiss"))
            part = None
            print(f"[{codec}] part {len(parts)} written ({start + len(x):,} vectors)", flush=True)
    add_s = time.perf_counter() - t0

    rows = []
    for shards in [s for s in args.shards if s <= len(parts)]:
        target = work / f"{shards}-shards"
        t0 = time.perf_counter()
        per_shard = -(-len(parts) // shards)
        names = [
            merge_parts(template, parts[s * per_shard : (s + 1) * per_shard], target, f"shard-{s:03d}")
            for s in range(shards)
        ]
        commit_shards(target, names, **MODEL)
        merge_s = time.perf_counter() - t0
        size = dir_bytes(target, names)
        print(f"[{codec}] merged into {shards} shard(s) in {merge_s:.0f} s, {size / n:.0f} B/vector", flush=True)
        for kind in ("text", "image"):
            result = serve_and_measure(target, queries[kind], args.nprobe, args.warmup)
            mem = result["memory"]
            for run in result["runs"]:
                times = np.array(run["times_ms"])
                rows.append(
                    {
                        "n": n,
                        "codec": codec,
                        "nlist": nlist,
                        "shards": shards,
                        "parts": len(parts),
                        "queries": kind,
                        "nprobe": run["nprobe"],
                        "recall_at_10": recall_at_10(np.array(run["ids"]), exact[kind]),
                        "p50_ms": float(np.percentile(times, 50)),
                        "p99_ms": float(np.percentile(times, 99)),
                        "cold_p50_ms": float(np.percentile(result["cold_ms"], 50)),
                        "train_s": train_s,
                        "add_s": add_s,
                        "merge_s": merge_s,
                        "index_bytes": size,
                        "bytes_per_vector": size / n,
                        "load_s": result["load_s"],
                        "rss_after_load": mem["after_load"]["VmRSS"] - mem["before_load"]["VmRSS"],
                        "rss_after_warmup": mem["after_warmup"]["VmRSS"] - mem["before_load"]["VmRSS"],
                        "anon_after_warmup": mem["after_warmup"]["RssAnon"] - mem["before_load"]["RssAnon"],
                        "rss_end": mem["end"]["VmRSS"] - mem["before_load"]["VmRSS"],
                        "anon_end": mem["end"]["RssAnon"] - mem["before_load"]["RssAnon"],
                        "file_end": mem["end"]["RssFile"] - mem["before_load"]["RssFile"],
                        "memory": mem,
                    }
                )
                print({k: v for k, v in rows[-1].items() if k != "memory"}, flush=True)
        if not args.keep:
            shutil.rmtree(target, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    mb = 1 / 2**20
    lines = [
        "| n | index | shards | queries | nprobe | recall@10 | p50 ms | p99 ms | cold p50 ms | train+add+merge s | "
        "B/vector | index MB | RSS after warm-up MB (anon) | RSS at end MB (anon) | RSS/index |",
        "| " + " | ".join(["---"] * 15) + " |",
    ]
    for r in rows:
        build = f"{r['train_s']:.0f}+{r['add_s']:.0f}+{r['merge_s']:.0f}"
        lines.append(
            f"| {r['n']:,} | IVF{r['nlist']},{r['codec']} | {r['shards']} | {r['queries']} | {r['nprobe']} | "
            f"{r['recall_at_10']:.3f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['cold_p50_ms']:.1f} | {build} | "
            f"{r['bytes_per_vector']:.0f} | {r['index_bytes'] * mb:.0f} | "
            f"{r['rss_after_warmup'] * mb:.0f} ({r['anon_after_warmup'] * mb:.0f}) | "
            f"{r['rss_end'] * mb:.0f} ({r['anon_end'] * mb:.0f}) | {r['rss_after_warmup'] / r['index_bytes']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("probe", help="internal: serve one index in this process and measure it")
    p.add_argument("directory", type=Path)
    p.add_argument("queries", type=Path)
    p.add_argument("--nprobe", default="32")
    p.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--codecs", default="SQ8,PQ64", help="FAISS codes after IVF{nlist},")
    parser.add_argument("--shards", default="1,2", help="shard counts to merge the parts into and serve")
    parser.add_argument("--parts", type=int, default=4, help="worker parts built apart, then merged")
    parser.add_argument("--nprobe", default="16,32,64,128")
    parser.add_argument("--nlist", type=int, default=0, help="default: app.index.nlist_for(vectors)")
    parser.add_argument("--niter", type=int, default=10, help="k-means iterations when training the centroids")
    parser.add_argument("--queries", type=int, default=200, help="per kind (text-like, image-like)")
    parser.add_argument("--warmup", type=int, default=20, help="cold queries before the timed ones")
    parser.add_argument("--work", default="/tmp/clipsearch-ondisk-bench")
    parser.add_argument("--keep", action="store_true", help="keep the built indexes in --work")
    parser.add_argument("--name", default="", help="results name (default index_ondisk-<n>)")
    args = parser.parse_args()
    if args.command == "probe":
        result = probe(args.directory, args.queries, [int(x) for x in args.nprobe.split(",")], args.warmup)
        print(json.dumps(result))
        return
    args.nprobe = [int(x) for x in args.nprobe.split(",")]
    args.shards = [int(x) for x in args.shards.split(",")]

    catalog = Catalog()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    queries = {
        "text": catalog.texts(np.random.default_rng([catalog.seed, 555]), args.queries),
        "image": catalog.images(np.random.default_rng([catalog.seed, 666]), args.queries),
    }
    paths = {}
    for kind, q in queries.items():
        paths[kind] = work / f"queries-{kind}.npy"
        np.save(paths[kind], q)
    t0 = time.perf_counter()
    both, scores = exact_top10(catalog, args.vectors, np.concatenate([queries["text"], queries["image"]]))
    exact = {"text": both[: args.queries], "image": both[args.queries :]}
    top1 = {"text": float(scores[: args.queries, 0].mean()), "image": float(scores[args.queries :, 0].mean())}
    exact_s = time.perf_counter() - t0
    print(f"exact top-10 in {exact_s:.0f} s; mean top-1 cosine: {top1}", flush=True)

    rows = []
    for codec in args.codecs.split(","):
        rows += build_and_measure(args, catalog, codec, paths, exact)
    name = args.name or f"index_ondisk-{args.vectors // 1000}k"
    if not args.name and args.vectors % 1_000_000 == 0:
        name = f"index_ondisk-{args.vectors // 1_000_000}m"
    notes = (
        f"Command: `python -m benchmarks.index_ondisk {' '.join(sys.argv[1:])}`; {args.parts} worker parts per "
        f"index, k-means {args.niter} iterations on app.index.training_size_for(nlist) vectors, "
        f"{args.queries} text-like and {args.queries} image-like queries (mean exact top-1 cosine: "
        f"text {top1['text']:.2f}, image {top1['image']:.2f}), {args.warmup} cold queries (shard files evicted "
        "from the page cache first) before the timed single-query pass. RSS figures are the serving process's "
        "growth over its state before loading the index: anonymous memory (anon) plus the mapped file pages it "
        f"touched, which the kernel can drop. FAISS threads: {faiss.omp_get_max_threads()}. Wall time "
        f"{time.perf_counter() - started:.0f} s."
    )
    data = {"dim": DIM, "vectors": args.vectors, "exact_s": exact_s, "mean_top1": top1, "rows": rows}
    write_results(name, data, table(rows), notes=notes)


if __name__ == "__main__":
    main()

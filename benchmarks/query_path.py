"""Query path: text encoding (full 77-token pass vs our truncated pass) and index search, in process.

    python -m benchmarks.query_path [--repeats 10]

ViT-B-32 with random weights (same compute as the real model). Typical 3-10 word queries, one at a time,
as the service encodes them. Results: benchmarks/results/query_path.json and .md.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from app.encoder import Encoder, ModelSpec
from benchmarks.common import write_results

QUERIES = [
    "red car",
    "a dog on the beach",
    "a red bicycle leaning on a wall",
    "people walking in the rain at night",
    "a bowl of fruit on a wooden kitchen table",
    "two children playing football in a green park",
    "an old man reading a newspaper on a park bench",
    "snow covered mountains under a clear blue sky at sunrise",
]


def time_queries(encoder: Encoder, truncate: bool, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        for q in QUERIES:
            t0 = time.perf_counter()
            encoder.encode_texts([q], truncate=truncate)
            times.append((time.perf_counter() - t0) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    encoder = Encoder(ModelSpec("ViT-B-32", ""), torch.device("cpu"))
    time_queries(encoder, True, 1)  # warm-up
    time_queries(encoder, False, 1)
    full = time_queries(encoder, False, args.repeats)
    fast = time_queries(encoder, True, args.repeats)
    diff = float(np.abs(encoder.encode_texts(QUERIES, truncate=False) - encoder.encode_texts(QUERIES)).max())
    row = {
        "model": "ViT-B-32 (random weights)",
        "queries": len(QUERIES) * args.repeats,
        "full_p50_ms": float(np.percentile(full, 50)),
        "full_p99_ms": float(np.percentile(full, 99)),
        "truncated_p50_ms": float(np.percentile(fast, 50)),
        "truncated_p99_ms": float(np.percentile(fast, 99)),
        "speedup_p50": float(np.percentile(full, 50) / np.percentile(fast, 50)),
        "max_abs_diff": diff,
    }
    print(row)
    table = "\n".join(
        [
            "| text tower | queries | full p50 ms | full p99 ms | truncated p50 ms | truncated p99 ms | speed-up "
            "| max abs diff |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {row['model']} | {row['queries']} | {row['full_p50_ms']:.1f} | {row['full_p99_ms']:.1f} | "
            f"{row['truncated_p50_ms']:.1f} | {row['truncated_p99_ms']:.1f} | {row['speedup_p50']:.2f}x | {diff:.1e} |",
        ]
    )
    write_results("query_path", {"rows": [row]}, table)


if __name__ == "__main__":
    main()

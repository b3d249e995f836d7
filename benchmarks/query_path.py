"""Query path: text encoding one query at a time, as the service does, for each way the tower can run.

    python -m benchmarks.query_path [--repeats 10] [--quick]

ViT-B-32 with random weights (same compute as the real model), typical 3-10 word queries. Rows, side by side:
- full: open_clip's encode_text on all 77 positions (the reference);
- truncated: our default, the tower run up to the query's EOT token only (same vectors, max abs diff shown);
- 1-token pass: the tower on a single position, a floor no truncation can beat: what is left is streaming the
  tower's weights through the CPU once per query (the bound of the truncated path);
- int8 truncated: the opt-in CLIPSEARCH_INFERENCE=int8 path (weights a quarter of the bytes; cosine to fp32 shown);
- 1 thread: the truncated pass with torch on one thread (CLIPSEARCH_TORCH_THREADS=1), for services running
  one worker per core.
Results: benchmarks/results/query_path.json and .md.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

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
MODEL = "ViT-B-32 (random weights)"


def time_calls(call: Callable[[str], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        for q in QUERIES:
            t0 = time.perf_counter()
            call(q)
            times.append((time.perf_counter() - t0) * 1000)
    return times


def one_token_pass(encoder: Encoder) -> Callable[[str], object]:
    """The text tower on one position (the start token): the least work a pass over its weights can do."""
    model = encoder.model
    token = encoder.tokenizer(["x"])[:, :1]

    def run(_: str) -> torch.Tensor:
        with torch.inference_mode():
            x = model.token_embedding(token) + model.positional_embedding[:1]
            x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:1, :1]))
            return x[:, 0] @ model.text_projection

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="2 repeats: a smoke run, figures indicative only")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fp32 = Encoder(ModelSpec("ViT-B-32", ""), torch.device("cpu"))
    torch.manual_seed(0)  # the same random weights, quantised by the product path
    int8 = Encoder(ModelSpec("ViT-B-32", ""), torch.device("cpu"), inference="int8")

    variants: list[tuple[str, Callable[[str], object], int]] = [
        ("full 77-token pass", lambda q: fp32.encode_texts([q], truncate=False), threads),
        ("truncated (default)", lambda q: fp32.encode_texts([q]), threads),
        ("1-token pass (floor)", one_token_pass(fp32), threads),
        ("int8 truncated (opt-in)", lambda q: int8.encode_texts([q]), threads),
        ("truncated, 1 thread", lambda q: fp32.encode_texts([q]), 1),
        ("int8 truncated, 1 thread", lambda q: int8.encode_texts([q]), 1),
    ]
    times: dict[str, list[float]] = {}
    for label, call, n in variants:
        torch.set_num_threads(n)
        time_calls(call, 1)  # warm-up
        times[label] = time_calls(call, repeats)
    torch.set_num_threads(threads)

    reference = fp32.encode_texts(QUERIES, truncate=False)
    fidelity = {
        "truncated (default)": f"max abs diff {np.abs(reference - fp32.encode_texts(QUERIES)).max():.1e}",
        "int8 truncated (opt-in)": f"mean cosine {np.mean(np.sum(reference * int8.encode_texts(QUERIES), 1)):.4f}",
    }
    full_p50 = float(np.percentile(times["full 77-token pass"], 50))
    rows = []
    for label, _, n in variants:
        p50 = float(np.percentile(times[label], 50))
        rows.append(
            {
                "model": MODEL,
                "variant": label,
                "threads": n,
                "queries": len(times[label]),
                "p50_ms": p50,
                "p99_ms": float(np.percentile(times[label], 99)),
                "speedup_vs_full_p50": full_p50 / p50,
                "fidelity": fidelity.get(label, ""),
            }
        )
        print(rows[-1], flush=True)
    lines = [
        f"Text tower of {MODEL}, one query per call, {len(QUERIES)} queries x {repeats} repeats.",
        "",
        "| variant | threads | p50 ms | p99 ms | vs full (p50) | fidelity to full |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['variant']} | {r['threads']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
        f"{r['speedup_vs_full_p50']:.2f}x | {r['fidelity']} |"
        for r in rows
    ]
    name = "query_path-quick" if args.quick else "query_path"  # a smoke run never replaces the full results
    write_results(name, {"repeats": repeats, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()

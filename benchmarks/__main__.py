"""Run the performance benchmarks one after another: the one command behind README's Performance table.

    python -m benchmarks --all            # all of PERFORMANCE below (full: about an hour; gpu_ingest only on a GPU)
    python -m benchmarks --all --quick    # smoke runs of the ones with a quick mode (a few minutes)
    python -m benchmarks query_path ingest

Each benchmark runs in its own process (a fresh torch and a fresh memory high-water mark), prints its table
and writes benchmarks/results/<name>.json and .md (quick runs: <name>-quick.*, never over the full results).
Extra arguments after ``--`` go to every benchmark run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks.common import gpu_names

# name -> (module, arguments, the extra arguments of its quick mode: None = no quick mode, skipped by --quick)
PERFORMANCE: dict[str, tuple[str, list[str], list[str] | None]] = {
    "ingest": ("ingest", [], ["--quick"]),
    "query_path": ("query_path", [], ["--quick"]),
    "index_scale": ("index_scale", [], None),
    "http_search": ("http_search", [], ["--quick"]),
    "http_search-onnx-int8": ("http_search", ["--inference", "onnx-int8"], ["--quick"]),
    "http_search-auto": ("http_search", ["--inference", "auto"], ["--quick"]),
    "inference_backends": ("inference_backends", [], ["--quick"]),
    "vocabulary": ("vocabulary", [], ["--quick"]),
    "model_load": ("model_load", [], ["--quick"]),
    "index_features": ("index_features", [], ["--quick"]),
    "store_scale": ("store_scale", [], ["--quick"]),
    "gpu_ingest": ("gpu_ingest", [], ["--quick"]),
}
#: benchmarks that need a GPU: skipped, saying so, on a machine without one
NEEDS_GPU = {"gpu_ingest"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, from: {', '.join(PERFORMANCE)}")
    parser.add_argument("--all", action="store_true", help="run every performance benchmark")
    parser.add_argument("--quick", action="store_true", help="their quick modes only (smoke runs)")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    names = list(PERFORMANCE) if args.all else args.names
    unknown = [n for n in names if n not in PERFORMANCE]
    if not names or unknown:
        hint = f" (unknown: {', '.join(unknown)})" if unknown else ""
        parser.error(f"name benchmarks from {', '.join(PERFORMANCE)}, or pass --all{hint}")
    failed = []
    for name in names:
        module, fixed_args, quick_args = PERFORMANCE[name]
        if args.quick and quick_args is None:
            print(f"== {name}: no quick mode, skipped (run it alone for its full figures)", flush=True)
            continue
        if name in NEEDS_GPU and not gpu_names():
            print(f"== {name}: needs a GPU (nvidia-smi lists none here), skipped", flush=True)
            continue
        cmd = [sys.executable, "-m", f"benchmarks.{module}", *fixed_args, *(quick_args if args.quick else []), *extra]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(cmd)
        print(f"== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

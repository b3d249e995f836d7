"""Loading a model: what every `clipsearch index` (and a service's torch start) pays before its first photo.

    python -m benchmarks.model_load [--rounds 5] [--quick]

For ViT-B-32 (random weights saved as a checkpoint file, as a downloaded model is) and the trained clipsearch-tiny-64
(local-dir:), side by side in interleaved rounds, medians:
- **open_clip's build** (the baseline): ``open_clip.create_model_and_transforms``, which fills every weight at random
  and then loads the checkpoint over them;
- **ours**: ``app.model_build.create_model_and_transforms``, the same weights bit for bit (checked) without the fills;
  both also in a fresh process each (imports done first, not timed), as a command builds it;
- **the indexing encoder**: ``Encoder.from_settings(indexing=True)`` with the default inference ('auto'): the model,
  its ONNX Runtime text session, and on a CPU with native bf16 the image tower's bf16 products (whose ORT session
  is no longer opened there); its ONNX export is made once, before the timed rounds;
- **a no-op `clipsearch index`** of 16 already indexed photos, as a user runs it again (a fresh process: imports,
  settings, store, encoder, listing), wall time.
Results: benchmarks/results/model_load.json and .md (quick: model_load-quick.*).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from app.config import Settings
from app.encoder import Encoder
from app.model_build import create_model_and_transforms
from app.model_spec import ModelSpec
from benchmarks.common import write_results
from benchmarks.http_search import save_weights
from benchmarks.ingest import NO_TAGS
from tests.helpers import INSTRUMENT_MODEL, copy_photos

CLI = Path(sys.executable).with_name("clipsearch")


def _timed(build: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    built = build()
    return time.perf_counter() - start, built


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _noop_index(settings: Settings, folder: Path) -> float:
    env = {
        **os.environ,
        "CLIPSEARCH_DATA_DIR": str(settings.data_dir),
        "CLIPSEARCH_MODEL": settings.model,
        "CLIPSEARCH_PRETRAINED": settings.pretrained,
        "CLIPSEARCH_DEVICE": "cpu",
        "CLIPSEARCH_INFERENCE": "auto",
        "CLIPSEARCH_TAG_VOCABULARY": "none",
        "CLIPSEARCH_SAFE_SEARCH_VOCABULARY": "none",
    }
    start = time.perf_counter()
    subprocess.run([str(CLI), "index", "--quiet", str(folder)], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


_FRESH_BUILD = """
import sys, time, open_clip
from app.model_build import create_model_and_transforms
from app.model_spec import ModelSpec
spec = ModelSpec(sys.argv[2], sys.argv[3])
start = time.perf_counter()
if sys.argv[1] == "open_clip":
    open_clip.create_model_and_transforms(spec.name, pretrained=spec.pretrained or None)
else:
    create_model_and_transforms(spec)
print(time.perf_counter() - start)
"""


def _fresh_build(how: str, spec: ModelSpec) -> float:
    """Seconds to build the model in a new process (imports done first, not timed): what a command pays."""
    out = subprocess.run(
        [sys.executable, "-c", _FRESH_BUILD, how, spec.name, spec.pretrained],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def bench_model(label: str, settings: Settings, photos: Path, rounds: int) -> dict[str, Any]:
    spec = ModelSpec.from_settings(settings)
    Encoder.from_settings(settings, indexing=True)  # the ONNX export, once
    _noop_index(settings, photos)  # the first index of the photos (and their tags' absence) is not timed
    same = True
    times: dict[str, list[float]] = {
        "open_clip": [], "ours": [], "fresh_open_clip": [], "fresh_ours": [], "encoder": [], "noop_index": []
    }  # fmt: skip
    backend = ""
    for _ in range(rounds):
        seconds, baseline = _timed(
            lambda: open_clip.create_model_and_transforms(spec.name, pretrained=spec.pretrained or None)
        )
        times["open_clip"].append(seconds)
        seconds, ours = _timed(lambda: create_model_and_transforms(spec))
        times["ours"].append(seconds)
        same = same and _same_weights(baseline[0], ours[0])
        del baseline, ours
        times["fresh_open_clip"].append(_fresh_build("open_clip", spec))
        times["fresh_ours"].append(_fresh_build("ours", spec))
        seconds, encoder = _timed(lambda: Encoder.from_settings(settings, indexing=True))
        times["encoder"].append(seconds)
        backend = encoder.image_backend
        del encoder
        times["noop_index"].append(_noop_index(settings, photos))
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "model": label,
        "rounds": rounds,
        "times_s": times,
        "median_s": med,
        "ours_speedup": med["open_clip"] / med["ours"],
        "fresh_speedup": med["fresh_open_clip"] / med["fresh_ours"],
        "same_weights": same,
        "image_backend": backend,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the 64 px model, 2 rounds (model_load-quick.*)")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    work = Path(tempfile.mkdtemp(prefix="bench-model-load-"))
    rows = []
    try:
        photos = work / "photos"
        copy_photos(photos, 16)
        models = [] if args.quick else ["vit"]
        for name in [*models, "instrument"]:
            data_dir = work / name
            common: dict[str, Any] = {"data_dir": data_dir, **{**NO_TAGS, "inference": "auto"}}
            if name == "vit":
                torch.manual_seed(0)
                weights = save_weights(work / "vit-b-32-random.pt", "ViT-B-32")
                settings = Settings(model="ViT-B-32", pretrained=str(weights), **common)
                label = "ViT-B-32 (random weights in a checkpoint)"
            else:
                settings = Settings(model=f"local-dir:{INSTRUMENT_MODEL}", **common)
                label = "clipsearch-tiny-64 (local-dir)"
            rows.append(bench_model(label, settings, photos, rounds))
            print(rows[-1]["model"], rows[-1]["median_s"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"Medians of {rounds} interleaved rounds, in seconds.",
        "",
        "| model | open_clip's build | ours | ours vs open_clip | in a fresh process: open_clip's / ours "
        "| same weights | indexing encoder (image tower) | no-op `clipsearch index` |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        m = r["median_s"]
        lines.append(
            f"| {r['model']} | {m['open_clip']:.2f} | {m['ours']:.2f} | {r['ours_speedup']:.2f}x | "
            f"{m['fresh_open_clip']:.2f} / {m['fresh_ours']:.2f} ({r['fresh_speedup']:.2f}x) | "
            f"{'yes' if r['same_weights'] else '**no**'} | {m['encoder']:.2f} ({r['image_backend']}) | "
            f"{m['noop_index']:.2f} |"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    notes = f"Peak RSS of the benchmark process: {peak:,.0f} MB."
    write_results("model_load-quick" if args.quick else "model_load", {"rows": rows}, "\n".join(lines), notes=notes)


if __name__ == "__main__":
    main()

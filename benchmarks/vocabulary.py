"""Encoding a tag vocabulary, the first index's one-time cost (ImageNet: 998 labels x 80 templates = 79,840 prompts).

    python -m benchmarks.vocabulary [--templates 16] [--quick]

For ViT-B-32 (random weights, the real model's compute) and the trained clipsearch-tiny-64, every label of the
built-in ImageNet vocabulary with its first ``--templates`` templates (all 80 are what an index encodes; a subset
keeps the run short, and the work per prompt is the same), through ``app.zeroshot.class_embeddings`` as an index
run calls it, side by side in one run:
- **plain** (the baseline: before shared prefixes): the indexing encoder's ``encode_texts`` in batches of 256
  prompts sorted by length, each cut at its longest real token, on ONNX Runtime fp32 (the text tower 'auto' runs);
- **shared prefixes, fp32**: ``Encoder.encode_prompts`` (app.text_prefix) with fp32 products;
- **the default**: what an index run now does ('auto', an indexing encoder): shared prefixes, with the products in
  bf16 where the CPU multiplies bf16 natively and faster than fp32 (as the image tower then runs), else fp32.
Prompts per second and ratios to plain; fidelity of each to plain: class vectors' mean/min cosine and, for the
trained model, how many of 500 Caltech-101 photos keep their best tag. --quick: 4 templates, the 64 px model only.
Results: benchmarks/results/vocabulary.json and .md (quick: vocabulary-quick.*).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.config import Settings
from app.encoder import Encoder
from app.quantize import bf16_pays, native_bf16
from app.vocab import imagenet_vocabulary
from app.zeroshot import class_embeddings
from benchmarks.common import write_results
from benchmarks.http_search import save_weights
from benchmarks.ingest import NO_TAGS
from tests.helpers import DATA, INSTRUMENT_MODEL


class Plain:
    """An encoder seen without its shared-prefix path: class_embeddings then takes the plain one."""

    shares_prompt_prefixes = False

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode_texts(texts)


def timed(encoder: Any, prompts: list[list[str]]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    vectors = class_embeddings(encoder, prompts)
    return time.perf_counter() - start, vectors


def fidelity(reference: np.ndarray, got: np.ndarray, images: np.ndarray | None) -> dict[str, float]:
    cosines = (reference * got).sum(axis=1)
    out = {"mean_cosine": float(cosines.mean()), "min_cosine": float(cosines.min())}
    if images is not None:
        same = (images @ reference.T).argmax(axis=1) == (images @ got.T).argmax(axis=1)
        out["same_best_tag"] = float(same.mean())
    return out


def bench(label: str, settings: Settings, prompts: list[list[str]], photos: list[Path] | None) -> dict[str, Any]:
    default = Encoder.from_settings(settings.with_overrides(inference="auto"), indexing=True)
    fp32 = Encoder.from_settings(settings.with_overrides(inference="fp32"))
    count = sum(len(p) for p in prompts)
    class_embeddings(default, prompts[:4])  # warm both paths up (sessions, first calls)
    class_embeddings(Plain(default), prompts[:4])
    seconds: dict[str, float] = {}
    vectors: dict[str, np.ndarray] = {}
    for name, encoder in (("plain", Plain(default)), ("prefix_fp32", fp32), ("default", default)):
        seconds[name], vectors[name] = timed(encoder, prompts)
        print(f"{label}: {name} {count / seconds[name]:.0f} prompts/s", flush=True)
    images = None
    if photos:
        images = fp32.encode_images([Image.open(p).convert("RGB") for p in photos])
    return {
        "model": label,
        "prompts": count,
        "default_products": "bf16" if default.image_inference == "bf16" else "fp32",
        "plain_text_tower": "ONNX Runtime fp32" if getattr(default._onnx, "text", None) is not None else "torch fp32",
        "prompts_per_s": {k: count / v for k, v in seconds.items()},
        "seconds": seconds,
        "fidelity": {k: fidelity(vectors["plain"], vectors[k], images) for k in ("prefix_fp32", "default")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", type=int, default=16, help="templates per label (of 80)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    templates = 4 if args.quick else args.templates
    prompts = [p[:templates] for p in imagenet_vocabulary().prompts_per_label()]
    photos = sorted((DATA / "caltech101").glob("*/*.jpg"))[::6][:500]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-vocabulary-") as work:
        common: dict[str, Any] = {"data_dir": Path(work), **NO_TAGS}
        if not args.quick:
            torch.manual_seed(0)
            weights = save_weights(Path(work) / "vit-b-32-random.pt", "ViT-B-32")
            vit = Settings(model="ViT-B-32", pretrained=str(weights), **common)
            rows.append(bench("ViT-B-32 (random weights)", vit, prompts, None))
        tiny = Settings(model=f"local-dir:{INSTRUMENT_MODEL}", **common)
        rows.append(bench("clipsearch-tiny-64 (trained)", tiny, prompts, photos))
    lines = [
        f"ImageNet's 998 labels x {templates} templates, as an index run encodes a vocabulary "
        f"(bf16 instructions: {native_bf16()}, bf16 faster than fp32 here: {bf16_pays()}); prompts/s, one pass each, "
        "and fidelity to plain:",
        "",
        "| model | prompts | plain (the baseline) | shared prefixes fp32 | default (products) | prefixes fp32 / plain "
        "| default / plain | fp32: mean / min cos | default: mean / min cos | default: same best tag |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        rate, fid = r["prompts_per_s"], r["fidelity"]
        tag = fid["default"].get("same_best_tag")
        lines.append(
            f"| {r['model']} | {r['prompts']} | {rate['plain']:.0f} ({r['plain_text_tower']}) "
            f"| {rate['prefix_fp32']:.0f} | {rate['default']:.0f} ({r['default_products']}) "
            f"| {rate['prefix_fp32'] / rate['plain']:.2f}x | {rate['default'] / rate['plain']:.2f}x "
            f"| {fid['prefix_fp32']['mean_cosine']:.6f} / {fid['prefix_fp32']['min_cosine']:.6f} "
            f"| {fid['default']['mean_cosine']:.6f} / {fid['default']['min_cosine']:.6f} "
            f"| {'-' if tag is None else f'{tag:.3f} of {len(photos)} photos'} |"
        )
    name = "vocabulary-quick" if args.quick else "vocabulary"
    write_results(name, {"templates": templates, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()

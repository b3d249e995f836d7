"""Ingest throughput: the canonical open_clip loop vs the model alone vs clipsearch's indexer, side by side.

    python -m benchmarks.ingest [--images N] [--models vit,instrument] [--no-int8] [--quick]

Each model is timed in one run on the same real photos, batch size and thread count:
- baseline: the loop people write (Image.open -> preprocess -> stack -> encode_image), one thread decoding;
- model-only: encode_image on tensors decoded beforehand (the bound for a model-bound setup);
- clipsearch: Indexer.run on a fresh data dir (walk, hash, decode pool, batched encode, commits, index save);
- int8 (the opt-in CLIPSEARCH_INFERENCE=int8, through app.quantize as the encoder applies it): model-only, as a
  ratio to the fp32 model-only rate (target >= 1.5x), with its fidelity to the reference (cosine >= 0.995,
  top-10 overlap >= 0.95).
Fidelity against the reference path (the same decoding without JPEG draft mode: EXIF orientation applied, full
resolution): mean/min cosine and top-10 neighbour overlap, for our default path and for int8; the baseline loop's
vectors differ from both where photos carry an EXIF rotation (it ignores it), also reported.
--quick: 32 ViT photos and 192 for the tiny model, written to ingest-quick.* (never over the full results).
Results: benchmarks/results/ingest.json and .md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.config import Settings
from app.encoder import Encoder
from app.imaging import decode_image
from app.quantize import INT8, quantize
from app.store import Store
from benchmarks.common import write_results
from indexer import Indexer
from tests.helpers import DATA, INSTRUMENT_MODEL

# Zero-shot tagging builds its classifier once per model (80k prompt texts for the ImageNet vocabulary, then
# cached): a one-off cost that a fresh data dir per run would pay every time. Ingest is timed without it.
NO_TAGS: dict[str, str] = {"device": "cpu", "tag_vocabulary": "none", "safe_search_vocabulary": "none"}
THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))


def pick_photos(count: int) -> list[Path]:
    """A fixed mix of real photos: COCO (640 px, the larger ones) first, then Caltech-101 and samples."""
    pools = [
        sorted((DATA / "coco-mini" / "images").glob("*.jpg")),
        sorted((DATA / "photo-samples").glob("*/*.jpg")),
        sorted((DATA / "caltech101").glob("*/*.jpg")),
    ]
    photos: list[Path] = []
    for pool in pools:
        photos += pool[: count - len(photos)]
    return photos[:count]


def baseline_loop(encoder: Encoder, paths: list[Path], batch_size: int) -> tuple[float, np.ndarray]:
    model, preprocess = encoder.model, encoder.preprocess
    out = []
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]])
        with torch.no_grad():
            features = model.encode_image(batch)
        out.append(torch.nn.functional.normalize(features, dim=-1).numpy())
    return time.perf_counter() - start, np.concatenate(out)


def model_only(encoder: Encoder, pixels: torch.Tensor, batch_size: int, model: torch.nn.Module | None = None) -> float:
    model = model or encoder.model
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        with torch.inference_mode():
            model.encode_image(pixels[i : i + batch_size].contiguous(memory_format=torch.channels_last))
    return time.perf_counter() - start


def clipsearch_run(settings: Settings, encoder: Encoder, folder: Path) -> tuple[float, np.ndarray, list[str]]:
    data_dir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    run_settings = settings.with_overrides(data_dir=data_dir)
    store = Store(run_settings.effective_database_url)
    start = time.perf_counter()
    summary = Indexer(run_settings, store, encoder, progress=False).run([folder])
    seconds = time.perf_counter() - start
    assert summary.failed == 0, summary.failures
    states = store.file_states()
    paths = sorted(states)
    vectors = np.stack([store.vector(states[p].id) for p in paths])
    store.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    return seconds, vectors, paths


def fidelity(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> dict[str, float]:
    cos = np.sum(reference * candidate, axis=1)
    ref_sim, cand_sim = reference @ reference.T, candidate @ candidate.T
    np.fill_diagonal(ref_sim, -np.inf)
    np.fill_diagonal(cand_sim, -np.inf)
    ref_top = np.argsort(-ref_sim, axis=1)[:, :k]
    cand_top = np.argsort(-cand_sim, axis=1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top, cand_top, strict=True)])
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "top10_overlap": float(overlap)}


def bench_model(label: str, settings: Settings, photos: list[Path], quant: bool) -> dict[str, object]:
    torch.manual_seed(0)
    encoder = Encoder.from_settings(settings)
    folder = Path(tempfile.mkdtemp(prefix="bench-photos-"))
    links = []
    for i, p in enumerate(photos):  # one flat folder, names in the same order as `photos`
        link = folder / f"{i:05d}{p.suffix.lower()}"
        os.symlink(p, link)
        links.append(link)
    bs = settings.batch_size
    # warm-up: first calls allocate and pick kernels
    encoder.encode_pixels(torch.stack([encoder.preprocess_image(Image.open(photos[0]).convert("RGB"))] * bs))

    base_s, base_vecs = baseline_loop(encoder, links, bs)
    reference = [decode_image(p.read_bytes(), max_pixels=settings.max_image_pixels).image for p in links]
    pixels = torch.stack([encoder.preprocess_image(im) for im in reference])
    # the reference: full decode and open_clip's own transform (ours resamples the crop region only)
    ref_pixels = torch.stack([encoder.reference_preprocess(im) for im in reference])
    ref_vecs = np.concatenate([encoder.encode_pixels(ref_pixels[i : i + bs]) for i in range(0, len(ref_pixels), bs)])
    model_s = model_only(encoder, pixels, bs)
    ours_s, ours_vecs, ours_paths = clipsearch_run(settings, encoder, folder)
    assert ours_paths == [str(p) for p in links]
    n = len(photos)
    row: dict[str, object] = {
        "model": label,
        "images": n,
        "batch_size": bs,
        "baseline_img_s": n / base_s,
        "model_only_img_s": n / model_s,
        "clipsearch_img_s": n / ours_s,
        "ours_vs_model_only": model_s / ours_s,
        "ours_vs_baseline": base_s / ours_s,
        "fidelity_default": fidelity(ref_vecs, ours_vecs),
        "baseline_vs_reference": fidelity(ref_vecs, base_vecs),
    }
    if quant:
        qmodel = quantize(encoder.model, INT8)
        model_only(encoder, pixels[:bs], bs, model=qmodel)  # warm-up
        q_s = model_only(encoder, pixels, bs, model=qmodel)
        with torch.inference_mode():
            qv = torch.nn.functional.normalize(qmodel.encode_image(pixels), dim=-1).numpy()
        row["int8_model_only_img_s"] = n / q_s
        row["int8_vs_fp32_model_only"] = model_s / q_s
        row["fidelity_int8"] = fidelity(ref_vecs, qv)
    shutil.rmtree(folder, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=0, help="photos per model (default: 192 ViT, 960 tiny)")
    parser.add_argument("--models", default="vit,instrument")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-int8", action="store_true", help="skip the opt-in int8 path")
    parser.add_argument("--quick", action="store_true", help="few photos: a smoke run (ingest-quick.*)")
    args = parser.parse_args()
    quant = not args.no_int8
    torch.set_num_threads(THREADS)
    rows = []
    for name in args.models.split(","):
        if name == "vit":
            settings = Settings(model="ViT-B-32", pretrained="", batch_size=args.batch_size, **NO_TAGS)
            label, count = "ViT-B-32 (random weights)", args.images or (32 if args.quick else 192)
        else:
            settings = Settings(model=f"local-dir:{INSTRUMENT_MODEL}", batch_size=args.batch_size, **NO_TAGS)
            label, count = "clipsearch-tiny-64 (trained, 64 px)", args.images or (192 if args.quick else 960)
        rows.append(bench_model(label, settings, pick_photos(count), quant))
        print(rows[-1], flush=True)

    lines = [
        "| model | images | baseline img/s | model-only img/s | clipsearch img/s | ours / model-only | ours / baseline "
        "| mean cos | top-10 overlap |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        f = r["fidelity_default"]
        lines.append(
            f"| {r['model']} | {r['images']} | {r['baseline_img_s']:.1f} | {r['model_only_img_s']:.1f} | "
            f"{r['clipsearch_img_s']:.1f} | {r['ours_vs_model_only']:.2f} | {r['ours_vs_baseline']:.2f} | "
            f"{f['mean_cosine']:.5f} | {f['top10_overlap']:.3f} |"  # type: ignore[index]
        )
    if quant:
        lines += ["", "| model | int8 model-only img/s | int8 / fp32 model-only | mean cos | top-10 overlap |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in rows:
            f = r["fidelity_int8"]
            lines.append(
                f"| {r['model']} | {r['int8_model_only_img_s']:.1f} | {r['int8_vs_fp32_model_only']:.2f} | "
                f"{f['mean_cosine']:.5f} | {f['top10_overlap']:.3f} |"  # type: ignore[index]
            )
    name = "ingest-quick" if args.quick else "ingest"
    write_results(name, {"threads": THREADS, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()

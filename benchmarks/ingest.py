"""Ingest throughput: the canonical open_clip loop vs the model alone vs clipsearch's indexer, side by side.

    python -m benchmarks.ingest [--images N] [--models vit,instrument] [--no-int8] [--rounds 3]
                                [--camera-mp 12] [--camera-images 64] [--quick]

Each model is timed in one run on the same real photos, batch size and thread count, in interleaved rounds
(--rounds, default 3; the order of the paths rotates per round) reporting each path's median rate:
- baseline: the loop people write (Image.open -> preprocess -> stack -> encode_image), one thread decoding;
- model-only: encode_image on tensors decoded beforehand (the bound for a model-bound setup);
- clipsearch: Indexer.run on a fresh data dir (walk, hash, decode pool, batched encode, commits, index save);
- the default ('auto'): on a CPU, ONNX Runtime fp32, or torch bf16 for the image tower where the CPU multiplies
  bf16 natively (then also bf16 model-only and clipsearch with 'onnx', the default before it, are timed);
- int8 (the opt-in CLIPSEARCH_INFERENCE=int8, through app.quantize as the encoder applies it): model-only, as a
  ratio to the fp32 model-only rate (target >= 1.5x), with its fidelity to the reference (cosine >= 0.995,
  top-10 overlap >= 0.95).
Fidelity against the reference path (the same decoding without JPEG draft mode: EXIF orientation applied, full
resolution): mean/min cosine and top-10 neighbour overlap, for our default path and for int8; the baseline loop's
vectors differ from both where photos carry an EXIF rotation (it ignores it), also reported.
Each model is timed twice: on the shared folder's real photos (a mix of 0.07-1.4 MP: COCO, samples, Caltech-101),
and on camera-size JPEGs (--camera-mp megapixels, quality 90, 4:2:0; made by upscaling the largest of those
photos, as no camera originals are at hand), where decoding, not a small model, is the bound of the loop.
--quick: 32 ViT photos and 192 for the tiny model (16 camera-size), one round, written to ingest-quick.* (never
over the full results).
Results: benchmarks/results/ingest.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.config import Settings
from app.encoder import Encoder
from app.imaging import decode_image
from app.quantize import INT8, native_bf16, quantize
from app.store import Store
from benchmarks.common import write_results
from benchmarks.http_search import save_weights
from indexer import Indexer
from tests.helpers import DATA, INSTRUMENT_MODEL

# Zero-shot tagging builds its classifier once per model (80k prompt texts for the ImageNet vocabulary, then
# cached): a one-off cost that a fresh data dir per run would pay every time. Ingest is timed without it.
# The indexer runs torch fp32, the model the model-only and loop paths time ('auto', the default, would run the
# trained model's image tower in ONNX Runtime: the same vectors, about the same speed, inference_backends).
NO_TAGS: dict[str, str] = {
    "device": "cpu", "tag_vocabulary": "none", "safe_search_vocabulary": "none", "inference": "fp32"
}  # fmt: skip
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


@contextlib.contextmanager
def camera_photos(count: int, megapixels: float) -> Iterator[list[Path]]:
    """``count`` distinct JPEGs of about ``megapixels`` each, as a camera or phone writes them (quality 90,
    4:2:0), made by upscaling the real photos of COCO and the samples (the largest first) in a temp folder."""
    folder = Path(tempfile.mkdtemp(prefix="bench-camera-"))
    try:
        sources = sorted(pick_photos(10_000)[: count * 2], key=lambda p: -os.path.getsize(p))[:count]
        out = []
        for i, source in enumerate(sources):
            with Image.open(source) as im:
                im = im.convert("RGB")
                scale = (megapixels * 1e6 / (im.width * im.height)) ** 0.5
                big = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
            path = folder / f"camera-{i:04d}.jpg"
            big.save(path, quality=90, subsampling="4:2:0")
            out.append(path)
        yield out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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


@contextlib.contextmanager
def photo_folder(photos: list[Path]) -> Iterator[list[Path]]:
    """A temporary flat folder of symlinks to ``photos``, named in their order; yields the links."""
    folder = Path(tempfile.mkdtemp(prefix="bench-photos-"))
    try:
        links = []
        for i, p in enumerate(photos):
            link = folder / f"{i:05d}{p.suffix.lower()}"
            os.symlink(p, link)
            links.append(link)
        yield links
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def decoded_pixels(encoder: Encoder, settings: Settings, paths: list[Path]) -> tuple[list[Image.Image], torch.Tensor]:
    """The photos fully decoded (EXIF orientation applied, no draft mode) and our preprocessing of them."""
    images = [decode_image(p.read_bytes(), max_pixels=settings.max_image_pixels).image for p in paths]
    return images, torch.stack([encoder.preprocess_image(im) for im in images])


def encode_all(encoder: Encoder, pixels: torch.Tensor, batch_size: int) -> np.ndarray:
    """Unit vectors of preprocessed ``pixels`` through the encoder, ``batch_size`` at a time."""
    starts = range(0, len(pixels), batch_size)
    return np.concatenate([encoder.encode_pixels(pixels[i : i + batch_size]) for i in starts])


def lanes_model_only(encoder: Encoder, pixels: torch.Tensor, batch_size: int) -> float:
    """Model-only through the indexer's lanes: ``image_lanes`` threads at once, each encoding an equal share of
    ``pixels`` in batches of at most ``batch_size``."""
    lanes = encoder.image_lanes
    share = -(-len(pixels) // lanes)

    def lane(k: int) -> None:
        encoder.enter_lane()
        part = pixels[k * share : (k + 1) * share]
        for i in range(0, len(part), batch_size):
            encoder.encode_pixels_in_lane(part[i : i + batch_size].contiguous())

    threads_before = torch.get_num_threads()
    start = time.perf_counter()
    workers = [threading.Thread(target=lane, args=(k,)) for k in range(lanes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads_before)
    return seconds


def bench_model(
    label: str,
    settings: Settings,
    photos: list[Path],
    quant: bool,
    rounds: int,
    photo_set: str = "real mix",
    lanes: int = 0,
) -> dict[str, object]:
    """Every path once per round, the order rotated per round so that none always runs first or last; the
    rates reported are each path's median over the rounds, and the ratios are taken between medians.

    Paths: the canonical loop, model-only and clipsearch on torch fp32 (clipsearch with the indexing encoder's
    lanes, and with one lane, the design before them); int8 model-only; and the default inference ('auto', which
    is ONNX Runtime fp32 on a CPU for fixed weights, the image tower of an indexing run on torch bf16 where the CPU
    multiplies bf16 natively and faster than fp32, app.quantize.bf16_pays): ORT model-only on the service's session
    (every thread on one call), model-only through the default's lanes, and clipsearch. Where the CPU has bf16
    instructions: bf16 model-only (every thread on one call), and where the default runs bf16, clipsearch with the
    image tower on ORT fp32 ('onnx', the default before bf16).
    ``settings.pretrained`` must name fixed weights (a file, a local-dir model) so that every path runs the same
    model."""
    bs = settings.batch_size
    torch_settings = settings.with_overrides(inference="fp32", encode_lanes=lanes)
    default_settings = settings.with_overrides(inference="auto", encode_lanes=lanes)
    encoder = Encoder.from_settings(torch_settings)  # model-only, the loop, one lane
    lane_encoder = Encoder.from_settings(torch_settings, indexing=True)
    ort = Encoder.from_settings(default_settings)  # the service's: every thread on one call
    ort_lanes = Encoder.from_settings(default_settings, indexing=True)
    assert ort.inference == ort_lanes.inference == "onnx", ort.inference
    default_images = ort_lanes.image_inference  # "bf16" where bf16 products pay here (bf16_pays), else "onnx"
    bf16 = Encoder.from_settings(settings.with_overrides(inference="bf16")) if native_bf16() else None
    onnx_lanes = (
        Encoder.from_settings(settings.with_overrides(inference="onnx", encode_lanes=lanes), indexing=True)
        if default_images == "bf16"
        else None
    )
    with photo_folder(photos) as links:
        reference, pixels = decoded_pixels(encoder, settings, links)
        # warm-up: first calls allocate and pick kernels, in each lane too (a run on the first batch of photos)
        for enc in (encoder, ort, *([bf16] if bf16 else [])):
            encode_all(enc, pixels[:bs], bs)
        for enc in (lane_encoder, ort_lanes, *([onnx_lanes] if onnx_lanes else [])):
            lanes_model_only(enc, pixels[: 2 * bs], bs)
            with photo_folder(photos[: 2 * bs]) as few:
                clipsearch_run(settings, enc, few[0].parent)
        # the reference: full decode and open_clip's own transform (ours resamples the crop region only)
        ref_pixels = torch.stack([encoder.reference_preprocess(im) for im in reference])
        ref_vecs = encode_all(encoder, ref_pixels, bs)
        qmodel = quantize(encoder.model, INT8) if quant else None
        if qmodel is not None:
            model_only(encoder, pixels[:bs], bs, model=qmodel)  # warm-up
        vectors: dict[str, np.ndarray] = {}

        def baseline() -> float:
            seconds, vectors["baseline"] = baseline_loop(encoder, links, bs)
            return seconds

        def indexed(name: str, enc: Encoder) -> Callable[[], float]:
            def run() -> float:
                seconds, vectors[name], paths = clipsearch_run(settings, enc, links[0].parent)
                assert paths == [str(p) for p in links]
                return seconds

            return run

        def all_threads(enc: Encoder) -> Callable[[], float]:
            def run() -> float:
                start = time.perf_counter()
                encode_all(enc, pixels, bs)
                return time.perf_counter() - start

            return run

        paths: dict[str, Callable[[], float]] = {
            "baseline": baseline,
            "model_only": lambda: model_only(encoder, pixels, bs),
            "clipsearch": indexed("clipsearch", lane_encoder),
            "clipsearch_one_lane": indexed("clipsearch_one_lane", encoder),
            "model_only_lanes": lambda: lanes_model_only(lane_encoder, pixels, bs),
            "ort_model_only": all_threads(ort),
            "default_model_only_lanes": lambda: lanes_model_only(ort_lanes, pixels, bs),
            "clipsearch_default": indexed("clipsearch_default", ort_lanes),
        }
        if bf16 is not None:
            paths["bf16_model_only"] = all_threads(bf16)
        if onnx_lanes is not None:
            paths["clipsearch_onnx"] = indexed("clipsearch_onnx", onnx_lanes)
        if qmodel is not None:
            paths["int8_model_only"] = lambda: model_only(encoder, pixels, bs, model=qmodel)
        names = list(paths)
        rates: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rates[name].append(len(photos) / paths[name]())
            print(label, "round", r + 1, {k: round(v[-1], 2) for k, v in rates.items()}, flush=True)
    med = {name: statistics.median(v) for name, v in rates.items()}
    # the model-only rate of what the default's image tower runs, on every thread in one call
    default_model_only = med["bf16_model_only" if default_images == "bf16" else "ort_model_only"]
    row: dict[str, object] = {
        "model": label,
        "photos": photo_set,
        "images": len(photos),
        "batch_size": bs,
        "rounds": rounds,
        "lanes": lane_encoder.image_lanes,
        "rates_img_s": rates,
        "baseline_img_s": med["baseline"],
        "model_only_img_s": med["model_only"],
        "clipsearch_img_s": med["clipsearch"],
        "ours_vs_model_only": med["clipsearch"] / med["model_only"],
        "ours_vs_model_only_lanes": med["clipsearch"] / med["model_only_lanes"],
        "ours_vs_baseline": med["clipsearch"] / med["baseline"],
        "one_lane_vs_model_only": med["clipsearch_one_lane"] / med["model_only"],
        "default_image_tower": default_images,
        "default_img_s": med["clipsearch_default"],
        "default_model_only_img_s": default_model_only,
        "default_vs_default_model_only": med["clipsearch_default"] / default_model_only,
        "default_vs_default_model_only_lanes": med["clipsearch_default"] / med["default_model_only_lanes"],
        "default_vs_ort_model_only": med["clipsearch_default"] / med["ort_model_only"],
        "default_vs_model_only": med["clipsearch_default"] / med["model_only"],
        "default_vs_baseline": med["clipsearch_default"] / med["baseline"],
        "fidelity_default": fidelity(ref_vecs, vectors["clipsearch"]),
        "fidelity_one_lane": fidelity(ref_vecs, vectors["clipsearch_one_lane"]),
        "fidelity_ort_default": fidelity(ref_vecs, vectors["clipsearch_default"]),
        "baseline_vs_reference": fidelity(ref_vecs, vectors["baseline"]),
    }
    if bf16 is not None:
        row["bf16_model_only_img_s"] = med["bf16_model_only"]
        row["bf16_vs_fp32_model_only"] = med["bf16_model_only"] / med["model_only"]
        row["bf16_vs_ort_model_only"] = med["bf16_model_only"] / med["ort_model_only"]
    if onnx_lanes is not None:
        row["onnx_default_img_s"] = med["clipsearch_onnx"]
        row["default_vs_onnx_default"] = med["clipsearch_default"] / med["clipsearch_onnx"]
        row["fidelity_onnx_default"] = fidelity(ref_vecs, vectors["clipsearch_onnx"])
    if qmodel is not None:
        with torch.inference_mode():
            qv = torch.nn.functional.normalize(qmodel.encode_image(pixels), dim=-1).numpy()
        fp32_vecs = encode_all(encoder, pixels, bs)
        row["int8_model_only_img_s"] = med["int8_model_only"]
        row["int8_vs_fp32_model_only"] = med["int8_model_only"] / med["model_only"]
        row["fidelity_int8"] = fidelity(ref_vecs, qv)
        # the quantisation alone: int8 vs fp32 on the same (our) pixels
        row["fidelity_int8_vs_fp32"] = fidelity(fp32_vecs, qv)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=0, help="photos per model (default: 192 ViT, 960 tiny)")
    parser.add_argument("--models", default="vit,instrument")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-int8", action="store_true", help="skip the opt-in int8 path")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--quick", action="store_true", help="few photos, one round: a smoke run (ingest-quick.*)")
    parser.add_argument(
        "--camera-mp", type=float, default=12.0, help="also time camera-size JPEGs of this many megapixels (0: no)"
    )
    parser.add_argument("--camera-images", type=int, default=64, help="camera-size photos per model (0: none)")
    parser.add_argument("--lanes", type=int, default=0, help="CLIPSEARCH_ENCODE_LANES for the indexing encoders")
    args = parser.parse_args()
    quant = not args.no_int8
    torch.set_num_threads(THREADS)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-models-"))  # random weights saved once, ONNX exports
    try:
        for name in args.models.split(","):
            common = {"data_dir": work, "batch_size": args.batch_size, **NO_TAGS}
            if name == "vit":
                torch.manual_seed(0)
                weights = save_weights(work / "vit-b-32-random.pt", "ViT-B-32")
                settings = Settings(model="ViT-B-32", pretrained=str(weights), **common)
                label, count = "ViT-B-32 (random weights)", args.images or (32 if args.quick else 192)
            else:
                settings = Settings(model=f"local-dir:{INSTRUMENT_MODEL}", **common)
                label, count = "clipsearch-tiny-64 (trained, 64 px)", args.images or (192 if args.quick else 960)
            rounds = 1 if args.quick else args.rounds
            rows.append(bench_model(label, settings, pick_photos(count), quant, rounds, lanes=args.lanes))
            print(rows[-1], flush=True)
            camera = 16 if args.quick else args.camera_images
            if args.camera_mp > 0 and camera > 0:
                with camera_photos(camera, args.camera_mp) as big:
                    photo_set = f"{args.camera_mp:g} MP JPEGs"
                    rows.append(bench_model(label, settings, big, False, rounds, photo_set, lanes=args.lanes))
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "Median of interleaved rounds (the order of the paths rotates per round); ratios between medians.",
        "",
        "torch fp32 (the model the canonical loop runs): clipsearch with its lanes, and with one lane (the model on "
        "every core, photos prepared between batches); model-only on every thread, and through the lanes.",
        "",
        "| model | photos | images x rounds | lanes | baseline img/s | model-only img/s | clipsearch img/s "
        "| ours / model-only | ours / model-only in lanes | one lane / model-only | ours / baseline | mean cos "
        "| top-10 overlap |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        f = r["fidelity_default"]
        lines.append(
            f"| {r['model']} | {r['photos']} | {r['images']} x {r['rounds']} | {r['lanes']} | "
            f"{r['baseline_img_s']:.1f} | {r['model_only_img_s']:.1f} | {r['clipsearch_img_s']:.1f} | "
            f"{r['ours_vs_model_only']:.2f} | {r['ours_vs_model_only_lanes']:.2f} | "
            f"{r['one_lane_vs_model_only']:.2f} | {r['ours_vs_baseline']:.2f} | "
            f"{f['mean_cosine']:.5f} | {f['top10_overlap']:.3f} |"  # type: ignore[index]
        )
    lines += [
        "",
        "The default inference ('auto': ONNX Runtime fp32 on a CPU; an indexing run's image tower on torch bf16 "
        "where the CPU multiplies bf16 natively and faster than fp32), clipsearch with its lanes, against the "
        "model-only rate of what its image tower runs (every thread on one call; and through the lanes), ORT fp32 "
        "model-only, torch fp32 model-only and the canonical loop:",
        "",
        "| model | photos | image tower | clipsearch img/s | its model-only img/s | ours / its model-only "
        "| ours / its model-only in lanes | ours / ORT fp32 model-only | ours / torch fp32 model-only "
        "| ours / baseline | mean cos | top-10 overlap |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        f = r["fidelity_ort_default"]
        lines.append(
            f"| {r['model']} | {r['photos']} | {r['default_image_tower']} | {r['default_img_s']:.1f} | "
            f"{r['default_model_only_img_s']:.1f} | {r['default_vs_default_model_only']:.2f} | "
            f"{r['default_vs_default_model_only_lanes']:.2f} | {r['default_vs_ort_model_only']:.2f} | "
            f"{r['default_vs_model_only']:.2f} | {r['default_vs_baseline']:.2f} | "
            f"{f['mean_cosine']:.5f} | {f['top10_overlap']:.3f} |"  # type: ignore[index]
        )
    bf16_rows = [r for r in rows if "bf16_model_only_img_s" in r]
    if bf16_rows:
        lines += ["", "This CPU has bf16 instructions: bf16 model-only (the opt-in CLIPSEARCH_INFERENCE=bf16, "
                  "every thread on one call) against torch fp32 and ORT fp32 model-only; the default's clipsearch "
                  "against clipsearch with the image tower on ORT fp32 ('onnx', the default before bf16):", "",
                  "| model | photos | bf16 model-only img/s | bf16 / torch fp32 | bf16 / ORT fp32 "
                  "| clipsearch 'onnx' img/s | default / 'onnx' | 'onnx' mean cos | 'onnx' top-10 overlap |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in bf16_rows:
            g = r.get("fidelity_onnx_default")
            onnx_cells = (
                f"{r['onnx_default_img_s']:.1f} | {r['default_vs_onnx_default']:.2f} | "
                f"{g['mean_cosine']:.5f} | {g['top10_overlap']:.3f}"  # type: ignore[index]
                if g
                else " |  |  | "
            )
            lines.append(
                f"| {r['model']} | {r['photos']} | {r['bf16_model_only_img_s']:.1f} | "
                f"{r['bf16_vs_fp32_model_only']:.2f} | {r['bf16_vs_ort_model_only']:.2f} | {onnx_cells} |"
            )
    if quant:
        lines += ["", "Fidelity of int8 to the reference path, and (quantisation alone) to fp32 on our pixels:", "",
                  "| model | int8 model-only img/s | int8 / fp32 model-only | mean cos | top-10 overlap "
                  "| vs fp32: mean cos | vs fp32: top-10 overlap |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in rows:
            if "fidelity_int8" not in r:
                continue
            f, g = r["fidelity_int8"], r["fidelity_int8_vs_fp32"]
            lines.append(
                f"| {r['model']} | {r['int8_model_only_img_s']:.1f} | {r['int8_vs_fp32_model_only']:.2f} | "
                f"{f['mean_cosine']:.5f} | {f['top10_overlap']:.3f} | "  # type: ignore[index]
                f"{g['mean_cosine']:.5f} | {g['top10_overlap']:.3f} |"  # type: ignore[index]
            )
    name = "ingest-quick" if args.quick else "ingest"
    write_results(name, {"threads": THREADS, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()

"""GPU ingest: the indexer end to end on a CUDA device, against the model alone and the canonical loop.

    python -m benchmarks.gpu_ingest [--images 4096] [--megapixels 0.3,3] [--batch-size 256] [--rounds 2]
                                    [--model vit|instrument] [--workers N] [--device cuda|cpu] [--quick]

Run it on a machine with a GPU: issue #5's target is ViT-B-32 (random weights, the real model's compute) at
>= 5,000 img/s end to end on an H100, and where the bottleneck is. Without a GPU it stops with a message, unless
``--device cpu``: the same code on the CPU, a smoke run that checks the benchmark works (its figures say nothing
about a GPU; written to gpu_ingest-cpu.*).

Photos: ``--images`` distinct JPEGs per size in ``--megapixels`` (random crops and mirror images of the shared
folder's real photos, resized to that many megapixels, quality 90, 4:2:0), written once by a process pool. They
must be distinct: the indexer embeds a content once.

Timed in interleaved rounds (the order rotates per round; medians reported), on the same photos and batch size:
- model_only: the encoder (autocast, as the indexer runs it) on preprocessed batches already on the device: the
  bound of any pipeline;
- loop: the canonical open_clip loop (Image.open -> preprocess -> stack -> encode_image under autocast), decoding
  on one thread, as users write it;
- cpu_lane: ``Indexer.run`` with CLIPSEARCH_JPEG_DECODER=pillow: ``--workers`` threads decode with Pillow (draft
  mode), hash and preprocess; the batches go to the GPU from pinned memory;
- both_lanes: ``Indexer.run`` as it runs by default on a GPU: the device lane decodes JPEGs in batches with
  nvjpeg (torchvision.io.decode_jpeg), resizes and hashes them on the GPU, beside those threads;
and, to show which part bounds the pipeline, each lane's preparation alone without the model: cpu_prepare
(``prepare_file`` on ``--workers`` threads) and device_prepare (``DeviceJpegLane.prepare``, bytes already read).
Fidelity: both_lanes' vectors against cpu_lane's (mean cosine, top-10 neighbour overlap).
Results: benchmarks/results/gpu_ingest.json and .md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.config import Settings
from app.encoder import Encoder
from app.store import Store
from benchmarks.common import usable_cores, write_results
from benchmarks.ingest import NO_TAGS, fidelity, pick_photos
from indexer import Indexer
from indexer.device_jpeg import DeviceJpegLane, LaneItem
from indexer.pipeline import prepare_file, read_local
from indexer.walk import FileInfo
from tests.helpers import INSTRUMENT_MODEL, resaved_crop


def _make_photo(job: tuple[str, str, float, int]) -> None:
    source, target, megapixels, seed = job
    resaved_crop(Path(source), Path(target), megapixels, seed, mirror=True)


def make_photos(folder: Path, count: int, megapixels: float) -> list[Path]:
    """``count`` distinct JPEGs of about ``megapixels`` each, from the shared real photos."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = pick_photos(10_000)
    jobs = [(str(sources[i % len(sources)]), str(folder / f"p{i:06d}.jpg"), megapixels, i) for i in range(count)]
    with ProcessPoolExecutor(usable_cores()) as pool:
        list(pool.map(_make_photo, jobs, chunksize=16))
    return [Path(j[1]) for j in jobs]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(encoder: Encoder, pixels: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        encoder.encode_pixels(pixels[i : i + batch_size])  # returns host vectors: waits for the device
    return time.perf_counter() - start


def canonical_loop(encoder: Encoder, paths: list[Path], batch_size: int) -> float:
    model, preprocess, device = encoder.model, encoder.reference_preprocess, encoder.device
    autocast = torch.autocast(device.type, dtype=torch.float16) if device.type == "cuda" else None
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]])
        with torch.no_grad():
            if autocast is not None:
                with autocast:
                    features = model.encode_image(batch.to(device))
            else:
                features = model.encode_image(batch.to(device))
        torch.nn.functional.normalize(features.float(), dim=-1).cpu()
    return time.perf_counter() - start


def index_run(settings: Settings, encoder: Encoder, folder: Path, counts: dict[str, int]) -> tuple[float, np.ndarray]:
    data_dir = Path(tempfile.mkdtemp(prefix="bench-gpu-ingest-"))
    store = Store(settings.with_overrides(data_dir=data_dir).effective_database_url)
    indexer = Indexer(settings.with_overrides(data_dir=data_dir), store, encoder, progress=False)
    start = time.perf_counter()
    summary = indexer.run([folder])
    seconds = time.perf_counter() - start
    assert summary.failed == 0, summary.failures
    if indexer.device_lane is not None:
        counts["device_lane_files"] = indexer.device_lane.prepared
        counts["handed_back"] = indexer.device_lane.handed_back
    states = store.file_states()
    vectors = np.stack([store.vector(states[p].id) for p in sorted(states)])
    store.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    return seconds, vectors


def cpu_prepare(settings: Settings, indexer: Indexer, paths: list[Path]) -> float:
    infos = [FileInfo(str(p), 0, 0.0) for p in paths]
    start = time.perf_counter()
    with ThreadPoolExecutor(settings.decode_workers) as pool:
        list(pool.map(lambda info: prepare_file(info, read_local, indexer.prepare_options), infos))
    return time.perf_counter() - start


def device_prepare(lane: DeviceJpegLane, items: list[LaneItem], batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(items), batch_size):
        lane.prepare(items[i : i + batch_size])
    _sync(lane.device)
    return time.perf_counter() - start


def bench_size(settings: Settings, encoder: Encoder, paths: list[Path], megapixels: float, rounds: int) -> dict:  # type: ignore[type-arg]
    bs = settings.batch_size
    folder = paths[0].parent
    pillow = settings.with_overrides(jpeg_decoder="pillow")
    lanes = settings.with_overrides(jpeg_decoder="torchvision")
    probe = Indexer(lanes, Store("sqlite://"), encoder, progress=False)
    lane = probe.device_lane
    assert lane is not None, "the model's preprocessing is not a plain resize and centre crop"
    items = [LaneItem(FileInfo(str(p), 0, 0.0), p.read_bytes(), "") for p in paths]
    # the model's input, prepared once, already on the device
    pixels = torch.cat(
        [torch.stack([r.pixels for r in lane.prepare(items[i : i + bs])]) for i in range(0, len(items), bs)]
    )
    encoder.encode_pixels(pixels[:bs])  # warm-up: kernels, autotuning
    counts: dict[str, int] = {}
    vectors: dict[str, np.ndarray] = {}

    def run_cpu_lane() -> float:
        seconds, vectors["cpu_lane"] = index_run(pillow, encoder, folder, {})
        return seconds

    def run_both() -> float:
        seconds, vectors["both_lanes"] = index_run(lanes, encoder, folder, counts)
        return seconds

    paths_to_time: dict[str, Callable[[], float]] = {
        "model_only": lambda: model_only(encoder, pixels, bs),
        "loop": lambda: canonical_loop(encoder, paths, bs),
        "cpu_lane": run_cpu_lane,
        "both_lanes": run_both,
        "cpu_prepare": lambda: cpu_prepare(pillow, probe, paths),
        "device_prepare": lambda: device_prepare(lane, items, bs),
    }
    names = list(paths_to_time)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rates[name].append(len(paths) / paths_to_time[name]())
        print(f"{megapixels:g} MP round {r + 1}:", {k: round(v[-1], 1) for k, v in rates.items()}, flush=True)
    med = {n: statistics.median(v) for n, v in rates.items()}
    supply = med["cpu_prepare"] + med["device_prepare"]
    return {
        "megapixels": megapixels,
        "images": len(paths),
        "rounds": rounds,
        "rates_img_s": rates,
        **{f"{n}_img_s": v for n, v in med.items()},
        "both_vs_model_only": med["both_lanes"] / med["model_only"],
        "both_vs_loop": med["both_lanes"] / med["loop"],
        "both_vs_cpu_lane": med["both_lanes"] / med["cpu_lane"],
        "bound": "model" if med["model_only"] <= supply else "decoding (both lanes' preparation)",
        "device_lane_share": counts.get("device_lane_files", 0) / len(paths),
        "handed_back": counts.get("handed_back", 0),
        "fidelity_both_vs_cpu_lane": fidelity(vectors["cpu_lane"], vectors["both_lanes"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096, help="distinct photos per size")
    parser.add_argument("--megapixels", default="0.3,3", help="photo sizes, comma-separated")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", choices=["vit", "instrument"], default="vit")
    parser.add_argument("--workers", type=int, default=usable_cores(), help="decode threads (default: every core)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="a few photos, one round (gpu_ingest[-cpu]-quick.*)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_ingest needs a CUDA device and none is available here. On a CPU, python -m benchmarks.ingest "
            "measures ingest; python -m benchmarks.gpu_ingest --device cpu --quick checks this benchmark's code."
        )
    images, rounds = (64, 1) if args.quick else (args.images, args.rounds)
    model = (
        {"model": "ViT-B-32", "pretrained": ""} if args.model == "vit" else {"model": f"local-dir:{INSTRUMENT_MODEL}"}
    )
    settings = Settings(
        **model, **{**NO_TAGS, "device": args.device}, batch_size=args.batch_size, decode_workers=args.workers
    )
    torch.manual_seed(0)
    encoder = Encoder.from_settings(settings)
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-gpu-photos-"))
    try:
        for megapixels in (float(m) for m in args.megapixels.split(",")):
            paths = make_photos(scratch / f"{megapixels:g}mp", images, megapixels)
            rows.append(bench_size(settings, encoder, paths, megapixels, rounds))
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    label = "ViT-B-32 (random weights)" if args.model == "vit" else "clipsearch-tiny-64"
    lines = [
        f"{label} on {args.device}, batch {args.batch_size}, {args.workers} decode threads; medians of interleaved "
        "rounds, img/s.",
        "",
        "| photos | images x rounds | model-only | canonical loop | CPU lane (Pillow) | both lanes (Pillow + device) "
        "| both / model-only | both / loop | both / CPU lane | CPU prepare alone | device prepare alone | bound "
        "| device lane's share | cos vs CPU lane | overlap |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        f = r["fidelity_both_vs_cpu_lane"]
        lines.append(
            f"| {r['megapixels']:g} MP | {r['images']} x {r['rounds']} | {r['model_only_img_s']:.0f} | "
            f"{r['loop_img_s']:.0f} | {r['cpu_lane_img_s']:.0f} | {r['both_lanes_img_s']:.0f} | "
            f"{r['both_vs_model_only']:.2f} | {r['both_vs_loop']:.2f} | {r['both_vs_cpu_lane']:.2f} | "
            f"{r['cpu_prepare_img_s']:.0f} | {r['device_prepare_img_s']:.0f} | {r['bound']} | "
            f"{r['device_lane_share']:.0%} | {f['mean_cosine']:.5f} | {f['top10_overlap']:.3f} |"
        )
    name = "gpu_ingest" + ("-cpu" if args.device == "cpu" else "") + ("-quick" if args.quick else "")
    notes = "" if args.device == "cuda" else "A smoke run on the CPU: it checks the code, not a GPU's speed."
    write_results(name, {"rows": rows, "settings": vars(args)}, "\n".join(lines), notes=notes)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

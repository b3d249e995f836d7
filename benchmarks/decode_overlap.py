"""When the indexer's decode workers should run on a CPU: alongside the model, or only between its batches.

    python -m benchmarks.decode_overlap [--models vit,instrument] [--rounds 3] [--vit-images 96]
                                        [--tiny-images 480]

For each model, in interleaved rounds on the same photos (the order of the two modes alternates per round):
model-only (encode_image on tensors decoded beforehand), then Indexer.run on a fresh data dir with
CLIPSEARCH_DECODE_OVERLAP=always and =between-batches. Reports the median rate of each and its ratio to the median
model-only rate. Results: benchmarks/results/decode_overlap.*
"""

from __future__ import annotations

import argparse
import statistics

import torch

from app.config import Settings
from app.encoder import Encoder
from benchmarks.common import write_results
from benchmarks.ingest import NO_TAGS, clipsearch_run, decoded_pixels, model_only, photo_folder, pick_photos
from tests.helpers import INSTRUMENT_MODEL

MODES = ("always", "between-batches")


def bench(label: str, settings: Settings, count: int, rounds: int) -> dict[str, object]:
    torch.manual_seed(0)
    encoder = Encoder.from_settings(settings)
    with photo_folder(pick_photos(count)) as links:
        _, pixels = decoded_pixels(encoder, settings, links)
        encoder.encode_pixels(pixels[: settings.batch_size])  # warm-up
        rates: dict[str, list[float]] = {"model-only": [], **{m: [] for m in MODES}}
        for r in range(rounds):
            rates["model-only"].append(count / model_only(encoder, pixels, settings.batch_size))
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                overlap = settings.with_overrides(decode_overlap=mode)
                seconds, _, _ = clipsearch_run(overlap, encoder, links[0].parent)
                rates[mode].append(count / seconds)
            print(label, r, {k: round(v[-1], 2) for k, v in rates.items()}, flush=True)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "model": label,
        "images": count,
        "rounds": rounds,
        "rates": rates,
        "median_img_s": medians,
        "vs_model_only": {m: medians[m] / medians["model-only"] for m in MODES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit,instrument")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vit-images", type=int, default=96)
    parser.add_argument("--tiny-images", type=int, default=480)
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        if name == "vit":
            settings = Settings(model="ViT-B-32", pretrained="", batch_size=32, **NO_TAGS)
            rows.append(bench("ViT-B-32 (random weights)", settings, args.vit_images, args.rounds))
        else:
            settings = Settings(model=f"local-dir:{INSTRUMENT_MODEL}", batch_size=32, **NO_TAGS)
            rows.append(bench("clipsearch-tiny-64 (trained, 64 px)", settings, args.tiny_images, args.rounds))
    lines = [
        "Median of interleaved rounds; ratios to the median model-only rate of the same rounds.",
        "",
        "| model | images x rounds | model-only img/s | always img/s | between-batches img/s | always / model-only "
        "| between-batches / model-only |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        med, ratio = row["median_img_s"], row["vs_model_only"]
        assert isinstance(med, dict) and isinstance(ratio, dict)
        lines.append(
            f"| {row['model']} | {row['images']} x {row['rounds']} | {med['model-only']:.2f} | {med['always']:.2f} | "
            f"{med['between-batches']:.2f} | {ratio['always']:.3f} | {ratio['between-batches']:.3f} |"
        )
    write_results("decode_overlap", {"rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()

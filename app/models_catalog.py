"""Recommended models for ``clipsearch models``: published quality, download size and speed measured here.

Published figures (fractions, 0..1) come from open_clip's result tables (docs/ of github.com/mlfoundations/open_clip,
CLIP_benchmark evaluations): ``openclip_classification_results.csv`` (ImageNet-1k zero-shot top-1, parameter
counts), ``openclip_retrieval_results.csv`` (Flickr30k and MSCOCO image retrieval R@1: text query -> image, the
search this product does) and ``openclip_multilingual_retrieval_results.csv`` (Crossmodal-3600 image retrieval R@1,
averaged over its 36 languages). A figure we did not find there is None (shown blank), never estimated.

Speeds were measured once on this project's CI machine with random weights of the same architecture
(``clipsearch models --measure``, see ``measure_speed``), so they hold for the trained weights too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

SOURCE = (
    "open_clip docs: openclip_classification_results.csv, openclip_retrieval_results.csv, "
    "openclip_multilingual_retrieval_results.csv (CLIP_benchmark)"
)
#: Where and when the stored speeds were measured (random weights, CPU, float32, image batch 8, text = the full
#: 77-token encode of one query). Multilingual towers need their Hugging Face config from the hub: not measured.
MEASURED_ON = "2026-11-23, 2-core AMD EPYC (AVX2), torch 2.14.1, quiet machine (clipsearch models --measure)"


@dataclass(frozen=True)
class CatalogModel:
    """One recommended model (CLIPSEARCH_MODEL + CLIPSEARCH_PRETRAINED) and what is known about it."""

    name: str
    pretrained: str
    languages: str  # "English" or "multilingual"
    params_millions: float | None
    imagenet_top1: float | None = None
    flickr_image_r1: float | None = None
    coco_image_r1: float | None = None
    xm3600_image_r1: float | None = None  # multilingual retrieval, mean over 36 languages
    images_per_second: float | None = None  # measured here, see MEASURED_ON
    text_ms: float | None = None  # one query, measured here
    note: str = ""

    @property
    def download_mb(self) -> float | None:
        """float32 weights: parameters x 4 bytes (the published files are this size, give or take metadata)."""
        return None if self.params_millions is None else self.params_millions * 4.0

    @property
    def settings_hint(self) -> str:
        return f"CLIPSEARCH_MODEL={self.name} CLIPSEARCH_PRETRAINED={self.pretrained}"

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "download_mb": self.download_mb, "settings": self.settings_hint}


CATALOG: tuple[CatalogModel, ...] = (
    CatalogModel(
        "ViT-B-32",
        "laion2b_s34b_b79k",
        "English",
        151.28,
        imagenet_top1=0.6656,
        flickr_image_r1=0.6678,
        coco_image_r1=0.3934,
        images_per_second=13.1,
        text_ms=66.1,
        note="the default: fast on CPU",
    ),
    CatalogModel(
        "ViT-B-16",
        "laion2b_s34b_b88k",
        "English",
        149.62,
        imagenet_top1=0.7023,
        flickr_image_r1=0.6984,
        coco_image_r1=0.4231,
        images_per_second=3.0,
        text_ms=80.6,
        note="better ranking, ~4x the image compute of B-32",
    ),
    CatalogModel(
        "ViT-L-14",
        "datacomp_xl_s13b_b90k",
        "English",
        427.62,
        imagenet_top1=0.7921,
        flickr_image_r1=0.7338,
        coco_image_r1=0.4573,
        images_per_second=0.68,
        text_ms=228.7,
        note="best quality here; wants a GPU",
    ),
    CatalogModel(
        "xlm-roberta-base-ViT-B-32",
        "laion5b_s13b_b90k",
        "multilingual",
        366.12,
        imagenet_top1=0.6236,
        flickr_image_r1=0.6448,
        coco_image_r1=0.3778,
        note="B-32 image tower + XLM-R text tower (~100 languages)",
    ),
    CatalogModel(
        "ViT-B-16-SigLIP-i18n-256",
        "webli",
        "multilingual",
        370.63,
        imagenet_top1=0.7513,
        flickr_image_r1=0.7216,
        coco_image_r1=0.4492,
        note="multilingual SigLIP",
    ),
    CatalogModel(
        "nllb-clip-base-siglip",
        "v1",
        "multilingual",
        None,
        xm3600_image_r1=0.5068,
        note="NLLB text tower (200 languages)",
    ),
    CatalogModel(
        "nllb-clip-base",
        "v1",
        "multilingual",
        501.89,
        imagenet_top1=0.2432,
        flickr_image_r1=0.4740,
        coco_image_r1=0.2649,
        note="NLLB text tower; weak on English benchmarks",
    ),
    CatalogModel(
        "xlm-roberta-large-ViT-H-14",
        "frozen_laion5b_s13b_b90k",
        "multilingual",
        1193.01,
        imagenet_top1=0.7695,
        flickr_image_r1=0.7742,
        coco_image_r1=0.4921,
        xm3600_image_r1=0.5022,
        note="strongest multilingual here; GPU only",
    ),
)

HOW_TO_SWITCH = (
    "Switch: set CLIPSEARCH_MODEL and CLIPSEARCH_PRETRAINED (or --model/--pretrained), then run "
    "'clipsearch index PATH...' again: images embedded with another model are detected and re-embedded, and "
    "the server refuses an index built with another model until then. Multilingual models also need their "
    "Hugging Face tokenizer/config, downloaded on first use."
)

COLUMNS = (
    ("model", 26),
    ("pretrained", 24),
    ("lang", 6),
    ("IN-1k", 6),
    ("Flickr", 6),
    ("COCO", 6),
    ("XM3600", 6),
    ("MB", 6),
    ("img/s", 6),
    ("text ms", 7),
)


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def table_lines(models: Sequence[CatalogModel] = CATALOG) -> list[str]:
    """The catalog as a fixed-width text table (blank: not published / not measured)."""
    header = " ".join(f"{name:<{width}}" for name, width in COLUMNS).rstrip()
    lines = [header, "-" * len(header)]
    for m in models:
        cells = (
            m.name,
            m.pretrained,
            "multi" if m.languages == "multilingual" else "en",
            _cell(m.imagenet_top1, ".3f"),
            _cell(m.flickr_image_r1, ".3f"),
            _cell(m.coco_image_r1, ".3f"),
            _cell(m.xm3600_image_r1, ".3f"),
            _cell(m.download_mb, ".0f"),
            _cell(m.images_per_second, ".1f"),
            _cell(m.text_ms, ".1f"),
        )
        lines.append(" ".join(f"{c:<{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True)).rstrip())
    lines += [
        "",
        "IN-1k: ImageNet zero-shot top-1; Flickr/COCO: image retrieval R@1 (text -> image); XM3600: multilingual "
        "image retrieval R@1 (36 languages); MB: float32 download (params x 4 bytes).",
        f"Quality: {SOURCE}. Blank: not published there.",
        f"Speed (random weights, same architecture): {MEASURED_ON}. Blank: not measured.",
        HOW_TO_SWITCH,
    ]
    return lines


@dataclass(frozen=True)
class SpeedMeasurement:
    model: str
    params_millions: float
    images_per_second: float
    text_ms: float
    batch_size: int
    device: str


def measure_speed(
    model_name: str, *, batch_size: int = 16, batches: int = 2, text_queries: int = 10, device: str = "cpu"
) -> SpeedMeasurement:
    """Image throughput and single-query text latency of an architecture with random weights (no download).

    ``model_name`` is an open_clip architecture or ``local-dir:/path``; one warm-up batch/query is not timed.
    """
    import open_clip
    import torch

    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=None, device=device)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    size = model.visual.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    pixels = torch.randn(batch_size, 3, height, width, device=device)
    tokens = tokenizer(["a photo of a dog playing on the beach"]).to(device)
    with torch.inference_mode():
        model.encode_image(pixels)
        started = time.perf_counter()
        for _ in range(batches):
            model.encode_image(pixels)
        image_seconds = time.perf_counter() - started
        model.encode_text(tokens)
        times = []
        for _ in range(text_queries):
            started = time.perf_counter()
            model.encode_text(tokens)
            times.append(time.perf_counter() - started)
    return SpeedMeasurement(
        model=model_name,
        params_millions=round(params, 2),
        images_per_second=batch_size * batches / image_seconds,
        text_ms=float(np.median(times)) * 1000.0,
        batch_size=batch_size,
        device=device,
    )

"""Near-duplicate look-up benchmark: our staged look-up vs a plain pHash threshold, per edit kind.

    python -m benchmarks.dupes [--originals N] [--catalog N] [--quick] [--model local-dir:PATH] [--workers N]

1. Real pairs: Caltech-101 Faces_easy/image_N (query, a tight crop) -> Faces/image_N (in the catalog); the other
   434 face photos (often the same person, same room, seconds apart) are the hard negatives.
2. Made copies: originals from coco-mini, caltech101 and photo-samples, edited with a fixed seed (JPEG, resize,
   crop, rotation, flip, colour, blur, text, border, canvas, a strong mix); everything else in shared/data
   (cifar10 and fashion-mnist included) is a distractor in the catalog.
3. Unrelated queries: photos held out of the catalog; any near_duplicate/exact verdict is a false positive.

Our look-up: prepare the query (hashes, ORB of it and of its mirror image), shortlist candidates (hash
neighbours + FeatureIndex ORB votes [+ CLIP neighbours with --model]), then app.dupes.lookup. The baseline
takes the nearest catalog image by pHash and calls it a near-duplicate when within BASELINE_PHASH bits.
Without --model the CLIP stage is off: a random-weight model would add nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from app.dupes import (
    Candidate,
    DupeThresholds,
    FeatureIndex,
    HashIndex,
    PreparedImage,
    Shortlisted,
    Verdict,
    compare,
    hamming,
    lookup,
    prepare_catalog_image,
    prepare_query,
    shortlist,
    verify,
)
from app.dupes.lookup import FEATURE_K, HASH_KNN, HASH_MAX, HASH_RADIUS, MIN_VOTES
from benchmarks.common import write_results

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CLIPSEARCH_SHARED_DIR", ROOT.parent / "shared")).resolve() / "data"

BASELINE_PHASH = 10  # imagededup's default pHash threshold
CLIP_K = 8  # CLIP neighbours added to the shortlist with --model

# Copies that already exist inside shared/data: a query made from one of them is rightly matched by the others.
# Found with --scan-known (every real photo looked up against the others) and checked by eye; the scan's other
# hits were not copies and stay counted as false positives: two different scissors and a scissors/wrench pair
# on white (now rejected by the texture agreement), and Faces/image_0159-0163, a burst of one person in front
# of a tripod camera that still verifies as a copy (see the notes in results/dupes.md).
_C = "caltech101/"
KNOWN_COPIES: list[tuple[str, ...]] = [
    ("photo-samples/opencv/Blender_Suzanne1.jpg", "photo-samples/opencv/Blender_Suzanne2.jpg"),  # mirrored
    ("photo-samples/opencv/ela_original.jpg", "photo-samples/opencv/ela_modified.jpg"),  # pasted logo
    *[
        tuple(f"{_C}{cls}/image_{n:04d}.jpg" for n in numbers)
        for cls, numbers in (
            ("Leopards", (25, 125)),  # mirrored
            ("anchor", (3, 39)),  # recoloured drawing
            ("anchor", (5, 16)),
            ("anchor", (7, 22)),  # re-cropped
            ("anchor", (11, 15)),
            ("beaver", (4, 22)),
            ("brontosaurus", (9, 13)),  # background changed
            ("butterfly", (17, 31)),  # labels added
            ("cougar_body", (2, 33)),  # border
            ("crayfish", (48, 51)),  # background changed
            ("dollar_bill", (4, 25)),  # the same bill image, alone and on a fanned stack
            ("dollar_bill", (49, 52)),
            ("emu", (22, 37)),  # rotated
            ("euphonium", (20, 21)),  # recoloured
            ("garfield", (23, 24, 25, 32, 33, 34)),  # one drawing, cropped and recoloured
            ("grand_piano", (3, 46)),
            ("grand_piano", (57, 66)),  # the same photo in an advertisement
            ("hawksbill", (29, 30)),  # pasted on a map
            ("ibis", (76, 79)),
            ("inline_skate", (27, 30)),
            ("menorah", (15, 17, 53)),
            ("metronome", (2, 3, 4)),
            ("metronome", (5, 6, 10)),  # mirrored, recoloured
            ("octopus", (2, 3, 4, 5, 6)),  # one engraving with edited heads
            ("okapi", (4, 27)),
            ("pagoda", (3, 31)),
            ("pagoda", (7, 13)),
            ("platypus", (4, 8)),
            ("platypus", (15, 22, 30)),
            ("snoopy", (8, 15)),  # border
            ("snoopy", (17, 18)),  # one drawing, with a heart or with captions
            ("stegosaurus", (15, 58)),
            ("stop_sign", (1, 22, 49)),
            ("strawberry", (2, 33)),
            ("tick", (2, 16)),  # rotated
            ("umbrella", (44, 57)),
            ("water_lilly", (1, 9)),
            ("wrench", (3, 20)),
            ("yin_yang", (11, 12)),
            ("yin_yang", (14, 45)),  # the symbol recoloured
        )
    ],
    (f"{_C}flamingo/image_0040.jpg", f"{_C}flamingo_head/image_0030.jpg"),  # cropped
    (f"{_C}flamingo/image_0060.jpg", f"{_C}flamingo_head/image_0039.jpg"),
    (f"{_C}crocodile/image_0005.jpg", f"{_C}crocodile_head/image_0008.jpg"),
]
# Pairs of different photos of one scene (stereo, another viewpoint): must not be near_duplicate.
SCENE_PAIRS = [
    ("photo-samples/opencv/aloeL.jpg", "photo-samples/opencv/aloeR.jpg"),
    ("photo-samples/opencv/leuvenA.jpg", "photo-samples/opencv/leuvenB.jpg"),
    ("photo-samples/opencv/left.jpg", "photo-samples/opencv/right.jpg"),
    ("photo-samples/opencv/aero1.jpg", "photo-samples/opencv/aero3.jpg"),
] + [(f"photo-samples/opencv/left{i:02d}.jpg", f"photo-samples/opencv/right{i:02d}.jpg") for i in (1, 2, 3, 4, 5, 6)]

# --- edits ------------------------------------------------------------------------------------------


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _sign(rng: random.Random) -> int:
    return rng.choice((-1, 1))


def _crop(image: Image.Image, keep: float, rng: random.Random) -> Image.Image:
    """Keep ``keep`` of the width and of the height (crop to 50 %: a quarter of the area)."""
    w, h = image.size
    cw, ch = max(8, round(w * keep)), max(8, round(h * keep))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return image.crop((x, y, x + cw, y + ch))


def _resize(image: Image.Image, factor: float) -> Image.Image:
    w, h = image.size
    return image.resize((max(8, round(w * factor)), max(8, round(h * factor))), Image.Resampling.LANCZOS)


def _rotate(image: Image.Image, degrees: float) -> Image.Image:
    return image.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=False)


def _text(image: Image.Image, rng: random.Random) -> Image.Image:
    w, h = image.size
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    x = w * rng.uniform(0.02, 0.1)
    big, small = _font(max(12, h // 8)), _font(max(10, h // 16))
    draw.text((x, h * rng.uniform(0.3, 0.5)), "© Stock Photos 2024", font=big, fill=(255, 255, 255, 160))
    draw.text((x, h * 0.85), "www.example.com", font=small, fill=(255, 255, 0, 230))
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def _border(image: Image.Image, rng: random.Random) -> Image.Image:
    side = max(4, round(0.08 * max(image.size)))
    colour = tuple(rng.randint(0, 255) for _ in range(3))
    return ImageOps.expand(image, border=(side, side // 2, side, side // 2), fill=colour)


def _canvas(image: Image.Image, rng: random.Random) -> Image.Image:
    """Paste a 0.8x copy onto a 1.8x1.6 canvas of coloured stripes (a screenshot, a collage)."""
    w, h = image.size
    cw, ch = round(w * 1.8), round(h * 1.6)
    canvas = Image.new("RGB", (cw, ch), tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(canvas)
    for y in range(0, ch, max(4, ch // 12)):
        draw.rectangle((0, y, cw, y + max(2, ch // 24)), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    small = _resize(image, 0.8)
    canvas.paste(small, (rng.randint(0, cw - small.width), rng.randint(0, ch - small.height)))
    return canvas


def _mix(image: Image.Image, rng: random.Random) -> Image.Image:
    """Crop to 80 %, rotate 4 degrees, saturate, brighten, overlay text, shrink to 0.6x (then JPEG 50)."""
    image = _rotate(_crop(image, 0.8, rng), 4 * _sign(rng))
    image = ImageEnhance.Brightness(ImageEnhance.Color(image).enhance(1.4)).enhance(1.15)
    return _resize(_text(image, rng), 0.6)


Edit = Callable[[Image.Image, random.Random], Image.Image]
EDITS: dict[str, Edit] = {
    "jpeg75": lambda im, r: im,
    "jpeg50": lambda im, r: im,
    "jpeg30": lambda im, r: im,
    "jpeg10": lambda im, r: im,
    "resize0.5": lambda im, r: _resize(im, 0.5),
    "resize0.25": lambda im, r: _resize(im, 0.25),
    "crop90": lambda im, r: _crop(im, 0.9, r),
    "crop70": lambda im, r: _crop(im, 0.7, r),
    "crop50": lambda im, r: _crop(im, 0.5, r),
    "rot5": lambda im, r: _rotate(im, 5 * _sign(r)),
    "rot10": lambda im, r: _rotate(im, 10 * _sign(r)),
    "rot90": lambda im, r: im.transpose(Image.Transpose.ROTATE_90 if _sign(r) > 0 else Image.Transpose.ROTATE_270),
    "flip": lambda im, r: ImageOps.mirror(im),
    "grey": lambda im, r: ImageOps.grayscale(im).convert("RGB"),
    "brightness30": lambda im, r: ImageEnhance.Brightness(im).enhance(1 + 0.3 * _sign(r)),
    "contrast30": lambda im, r: ImageEnhance.Contrast(im).enhance(1 + 0.3 * _sign(r)),
    "blur": lambda im, r: im.filter(ImageFilter.GaussianBlur(max(1.0, max(im.size) / 250))),
    "text": _text,
    "border": _border,
    "canvas": _canvas,
    "mix": _mix,
}
JPEG_QUALITY = {"jpeg75": 75, "jpeg50": 50, "jpeg30": 30, "jpeg10": 10, "mix": 50}
MILD: tuple[str, ...] = ("jpeg75", "jpeg50", "jpeg30", "jpeg10", "resize0.5", "resize0.25", "grey")
MILD += ("brightness30", "contrast30", "flip", "border")
HARD = ("crop50", "rot5", "rot10", "rot90")


def make_query(source: Path, kind: str, seed: int) -> bytes:
    """The edited copy as the bytes a user would upload (edits saved as JPEG 90 unless the kind says)."""
    if kind == "exact":
        return source.read_bytes()
    rng = random.Random(f"{seed}:{source.name}:{kind}")
    image = Image.open(source).convert("RGB")
    return _jpeg(EDITS[kind](image, rng), JPEG_QUALITY.get(kind, 90))


# --- the data ---------------------------------------------------------------------------------------


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


@dataclass
class Dataset:
    catalog: list[str]  # relative paths; the id of an image is its position
    originals: list[str]
    faces: list[str]  # Faces_easy queries (their Faces twin is in the catalog)
    unrelated: list[str]  # held out of the catalog
    pad_sources: list[str]  # distractor photos that padding may be made from
    groups: dict[str, set[str]] = field(default_factory=dict)  # path -> the catalog paths that are copies of it


def build_dataset(n_originals: int, max_catalog: int | None, n_faces: int, n_unrelated: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    rel = lambda p: str(p.relative_to(DATA))  # noqa: E731
    caltech = [rel(p) for p in _images(DATA / "caltech101") if p.parent.name not in ("Faces", "Faces_easy")]
    faces = [rel(p) for p in _images(DATA / "caltech101" / "Faces")]
    faces_easy = [rel(p) for p in _images(DATA / "caltech101" / "Faces_easy")]
    coco = [rel(p) for p in _images(DATA / "coco-mini")]
    samples = [rel(p) for p in _images(DATA / "photo-samples")]
    tiny = [rel(p) for p in _images(DATA / "cifar10-test")] + [rel(p) for p in _images(DATA / "fashion-mnist-test")]

    photos = coco + caltech + samples
    rng.shuffle(photos)
    originals = photos[:n_originals]
    unrelated = photos[n_originals : n_originals + n_unrelated]
    held_out = set(unrelated)
    distractors = [p for p in photos[n_originals:] if p not in held_out] + faces + tiny
    rng.shuffle(distractors)
    # Both members of a known copy pair are kept whenever one is (else a correct match would count as a miss).
    partners = {p: set(group) for group in KNOWN_COPIES for p in group}
    scene = {p for pair in SCENE_PAIRS for p in pair}
    must = set(originals) | {q for p in originals if p in partners for q in partners[p]} | scene
    unrelated = [p for p in unrelated if p not in partners and p not in scene]
    room = None if max_catalog is None else max(0, max_catalog - len(must))
    chosen_faces = sorted(rng.sample(range(len(faces)), min(n_faces, len(faces))))
    must |= {faces[i] for i in chosen_faces}
    rest = [p for p in distractors if p not in must]
    catalog = sorted(must) + (rest if room is None else rest[:room])
    groups = {p: {p} | partners.get(p, set()) for p in catalog}
    face_queries = [faces_easy[i] for i in chosen_faces]
    for i in chosen_faces:
        groups[faces_easy[i]] = {faces[i]}
    pad_sources = [p for p in photos[n_originals:] if p not in held_out and p not in must and p not in partners]
    return Dataset(catalog, originals, face_queries, unrelated, pad_sources, groups)


# --- preparing and indexing the catalog ---------------------------------------------------------------


def _decode(data: bytes) -> Image.Image:
    image: Image.Image = Image.open(io.BytesIO(data))
    image = ImageOps.exif_transpose(image) or image
    return image.convert("RGB")


PAD_PREFIX = "pad:"


def load_catalog_image(key: str) -> Image.Image:
    """A catalog image: a file under DATA, or a padding distractor ``pad:<n>:<path>`` made from one."""
    if not key.startswith(PAD_PREFIX):
        return _decode((DATA / key).read_bytes())
    _, number, path = key.split(":", 2)
    rng = random.Random(f"pad:{number}:{path}")
    image = _crop(_decode((DATA / path).read_bytes()), rng.uniform(0.6, 0.85), rng)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    return _resize(image, rng.uniform(0.7, 1.3))


def padding(catalog: list[str], sources: list[str], total: int, seed: int) -> list[str]:
    """Keys of synthetic distractors (crop, maybe flip, colour, resize of distractor photos) up to ``total``."""
    rng = random.Random(seed)
    return [f"{PAD_PREFIX}{i}:{rng.choice(sources)}" for i in range(max(0, total - len(catalog)))]


def _prepare_catalog_item(key: str) -> PreparedImage:
    return prepare_catalog_image(load_catalog_image(key))


def _pool(workers: int) -> Any:
    return mp.get_context("fork").Pool(workers, initializer=_single_thread)


def _single_thread() -> None:
    import cv2
    import faiss

    from app.dupes.resample import single_threaded_blas

    cv2.setNumThreads(1)
    faiss.omp_set_num_threads(1)
    single_threaded_blas()  # as the look-up service runs its hashes


@dataclass
class Catalog:
    paths: list[str]
    prepared: list[PreparedImage]
    hashes: HashIndex
    features: FeatureIndex
    vectors: np.ndarray | None  # CLIP vectors (unit rows) when a model is given
    digests: dict[str, list[int]]


def build_catalog(paths: list[str], workers: int, encoder: Any | None) -> tuple[Catalog, dict[str, float]]:
    timings = {}
    start = time.perf_counter()
    with _pool(workers) as pool:
        prepared = pool.map(_prepare_catalog_item, paths, chunksize=16)
    timings["prepare_s"] = time.perf_counter() - start
    ids = list(range(len(paths)))
    start = time.perf_counter()
    hashes = HashIndex()
    hashes.add(ids, [p.hashes for p in prepared])
    timings["hash_index_s"] = time.perf_counter() - start
    start = time.perf_counter()
    features = FeatureIndex.build(ids, prepared)
    timings["feature_index_s"] = time.perf_counter() - start
    vectors = None
    if encoder is not None:
        start = time.perf_counter()
        chunks = []
        for i in range(0, len(paths), 64):
            chunks.append(encoder.encode_images([load_catalog_image(p) for p in paths[i : i + 64]]))
        vectors = np.concatenate(chunks)
        timings["clip_encode_s"] = time.perf_counter() - start
    digests: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(prepared):
        digests[item.pixel_digest].append(i)
    return Catalog(paths, prepared, hashes, features, vectors, dict(digests)), timings


# --- one query ------------------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}


@dataclass
class QueryTask:
    kind: str
    source: str  # a path under DATA
    truth: list[int]  # catalog ids that are correct answers (empty: unrelated query)


def candidates_for(query: PreparedImage, catalog: Catalog, query_vector: np.ndarray | None) -> list[Shortlisted]:
    clip: list[tuple[int, float]] = []
    if query_vector is not None and catalog.vectors is not None:
        scores = catalog.vectors @ query_vector
        clip = [(int(i), float(scores[i])) for i in np.argsort(-scores)[:CLIP_K]]
    return shortlist(query, hashes=catalog.hashes, features=catalog.features, clip_neighbours=clip)


def run_query(task: QueryTask) -> dict[str, Any]:
    catalog: Catalog = _STATE["catalog"]
    thresholds: DupeThresholds = _STATE["thresholds"]
    encoder = _STATE.get("encoder")
    seed: int = _STATE["seed"]
    path = DATA / task.source
    data = make_query(path, task.kind, seed) if task.kind not in ("faces", "unrelated") else path.read_bytes()
    truth = set(task.truth)

    start, cpu_start = time.perf_counter(), time.process_time()
    image = _decode(data)
    query = prepare_query(image)
    t_prepared = time.perf_counter()
    vector = encoder.encode_images([image])[0] if encoder is not None else None
    listed = candidates_for(query, catalog, vector)
    t_shortlisted = time.perf_counter()
    result = lookup(
        query,
        (Candidate(c.id, catalog.prepared[c.id], c.cosine) for c in listed),
        thresholds=thresholds,
        min_verdict=Verdict.DIFFERENT,
    )
    end, cpu_end = time.perf_counter(), time.process_time()

    top = result.matches[0] if result.matches else None
    by_id = {m.id: m for m in result.matches}
    truth_verdicts = [by_id[i].verdict for i in truth if i in by_id]
    best_truth = max(truth_verdicts, key=lambda v: v.rank) if truth_verdicts else Verdict.DIFFERENT
    false_hits = [m for m in result.matches if m.id not in truth and m.verdict.at_least(Verdict.NEAR_DUPLICATE)]
    record: dict[str, Any] = {
        "kind": task.kind,
        "source": task.source,
        "r1": bool(top is not None and top.id in truth),
        "near": best_truth.at_least(Verdict.NEAR_DUPLICATE),
        "exact": best_truth == Verdict.EXACT,
        "truth_verdict": best_truth.value,
        "fp": bool(false_hits),
        "fp_ids": [catalog.paths[m.id] for m in false_hits[:3]],
        "ms": (end - start) * 1000,
        "cpu_ms": (cpu_end - cpu_start) * 1000,
        "prepare_ms": (t_prepared - start) * 1000,
        "shortlist_ms": (t_shortlisted - t_prepared) * 1000,
        "verify_ms": (end - t_shortlisted) * 1000,
        "candidates": len(listed),
        "in_shortlist": {
            name: any(c.id in truth and name in c.sources for c in listed)
            for name in ("hash", "orb") + (("clip",) if vector is not None else ())
        },
    }
    truth_match = next((by_id[i] for i in truth if i in by_id), None)
    if truth_match is not None:
        e = truth_match.evidence
        record["truth_evidence"] = {
            "inliers": e.inliers,
            "inlier_ratio": round(e.inlier_ratio, 3),
            "agreement": round(e.geometry.agreement, 3),
            "texture_agreement": round(e.geometry.texture_agreement, 3),
            "containment": round(e.geometry.containment, 3),
            "phash": e.phash_distance,
            "dhash": e.dhash_distance,
        }
    if false_hits:
        record["fp_reason"] = false_hits[0].evidence.reason
    other = next((m for m in result.matches if m.id not in truth), None)
    if other is not None:
        g = other.evidence.geometry
        record["top_other"] = {
            "verdict": other.verdict.value,
            "inliers": g.inliers,
            "inlier_ratio": round(g.inlier_ratio, 3),
            "agreement": round(g.agreement, 3),
            "texture_agreement": round(g.texture_agreement, 3),
            "containment": round(g.containment, 3),
            "phash": other.evidence.phash_distance,
            "dhash": other.evidence.dhash_distance,
        }
    record.update(_baseline(data, catalog, truth))
    return record


def _baseline(data: bytes, catalog: Catalog, truth: set[int]) -> dict[str, Any]:
    """Plain pHash: the nearest catalog image by pHash, a near-duplicate within BASELINE_PHASH bits."""
    start = time.perf_counter()
    from app.dupes import ImageHashes

    phash = ImageHashes.of(_decode(data)).phash
    nearest = catalog.hashes.search(ImageHashes(phash, 0, phash, 0), 1)  # no mirror: a plain pHash look-up
    ms = (time.perf_counter() - start) * 1000
    if not nearest:
        return {"b_r1": False, "b_near": False, "b_fp": False, "b_ms": ms}
    best = nearest[0]
    distance = hamming(phash, catalog.prepared[best.id].hashes.phash)
    # Every catalog image within the threshold is reported as a near-duplicate.
    within = catalog.hashes.range_search(ImageHashes(phash, 0, phash, 0), BASELINE_PHASH)
    within_ids = {n.id for n in within if hamming(phash, catalog.prepared[n.id].hashes.phash) <= BASELINE_PHASH}
    truth_distance = min((hamming(phash, catalog.prepared[i].hashes.phash) for i in truth), default=64)
    return {
        "b_r1": bool(truth) and truth_distance == distance,  # ties count for the baseline
        "b_near": truth_distance <= BASELINE_PHASH,
        "b_fp": bool(within_ids - truth),
        "b_ms": ms,
    }


def _scan_one(index: int) -> list[tuple[int, int, str]]:
    """Verified copies of one catalog photo among the others (for --scan-known)."""
    catalog: Catalog = _STATE["catalog"]
    query = prepare_query(load_catalog_image(catalog.paths[index]))
    listed = [c for c in shortlist(query, hashes=catalog.hashes, features=catalog.features) if c.id != index]
    result = lookup(
        query, (Candidate(c.id, catalog.prepared[c.id]) for c in listed), min_verdict=Verdict.NEAR_DUPLICATE
    )
    return [(index, m.id, m.evidence.reason) for m in result.matches]


def scan_known_copies(workers: int) -> None:
    """Print the pairs of real photos in shared/data that verify as copies of each other.

    Caltech-101 holds some (the same photo twice, mirrored, re-cropped, rotated): their list, checked by eye,
    is KNOWN_COPIES, so that finding one of them is not counted as a false positive.
    """
    photos = [str(p.relative_to(DATA)) for p in _images(DATA / "caltech101") if p.parent.name != "Faces_easy"]
    photos += [str(p.relative_to(DATA)) for p in _images(DATA / "coco-mini") + _images(DATA / "photo-samples")]
    catalog, _ = build_catalog(photos, workers, None)
    _STATE.update({"catalog": catalog})
    with mp.get_context("fork").Pool(workers, initializer=_single_thread) as pool:
        found = [pair for pairs in pool.map(_scan_one, range(len(photos)), chunksize=16) for pair in pairs]
    seen = set()
    for a, b, reason in sorted(found):
        key = (min(a, b), max(a, b))
        if key not in seen:
            seen.add(key)
            print(f'    ("{photos[key[0]]}", "{photos[key[1]]}"),  # {reason[:70]}')


DETECTOR_KINDS = ("jpeg10", "resize0.25", "crop50", "rot10", "blur", "mix")


def compare_detectors(originals: list[str], seed: int) -> tuple[str, dict[str, Any]]:
    """ORB (what app.dupes uses) against SIFT on the same work images, same ratio test and RANSAC.

    For each edit kind: the share of copies verified with >= 15 inliers, the median inliers, and the CPU time
    to extract features (query side) and to match + fit one pair.
    """
    import cv2

    from app.dupes.features import CATALOG_FEATURES, QUERY_FEATURES, work_image

    sift_query = cv2.SIFT_create(QUERY_FEATURES)  # type: ignore[attr-defined]
    sift_catalog = cv2.SIFT_create(CATALOG_FEATURES)  # type: ignore[attr-defined]
    matcher = cv2.BFMatcher(cv2.NORM_L2)

    def sift(detector: Any, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        grey, _ = work_image(image)
        keypoints, descriptors = detector.detectAndCompute(grey, None)
        points = np.array([k.pt for k in keypoints], dtype=np.float32).reshape(-1, 2)
        return points, descriptors if descriptors is not None else np.zeros((0, 128), np.float32)

    def sift_inliers(q: tuple[np.ndarray, np.ndarray], c: tuple[np.ndarray, np.ndarray]) -> int:
        if len(q[0]) < 2 or len(c[0]) < 2:
            return 0
        pairs = matcher.knnMatch(q[1], c[1], k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.8 * p[1].distance]
        if len(good) < 3:
            return 0
        src = c[0][[m.trainIdx for m in good]]
        dst = q[0][[m.queryIdx for m in good]]
        _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=4.0)
        return int(mask.sum()) if mask is not None else 0

    rows: list[dict[str, Any]] = []
    for kind in DETECTOR_KINDS:
        orb_inl, sift_inl, times = [], [], defaultdict(list)
        for source in originals:
            original = load_catalog_image(source)
            edited = _decode(make_query(DATA / source, kind, seed))
            t0 = time.process_time()
            orb_q = prepare_query(edited)
            t1 = time.process_time()
            orb_c = prepare_catalog_image(original)
            t2 = time.process_time()
            orb_inl.append(verify(orb_q, orb_c).inliers)
            t3 = time.process_time()
            sift_q = sift(sift_query, edited)
            t4 = time.process_time()
            sift_c = sift(sift_catalog, original)
            t5 = time.process_time()
            sift_inl.append(sift_inliers(sift_q, sift_c))
            t6 = time.process_time()
            times["orb_extract"].append(t1 - t0)
            times["orb_match"].append(t3 - t2)
            times["sift_extract"].append(t4 - t3)
            times["sift_match"].append(t6 - t5)
        rows.append(
            {
                "kind": kind,
                "pairs": len(originals),
                "orb_verified": _rate([i >= 15 for i in orb_inl]),
                "sift_verified": _rate([i >= 15 for i in sift_inl]),
                "orb_median_inliers": float(np.median(orb_inl)),
                "sift_median_inliers": float(np.median(sift_inl)),
                **{f"{k}_ms": 1000 * float(np.median(v)) for k, v in times.items()},
            }
        )
    lines = [
        "| edit kind | pairs | verified ORB | verified SIFT | median inliers ORB | SIFT "
        "| extract ms ORB (x2: + mirror) | SIFT | match+fit ms ORB (both orientations if needed) | SIFT |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['pairs']} | {_f(r['orb_verified'])} | {_f(r['sift_verified'])} "
            f"| {r['orb_median_inliers']:.0f} | {r['sift_median_inliers']:.0f} | {r['orb_extract_ms']:.0f} "
            f"| {r['sift_extract_ms']:.0f} | {r['orb_match_ms']:.1f} | {r['sift_match_ms']:.1f} |"
        )
    return "\n".join(lines), {"rows": rows}


def calibration(records: list[dict[str, Any]], bursts: list[dict[str, Any]], t: DupeThresholds) -> list[str]:
    """The numbers behind each threshold: where copies and non-copies fall on each piece of evidence."""
    copies = [r["truth_evidence"] for r in records if "truth_evidence" in r and r["kind"] not in ("exact",)]
    verified = [e for e in copies if e["inliers"] >= t.min_inliers]
    others = [r["top_other"] for r in records if "top_other" in r and r["kind"] == "unrelated"]
    unrelated = [r["top_other"] for r in records if "top_other" in r and r["top_other"]["inliers"] < t.min_inliers]
    aligned_bursts = [b for b in bursts if b["inliers"] >= t.min_inliers]
    ratios = [e["inlier_ratio"] for e in verified if e["agreement"] >= t.min_agreement]

    def q(values: list[float], p: float) -> str:
        return f"{np.percentile(values, p, method='lower'):.2f}".removesuffix(".00") if values else "–"

    heavy = [e for r, e in ((r, r.get("truth_evidence")) for r in records) if e and r["kind"] in ("mix", "jpeg10")]
    heavy = [e for e in heavy if e["inliers"] >= t.min_inliers]
    return [
        "",
        "Calibration (the evidence of every query's true copy vs the best-ranked other candidate):",
        f"- min_inliers = {t.min_inliers}: inliers of the true copy p1/p5 = "
        f"{q([e['inliers'] for e in copies], 1)}/{q([e['inliers'] for e in copies], 5)}; the best candidate of a "
        f"held-out (unrelated) photo p50/p99/max = {q([o['inliers'] for o in others], 50)}/"
        f"{q([o['inliers'] for o in others], 99)}/{max([o['inliers'] for o in others], default=0)}.",
        f"- min_inlier_ratio = {t.min_inlier_ratio}: verified copies p0.5/p1 = {q(ratios, 0.5)}/{q(ratios, 1)}; "
        "the chessboard pairs (right04/left12) align 15-18 of ~250 matches (6-10 %).",
        f"- min_agreement = {t.min_agreement}: agreement of verified copies p2/p5/p10 = "
        f"{q([e['agreement'] for e in verified], 2)}/{q([e['agreement'] for e in verified], 5)}/"
        f"{q([e['agreement'] for e in verified], 10)} (JPEG 10 and the strong mix p10 = "
        f"{q([e['agreement'] for e in heavy], 10)}); burst shots that align (Faces_easy/N vs Faces/N+-1,2, "
        f"{len(aligned_bursts)} pairs) p99/max = {q([b['agreement'] for b in aligned_bursts], 99)}/"
        f"{max([b['agreement'] for b in aligned_bursts], default=0):.2f}.",
        f"- min_texture_agreement = {t.min_texture_agreement}: verified copies p1/p5 = "
        f"{q([e['texture_agreement'] for e in verified], 1)}/{q([e['texture_agreement'] for e in verified], 5)}; "
        "product shots on white that align by chance score 0.29-0.40 (scissors/wrench, --scan-known).",
        f"- min_containment = {t.min_containment}: copies' overlap p1 = {q([e['containment'] for e in verified], 1)}; "
        "two views that merely overlap (a panorama's neighbouring frames) are 'similar'.",
        f"- hash_near = {t.hash_near}: only used when local features cannot judge; the best non-matching "
        f"candidates ({len(unrelated)}, < {t.min_inliers} inliers) have pHash p0.5/p1 = "
        f"{q([o['phash'] for o in unrelated], 0.5)}/{q([o['phash'] for o in unrelated], 1)} bits.",
    ]


def _init_worker(state: dict[str, Any]) -> None:
    _single_thread()
    _STATE.update(state)


# --- pairs judged directly (no shortlist) ------------------------------------------------------------------


def judge_pairs(pairs: list[tuple[str, str]], thresholds: DupeThresholds) -> list[dict[str, Any]]:
    out = []
    for a, b in pairs:
        qa = prepare_query(_decode((DATA / a).read_bytes()))
        qb = prepare_catalog_image(_decode((DATA / b).read_bytes()))
        e = compare(qa, qb, thresholds=thresholds)
        g = e.geometry
        out.append(
            {
                "query": a,
                "candidate": b,
                "verdict": e.verdict.value,
                "reason": e.reason,
                "inliers": g.inliers,
                "agreement": round(g.agreement, 3),
                "texture_agreement": round(g.texture_agreement, 3),
                "containment": round(g.containment, 3),
            }
        )
    return out


def burst_pairs(faces: list[str], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """Faces_easy/image_N against Faces/image_M with M = N +- 1, 2: mostly the same person seconds apart."""
    pairs = []
    for query in faces[:n]:
        number = int(Path(query).stem.split("_")[1])
        for step in (-2, -1, 1, 2):
            other = DATA / "caltech101" / "Faces" / f"image_{number + step:04d}.jpg"
            if other.exists():
                pairs.append((query, str(other.relative_to(DATA))))
    rng.shuffle(pairs)
    return pairs


# --- report ------------------------------------------------------------------------------------------------


def _rate(values: list[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_kind[record["kind"]].append(record)
    order = ["exact", *EDITS, "faces", "unrelated"]
    rows = []
    for kind in order:
        group = by_kind.get(kind)
        if not group:
            continue
        has_truth = kind != "unrelated"
        rows.append(
            {
                "kind": kind,
                "queries": len(group),
                "r1": _rate([r["r1"] for r in group]) if has_truth else None,
                "near": _rate([r["near"] for r in group]) if has_truth else None,
                "fp": _rate([r["fp"] for r in group]),
                "p50_ms": _pct([r["ms"] for r in group], 50),
                "p95_ms": _pct([r["ms"] for r in group], 95),
                "cpu_p50_ms": _pct([r["cpu_ms"] for r in group], 50),
                "b_r1": _rate([r["b_r1"] for r in group]) if has_truth else None,
                "b_near": _rate([r["b_near"] for r in group]) if has_truth else None,
                "b_fp": _rate([r["b_fp"] for r in group]),
                "b_p50_ms": _pct([r["b_ms"] for r in group], 50),
                "shortlist": {
                    name: _rate([r["in_shortlist"].get(name, False) for r in group])
                    for name in sorted({n for r in group for n in r["in_shortlist"]})
                }
                if has_truth
                else {},
            }
        )
    return rows


def _f(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def render(rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> str:
    lines = [
        "| edit kind | queries | R@1 ours | R@1 pHash | near-dup+ ours | near-dup+ pHash | FP ours | FP pHash "
        "| p50 ms ours | p95 ms ours | p50 CPU ms ours | p50 ms pHash | in shortlist: hash / orb |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        short = r["shortlist"]
        lines.append(
            f"| {r['kind']} | {r['queries']} | {_f(r['r1'])} | {_f(r['b_r1'])} | {_f(r['near'])} | {_f(r['b_near'])} "
            f"| {_f(r['fp'])} | {_f(r['b_fp'])} | {_f(r['p50_ms'], 0)} | {_f(r['p95_ms'], 0)} "
            f"| {_f(r['cpu_p50_ms'], 0)} | {_f(r['b_p50_ms'], 1)} "
            f"| {_f(short.get('hash'), 2)} / {_f(short.get('orb'), 2)} |"
        )
    made = [r for r in records if r["kind"] in EDITS or r["kind"] == "exact"]
    all_q = records
    lines.append(
        f"| **all made copies** | {len(made)} | {_f(_rate([r['r1'] for r in made]))} "
        f"| {_f(_rate([r['b_r1'] for r in made]))} | {_f(_rate([r['near'] for r in made]))} "
        f"| {_f(_rate([r['b_near'] for r in made]))} | {_f(_rate([r['fp'] for r in all_q]))} "
        f"| {_f(_rate([r['b_fp'] for r in all_q]))} | {_f(_pct([r['ms'] for r in all_q], 50), 0)} "
        f"| {_f(_pct([r['ms'] for r in all_q], 95), 0)} | {_f(_pct([r['cpu_ms'] for r in all_q], 50), 0)} "
        f"| {_f(_pct([r['b_ms'] for r in all_q], 50), 1)} | |"
    )
    return "\n".join(lines)


def targets(records: list[dict[str, Any]], latency: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def pick(kinds: tuple[str, ...]) -> list[dict[str, Any]]:
        return [r for r in records if r["kind"] in kinds]

    mild, hard = pick(MILD), pick(HARD)
    checks = [
        ("R@1 on mild edits (JPEG, resize, colour, flip, border)", _rate([r["r1"] for r in mild]), ">=", 0.95),
        ("R@1 on crops to 50 % and rotations", _rate([r["r1"] for r in hard]), ">=", 0.80),
        ("false-positive near-duplicate verdicts (all queries)", _rate([r["fp"] for r in records]), "<=", 0.01),
        (
            f"look-up p50 ms, one request at a time ({len(latency)} sampled queries, wall clock)",
            _pct([r["ms"] for r in latency], 50),
            "<=",
            150.0,
        ),
        (
            "look-up p50 ms, all queries of the main run (wall clock)",
            _pct([r["ms"] for r in records], 50),
            "<=",
            150.0,
        ),
        ("look-up p50 ms, all queries, CPU time of one thread", _pct([r["cpu_ms"] for r in records], 50), "<=", 150.0),
    ]
    for kind in HARD:
        checks.append((f"R@1 on {kind}", _rate([r["r1"] for r in pick((kind,))]), ">=", 0.80))
    out = []
    for name, value, op, goal in checks:
        ok = value >= goal if op == ">=" else value <= goal
        out.append({"target": name, "value": value, "goal": f"{op} {goal}", "met": bool(ok)})
    return out


# --- main --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dupes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--originals", type=int, default=150, help="originals to make edited copies of")
    parser.add_argument("--catalog", type=int, default=None, help="cap on the catalog size (default: all data)")
    parser.add_argument("--faces", type=int, default=150, help="Faces_easy -> Faces queries (max 435)")
    parser.add_argument("--unrelated", type=int, default=150, help="held-out photos queried as unrelated")
    parser.add_argument("--bursts", type=int, default=60, help="Faces_easy queries whose burst pairs are judged")
    parser.add_argument(
        "--pad-to",
        type=int,
        default=15000,
        help="add synthetic distractors (crops, flips, colour variants of distractor photos) up to this catalog size",
    )
    parser.add_argument("--kinds", default="", help="comma-separated edit kinds (default: all)")
    parser.add_argument("--quick", action="store_true", help="a small run (< 2 min) for a smoke test")
    parser.add_argument("--model", default="", help="add CLIP neighbours, e.g. local-dir:/path/to/model")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--latency", type=int, default=300, help="queries re-run one at a time for the single-request latency"
    )
    parser.add_argument(
        "--detectors", type=int, default=0, metavar="N", help="compare ORB with SIFT on N originals, then exit"
    )
    parser.add_argument("--scan-known", action="store_true", help="list copies already inside shared/data, exit")
    parser.add_argument("--records", default="", help="also write every query's record (JSON) to this file")
    parser.add_argument("--name", default="dupes", help="results file name (benchmarks/results/<name>.*)")
    args = parser.parse_args(argv)
    if args.quick:
        args.originals, args.catalog, args.faces, args.unrelated, args.bursts = 24, 1500, 40, 40, 15
        args.pad_to, args.latency = 0, 100
    return args


def _tasks(data: Dataset, kinds: list[str], index: dict[str, int]) -> Iterator[QueryTask]:
    for source in data.originals:
        truth = sorted(index[p] for p in data.groups[source])
        for kind in ["exact", *kinds]:
            yield QueryTask(kind, source, truth)
    for source in data.faces:
        yield QueryTask("faces", source, sorted(index[p] for p in data.groups[source]))
    for source in data.unrelated:
        yield QueryTask("unrelated", source, [])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not DATA.exists():
        sys.exit(f"shared data not found at {DATA} (set CLIPSEARCH_SHARED_DIR)")
    started = time.perf_counter()
    _single_thread()  # OpenMP threads spin on a busy 2-core machine: one thread is several times faster
    if args.scan_known:
        scan_known_copies(args.workers)
        return
    if args.detectors:
        data = build_dataset(args.detectors, None, 0, 0, args.seed)
        table, result = compare_detectors(data.originals, args.seed)
        detector_notes = (
            "Same work images (longest side 512), ratio test 0.8, similarity RANSAC at 4 px; CPU times of one "
            "thread. ORB extraction covers the query and its mirror image (flips), SIFT only the image."
        )
        write_results(f"{args.name}-detectors", result, table, notes=detector_notes)
        return
    kinds = [k for k in args.kinds.split(",") if k] or list(EDITS)
    unknown = set(kinds) - set(EDITS)
    if unknown:
        sys.exit(f"unknown edit kinds {sorted(unknown)}; known: {', '.join(EDITS)}")
    data = build_dataset(args.originals, args.catalog, args.faces, args.unrelated, args.seed)
    real_size = len(data.catalog)
    data.catalog += padding(data.catalog, data.pad_sources, args.pad_to, args.seed)
    encoder = None
    if args.model:
        from app.config import Settings
        from app.encoder import Encoder

        encoder = Encoder.from_settings(Settings(model=args.model, pretrained="", device="cpu"))
    print(f"catalog: {len(data.catalog):,} images; preparing with {args.workers} workers ...", flush=True)
    catalog, timings = build_catalog(data.catalog, args.workers, encoder)
    print(f"catalog ready in {time.perf_counter() - started:.0f}s {timings}", flush=True)
    index = {p: i for i, p in enumerate(catalog.paths)}
    # Pixel-identical images in the catalog answer for each other.
    for path in list(data.groups):
        ids = {index[p] for p in data.groups[path] if p in index}
        for i in list(ids):
            ids.update(catalog.digests[catalog.prepared[i].pixel_digest])
        data.groups[path] = {catalog.paths[i] for i in ids}
    tasks = list(_tasks(data, kinds, index))
    thresholds = DupeThresholds()
    state = {"catalog": catalog, "thresholds": thresholds, "seed": args.seed, "encoder": encoder}
    print(f"{len(tasks):,} queries ...", flush=True)
    query_start = time.perf_counter()
    workers = args.workers if encoder is None else 1  # the encoder is not shared across forked processes
    if workers > 1:
        _STATE.update(state)  # inherited by the forked workers: no pickling of the catalog
        with mp.get_context("fork").Pool(args.workers, initializer=_single_thread) as pool:
            records = pool.map(run_query, tasks, chunksize=8)
    else:
        _init_worker(state)
        records = [run_query(t) for t in tasks]
    query_s = time.perf_counter() - query_start
    # Single-request latency: one look-up at a time in this process, nothing else of ours running.
    latency_tasks = random.Random(args.seed).sample(tasks, min(args.latency, len(tasks)))
    _init_worker(state)
    latency = [run_query(t) for t in latency_tasks]

    rng = random.Random(args.seed)
    bursts = judge_pairs(burst_pairs(data.faces, args.bursts, rng), thresholds)
    scenes = judge_pairs([(a, b) for a, b in SCENE_PAIRS] + [(b, a) for a, b in SCENE_PAIRS], thresholds)
    known = [(g[0], g[1]) for g in KNOWN_COPIES[:2]]  # the two photo-samples pairs, both ways
    copies = judge_pairs(known + [(b, a) for a, b in known], thresholds)

    rows = summarise(records)
    table = render(rows, records)
    checks = targets(records, latency)
    total_s = time.perf_counter() - started
    burst_nd = _rate([b["verdict"] in ("near_duplicate", "exact") for b in bursts])
    scene_nd = _rate([b["verdict"] in ("near_duplicate", "exact") for b in scenes])
    notes = [
        f"Catalog: {len(catalog.paths):,} images: {real_size:,} real ones (shared/data but the held-out and "
        "Faces_easy queries"
        + (f", capped at {args.catalog:,}" if args.catalog else "")
        + ")"
        + (
            f" + {len(catalog.paths) - real_size:,} synthetic distractors (crop, flip, colour, resize of distractor "
            "photos) to reach the 15k-image catalog the issue asks for."
            if len(catalog.paths) > real_size
            else "; the issue asks for latency at 15k images: this run is smaller (see --pad-to)."
        ),
        f"Queries: {len(records):,} ({len(data.originals)} originals x {len(kinds) + 1} kinds incl. the unedited "
        f"file, {len(data.faces)} Faces_easy -> Faces, {len(data.unrelated)} unrelated held-out photos), "
        f"{workers} worker process(es), each single-threaded.",
        "CLIP stage: "
        + (
            f"on ({args.model}, top {CLIP_K} neighbours)"
            if args.model
            else "off (no --model: random weights add nothing)"
        ),
        f"Shortlist: hash neighbours (<= {HASH_RADIUS} bits, at most {HASH_MAX}, + {HASH_KNN} nearest by pHash) + "
        f"FeatureIndex top {FEATURE_K} by ORB votes (>= {MIN_VOTES}).",
        f"Baseline: nearest catalog image by plain pHash; near-duplicate when <= {BASELINE_PHASH} bits.",
        f"Burst shots (Faces_easy/N vs Faces/N+-1,2, {len(bursts)} pairs) judged near-duplicate: {_f(burst_nd)}; "
        f"different photos of one scene ({len(scenes)} ordered pairs) judged near-duplicate: {_f(scene_nd)}; "
        f"known copies (Blender_Suzanne mirrored, ela pasted logo) verdicts: "
        f"{', '.join(c['verdict'] for c in copies)}.",
        f"Run time: {total_s:.0f}s (catalog {timings['prepare_s']:.0f}s, queries {query_s:.0f}s).",
        "",
        *calibration(records, bursts, thresholds),
        "",
        "What is left (read the false_positive_examples in dupes.json):",
        "- Burst frames from a tripod where only a small part changed (Caltech Faces/image_0159-0163: one man, "
        "eyes closed or open, the face a tenth of the frame) agree on 85-90 % of the overlap, as much as a copy "
        "with a text overlay; they are called near-duplicates. A stricter min_agreement trades them against "
        "overlays and heavy edits (0.90 would lose ~20 % of the strong mix and text copies).",
        "- Standard flat designs photographed or drawn separately (stop signs, banknotes) align pixel for pixel "
        "and are called near-duplicates: right for a copyright check of the design, not for 'the same photo'.",
        "- Crops to 50 % of a small (300 px) photo leave a 150-px query: 5 % of them are not shortlisted "
        "without CLIP neighbours; the verdict of a crop of the true photo is near_duplicate in 85 %.",
        "- Verdicts are directional (agreement is measured in the query's frame): 'clipsearch dupes' should "
        "take a pair as linked when either direction verifies.",
        "",
        "| target | value | goal | met |",
        "| --- | ---: | --- | --- |",
        *[f"| {c['target']} | {_f(c['value'])} | {c['goal']} | {'yes' if c['met'] else 'NO'} |" for c in checks],
    ]
    stage = {
        "single_request_ms_p50": _pct([r["ms"] for r in latency], 50),
        "single_request_ms_p95": _pct([r["ms"] for r in latency], 95),
        "cpu_ms_p50": _pct([r["cpu_ms"] for r in records], 50),
        "cpu_ms_p95": _pct([r["cpu_ms"] for r in records], 95),
        "prepare_ms_p50": _pct([r["prepare_ms"] for r in records], 50),
        "shortlist_ms_p50": _pct([r["shortlist_ms"] for r in records], 50),
        "verify_ms_p50": _pct([r["verify_ms"] for r in records], 50),
        "candidates_mean": statistics.fmean(r["candidates"] for r in records),
    }
    notes.insert(
        6,
        f"Single-request latency ({len(latency)} sampled queries, one at a time): p50 "
        f"{stage['single_request_ms_p50']:.0f} ms, p95 {stage['single_request_ms_p95']:.0f} ms wall clock. "
        f"The table's times come from the {workers}-process run (plus other users' load on the machine). "
        f"Look-up stages, p50: decode+prepare {stage['prepare_ms_p50']:.0f} ms, shortlist "
        f"{stage['shortlist_ms_p50']:.0f} ms, verification {stage['verify_ms_p50']:.0f} ms "
        f"({stage['candidates_mean']:.1f} candidates on average).",
    )
    failures = [r for r in records if r["fp"]][:20]
    data_out = {
        "args": vars(args),
        "thresholds": thresholds.model_dump(),
        "catalog_size": len(catalog.paths),
        "real_images": real_size,
        "timings": {**timings, "queries_s": query_s, "total_s": total_s},
        "stages": stage,
        "rows": rows,
        "targets": checks,
        "bursts": {"pairs": len(bursts), "near_duplicate_rate": burst_nd},
        "scenes": scenes,
        "known_copies": copies,
        "false_positive_examples": [
            {k: r[k] for k in ("kind", "source", "fp_ids", "fp_reason") if k in r} for r in failures
        ],
    }
    if args.records:
        Path(args.records).write_text(json.dumps({"queries": records, "bursts": bursts}))
    write_results(args.name, data_out, table, notes="\n".join(notes))


if __name__ == "__main__":
    main()

"""Test helpers: tiny random-weight open_clip models saved the way real ones are, and shared data paths."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from app.store import Store
    from indexer import IndexSummary

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CLIPSEARCH_SHARED_DIR", ROOT.parent / "shared")).resolve()
DATA = SHARED / "data"
INSTRUMENT_MODEL = SHARED / "models" / "clipsearch-tiny-64"

TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_PREPROCESS_CFG = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def build_tiny_model(seed: int = 0) -> torch.nn.Module:
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_MODEL_CFG)
    model.eval()
    return model


def save_local_dir_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random CLIP in open_clip's local-dir format (config + safetensors), as a real model folder."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    config = {"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": TINY_PREPROCESS_CFG}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    return folder


def register_tiny_architecture(folder: Path, name: str = "clipsearch-test-tiny") -> str:
    """Register the tiny architecture under a model name, as a custom open_clip config would be."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(TINY_MODEL_CFG))
    open_clip.add_model_config(config_path)
    return name


def save_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny random CLIP saved as a training checkpoint file ({'state_dict': ...})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": build_tiny_model(seed).state_dict()}, path)
    return path


def copy_photos(dest: Path, count: int, source: Path | None = None) -> list[Path]:
    """Copy ``count`` real photos (COCO-mini, then Caltech-101) into ``dest``; returns the new paths."""
    sources = sorted((source or DATA / "coco-mini" / "images").glob("*.jpg"))
    if len(sources) < count:
        sources += sorted((DATA / "caltech101").glob("*/*.jpg"))[: count - len(sources)]
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, src in enumerate(sources[:count]):
        target = dest / f"photo_{i:03d}{src.suffix}"
        shutil.copy2(src, target)
        out.append(target)
    return out


#: Caltech-101 folders the instrument model tells apart well, with the tag each should get.
CALTECH_TAGS = {
    "Leopards": "leopard",
    "airplanes": "airplane",
    "Motorbikes": "motorbike",
    "sunflower": "sunflower",
    "pizza": "pizza",
    "revolver": "revolver",
}
#: A tag vocabulary for them (and a few labels none of them shows).
CALTECH_TAG_VOCABULARY = """\
name: caltech-test
templates: simple
threshold: 0.05
labels: [leopard, airplane, motorbike, sunflower, pizza, revolver, wrist watch, elephant, chair, lamp]
"""
#: A flag vocabulary that flags the revolver photos (and nothing else of CALTECH_TAGS).
WEAPON_FLAG_VOCABULARY = """\
name: weapon-flags
templates: []
labels:
  - name: weapons
    prompts: ["a photo of a revolver.", "a photo of a gun."]
    threshold: 0.5
background:
  - "a photo."
  - "a photo of an animal."
  - "a photo of a leopard."
  - "a photo of an airplane."
  - "a photo of a motorbike."
  - "a photo of a flower."
  - "a photo of food."
"""


def copy_caltech(dest: Path, per_class: int = 3, classes: dict[str, str] | None = None) -> dict[Path, str]:
    """The first ``per_class`` photos of each Caltech-101 folder in ``classes`` copied into ``dest``, by new path
    with the tag each should get."""
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[Path, str] = {}
    for folder, tag in (classes or CALTECH_TAGS).items():
        for source in sorted((DATA / "caltech101" / folder).glob("*.jpg"))[:per_class]:
            target = dest / f"{folder.lower()}_{source.name}"
            shutil.copy2(source, target)
            out[target] = tag
    return out


def embedding_fidelity(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> tuple[float, float]:
    """Mean cosine between matching rows of two unit-vector sets, and the mean overlap of each row's top-``k``
    neighbours (itself excluded) under the two: how faithful a fast path is to the reference path."""
    cosine = float(np.mean(np.sum(reference * candidate, axis=1)))
    ref, cand = reference @ reference.T, candidate @ candidate.T
    np.fill_diagonal(ref, -np.inf)
    np.fill_diagonal(cand, -np.inf)
    ref_top, cand_top = np.argsort(-ref, axis=1)[:, :k], np.argsort(-cand, axis=1)[:, :k]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top, cand_top, strict=True)]))
    return cosine, overlap


def resaved_crop(source: Path, target: Path, megapixels: float, seed: int, *, mirror: bool = False) -> tuple[int, int]:
    """A random crop (75-100 % of each side) of a real photo, mirrored half the time when ``mirror``, resized to about
    ``megapixels`` and saved as a JPEG (quality 90, 4:2:0) at ``target``: the odd sizes photos get once someone has
    cropped and re-saved them, and distinct bytes for each seed. Returns the saved (width, height)."""
    import random

    rng = random.Random(seed)
    with Image.open(source) as im:
        im = im.convert("RGB")
        keep = rng.uniform(0.75, 1.0)
        w, h = round(im.width * keep), round(im.height * keep)
        left, top = rng.randint(0, im.width - w), rng.randint(0, im.height - h)
        im = im.crop((left, top, left + w, top + h))
        if mirror and rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = (megapixels * 1e6 / (w * h)) ** 0.5
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
        im.save(target, quality=90, subsampling="4:2:0")
        return im.size


def interrupted_then_resumed(run: Callable[..., IndexSummary], folder: Path, store: Store, total: int) -> None:
    """Index ``folder`` with ``run`` (an Indexer's run, or one built afresh each call) interrupted as Ctrl-C would
    after its first committed batch, then again: the first run leaves whole batches, the second embeds only the
    files the first did not commit."""
    import pytest  # here: benchmarks import this module too, without the test extras

    def interrupt_after_one_batch(batches: int) -> None:
        if batches == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run([folder], on_batch_committed=interrupt_after_one_batch)
    committed = store.counts()["indexed"]
    assert 0 < committed < total
    resumed = run([folder])
    assert resumed.embedded == total - committed and store.counts()["indexed"] == total

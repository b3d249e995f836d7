"""Built-in evaluation: retrieval recall on a captioned set and zero-shot accuracy on a labelled folder.

Metrics are pure functions over similarity matrices (``recall_at_k``, ``topk_accuracy``, ``per_class_accuracy``,
``confusion_pairs``); ``evaluate_retrieval`` and ``evaluate_zeroshot`` read the files, embed them with an
:class:`~app.encoder.Encoder` and return reports (dataclasses, figures in percent) that the CLI prints or dumps.

Conventions, so that figures compare with published ones:
- Ties count against the model: an item ranks below every wrong item scoring the same (a constant model scores
  chance, never 100 %).
- Text to image: each caption is a query; a hit at K when its image is among the K best images.
  Image to text: each image is a query; a hit at K when any of its captions is among the K best captions.
- Zero-shot: classes are the sub-folders of the image folder, sorted; a class's text is its folder name, mapped
  through an optional JSON name map (``{"Faces": "off-center face"}``), else with underscores as spaces.
  "single" is one prompt, ``"a photo of a {}."``; "ensemble" the mean of the normalised embeddings of open_clip's
  80 ImageNet templates, normalised again. Top-1 is over all images (micro); "mean per class" weighs classes
  equally, which is what a constant guess scores at chance (1 / classes) on an unbalanced folder.
- Images go through ``app.imaging.decode_image`` (EXIF orientation, RGB) and the model's own preprocessing, at
  full resolution as published evaluations do; ``draft=True`` decodes JPEGs at reduced scale as the indexer does
  (faster; on Caltech-101 with the instrument model it moves top-1 by about a quarter of a point).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from app.config import Settings
from app.errors import ClipSearchError, ConfigError, UnsupportedImage
from app.imaging import decode_image, is_image_path
from app.vocab import SINGLE_TEMPLATE, imagenet_templates
from app.zeroshot import class_embeddings

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
ACCURACY_KS = (1, 5)
TemplateChoice = Literal["single", "ensemble", "both"]


class EvaluationError(ClipSearchError):
    """An evaluation set that cannot be read as given."""


# --- metrics (pure) ---


def ranks_of_relevant(similarity: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Per query (row), the 0-based rank of its best relevant item: how many irrelevant items score at least
    as high (ties count against). Queries without a relevant item get the number of items."""
    similarity = np.asarray(similarity, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if similarity.shape != relevant.shape or similarity.ndim != 2:
        raise ValueError(f"similarity {similarity.shape} and relevance {relevant.shape} must be the same 2-D shape")
    best = np.where(relevant, similarity, -np.inf).max(axis=1, initial=-np.inf)
    ranks = ((similarity >= best[:, None]) & ~relevant).sum(axis=1)
    ranks[~relevant.any(axis=1)] = similarity.shape[1]
    return ranks


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray, ks: Iterable[int] = RECALL_KS) -> dict[int, float]:
    """Fraction of queries (rows) with a relevant item among their K best items, for each K."""
    ranks = ranks_of_relevant(similarity, relevant)
    return {k: float((ranks < k).mean()) if len(ranks) else 0.0 for k in ks}


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Iterable[int] = ACCURACY_KS) -> dict[int, float]:
    """Fraction of samples whose true class is among the K highest scores (ties count against)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    relevant = np.zeros(logits.shape, dtype=bool)
    relevant[np.arange(len(labels)), labels] = True
    return recall_at_k(logits, relevant, ks)


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per class, the fraction of its samples predicted right (NaN for a class with no sample)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    totals = np.bincount(labels, minlength=num_classes).astype(np.float64)
    right = np.bincount(labels[predictions == labels], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, right / np.maximum(totals, 1), np.nan)


@dataclass(frozen=True)
class ConfusionPair:
    true: str
    predicted: str
    count: int
    share: float  # of the true class's samples, in percent


def confusion_pairs(
    predictions: np.ndarray, labels: np.ndarray, class_names: Sequence[str], top: int = 10
) -> list[ConfusionPair]:
    """The most frequent (true, predicted) mistakes, most frequent first (ties by class order)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    count = len(class_names)
    matrix = np.zeros((count, count), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    np.fill_diagonal(matrix, 0)
    totals = np.bincount(labels, minlength=count)
    flat = np.argsort(-matrix, axis=None, kind="stable")[:top]
    pairs = []
    for index in flat:
        true, predicted = divmod(int(index), count)
        if matrix[true, predicted] == 0:
            break
        share = 100.0 * float(matrix[true, predicted]) / float(totals[true])
        pairs.append(ConfusionPair(class_names[true], class_names[predicted], int(matrix[true, predicted]), share))
    return pairs


def chance_recall(items: int, relevant_per_query: int, k: int) -> float:
    """Expected recall@K of a random ranking: P(at least one of r relevant among the first K of n)."""
    if k >= items:
        return 1.0
    return 1.0 - math.comb(items - relevant_per_query, k) / math.comb(items, k)


# --- data sets ---


@dataclass(frozen=True)
class CaptionSet:
    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # (captions,) index into images


def load_captions(captions_file: Path, images_dir: Path) -> CaptionSet:
    """Read CSV ``image,caption`` (header required) or COCO-style JSON (``images`` + ``annotations``)."""
    captions_file, images_dir = Path(captions_file), Path(images_dir)
    if not captions_file.is_file():
        raise EvaluationError(f"captions file {captions_file} not found")
    if not images_dir.is_dir():
        raise EvaluationError(f"image folder {images_dir} not found")
    pairs = _read_caption_pairs(captions_file)
    if not pairs:
        raise EvaluationError(f"captions file {captions_file} holds no captions")
    names = list(dict.fromkeys(name for name, _ in pairs))
    missing = [name for name in names if not (images_dir / name).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise EvaluationError(
            f"{len(missing)} of the {len(names)} images named in {captions_file} are not in {images_dir}: {shown}"
        )
    position = {name: i for i, name in enumerate(names)}
    return CaptionSet(
        images=[images_dir / name for name in names],
        captions=[caption for _, caption in pairs],
        caption_image=np.array([position[name] for name, _ in pairs], dtype=np.int64),
    )


def _read_caption_pairs(path: Path) -> list[tuple[str, str]]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
            files = {image["id"]: image["file_name"] for image in data["images"]}
            return [(files[a["image_id"]], " ".join(a["caption"].split())) for a in data["annotations"]]
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"captions file {path} is not valid JSON: line {exc.lineno}: {exc.msg}") from None
        except (KeyError, TypeError) as exc:
            raise EvaluationError(
                f"captions file {path} is not COCO-style JSON ('images' with id and file_name, 'annotations' with "
                f"image_id and caption): missing {exc}"
            ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))  # a quoted caption may hold a line break
    if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
        raise EvaluationError(
            f"captions file {path} must be CSV with a header naming the columns 'image' and 'caption' "
            f"(found: {', '.join(reader.fieldnames or []) or 'no header'})"
        )
    pairs = []
    for row in reader:
        image, caption = (row.get("image") or "").strip(), " ".join((row.get("caption") or "").split())
        if not image or not caption:
            raise EvaluationError(f"captions file {path}, line {reader.line_num}: empty image name or caption")
        pairs.append((image, caption))
    return pairs


@dataclass(frozen=True)
class LabelledSet:
    images: list[Path]
    labels: np.ndarray  # (images,) index into folders
    folders: list[str]
    class_names: list[str]


def load_labelled_folder(images_dir: Path, names_file: Path | None = None) -> LabelledSet:
    """Images under ``images_dir/<class>/`` (any depth below it); class names from the optional JSON map."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise EvaluationError(f"image folder {images_dir} not found")
    folders = sorted(p.name for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    images: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        files = sorted(p for p in (images_dir / folder).rglob("*") if p.is_file() and is_image_path(p))
        images += files
        labels += [label] * len(files)
    used = sorted({folders[i] for i in labels})
    if len(used) < 2:
        raise EvaluationError(
            f"{images_dir} needs at least two sub-folders of images (one per class); found {len(used)}"
        )
    folders = [f for f in folders if f in used]
    remap = {old: new for new, old in enumerate(sorted({*labels}))}
    mapping = _read_name_map(names_file) if names_file else {}
    class_names = [mapping.get(folder, folder.replace("_", " ")) for folder in folders]
    return LabelledSet(images, np.array([remap[x] for x in labels], dtype=np.int64), folders, class_names)


def _read_name_map(path: Path) -> dict[str, str]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvaluationError(f"class name file {path} not found") from None
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"class name file {path} is not valid JSON: line {exc.lineno}: {exc.msg}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise EvaluationError(f'class name file {path} must be a JSON object of folder -> name ({{"Faces": "face"}})')
    return {k: " ".join(v.split()) for k, v in data.items() if v.strip()}


# --- embedding ---


def embed_image_files(
    encoder: Any,
    paths: Sequence[Path],
    *,
    batch_size: int = 32,
    workers: int = 2,
    max_pixels: int = 100_000_000,
    draft: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    """Decode (in a thread pool) and encode images in order. Returns the vectors of the images that decoded,
    in order, and (path, reason) for those that did not. ``progress`` is called with each count of images done."""
    draft_size = encoder.image_size * 2 if draft else None

    def load(path: Path) -> torch.Tensor | str:
        try:
            decoded = decode_image(path.read_bytes(), max_pixels=max_pixels, draft_size=draft_size)
        except (UnsupportedImage, OSError) as exc:
            return str(exc)
        tensor: torch.Tensor = encoder.preprocess_image(decoded.image)
        return tensor

    chunks: list[np.ndarray] = []
    failed: list[tuple[Path, str]] = []
    batch: list[torch.Tensor] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, item in zip(paths, pool.map(load, paths), strict=True):
            if isinstance(item, str):
                failed.append((path, item))
                if progress:
                    progress(1)
                continue
            batch.append(item)
            if len(batch) == batch_size:
                chunks.append(encoder.encode_pixels(torch.stack(batch)))
                if progress:
                    progress(len(batch))
                batch = []
    if batch:
        chunks.append(encoder.encode_pixels(torch.stack(batch)))
        if progress:
            progress(len(batch))
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), dtype=np.float32)
    return vectors, failed


# --- reports ---


@dataclass
class RetrievalReport:
    captions_file: str
    images_dir: str
    model: str
    images: int
    captions: int
    text_to_image: dict[int, float]  # recall@K in percent
    image_to_text: dict[int, float]
    chance_text_to_image: dict[int, float]
    chance_image_to_text: dict[int, float]
    median_rank_text_to_image: float  # 1-based
    skipped: list[str] = field(default_factory=list)  # images that did not decode (and so their captions)


@dataclass
class PromptResult:
    prompts: str  # "single" or "ensemble"
    templates: int
    top1: float  # percent, over images
    top5: float
    mean_per_class_top1: float
    per_class_top1: dict[str, float]
    confusions: list[ConfusionPair]


@dataclass
class ZeroShotReport:
    images_dir: str
    model: str
    images: int
    classes: int
    class_names: list[str]
    chance_top1: float  # percent, for a uniform random guess
    chance_top5: float
    results: list[PromptResult]
    skipped: list[str] = field(default_factory=list)

    def result(self, prompts: str) -> PromptResult:
        return next(r for r in self.results if r.prompts == prompts)


@dataclass(frozen=True)
class ImageOptions:
    """How evaluation images are read: from the settings, plus draft decoding and a progress callback."""

    batch_size: int = 32
    workers: int = 2
    max_pixels: int = 100_000_000
    draft: bool = False
    progress: Callable[[int], None] | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, *, draft: bool = False, progress: Callable[[int], None] | None = None
    ) -> ImageOptions:
        return cls(settings.batch_size, settings.decode_workers, settings.max_image_pixels, draft, progress)


def _embed(encoder: Any, paths: Sequence[Path], options: ImageOptions | None) -> tuple[np.ndarray, list[Any]]:
    o = options or ImageOptions()
    return embed_image_files(
        encoder,
        paths,
        batch_size=o.batch_size,
        workers=o.workers,
        max_pixels=o.max_pixels,
        draft=o.draft,
        progress=o.progress,
    )


def evaluate_retrieval(
    encoder: Any, captions_file: Path, images_dir: Path, *, images: ImageOptions | None = None
) -> RetrievalReport:
    """Text-to-image and image-to-text Recall@1/5/10 of the encoder on a captioned image set."""
    data = load_captions(captions_file, images_dir)
    vectors, failed = _embed(encoder, data.images, images)
    bad = {path for path, _ in failed}
    keep = np.array([path not in bad for path in data.images])
    if keep.sum() < 2:
        raise EvaluationError(f"fewer than two images of {images_dir} could be decoded: {failed[:3]}")
    new_index = np.cumsum(keep) - 1
    caption_keep = keep[data.caption_image]
    captions = [c for c, k in zip(data.captions, caption_keep, strict=True) if k]
    caption_image = new_index[data.caption_image[caption_keep]]
    text_vectors = encoder.encode_texts(captions)
    similarity = text_vectors @ vectors.T  # (captions, images)
    relevant = np.zeros(similarity.shape, dtype=bool)
    relevant[np.arange(len(captions)), caption_image] = True
    image_count = int(keep.sum())
    per_image = int(round(len(captions) / image_count))
    ranks = ranks_of_relevant(similarity, relevant)
    return RetrievalReport(
        captions_file=str(captions_file),
        images_dir=str(images_dir),
        model=encoder.spec.label if hasattr(encoder, "spec") else "",
        images=image_count,
        captions=len(captions),
        text_to_image=_percent(recall_at_k(similarity, relevant)),
        image_to_text=_percent(recall_at_k(similarity.T, relevant.T)),
        chance_text_to_image={k: 100 * chance_recall(image_count, 1, k) for k in RECALL_KS},
        chance_image_to_text={k: 100 * chance_recall(len(captions), per_image, k) for k in RECALL_KS},
        median_rank_text_to_image=float(np.median(ranks) + 1),
        skipped=[f"{path}: {reason}" for path, reason in failed],
    )


def prompt_sets(choice: TemplateChoice, single_prompt: str = SINGLE_TEMPLATE) -> dict[str, list[str]]:
    if single_prompt.count("{}") != 1:
        raise ConfigError(f"the single prompt '{single_prompt}' must contain '{{}}' once, where the class goes")
    sets = {"single": [single_prompt], "ensemble": list(imagenet_templates())}
    return sets if choice == "both" else {choice: sets[choice]}


def zeroshot_result(
    image_vectors: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    class_vectors: np.ndarray,
    *,
    prompts: str,
    templates: int,
    confusions: int = 10,
) -> PromptResult:
    """Accuracy figures of one classifier (class vectors) on labelled image vectors."""
    logits = image_vectors @ class_vectors.T
    accuracy = topk_accuracy(logits, labels, (1, 5))
    predictions = logits.argmax(axis=1)
    per_class = per_class_accuracy(predictions, labels, len(class_names))
    return PromptResult(
        prompts=prompts,
        templates=templates,
        top1=100 * accuracy[1],
        top5=100 * accuracy[5],
        mean_per_class_top1=100 * float(np.nanmean(per_class)),
        per_class_top1={name: 100 * float(a) for name, a in zip(class_names, per_class, strict=True)},
        confusions=confusion_pairs(predictions, labels, class_names, confusions),
    )


def evaluate_zeroshot(
    encoder: Any,
    images_dir: Path,
    *,
    names_file: Path | None = None,
    templates: TemplateChoice = "both",
    single_prompt: str = SINGLE_TEMPLATE,
    confusions: int = 10,
    images: ImageOptions | None = None,
) -> ZeroShotReport:
    """Top-1/top-5 zero-shot accuracy on ``images_dir/<class>/...``, single prompt and/or the 80-template ensemble."""
    sets = prompt_sets(templates, single_prompt)
    data = load_labelled_folder(images_dir, names_file)
    vectors, failed = _embed(encoder, data.images, images)
    bad = {path for path, _ in failed}
    labels = data.labels[[path not in bad for path in data.images]]
    if len(labels) == 0:
        raise EvaluationError(f"no image under {images_dir} could be decoded: {failed[:3]}")
    results = []
    for name, template_list in sets.items():
        prompts = [[t.replace("{}", cls) for t in template_list] for cls in data.class_names]
        class_vectors = class_embeddings(encoder, prompts)
        results.append(
            zeroshot_result(
                vectors,
                labels,
                data.class_names,
                class_vectors,
                prompts=name,
                templates=len(template_list),
                confusions=confusions,
            )
        )
    classes = len(data.class_names)
    return ZeroShotReport(
        images_dir=str(images_dir),
        model=encoder.spec.label if hasattr(encoder, "spec") else "",
        images=len(labels),
        classes=classes,
        class_names=data.class_names,
        chance_top1=100 / classes,
        chance_top5=100 * min(5, classes) / classes,
        results=results,
        skipped=[f"{path}: {reason}" for path, reason in failed],
    )


def _percent(values: dict[int, float]) -> dict[int, float]:
    return {k: 100 * v for k, v in values.items()}

"""SearchService: text, image and "more like this" queries over the index. No HTTP, no CLI here.

Besides the one-shot queries the CLI uses (``search_text``, ``similar``...), the service answers paged
queries (``query``, ``query_image_bytes``, ``similar_page``): weighted text terms with negatives, optionally
combined with an indexed image, cut by ``min_score`` and metadata filters, sorted by relevance or date.
It picks up a newer index written by the indexer on its own (``maybe_refresh``), without failing queries.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from app.batching import TextBatcher
from app.config import Settings
from app.cutoff import CutoffChoice, QueryKind, relevance_cutoff
from app.errors import BadQuery, ClipSearchError, NotFound, NotReady
from app.id_cache import IdCache
from app.imaging import decode_image, model_draft_size
from app.index import MANIFEST_FILE, Manifest, VectorIndex, read_manifest
from app.labels import CandidateLabels, Labels
from app.model_spec import ModelSpec
from app.onnx_encoder import OnnxEncoder, load_encoder
from app.preload import IndexPreload
from app.store import ImageRecord, ImageStatus, Store, StoredTag, TagKind
from app.tagging import TaggingPlan, label_names

if TYPE_CHECKING:
    from app.encoder import Encoder

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_K = 1000
MAX_TERMS = 16
MAX_WEIGHT = 100.0
MAX_TERM_CHARS = 1000
RECORD_CACHE_SIZE = 100_000
MAX_TAG_FILTERS = 16
MAX_TAG_CHARS = 300
DEFAULT_FACETS = 20
MAX_FACETS = 100
#: catalog vectors scored per query to estimate the background of the automatic cut-off (see app/cutoff.py)
CUTOFF_SAMPLE_SIZE = 2000
#: the text a start's warm-up encodes: the opening of CLIP's prompts, which the prefix cache then holds
WARM_UP_TEXT = "a photo of a"

SortOrder = Literal["relevance", "date"]

# A trailing ":number" is the weight of a term ("beach:0.5", "people:-1").
_WEIGHT_SUFFIX = re.compile(r"^(?P<text>.*?)\s*:\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*$", re.DOTALL)

# What a format filter may name, and the PIL format names each stands for (MPO is a camera JPEG).
FORMAT_ALIASES: dict[str, frozenset[str]] = {
    "jpeg": frozenset({"JPEG", "MPO"}),
    "jpg": frozenset({"JPEG", "MPO"}),
    "png": frozenset({"PNG"}),
    "webp": frozenset({"WEBP"}),
    "gif": frozenset({"GIF"}),
    "bmp": frozenset({"BMP"}),
    "tiff": frozenset({"TIFF"}),
    "tif": frozenset({"TIFF"}),
}


@dataclass(frozen=True)
class Hit:
    id: int
    path: str
    score: float
    width: int | None
    height: int | None
    #: passed the relevance cut-off (always True when the query asked for none)
    relevant: bool = True


# --- query terms ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One text term of a query and its weight (negative: show fewer images like this)."""

    text: str
    weight: float = 1.0


def parse_term(raw: str) -> Term:
    """``"beach"`` -> +1, ``"-people"`` -> -1, ``"sunset:0.5"`` -> 0.5, ``"-dog:2"`` -> -2."""
    if len(raw) > MAX_TERM_CHARS:
        raise BadQuery(f"a query term is longer than {MAX_TERM_CHARS} characters: shorten it")
    text = raw.strip()
    sign = 1.0
    if text[:1] in ("-", "+"):
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:].strip()
    weight = 1.0
    match = _WEIGHT_SUFFIX.match(text)
    if match and match.group("text").strip():
        text, weight = match.group("text").strip(), float(match.group("weight"))
    if not text:
        raise BadQuery(f"the query term {raw!r} has no words: type a few words describing the picture")
    if weight == 0 or not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        raise BadQuery(f"the weight of {text!r} must be a non-zero number between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}")
    return Term(text=" ".join(text.split()), weight=sign * weight)


def parse_terms(raw_terms: Iterable[str]) -> list[Term]:
    raw = list(raw_terms)
    if len(raw) > MAX_TERMS:
        raise BadQuery(f"a query has at most {MAX_TERMS} terms, got {len(raw)}: combine some of them")
    if any(not r.strip() for r in raw):
        raise BadQuery("a query term is empty: type a few words describing the picture")
    return [parse_term(r) for r in raw]


def combine(vectors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The unit vector of the weighted sum of unit vectors: the query of a multi-term search."""
    if not vectors:
        raise BadQuery("give some query text (q) or an image (image_id)")
    if not any(w > 0 for w in weights):
        raise BadQuery(
            "a query needs at least one positive term: '-people' alone says only what to avoid; "
            "add what you want to see, e.g. q=beach&q=-people"
        )
    total = np.zeros_like(vectors[0], dtype=np.float32)
    for vector, weight in zip(vectors, weights, strict=True):
        total += np.float32(weight) * vector
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise BadQuery("the query terms cancel each other out: change a weight or drop a negative term")
    return (total / norm).astype(np.float32)


# --- filters, paging and results -----------------------------------------------------------------


def parse_formats(value: str | None) -> frozenset[str]:
    """``"jpg,png"`` -> the PIL format names to keep; empty for no format filter."""
    if not value:
        return frozenset()
    names: set[str] = set()
    for part in value.split(","):
        key = part.strip().lower().lstrip(".")
        if not key:
            continue
        if key not in FORMAT_ALIASES:
            known = ", ".join(sorted(FORMAT_ALIASES))
            raise BadQuery(f"unknown image format {part.strip()!r}: use one or more of {known}, comma-separated")
        names |= FORMAT_ALIASES[key]
    return frozenset(names)


def to_timestamp(value: datetime | None) -> float | None:
    """A datetime as a POSIX timestamp; a naive one is taken as UTC."""
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


@dataclass(frozen=True)
class Filters:
    """Metadata conditions a hit must meet. ``prefix`` is a plain prefix of the stored absolute path."""

    prefix: str | None = None
    formats: frozenset[str] = frozenset()
    min_width: int | None = None
    min_height: int | None = None
    modified_after: float | None = None
    modified_before: float | None = None

    def __post_init__(self) -> None:
        after, before = self.modified_after, self.modified_before
        if after is not None and before is not None and after > before:
            raise BadQuery("modified_after is later than modified_before: swap them or drop one")

    @property
    def active(self) -> bool:
        return any(
            v not in (None, "", frozenset())
            for v in (
                self.prefix,
                self.formats,
                self.min_width,
                self.min_height,
                self.modified_after,
                self.modified_before,
            )
        )

    def accepts(self, record: ImageRecord) -> bool:
        if self.prefix and not record.path.startswith(self.prefix):
            return False
        if self.formats and (record.format or "").upper() not in self.formats:
            return False
        if self.min_width is not None and (record.width or 0) < self.min_width:
            return False
        if self.min_height is not None and (record.height or 0) < self.min_height:
            return False
        if self.modified_after is not None and record.mtime < self.modified_after:
            return False
        return not (self.modified_before is not None and record.mtime > self.modified_before)


@dataclass(frozen=True)
class SearchOptions:
    """Which slice of the ranked hits to return, and how they are cut and ordered."""

    k: int = 20
    offset: int = 0
    min_score: float | None = None
    sort: SortOrder = "relevance"
    filters: Filters = field(default_factory=Filters)
    #: hits must carry every one of these tags
    tags: tuple[str, ...] = ()
    #: leave out images with a safe-search flag
    safe: bool = False
    #: how many tag facets (tag -> hits carrying it) to count over the hits; 0: none
    facets: int = DEFAULT_FACETS
    #: which hits are marked relevant: "auto" (per-query rule of app/cutoff.py), a score, or None (all)
    cutoff: CutoffChoice = None

    def __post_init__(self) -> None:
        if isinstance(self.cutoff, float | int) and not -1.0 <= self.cutoff <= 1.0:
            raise BadQuery(f"a cutoff score must be between -1 and 1 (cosine similarity), got {self.cutoff}")
        if isinstance(self.cutoff, str) and self.cutoff != "auto":
            raise BadQuery(f"cutoff must be 'auto', 'none' or a score between -1 and 1, got {self.cutoff!r}")
        if not 1 <= self.k <= MAX_K:
            raise BadQuery(f"k must be between 1 and {MAX_K}, got {self.k}")
        if len(self.tags) > MAX_TAG_FILTERS:
            raise BadQuery(f"at most {MAX_TAG_FILTERS} tag filters, got {len(self.tags)}: drop some")
        if any(not t.strip() or len(t) > MAX_TAG_CHARS for t in self.tags):
            raise BadQuery(f"a tag filter is empty or longer than {MAX_TAG_CHARS} characters: use a tag from /tags")
        if not 0 <= self.facets <= MAX_FACETS:
            raise BadQuery(f"facets must be between 0 and {MAX_FACETS}, got {self.facets}")
        if self.offset < 0:
            raise BadQuery(f"offset must be 0 or more, got {self.offset}")
        if self.sort not in ("relevance", "date"):
            raise BadQuery(f"sort must be 'relevance' or 'date', got {self.sort!r}")


@dataclass(frozen=True)
class SearchPage:
    """One page of hits, with how many hits pass the cut-off and filters in all (``total``)."""

    hits: list[Hit]
    total: int
    offset: int
    k: int
    took_ms: float
    #: seconds in the model (0 when every embedding came from the cache, or for "more like this")
    encode_seconds: float
    #: seconds in the index search, filtering and metadata look-up
    search_seconds: float
    #: (tag, hits carrying it) over all the hits (not only this page), most frequent first
    facets: list[tuple[str, int]] = field(default_factory=list)
    #: the score from which hits count as relevant (None: no cut-off asked for, or nothing to cut)
    cutoff: float | None = None
    #: how many of the ``total`` hits pass the cut-off
    relevant_total: int | None = None


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str | None
    manifest: Manifest | None
    #: images the store holds as indexed with this model (0 when not ready)
    images: int = 0


def top_candidates(
    ids: np.ndarray, scores: np.ndarray, exclude: Collection[int], depth: int
) -> list[tuple[int, float]]:
    """An index's answer as (id, score) pairs, best first, at most ``depth``: without FAISS's -1 padding and the
    ``exclude``d ids, ties (copies of one photo) by id so that the order is stable (pure; numpy for the 1,000
    candidates a page reads, ~20x faster than a Python sort)."""
    keep = ids >= 0
    if exclude:
        keep &= ~np.isin(ids, np.fromiter(exclude, dtype=np.int64))
    ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))[:depth]
    return list(zip(ids[order].tolist(), scores[order].tolist(), strict=True))


def rank(
    candidates: Sequence[tuple[int, float]],
    records: dict[int, ImageRecord],
    options: SearchOptions,
) -> list[tuple[int, float, ImageRecord]]:
    """Apply the score cut-off, the filters and the sort order to (id, score) candidates (pure)."""
    kept = [
        (i, s, records[i])
        for i, s in candidates
        if i in records
        and (options.min_score is None or s >= options.min_score)
        and options.filters.accepts(records[i])
    ]
    if options.sort == "date":
        kept.sort(key=lambda t: (-t[2].mtime, -t[1], t[0]))
    else:
        kept.sort(key=lambda t: (-t[1], t[0]))
    return kept


class _LRU:
    """A small thread-safe LRU map of text -> embedding."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        value.flags.writeable = False
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class SearchService:
    """Answers queries from the current index; picks up a newer index written by the indexer."""

    def __init__(
        self,
        settings: Settings,
        encoder: Encoder | OnnxEncoder,
        store: Store,
        *,
        images_counting: Future[int] | None = None,
    ) -> None:
        """``images_counting``: the store's count of indexed images, already under way (see open_service)."""
        self.settings = settings
        self.encoder = encoder
        self.store = store
        self.spec: ModelSpec = encoder.spec
        self._index: VectorIndex | None = None
        self._manifest: Manifest | None = None
        self._swap_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._manifest_seen: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._problem: str | None = None
        self.text_cache = _LRU(settings.text_cache_size)
        self.text_batcher = TextBatcher(encoder.encode_texts)
        # Store rows of recent hits, so that filtering a thousand candidates needs no database round trip;
        # cleared whenever another index is swapped in (the indexer writes a new index after every change to
        # the store, so the rows cached for one index stay those of its images).
        self.records: IdCache[ImageRecord] = IdCache(store.get_many, RECORD_CACHE_SIZE)
        self.labels = Labels(
            store,
            settings.index_check_seconds,
            RECORD_CACHE_SIZE,
            in_memory=settings.labels_in_memory,
            saved_in=settings.data_dir / "labels",
        )
        self._background: tuple[VectorIndex, np.ndarray] | None = None
        self._images_counted: tuple[VectorIndex | None, int] | None = None  # see indexed_images
        self._images_counting = images_counting
        self._count_lock = threading.Lock()
        self._background_lock = threading.Lock()
        #: the start's warm-up (app.api.main), when it runs one: its seconds, or None if it failed
        self.warmed: Future[float | None] | None = None
        #: the cut-off sample's read after the last index swap, when CLIPSEARCH_WARM_UP asks for it
        self.sample_read: Future[np.ndarray] | None = None

    # --- index lifecycle -------------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest | None:
        return self._manifest

    @property
    def index_count(self) -> int:
        index = self._index
        return index.ntotal if index is not None else 0

    def load_index(self, preload: IndexPreload | None = None) -> Manifest:
        """Load (or reload) the index from the data dir, or take it from ``preload`` when that read the
        current one. Raises NotReady / IndexMismatch."""
        with self._swap_lock:
            loaded = preload.take(model=self.spec.name, pretrained=self.spec.pretrained) if preload else None
            index, manifest = loaded or VectorIndex.load(
                self.settings.index_dir,
                model=self.spec.name,
                pretrained=self.spec.pretrained,
                nprobe=self.settings.nprobe,
            )
            if manifest.dim != self.encoder.dim:
                raise NotReady(f"the index has {manifest.dim}-d vectors but the model gives {self.encoder.dim}-d")
            # Swap references in one step: a query already running keeps the index it started with.
            self._index, self._manifest = index, manifest
            self.records.clear()
            self.labels.clear()
            self._problem = None
            log.info("loaded index %s with %d vectors", manifest.index_file, manifest.count)
            return manifest

    def refresh_if_changed(self) -> bool:
        """Reload when the manifest on disk names another index file. Returns True if swapped."""
        try:
            current = read_manifest(self.settings.index_dir)
        except NotReady:
            return False
        if self._manifest is not None and current.index_file == self._manifest.index_file:
            return False
        self.load_index()
        self._read_sample_ahead()
        return True

    def start(self, preload: IndexPreload | None = None) -> Readiness:
        """Load the index if there is one; otherwise remember why not (queries answer NotReady)."""
        self._manifest_seen = self._manifest_signature()
        self._next_check = time.monotonic() + self.settings.index_check_seconds
        try:
            self.load_index(preload)
        except ClipSearchError as exc:
            self._problem = str(exc)
            log.warning("the service starts without an index: %s", exc)
        return self.readiness(refresh=False)

    def warm_up(self) -> float:
        """Run one query's path once, so that the first real query does not pay for it: the text tower's first run
        (ONNX Runtime allocates its buffers then; the prefix cache keeps WARM_UP_TEXT's tokens), the index's search at
        full depth and the automatic cut-off's catalog sample (read from the store). Nothing enters the query cache.
        Returns the seconds it took."""
        started = time.perf_counter()
        vector = self.encoder.encode_texts([WARM_UP_TEXT])[0]
        index = self._index
        if index is not None:
            index.search(vector[None, :], self.settings.search_max_candidates)
            self.background_sample()
        return time.perf_counter() - started

    def maybe_refresh(self) -> bool:
        """Swap in a newer index when the manifest changed, checking at most every index_check_seconds.

        Cheap on the common path (a clock read; a stat when due). One caller reloads while the others
        carry on with the index they have; a failed reload keeps the current index and is logged.
        """
        now = time.monotonic()
        if now < self._next_check:
            return False
        if not self._refresh_lock.acquire(blocking=False):
            return False
        try:
            self._next_check = now + self.settings.index_check_seconds
            signature = self._manifest_signature()
            if signature == self._manifest_seen:
                return False
            self._manifest_seen = signature
            try:
                return self.refresh_if_changed()
            except ClipSearchError as exc:
                self._problem = str(exc)
                log.warning("keeping the current index: the new one could not be loaded: %s", exc)
                return False
        finally:
            self._refresh_lock.release()

    def reload(self) -> Manifest:
        """Load the index on disk now, whatever the manifest check says."""
        with self._refresh_lock:
            self._manifest_seen = self._manifest_signature()
            try:
                manifest = self.load_index()
            except ClipSearchError as exc:
                self._problem = str(exc)
                raise
            self._read_sample_ahead()
            return manifest

    def _read_sample_ahead(self) -> None:
        """After an index swap (CLIPSEARCH_WARM_UP): read the new index's cut-off sample on a background thread, so
        that the next query with cutoff=auto does not (about 0.2 s at 1M images)."""
        if self.settings.warm_up:
            self.sample_read = in_background(self.background_sample, name="cutoff-sample")

    def readiness(self, *, refresh: bool = True) -> Readiness:
        if refresh:
            self.maybe_refresh()
        if self._index is None:
            reason = self._problem or "no index loaded yet: run 'clipsearch index PATH' first"
            return Readiness(False, reason, None)
        try:
            images = self.indexed_images()
        except SQLAlchemyError as exc:
            return Readiness(False, f"the metadata store is unreachable ({self.store.safe_url}): {exc}", None)
        return Readiness(True, None, self._manifest, images)

    def indexed_images(self) -> int:
        """The store's count of images indexed with this model, counted once per loaded index (a scan of the
        images table: about 0.5 s at 1M rows, more with their vectors in the rows) and cached; later calls only
        check that the database answers. Raises SQLAlchemyError when it does not."""
        index = self._index
        with self._count_lock:
            cached = self._images_counted
            if cached is not None and cached[0] is index:
                self.store.ping()
                return cached[1]
            pending, self._images_counting = self._images_counting, None
            count = pending.result() if pending is not None else self.store.count_indexed(self.spec.store_key)
            self._images_counted = (index, count)
            return count

    def _manifest_signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.settings.index_dir / MANIFEST_FILE)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _require_index(self) -> VectorIndex:
        index = self._index
        if index is None:
            raise NotReady(self._problem or "no index loaded yet: run 'clipsearch index PATH' first")
        return index

    # --- embeddings ------------------------------------------------------------------------------

    def embed_text(self, text: str) -> np.ndarray:
        text = text.strip()
        if not text:
            raise BadQuery("the query text is empty: type a few words describing the picture")
        vector: np.ndarray = self.embed_texts([text])[0][0]
        return vector

    def embed_texts(self, texts: Sequence[str]) -> tuple[list[np.ndarray], float]:
        """Embeddings of ``texts`` (from the LRU cache where possible) and the seconds spent in the model."""
        keys = [" ".join(t.split()) for t in texts]
        found: dict[str, np.ndarray] = {}
        for key in keys:
            cached = self.text_cache.get(key)
            if cached is not None:
                found[key] = cached
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        seconds = 0.0
        if missing:
            started = time.perf_counter()
            vectors = self.text_batcher.encode(missing)  # with the texts of concurrent queries, if any
            seconds = time.perf_counter() - started
            for key, vector in zip(missing, vectors, strict=True):
                vector = np.array(vector, dtype=np.float32)
                self.text_cache.put(key, vector)
                found[key] = vector
        return [found[k] for k in keys], seconds

    def embed_image_bytes(self, data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
        decoded = decode_image(
            data,
            max_pixels=max_pixels or self.settings.max_image_pixels,
            draft_size=model_draft_size(self.encoder.image_size),
        )
        vector: np.ndarray = self.encoder.encode_images([decoded.image])[0]
        return vector

    def indexed_vector(self, image_id: int) -> np.ndarray:
        """The vector of an indexed image; NotFound (saying why) for an id the index does not hold."""
        vector = self._require_index().reconstruct(image_id)
        if vector is None:
            record = self.store.get(image_id)  # raises NotFound for unknown ids
            raise NotFound(f"image {image_id} ({record.path}) is not in the index (status: {record.status})")
        return vector

    # --- one-shot queries (CLI) ------------------------------------------------------------------

    def search_text(self, text: str, k: int = 20) -> list[Hit]:
        return self.search_vector(self.embed_text(text), k)

    def search_image_file(self, path: Path, k: int = 20) -> list[Hit]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BadQuery(f"cannot read query image {path}: {exc.strerror or exc}") from exc
        return self.search_vector(self.embed_image_bytes(data), k)

    def similar(self, image_id: int, k: int = 20) -> list[Hit]:
        return self.search_vector(self.indexed_vector(image_id), k, exclude={image_id})

    def search_vector(self, vector: np.ndarray, k: int, exclude: set[int] | None = None) -> list[Hit]:
        if not 1 <= k <= MAX_K:
            raise BadQuery(f"k must be between 1 and {MAX_K}, got {k}")
        index = self._require_index()
        exclude = exclude or set()
        scores, ids = index.search(vector[None, :], k + len(exclude))
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0 and i not in exclude]
        pairs = pairs[:k]
        records = self.store.get_many([i for i, _ in pairs])
        return [
            Hit(id=i, path=records[i].path, score=s, width=records[i].width, height=records[i].height)
            for i, s in pairs
            if i in records
        ]

    # --- paged queries (API) ---------------------------------------------------------------------

    def query(
        self, terms: Sequence[str] = (), *, image_id: int | None = None, options: SearchOptions | None = None
    ) -> SearchPage:
        """Weighted text terms (see ``parse_term``), optionally plus an indexed image (which is then
        left out of the hits). Needs at least one of them."""
        started = time.perf_counter()
        self.maybe_refresh()
        parsed = parse_terms(terms)
        if not parsed and image_id is None:
            raise BadQuery("give some query text (q) or an image (image_id), or both")
        vectors, encode_seconds = self.embed_texts([t.text for t in parsed])
        weights = [t.weight for t in parsed]
        exclude: set[int] = set()
        if image_id is not None:
            vectors.append(self.indexed_vector(image_id))
            weights.append(1.0)
            exclude.add(image_id)
        kind: QueryKind = "image" if image_id is not None else "text"
        vector = combine(vectors, weights)
        return self._page(vector, options or SearchOptions(), exclude, started, encode_seconds, kind)

    def query_image_bytes(self, data: bytes, *, options: SearchOptions | None = None) -> SearchPage:
        """Images like an uploaded picture; the bytes are decoded in memory and never stored."""
        started = time.perf_counter()
        self.maybe_refresh()
        self._require_index()
        max_pixels = min(self.settings.max_image_pixels, self.settings.max_upload_pixels)
        encode_started = time.perf_counter()
        vector = self.embed_image_bytes(data, max_pixels=max_pixels)
        encode_seconds = time.perf_counter() - encode_started
        return self._page(vector, options or SearchOptions(), set(), started, encode_seconds, "image")

    def similar_page(self, image_id: int, *, options: SearchOptions | None = None) -> SearchPage:
        started = time.perf_counter()
        self.maybe_refresh()
        vector = self.indexed_vector(image_id)
        return self._page(vector, options or SearchOptions(), {image_id}, started, 0.0, "image")

    def _page(
        self,
        vector: np.ndarray,
        options: SearchOptions,
        exclude: set[int],
        started: float,
        encode_seconds: float,
        kind: QueryKind = "text",
    ) -> SearchPage:
        search_started = time.perf_counter()
        index = self._require_index()
        depth = self.settings.search_max_candidates
        scores, ids = index.search(vector[None, :], depth + len(exclude))
        candidates = top_candidates(ids[0], scores[0], exclude, depth)
        threshold = self._cutoff_score(vector, candidates, options.cutoff, kind)
        if options.min_score is not None:
            candidates = [c for c in candidates if c[1] >= options.min_score]
        labels: CandidateLabels | None = None
        if options.tags or options.safe or options.facets:
            labels = self.labels.of(np.fromiter((i for i, _ in candidates), dtype=np.int64, count=len(candidates)))
            if options.tags or options.safe:
                keep = labels.accepts(options.tags, options.safe).tolist()
                candidates = [c for c, ok in zip(candidates, keep, strict=True) if ok]
        end = options.offset + options.k
        if options.filters.active or options.sort == "date":
            ranked = rank(candidates, self.records.get_many([i for i, _ in candidates]), options)
            total, page = len(ranked), ranked[options.offset : end]
            hit_ids = [i for i, _, _ in ranked]
            scores_kept = [s for _, s, _ in ranked]
        else:
            # No metadata needed to count: read the rows of this page only.
            total, window = len(candidates), candidates[options.offset : end]
            page = rank(window, self.records.get_many([i for i, _ in window]), options)
            hit_ids = [i for i, _ in candidates]
            scores_kept = [s for _, s in candidates]
        facets = labels.facets(hit_ids, options.facets) if labels is not None and options.facets else []
        hits = [Hit(i, r.path, s, r.width, r.height, relevant=threshold is None or s >= threshold) for i, s, r in page]
        relevant_total = total if threshold is None else sum(1 for s in scores_kept if s >= threshold)
        now = time.perf_counter()
        return SearchPage(
            hits=hits,
            total=total,
            offset=options.offset,
            k=options.k,
            took_ms=(now - started) * 1000.0,
            encode_seconds=encode_seconds,
            search_seconds=now - search_started,
            facets=facets,
            cutoff=threshold,
            relevant_total=relevant_total,
        )

    # --- relevance cut-off -----------------------------------------------------------------------

    def _cutoff_score(
        self, vector: np.ndarray, candidates: Sequence[tuple[int, float]], choice: CutoffChoice, kind: QueryKind
    ) -> float | None:
        """The score from which hits are relevant: the asked-for number, or the per-query rule of app/cutoff.py
        for "auto" (best = the top candidate before any filter; background = a sample of the catalog)."""
        if choice is None:
            return None
        if choice != "auto":
            return float(choice)
        if not candidates:
            return None
        background = self.background_sample() @ vector
        return relevance_cutoff(background, candidates[0][1], kind).score

    def background_sample(self) -> np.ndarray:
        """About CUTOFF_SAMPLE_SIZE catalog vectors, evenly spread over the store's ids, for the cut-off's
        background. Works for any index kind (flat, IVF): read from the store once per loaded index, on first use."""
        index = self._require_index()
        cached = self._background
        if cached is not None and cached[0] is index:
            return cached[1]
        with self._background_lock:
            cached = self._background
            if cached is not None and cached[0] is index:
                return cached[1]
            count = self.indexed_images()
            # Every stride-th id, picked by the database: only the sample's vectors are read, even at 1M.
            stride = max(1, math.ceil(count / CUTOFF_SAMPLE_SIZE))
            chunks = [vectors for _, vectors in self.store.iter_vectors(self.spec.store_key, stride=stride)]
            dim = self.encoder.dim
            sample = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, dim), np.float32)
            self._background = (index, sample)
            log.info("cut-off background: %d of %d catalog vectors", len(sample), count)
            return sample

    # --- tags ------------------------------------------------------------------------------------

    def image_tags(self, image_id: int) -> list[StoredTag]:
        """The tags and flags of an image in the catalog (tags first, best first); NotFound otherwise."""
        record = self.store.get(image_id)
        if record.status != ImageStatus.INDEXED:
            raise NotFound(f"image {image_id} is not in the catalog any more (status: {record.status})")
        return self.store.tags_of(image_id)

    @functools.cached_property
    def tagging(self) -> TaggingPlan:
        """The configured tag and flag vocabularies (read on first use)."""
        return TaggingPlan.from_settings(self.settings)

    def vocabulary_name(self, kind: TagKind) -> str | None:
        label_set = self.tagging.tags if kind is TagKind.TAG else self.tagging.flags
        return label_set.vocabulary.name if label_set else None

    def label_counts(self, kind: TagKind, *, include_unused: bool = False) -> dict[str, int]:
        """Label -> images of the catalog carrying it, most first; with ``include_unused``, followed by the
        configured vocabulary's labels that no image carries (count 0)."""
        counts = self.store.label_counts(kind, model=self.spec.store_key)
        if include_unused:
            for name in label_names(self.tagging, kind):
                counts.setdefault(name, 0)
        return counts

    # --- images ----------------------------------------------------------------------------------

    def image_record(self, image_id: int) -> ImageRecord:
        """The store row of an indexed image whose file is still there; NotFound otherwise."""
        record = self.store.get(image_id)
        if record.status != ImageStatus.INDEXED:
            raise NotFound(f"image {image_id} is not in the catalog any more (status: {record.status})")
        if not os.path.isfile(record.path):
            raise NotFound(
                f"the file of image {image_id} is gone from disk: run 'clipsearch index' again to update the catalog"
            )
        return record


def open_service(
    settings: Settings,
    *,
    require_index: bool = True,
    preload: IndexPreload | None = None,
    export_in_background: bool = False,
    lazy_towers: bool = False,
) -> SearchService:
    """Load the model, open the store and the index named by the settings (from ``preload`` if given:
    the index read meanwhile on a background thread). ``export_in_background``: a long-running server under
    'auto' serves on torch while the towers are exported the first time (app.onnx_encoder.load_encoder).
    ``lazy_towers`` (a one-off command): an ONNX start opens a tower's session only when a query needs it."""
    store = Store(settings.effective_database_url)
    try:
        # The count /readyz reports is a table scan (~0.5 s at 1M rows): it runs while the model loads.
        store_key = ModelSpec.from_settings(settings).store_key
        counting = in_background(lambda: store.count_indexed(store_key), name="count-indexed")
        encoder = load_encoder(settings, export_in_background=export_in_background, lazy_towers=lazy_towers)
        service = SearchService(settings, encoder, store, images_counting=counting)
        if require_index:
            service.load_index(preload)
    except BaseException:
        store.close()
        raise
    return service


def in_background(work: Callable[[], T], *, name: str) -> Future[T]:
    """``work()`` on a daemon thread; its result (or exception) through the returned future."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future

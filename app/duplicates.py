"""DupeService: is a picture a copy of one in the catalog, and of which? No HTTP, no CLI here.

A look-up runs in stages; ``app.dupes`` holds the pure parts, this module the catalog around them:

1. candidates: the query's CLIP nearest neighbours in the vector index, its perceptual-hash neighbours (a
   HashIndex over the hashes the indexer stored, searched with the query and its mirror image), and the images
   sharing most ORB descriptors with it (a FeatureIndex, built in the background: these find the crops, borders
   and overlays that hashes miss, with any CLIP model);
2. verification: each candidate is decoded from its file and prepared once (hashes, ORB keypoints, a grey
   thumbnail; kept in a bounded LRU), then compared with the query: hash distances, geometric verification with
   local features, pixel agreement of the aligned images;
3. a verdict per candidate (exact, near_duplicate, similar, different) by the thresholds of the dupe_* settings.

``find_groups`` does the same for every image of the catalog and joins the verified copies into groups: burst
shots and re-shoots of a scene verify as 'similar' and join nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import faiss
import numpy as np
from PIL import Image

from app.config import Settings
from app.dupes import (
    Candidate,
    DupeThresholds,
    Evidence,
    FeatureHit,
    FeatureIndex,
    HashIndex,
    ImageHashes,
    Match,
    PreparedImage,
    Verdict,
    group_duplicates,
    lookup,
    prepare_catalog_image,
    prepare_query,
)
from app.errors import BadQuery, ClipSearchError, NotFound, NotReady, UnsupportedImage
from app.imaging import decode_image
from app.index import Manifest
from app.search import SearchService
from app.store import ImageRecord, ImageStatus, Store

log = logging.getLogger(__name__)

MAX_MATCHES = 100
#: (done, total) of a long catalog-wide run, for a progress bar
Progress = Callable[[str, int, int], None]


def _single_threaded_faiss() -> None:
    # FAISS searches the few hundred descriptors of one pair with OpenMP; on a busy machine each parallel region
    # waits for a descheduled thread and a 5 ms comparison takes a second. The setting is per thread: it keeps
    # the verification threads single-threaded and leaves the vector index searches as they are.
    faiss.omp_set_num_threads(1)


def parse_verdict(value: str | Verdict) -> Verdict:
    try:
        return Verdict(value)
    except ValueError:
        names = ", ".join(v.value for v in Verdict)
        raise BadQuery(f"unknown verdict {value!r}: use one of {names}") from None


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DupeMatch:
    """A catalog image judged against the query, with the evidence for its verdict."""

    id: int
    path: str
    width: int | None
    height: int | None
    evidence: Evidence

    @property
    def verdict(self) -> Verdict:
        return self.evidence.verdict

    def evidence_dict(self) -> dict[str, Any]:
        """The numbers behind the verdict (cosine, hash distances, inliers, matched boxes...), JSON-ready."""
        numbers = self.evidence.to_dict()
        numbers.pop("verdict", None)
        numbers.pop("reason", None)
        return numbers

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "width": self.width,
            "height": self.height,
            "verdict": self.verdict.value,
            "reason": self.evidence.reason,
            "evidence": self.evidence_dict(),
        }


@dataclass(frozen=True)
class DupeReport:
    """The overall verdict (the strongest relation found to any candidate) and the matches at or above the
    requested verdict, strongest first."""

    verdict: Verdict
    matches: list[DupeMatch]
    #: catalog images verified
    candidates: int
    took_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "matches": [m.to_dict() for m in self.matches],
            "candidates": self.candidates,
            "took_ms": round(self.took_ms, 3),
        }


@dataclass(frozen=True)
class GroupMember:
    id: int
    path: str
    #: the verdict of this image against the group's first member (None for the first member itself)
    evidence: Evidence | None

    @property
    def verdict(self) -> Verdict | None:
        return self.evidence.verdict if self.evidence is not None else None


@dataclass(frozen=True)
class DupeGroup:
    """Images joined by verified copies (connected components): the largest first, then by id."""

    members: list[GroupMember]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ids": [m.id for m in self.members],
            "members": [
                {
                    "id": m.id,
                    "path": m.path,
                    "verdict": m.verdict.value if m.verdict is not None else None,
                    "reason": m.evidence.reason if m.evidence is not None else None,
                }
                for m in self.members
            ],
        }


@dataclass
class GroupsReport:
    groups: list[DupeGroup]
    min_verdict: Verdict
    #: images examined, candidate pairs verified, images that could not be read
    images: int = 0
    pairs: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_verdict": self.min_verdict.value,
            "images": self.images,
            "pairs_verified": self.pairs,
            "groups": [g.to_dict() for g in self.groups],
            "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
            "seconds": round(self.seconds, 3),
        }


# --- pieces --------------------------------------------------------------------------------------


class PreparedCache:
    """A thread-safe LRU of prepared catalog images, keyed by id and content (a changed file misses)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[int, str], PreparedImage] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(record: ImageRecord) -> tuple[int, str]:
        return (record.id, record.sha256 or f"{record.size}:{record.mtime}")

    def get(self, record: ImageRecord) -> PreparedImage | None:
        with self._lock:
            key = self.key(record)
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, record: ImageRecord, prepared: PreparedImage) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[self.key(record)] = prepared
            self._items.move_to_end(self.key(record))
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def build_hash_index(rows: Iterable[tuple[int, dict[str, int]]], chunk: int = 10_000) -> HashIndex:
    """A HashIndex over (id, stored hashes) rows, such as ``Store.iter_hashes()``."""
    index = HashIndex()
    ids: list[int] = []
    hashes: list[ImageHashes] = []
    for image_id, values in rows:
        ids.append(int(image_id))
        hashes.append(ImageHashes.from_dict(values))
        if len(ids) >= chunk:
            index.add(ids, hashes)
            ids, hashes = [], []
    index.add(ids, hashes)
    return index


def is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _strongest_first(matches: Iterable[Match]) -> list[Match]:
    """The order app.dupes.lookup gives: verdict, verified agreement and inliers, cosine, hashes; then id."""
    return sorted(matches, key=lambda m: (m.evidence.sort_key(), -m.id), reverse=True)


class FeatureShortlist:
    """The ORB-vote index of the catalog, brought up to date in a background thread; searches never wait for it.

    The first build prepares every catalog image (decode + ORB, ~30-70 ms each, one thread) and keeps ~16 KB of
    descriptors per image. Later catalogs (another index was swapped in) only prepare their new or changed images;
    when the catalog has grown REBUILD_GROWTH times since the build, the index is built again for its new size.
    """

    REBUILD_GROWTH = 4

    def __init__(self, store: Store, prepare: Callable[[ImageRecord], PreparedImage | None]) -> None:
        self.store = store
        self._prepare = prepare
        self._index: FeatureIndex | None = None
        self._built_size = 0
        self._indexed: dict[int, tuple[int, str]] = {}  # id -> PreparedCache.key of what is indexed
        self._lock = threading.Lock()  # guards the index: FAISS indexes are not safe to change while searched
        self._state = threading.Condition()
        self._wanted: object | None = None
        self._done: object | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def request(self, generation: object) -> None:
        """Catch up with the catalog of this generation (the served manifest) in the background."""
        with self._state:
            if generation is self._wanted or self._stop.is_set():
                return
            self._wanted = generation
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dupes-features", daemon=True)
                self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the index is up to date with the last requested catalog; False on timeout."""
        with self._state:
            return self._state.wait_for(lambda: self._done is self._wanted, timeout)

    def search(self, query: PreparedImage, k: int) -> list[FeatureHit]:
        with self._lock:
            return self._index.search(query, k) if self._index is not None else []

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __len__(self) -> int:
        return len(self._indexed)

    def _run(self) -> None:
        _single_threaded_faiss()
        while not self._stop.is_set():
            with self._state:
                target = self._wanted
            try:
                self._catch_up()
            except Exception:  # a store or decoder failure must not kill look-ups: retry on the next generation
                log.exception("could not update the local-feature index")
            with self._state:
                self._done = target
                self._state.notify_all()
                if self._wanted is target:
                    self._thread = None
                    return

    def _catch_up(self) -> None:
        ids = [image_id for image_id, _ in self.store.iter_hashes()]
        records: dict[int, ImageRecord] = {}
        for start in range(0, len(ids), 500):
            records.update(self.store.get_many(ids[start : start + 500]))
        keys = {image_id: PreparedCache.key(record) for image_id, record in records.items()}
        if self._index is None or len(keys) > self.REBUILD_GROWTH * max(self._built_size, 64):
            self._build(records, keys)
            return
        gone = [image_id for image_id, key in self._indexed.items() if keys.get(image_id) != key]
        with self._lock:
            self._index.remove(gone)
        for image_id in gone:
            del self._indexed[image_id]
        for image_id, record in records.items():
            if self._stop.is_set():
                return
            if image_id in self._indexed:
                continue
            prepared = self._prepare(record)
            if prepared is not None:
                with self._lock:
                    self._index.add([image_id], [prepared])
                self._indexed[image_id] = keys[image_id]

    def _build(self, records: dict[int, ImageRecord], keys: dict[int, tuple[int, str]]) -> None:
        started = time.perf_counter()
        ids: list[int] = []
        light: list[PreparedImage] = []
        for image_id, record in records.items():
            if self._stop.is_set():
                return
            prepared = self._prepare(record)
            if prepared is not None:
                ids.append(image_id)
                light.append(replace(prepared, thumb=_NO_THUMB, mirrored=None))  # only descriptors are indexed
        index = FeatureIndex.build(ids, light)
        with self._lock:
            self._index = index
        self._indexed = {image_id: keys[image_id] for image_id in ids}
        self._built_size = len(ids)
        log.info("local-feature index: %d images in %.1fs", len(ids), time.perf_counter() - started)


_NO_THUMB = np.zeros((1, 1), dtype=np.uint8)


# --- the service ---------------------------------------------------------------------------------


class DupeService:
    """Near-duplicate look-up over the catalog that a SearchService serves.

    Its hash index follows the search service's index: when that swaps in a newer index (the indexer ran), the
    next look-up rebuilds the hash index from the store's hashes. Call ``close`` when done.
    """

    def __init__(self, settings: Settings, search: SearchService) -> None:
        self.settings = settings
        self.search = search
        self.store: Store = search.store
        self.thresholds: DupeThresholds = settings.dupe_thresholds
        self.prepared = PreparedCache(settings.dupe_cache_size)
        self._hashes: HashIndex | None = None
        self._hashes_for: Manifest | None = None
        self._hash_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.features = FeatureShortlist(self.store, self._prepare_uncached)

    def start(self) -> None:
        """Begin preparing the local-feature index of the catalog being served (when there is one)."""
        if self.settings.dupe_feature_candidates and self.search.manifest is not None:
            self.features.request(self.search.manifest)

    def close(self) -> None:
        self.features.close()
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    @property
    def pool(self) -> Executor:
        """Threads for decoding, preparing and comparing (single-threaded FAISS each)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max(1, self.settings.decode_workers),
                    thread_name_prefix="dupes",
                    initializer=_single_threaded_faiss,
                )
            return self._pool

    # --- the catalog side ------------------------------------------------------------------------

    def hash_index(self) -> HashIndex:
        """The hash index of the catalog behind the index being served (rebuilt when that changes)."""
        manifest = self.search.manifest
        with self._hash_lock:
            if self._hashes is None or manifest is not self._hashes_for:
                started = time.perf_counter()
                self._hashes = build_hash_index(self.store.iter_hashes())
                self._hashes_for = manifest
                log.info("hash index: %d images in %.2fs", len(self._hashes), time.perf_counter() - started)
            return self._hashes

    def _require_ready(self) -> Manifest:
        self.search.maybe_refresh()
        manifest = self.search.manifest
        if manifest is None:
            reason = self.search.readiness(refresh=False).reason
            raise NotReady(reason or "no index loaded yet: run 'clipsearch index PATH' first")
        return manifest

    def prepare_record(self, record: ImageRecord) -> PreparedImage | None:
        """The catalog-side features of an image, from the cache or its file; None when the file cannot be read."""
        cached = self.prepared.get(record)
        if cached is not None:
            return cached
        try:
            image = self._decode_file(record.path)
        except (OSError, ClipSearchError) as exc:
            log.info("skipping candidate %d (%s): %s", record.id, record.path, exc)
            return None
        prepared = prepare_catalog_image(image)
        self.prepared.put(record, prepared)
        return prepared

    def _prepare_uncached(self, record: ImageRecord) -> PreparedImage | None:
        try:
            return prepare_catalog_image(self._decode_file(record.path))
        except (OSError, ClipSearchError) as exc:
            log.info("no local features for %d (%s): %s", record.id, record.path, exc)
            return None

    def _decode_file(self, path: str) -> Image.Image:
        with open(path, "rb") as handle:
            data = handle.read()
        return decode_image(data, max_pixels=self.settings.max_image_pixels).image

    # --- look-up ---------------------------------------------------------------------------------

    def lookup_bytes(
        self, data: bytes, *, min_verdict: Verdict | str = Verdict.NEAR_DUPLICATE, limit: int = 20
    ) -> DupeReport:
        """Look up an uploaded picture (decoded in memory, never stored) in the catalog."""
        started = time.perf_counter()
        self._require_ready()
        max_pixels = min(self.settings.max_image_pixels, self.settings.max_upload_pixels)
        image = decode_image(data, max_pixels=max_pixels).image
        query = self.pool.submit(prepare_query, image)
        vector = np.asarray(self.search.encoder.encode_images([image])[0], dtype=np.float32)
        return self._lookup(query.result(), vector, set(), parse_verdict(min_verdict), limit, started)

    def duplicates_of(
        self, image_id: int, *, min_verdict: Verdict | str = Verdict.NEAR_DUPLICATE, limit: int = 20
    ) -> DupeReport:
        """Look up an indexed image (itself left out) with its stored vector; NotFound for an unknown id."""
        started = time.perf_counter()
        self._require_ready()
        record = self.search.image_record(image_id)  # NotFound: unknown, deleted, or file gone
        vector = self.search.indexed_vector(image_id)
        try:
            image = self._decode_file(record.path)
        except OSError as exc:
            raise NotFound(
                f"the file of image {image_id} cannot be read ({exc}): run 'clipsearch index' again"
            ) from exc
        except UnsupportedImage as exc:
            raise NotFound(
                f"the file of image {image_id} no longer decodes ({exc}): run 'clipsearch index' again"
            ) from exc
        query = self.pool.submit(prepare_query, image).result()
        return self._lookup(query, vector, {image_id}, parse_verdict(min_verdict), limit, started)

    def _lookup(
        self,
        query: PreparedImage,
        vector: np.ndarray,
        exclude: set[int],
        min_verdict: Verdict,
        limit: int,
        started: float,
    ) -> DupeReport:
        if not 1 <= limit <= MAX_MATCHES:
            raise BadQuery(f"limit must be between 1 and {MAX_MATCHES}, got {limit}")
        # On a worker thread: FAISS single-threaded (see _single_threaded_faiss).
        cosines = self.pool.submit(self._candidates, query, vector, exclude).result()
        records = {i: r for i, r in self.store.get_many(list(cosines)).items() if r.status == ImageStatus.INDEXED}
        matches = self._verify(query, [(records[i], cosines[i]) for i in cosines if i in records])
        ranked = _strongest_first(matches)
        verdict = ranked[0].verdict if ranked else Verdict.DIFFERENT
        kept = [m for m in ranked if m.verdict.at_least(min_verdict)][:limit]
        return DupeReport(
            verdict=verdict,
            matches=[self._present(m, records[m.id]) for m in kept],
            candidates=len(matches),
            took_ms=(time.perf_counter() - started) * 1000.0,
        )

    def _candidates(self, query: PreparedImage, vector: np.ndarray, exclude: set[int]) -> dict[int, float | None]:
        """Candidate id -> CLIP cosine with the query (None when the index does not hold it): CLIP neighbours,
        then hash neighbours, then ORB-vote neighbours (once the background build has some)."""
        settings = self.settings
        found: dict[int, float | None] = {}
        if settings.dupe_clip_candidates:
            for hit in self.search.search_vector(vector, settings.dupe_clip_candidates, exclude=exclude):
                found[hit.id] = hit.score
        others: list[int] = []
        neighbours = self.hash_index().range_search(query.hashes, settings.dupe_hash_radius)
        others += [n.id for n in neighbours if n.id not in exclude][: settings.dupe_hash_candidates]
        if settings.dupe_feature_candidates:
            self.features.request(self.search.manifest)
            hits = self.features.search(query, settings.dupe_feature_candidates + len(exclude))
            others += [h.id for h in hits if h.id not in exclude][: settings.dupe_feature_candidates]
        for image_id in others:
            if image_id not in found:
                found[image_id] = self._cosine(vector, image_id)
        return found

    def _cosine(self, vector: np.ndarray, image_id: int) -> float | None:
        try:
            other = self.search.indexed_vector(image_id)
        except ClipSearchError:
            return None
        return float(np.dot(vector, other))

    def _verify(self, query: PreparedImage, candidates: Sequence[tuple[ImageRecord, float | None]]) -> list[Match]:
        """Prepare (or take from the cache) and compare every candidate, on the worker threads."""

        def judge(record: ImageRecord, cosine: float | None) -> Match | None:
            prepared = self.prepare_record(record)
            if prepared is None:
                return None
            candidate = Candidate(record.id, prepared, cosine)
            result = lookup(query, [candidate], thresholds=self.thresholds, min_verdict=Verdict.DIFFERENT)
            return result.matches[0]

        futures = [self.pool.submit(judge, record, cosine) for record, cosine in candidates]
        return [m for m in (f.result() for f in futures) if m is not None]

    @staticmethod
    def _present(match: Match, record: ImageRecord) -> DupeMatch:
        return DupeMatch(match.id, record.path, record.width, record.height, match.evidence)

    # --- catalog-wide groups ---------------------------------------------------------------------

    def find_groups(
        self,
        *,
        min_verdict: Verdict | str = Verdict.NEAR_DUPLICATE,
        under: str | None = None,
        neighbours: int = 5,
        progress: Progress | None = None,
    ) -> GroupsReport:
        """Duplicate groups among the indexed images (those ``under`` a folder, when given).

        Candidate pairs: each image's hash neighbours, its ``neighbours`` nearest CLIP neighbours and its
        ``neighbours`` best ORB-vote hits (dupe_feature_candidates, 0: none). Every pair is verified once; groups
        are the connected components over pairs judged ``min_verdict`` or stronger. Holds the prepared features of
        every image in memory (~70 KB each).
        """
        started = time.perf_counter()
        floor = parse_verdict(min_verdict)
        if floor is Verdict.DIFFERENT:
            raise BadQuery("min_verdict 'different' would join every pair: use similar, near_duplicate or exact")
        report = GroupsReport(groups=[], min_verdict=floor)
        ids, vectors = self._catalog_vectors()
        records = self._records(ids)
        if under is not None:
            folder = os.path.abspath(os.path.expanduser(under))
            keep = [i for i, image_id in enumerate(ids) if is_under(records[image_id].path, folder)]
            ids, vectors = ids[keep], vectors[keep]
        report.images = len(ids)
        if len(ids) < 2:
            report.seconds = time.perf_counter() - started
            return report

        prepared, report.unreadable = self._prepare_all([records[int(i)] for i in ids], progress)
        usable = [i for i, image_id in enumerate(ids) if int(image_id) in prepared]
        ids, vectors = ids[usable], vectors[usable]
        candidates = self.pool.submit(self._candidate_pairs, ids, vectors, prepared, neighbours).result()
        evidence = self._verify_pairs(candidates, records, prepared, progress)
        report.pairs = len(evidence)

        groups = group_duplicates(((a, b, e) for (a, b), e in evidence.items()), min_verdict=floor)
        for group in groups:
            # The largest image first (an original is rarely smaller than its copies); ties: the smallest id.
            first = max(group, key=lambda i: ((records[i].width or 0) * (records[i].height or 0), -i))
            members = [first, *(i for i in group if i != first)]
            # Pairs were judged with the smaller id as the query: the verdict does not depend on the direction.
            pairs = {other: (min(first, other), max(first, other)) for other in members[1:]}
            direct = {other: evidence[pair] for other, pair in pairs.items() if pair in evidence}
            missing = [other for other in members[1:] if other not in direct]
            if missing:
                direct.update(self._judge_against(first, missing, records, prepared))
            out = [GroupMember(first, records[first].path, None)]
            out += [GroupMember(other, records[other].path, direct.get(other)) for other in members[1:]]
            report.groups.append(DupeGroup(out))
        report.seconds = time.perf_counter() - started
        return report

    def _catalog_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        id_chunks, vector_chunks = [], []
        for chunk_ids, chunk_vectors in self.store.iter_vectors(self.search.spec.name):
            id_chunks.append(chunk_ids)
            vector_chunks.append(chunk_vectors)
        if not id_chunks:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.search.encoder.dim), dtype=np.float32)
        return np.concatenate(id_chunks), np.concatenate(vector_chunks).astype(np.float32)

    def _records(self, ids: np.ndarray) -> dict[int, ImageRecord]:
        records: dict[int, ImageRecord] = {}
        wanted = [int(i) for i in ids]
        for start in range(0, len(wanted), 500):
            records.update(self.store.get_many(wanted[start : start + 500]))
        return records

    def _prepare_all(
        self, records: list[ImageRecord], progress: Progress | None
    ) -> tuple[dict[int, PreparedImage], list[tuple[str, str]]]:
        prepared: dict[int, PreparedImage] = {}
        unreadable: list[tuple[str, str]] = []

        def prepare(record: ImageRecord) -> PreparedImage:
            return prepare_catalog_image(self._decode_file(record.path))

        for done, (record, future) in enumerate(self._in_order(prepare, records), 1):
            try:
                prepared[record.id] = future.result()
            except (OSError, ClipSearchError) as exc:
                unreadable.append((record.path, str(exc)))
            if progress is not None:
                progress("preparing", done, len(records))
        return prepared, unreadable

    def _in_order(self, work: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[Any, Future[Any]]]:
        """(item, future) in order, with a bounded number of items in flight."""
        window = 4 * max(1, self.settings.decode_workers)
        pending: list[tuple[Any, Future[Any]]] = []
        for item in items:
            pending.append((item, self.pool.submit(work, item)))
            if len(pending) >= window:
                yield pending.pop(0)
        yield from pending

    def _candidate_pairs(
        self, ids: np.ndarray, vectors: np.ndarray, prepared: dict[int, PreparedImage], neighbours: int
    ) -> dict[int, dict[int, float | None]]:
        """Query id -> {candidate id: CLIP cosine}, each unordered pair once (under its smaller id)."""
        pairs: dict[int, dict[int, float | None]] = {}
        position = {int(image_id): row for row, image_id in enumerate(ids)}

        def cosine(a: int, b: int) -> float:
            return float(np.dot(vectors[position[a]], vectors[position[b]]))

        def add(a: int, b: int) -> None:
            if a != b:
                low, high = min(a, b), max(a, b)
                pairs.setdefault(low, {})[high] = cosine(low, high)

        k = min(neighbours, len(ids) - 1)
        if k > 0 and self.settings.dupe_clip_candidates:
            flat = faiss.IndexFlatIP(vectors.shape[1])
            flat.add(np.ascontiguousarray(vectors))
            _, rows = flat.search(np.ascontiguousarray(vectors), k + 1)
            for row, found in enumerate(rows):
                for other in found:
                    if other >= 0:
                        add(int(ids[row]), int(ids[other]))
        hashes = HashIndex()
        hashes.add([int(i) for i in ids], [prepared[int(i)].hashes for i in ids])
        for image_id in ids:
            near = hashes.range_search(prepared[int(image_id)].hashes, self.settings.dupe_hash_radius)
            for neighbour in [n for n in near if n.id != image_id][: self.settings.dupe_hash_candidates]:
                add(int(image_id), neighbour.id)
        shortlist = min(neighbours, self.settings.dupe_feature_candidates)
        if shortlist > 0:
            features = FeatureIndex.build([int(i) for i in ids], [prepared[int(i)] for i in ids])
            for image_id in ids:
                for hit in features.search(prepared[int(image_id)], shortlist + 1):
                    add(int(image_id), hit.id)
        return pairs

    def _verify_pairs(
        self,
        pairs: dict[int, dict[int, float | None]],
        records: dict[int, ImageRecord],
        prepared: dict[int, PreparedImage],
        progress: Progress | None,
    ) -> dict[tuple[int, int], Evidence]:
        """Each pair judged with the smaller id as the query (prepared again with its mirror image)."""

        def judge(query_id: int) -> list[tuple[int, Evidence]]:
            query = prepare_query(self._decode_file(records[query_id].path))
            candidates = [Candidate(i, prepared[i], cosine) for i, cosine in pairs[query_id].items()]
            result = lookup(query, candidates, thresholds=self.thresholds, min_verdict=Verdict.DIFFERENT)
            return [(m.id, m.evidence) for m in result.matches]

        evidence: dict[tuple[int, int], Evidence] = {}
        queries = sorted(pairs)
        for done, (query_id, future) in enumerate(self._in_order(judge, queries), 1):
            try:
                for other, judged in future.result():
                    evidence[(query_id, other)] = judged
            except (OSError, ClipSearchError) as exc:
                log.warning("skipping %s: %s", records[query_id].path, exc)
            if progress is not None:
                progress("verifying", done, len(queries))
        return evidence

    def _judge_against(
        self, first: int, others: list[int], records: dict[int, ImageRecord], prepared: dict[int, PreparedImage]
    ) -> dict[int, Evidence]:
        """Verdicts of group members against the first member, for those joined to it only through others."""

        def judge() -> dict[int, Evidence]:
            query = prepare_query(self._decode_file(records[first].path))
            candidates = [Candidate(other, prepared[other]) for other in others]
            result = lookup(query, candidates, thresholds=self.thresholds, min_verdict=Verdict.DIFFERENT)
            return {m.id: m.evidence for m in result.matches}

        try:
            return self.pool.submit(judge).result()
        except (OSError, ClipSearchError) as exc:
            log.warning("cannot compare with %s: %s", records[first].path, exc)
            return {}

"""DupeService: is a picture a copy of one in the catalog, and of which? No HTTP, no CLI here.

A look-up runs in stages; ``app.dupes`` holds the pure parts, this module the catalog around them:

1. candidates: the query's CLIP nearest neighbours in the vector index, its perceptual-hash neighbours (a
   HashIndex over the hashes the indexer stored, searched with the query and its mirror image), and the images
   sharing most ORB descriptors with it (a FeatureIndex that `clipsearch index` stores under data_dir/dupes with
   every image's prepared features, app.dupes.cache; the server maps both and prepares in the background only
   what they lack; these find the crops, borders and overlays that hashes miss, with any CLIP model);
2. verification: each candidate's prepared features (hashes, ORB keypoints, a grey thumbnail) come from that
   cache, or else from its file (kept in a bounded LRU either way), and are compared with the query: hash
   distances, geometric verification with local features, pixel agreement of the aligned images;
3. a verdict per candidate (exact, near_duplicate, similar, different) by the thresholds of the dupe_* settings.

``find_groups`` does the same for every image of the catalog and joins the verified copies into groups: burst
shots and re-shoots of a scene verify as 'similar' and join nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
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
    Match,
    PreparedImage,
    Verdict,
    group_duplicates,
    lookup,
    prepare_catalog_image,
    prepare_query,
)
from app.dupes.cache import (
    CacheError,
    FeatureStore,
    features_path,
    file_stamp,
    merge_features,
    read_shortlist,
    shortlist_path,
    write_shortlist,
)
from app.dupes.resample import single_threaded_blas
from app.errors import BadQuery, ClipSearchError, NotFound, NotReady, UnsupportedImage
from app.imaging import decode_image, model_draft_size
from app.index import Manifest
from app.pixels import FULL_SIZE_KEY, full_size
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


def _timed(work: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = work(*args)
    return result, time.perf_counter() - started


def shrunk_for_model(image: Image.Image, draft: int) -> Image.Image:
    """The image box-reduced by the largest integer factor that keeps its shorter side >= ``draft`` pixels: what
    the indexer's JPEG draft decode gives the model, so that a large upload is not resized from full size."""
    factor = min(image.size) // max(draft, 1)
    if factor < 2:
        return image
    reduced = image.reduce(factor)
    reduced.info[FULL_SIZE_KEY] = full_size(image)  # the model's crop follows the whole picture (app.pixels)
    return reduced


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
    #: seconds per stage: decode, prepare (query ORB + hashes), encode (CLIP), candidates, verify (on threads,
    #: prepare and encode overlap); for the lookup metrics
    stages: dict[str, float] = field(default_factory=dict)

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


def is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _strongest_first(matches: Iterable[Match]) -> list[Match]:
    """The order app.dupes.lookup gives: verdict, verified agreement and inliers, cosine, hashes; then id."""
    return sorted(matches, key=lambda m: (m.evidence.sort_key(), -m.id), reverse=True)


def catalog_keys(store: Store) -> dict[int, str]:
    """The content key (``content_key``) of every indexed image that has hashes (the catalog a look-up searches),
    by id."""
    return {
        image_id: _content_key(sha, path, size, mtime) for image_id, sha, path, size, mtime in store.iter_catalog_keys()
    }


def content_key(record: ImageRecord) -> str:
    """What the feature cache knows an image by: its content (a file without a sha256, by path and stat)."""
    return _content_key(record.sha256, record.path, record.size, record.mtime)


def _content_key(sha256: str | None, path: str, size: int, mtime: float) -> str:
    return sha256 or f"nosha:{path}:{size}:{mtime}"


@dataclass
class FeatureSync:
    """The feature cache and shortlist after ``sync_features``, and what it took."""

    features: FeatureStore
    index: FeatureIndex
    #: id -> content key of what the index holds
    keys: dict[int, str]
    built_size: int
    #: images prepared (decoded, ORB) by this sync; cached images dropped because they left the catalog
    prepared: int = 0
    dropped: int = 0
    written: bool = False
    seconds: float = 0.0
    #: the version of the shortlist file this index matches (file_stamp)
    shortlist_stamp: tuple[int, int, int] | None = None

    def line(self) -> str:
        return (
            f"local features: {len(self.features)} images cached, {self.prepared} prepared, {self.dropped} dropped "
            f"in {self.seconds:.1f}s"
        )


def _load_features(path: Path) -> FeatureStore:
    try:
        return FeatureStore.load(path)
    except FileNotFoundError:
        return FeatureStore.empty()
    except (CacheError, OSError) as exc:
        log.warning("the local-feature cache cannot be used, preparing the catalog again: %s", exc)
        return FeatureStore.empty()


def _load_shortlist(path: Path) -> tuple[FeatureIndex, dict[int, str], int] | None:
    try:
        return read_shortlist(path)
    except FileNotFoundError:
        return None
    except (CacheError, OSError) as exc:
        log.warning("the shortlist cache cannot be used, building it again: %s", exc)
        return None


def sync_features(
    store: Store,
    data_dir: Path | None,
    prepare: Callable[[ImageRecord], PreparedImage | None],
    *,
    current: FeatureSync | None = None,
    run: Callable[[Callable[[ImageRecord], PreparedImage | None], list[ImageRecord]], Iterable[Any]] | None = None,
    guard: Any = None,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    rebuild_growth: int = 4,
) -> FeatureSync:
    """Bring the feature cache and the ORB-vote shortlist up to date with the catalog in ``store``.

    Starts from ``current`` (a server's previous sync) or from the files under ``data_dir/dupes``; prepares only
    the images whose content is not cached (``prepare``, mapped over them by ``run``: in order, one thread by
    default), drops those that left the catalog, and writes both files back when anything changed (atomically;
    a read-only data dir keeps them in memory with a warning). ``data_dir`` None: memory only. ``guard`` (a
    lock) is held while the index changes, for a server that searches it meanwhile.
    """
    started = time.perf_counter()
    guard = guard if guard is not None else contextlib.nullcontext()
    run = run or (lambda work, items: map(work, items))
    features_file = features_path(data_dir) if data_dir is not None else None
    shortlist_file = shortlist_path(data_dir) if data_dir is not None else None
    wanted = catalog_keys(store)  # not the whole records: at 1M images, 11 s and 1.6 GB to read
    wanted_keys = set(wanted.values())

    features = current.features if current is not None else None
    if features_file is not None and (features is None or file_stamp(features_file) != features.stamp):
        # First start, or `clipsearch index` replaced the file since: what it prepared need not be prepared here.
        on_disk = _load_features(features_file)
        features = on_disk if len(on_disk) or features is None else features
    elif features is None:
        features = FeatureStore.empty()
    missing: dict[str, int] = {}
    for image_id, key in wanted.items():
        if key not in features and key not in missing:
            missing[key] = image_id
    records = store.get_many(list(missing.values()))
    todo = {  # an image deleted since is left out
        key: records[image_id]
        for key, image_id in missing.items()
        if image_id in records and records[image_id].status == ImageStatus.INDEXED
    }
    if todo:
        level = logging.WARNING if current is None and len(features) else logging.INFO
        log.log(level, "local features: %d of %d catalog images are not cached, preparing them", len(todo),
                len(wanted_keys))  # fmt: skip
    new: dict[str, PreparedImage] = {}
    failed: set[str] = set()
    for done, (key, prepared) in enumerate(zip(todo, run(prepare, list(todo.values())), strict=False), 1):
        if prepared is not None:
            new[key] = prepared
        else:
            failed.add(key)
        if progress is not None:
            progress("local features", done, len(todo))
        if stop is not None and stop.is_set():
            break
    keep = [key for key in features.shas() if key in wanted_keys]  # one set: built per key, 4 s at 15k images
    dropped = len(features) - len(keep)
    written = False
    if new or dropped:
        try:
            features = merge_features(features_file, features, keep, new)
            written = features_file is not None
        except OSError as exc:
            log.warning("could not write the local-feature cache %s (%s): keeping it in memory", features_file, exc)
            features = merge_features(None, features, keep, new)

    held = {image_id: key for image_id, key in wanted.items() if key in features}
    loaded = (current.index, current.keys, current.built_size) if current is not None else None
    stamp = file_stamp(shortlist_file) if shortlist_file is not None else None
    if shortlist_file is not None and stamp is not None and (current is None or stamp != current.shortlist_stamp):
        loaded = _load_shortlist(shortlist_file) or loaded
    changed = False
    if loaded is None or len(held) > rebuild_growth * max(loaded[2], 64):
        ids = list(held)
        index = FeatureIndex.build_from_descriptors(ids, [_descriptors(features, held[i]) for i in ids])
        keys, built_size, changed = dict(held), len(ids), True
    else:
        index, keys, built_size = loaded[0], dict(loaded[1]), loaded[2]
        gone = [image_id for image_id, key in keys.items() if held.get(image_id) != key]
        fresh = [image_id for image_id, key in held.items() if keys.get(image_id) != key]
        if gone or fresh:
            with guard:
                index.remove(gone)
                index.add_descriptors(fresh, [_descriptors(features, held[i]) for i in fresh])
            for image_id in gone:
                keys.pop(image_id, None)
            keys.update({image_id: held[image_id] for image_id in fresh})
            changed = True
    if changed and shortlist_file is not None:
        try:
            write_shortlist(shortlist_file, index, keys, built_size)
            stamp = file_stamp(shortlist_file)
            written = True
        except OSError as exc:
            log.warning("could not write the shortlist cache %s (%s): keeping it in memory", shortlist_file, exc)
    seconds = time.perf_counter() - started
    return FeatureSync(features, index, keys, built_size, len(new), dropped, written, seconds, stamp)


def _descriptors(features: FeatureStore, key: str) -> np.ndarray:
    codes = features.descriptors(key)
    return codes if codes is not None else np.zeros((0, 32), dtype=np.uint8)


def update_feature_cache(settings: Settings, store: Store, *, progress: Progress | None = None) -> FeatureSync:
    """What ``clipsearch index`` runs after the index is saved: prepare the local features of the new and changed
    images (on ``decode_workers`` threads) and store them with the shortlist under ``data_dir/dupes``."""
    max_pixels = settings.max_image_pixels

    def prepare(record: ImageRecord) -> PreparedImage | None:
        try:
            with open(record.path, "rb") as handle:
                image = decode_image(handle.read(), max_pixels=max_pixels).image
            return prepare_catalog_image(image)
        except (OSError, ClipSearchError) as exc:
            log.info("no local features for %s: %s", record.path, exc)
            return None

    workers = max(1, settings.decode_workers)
    single_threaded_blas()  # the workers hash photos side by side
    with ThreadPoolExecutor(workers, thread_name_prefix="features", initializer=_single_threaded_faiss) as pool:

        def run(work: Callable[[ImageRecord], PreparedImage | None], items: list[ImageRecord]) -> Iterator[Any]:
            # In order, with a bounded number in flight: ~70 KB of features each until they are written.
            pending: list[Future[PreparedImage | None]] = []
            for item in items:
                pending.append(pool.submit(work, item))
                if len(pending) >= 4 * workers:
                    yield pending.pop(0).result()
            for future in pending:
                yield future.result()

        return sync_features(store, settings.data_dir, prepare, run=run, progress=progress)


class FeatureShortlist:
    """The ORB-vote index of the catalog and the cache of prepared catalog images, kept up to date in a
    background thread; searches never wait for it.

    At start it maps the files that ``clipsearch index`` wrote (data_dir/dupes) and only prepares the images they
    lack (decode + ORB, ~30-70 ms each, one thread), then writes them back so that the next start need not.
    Later catalogs (another index was swapped in) are handled the same way.
    """

    REBUILD_GROWTH = 4

    def __init__(
        self, store: Store, prepare: Callable[[ImageRecord], PreparedImage | None], data_dir: Path | None = None
    ) -> None:
        self.store = store
        self.data_dir = data_dir
        self._prepare = prepare
        self._sync: FeatureSync | None = None
        self._lock = threading.Lock()  # guards the index: FAISS indexes are not safe to change while searched
        self._state = threading.Condition()
        self._wanted: object | None = None
        self._done: object | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: images prepared by this server because the cache lacked them (0 when the indexer stored them all)
        self.prepared_here = 0

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

    @property
    def ready(self) -> bool:
        with self._state:
            return self._wanted is not None and self._done is self._wanted

    def search(self, query: PreparedImage, k: int) -> list[FeatureHit]:
        sync = self._sync
        if sync is None:
            return []
        with self._lock:
            return sync.index.search(query, k)

    def cached(self, record: ImageRecord) -> PreparedImage | None:
        """The prepared features of a catalog image from the feature cache, if it holds them."""
        sync = self._sync
        return sync.features.get(content_key(record)) if sync is not None else None

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __len__(self) -> int:
        sync = self._sync
        return len(sync.keys) if sync is not None else 0

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
        sync = sync_features(
            self.store,
            self.data_dir,
            self._prepare,
            current=self._sync,
            guard=self._lock,
            stop=self._stop,
            rebuild_growth=self.REBUILD_GROWTH,
        )
        self._sync = sync
        self.prepared_here += sync.prepared
        log.info("local-feature index: %s", sync.line())


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
        data_dir = settings.data_dir if settings.dupe_feature_cache else None
        self.features = FeatureShortlist(self.store, self._prepare_uncached, data_dir)

    def start(self) -> None:
        """Begin preparing the local-feature index of the catalog being served (when there is one)."""
        wanted = self.settings.dupe_feature_candidates or self.settings.dupe_feature_cache
        if wanted and self.search.manifest is not None:
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
                single_threaded_blas()  # look-ups hash their queries on these threads, several at once
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
                self._hashes = HashIndex.from_arrays(*self.store.hash_arrays())
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
        cached = self.prepared.get(record) or self.features.cached(record)
        if cached is not None:
            self.prepared.put(record, cached)
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
        floor = parse_verdict(min_verdict)
        self._require_ready()
        max_pixels = min(self.settings.max_image_pixels, self.settings.max_upload_pixels)
        image = decode_image(data, max_pixels=max_pixels).image
        stages = {"decode": time.perf_counter() - started}
        # The query's ORB features on a worker thread while this one runs the CLIP model: the two overlap.
        query = self.pool.submit(_timed, prepare_query, image)
        encode_started = time.perf_counter()
        clip_input = shrunk_for_model(image, model_draft_size(self.search.encoder.image_size))
        vector = np.asarray(self.search.encoder.encode_images([clip_input])[0], dtype=np.float32)
        stages["encode"] = time.perf_counter() - encode_started
        prepared, stages["prepare"] = query.result()
        return self._lookup(prepared, vector, set(), floor, limit, started, stages)

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
        query, prepare_seconds = self.pool.submit(_timed, prepare_query, image).result()
        stages = {"prepare": prepare_seconds}
        return self._lookup(query, vector, {image_id}, parse_verdict(min_verdict), limit, started, stages)

    def _lookup(
        self,
        query: PreparedImage,
        vector: np.ndarray,
        exclude: set[int],
        min_verdict: Verdict,
        limit: int,
        started: float,
        stages: dict[str, float],
    ) -> DupeReport:
        if not 1 <= limit <= MAX_MATCHES:
            raise BadQuery(f"limit must be between 1 and {MAX_MATCHES}, got {limit}")
        # On a worker thread: FAISS single-threaded (see _single_threaded_faiss).
        cosines, stages["candidates"] = self.pool.submit(_timed, self._candidates, query, vector, exclude).result()
        verify_started = time.perf_counter()
        records = {i: r for i, r in self.store.get_many(list(cosines)).items() if r.status == ImageStatus.INDEXED}
        matches = self._verify(query, [(records[i], cosines[i]) for i in cosines if i in records])
        stages["verify"] = time.perf_counter() - verify_started
        ranked = _strongest_first(matches)
        verdict = ranked[0].verdict if ranked else Verdict.DIFFERENT
        kept = [m for m in ranked if m.verdict.at_least(min_verdict)][:limit]
        return DupeReport(
            verdict=verdict,
            matches=[self._present(m, records[m.id]) for m in kept],
            candidates=len(matches),
            took_ms=(time.perf_counter() - started) * 1000.0,
            stages=stages,
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
        if settings.dupe_feature_candidates or settings.dupe_feature_cache:
            self.features.request(self.search.manifest)
        if settings.dupe_feature_candidates:
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
        for chunk_ids, chunk_vectors in self.store.iter_vectors(self.search.spec.store_key):
            id_chunks.append(chunk_ids)
            vector_chunks.append(chunk_vectors)
        if not id_chunks:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.search.encoder.dim), dtype=np.float32)
        return np.concatenate(id_chunks), np.concatenate(vector_chunks).astype(np.float32)

    def _records(self, ids: np.ndarray) -> dict[int, ImageRecord]:
        return self.store.get_many([int(i) for i in ids])

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

"""Incremental indexing: only new or changed files are decoded, and only unseen contents are embedded."""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import faiss
import numpy as np
from PIL import Image
from tqdm import tqdm

from app.config import Settings
from app.dupes import ImageHashes
from app.dupes.resample import single_threaded_blas
from app.errors import IndexMismatch, ModelMismatch, NotReady, UnsupportedImage
from app.imaging import decode_image, model_draft_size, sha256_bytes
from app.index import FLAT, ONDISK, VectorIndex, choose_kind, nlist_for, training_size_for
from app.index_ondisk import OnDiskIndex
from app.lazy_encoder import LazyEncoder
from app.onnx_encoder import default_threads
from app.store import FileState, ImageResult, ImageStatus, Store
from app.tagging import TaggingPlan, tag_images
from app.zeroshot import classifier_cache_dir
from indexer.ondisk import PartWriter, build_from_store, maybe_compact, write_store_parts
from indexer.walk import FileInfo, ScanResult, is_under, scan

if TYPE_CHECKING:  # torch and the model's modules are imported when a run has something to embed (LazyEncoder)
    import torch

    from app.encoder import Encoder
    from indexer.device_jpeg import DeviceJpegLane, LaneItem

log = logging.getLogger(__name__)


@dataclass
class IndexSummary:
    """What a run did, file by file category, as shown to the user at the end."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    reused: int = 0
    removed: int = 0
    failed: int = 0
    hashed: int = 0
    embedded: int = 0
    #: images given tags and flags from their stored vectors (new, re-embedded, or labelled under other settings)
    tagged: int = 0
    seconds: float = 0.0
    tag_seconds: float = 0.0
    index_count: int = 0
    index_rebuilt: bool = False
    #: what compacting the on-disk index did, when it was compacted
    index_compacted: str = ""
    failures: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    #: what ran the image tower in this process (Encoder.image_backend, and the lanes), for the summary line
    image_tower: str = ""

    @property
    def rate(self) -> float:
        seconds = self.seconds - self.tag_seconds
        return self.embedded / seconds if seconds > 0 else 0.0

    def _embedded_part(self) -> str:
        """'embedded N images in Xs (R img/s on BACKEND); ', or 'embedded 0 images; ' (no rate to speak of)."""
        if not self.embedded:
            return "embedded 0 images; "
        seconds, tower = self.seconds - self.tag_seconds, f" on {self.image_tower}" if self.image_tower else ""
        return f"embedded {self.embedded} images in {seconds:.1f}s ({self.rate:.1f} img/s{tower}); "

    def lines(self, max_failures: int = 5) -> list[str]:
        out = [
            f"added {self.added}, updated {self.updated}, unchanged {self.unchanged}, reused {self.reused}, "
            f"removed {self.removed}, failed {self.failed}"
            + (f", hashes added to {self.hashed} existing" if self.hashed else ""),
            self._embedded_part()
            + (f"tagged {self.tagged} in {self.tag_seconds:.1f}s; " if self.tagged else "")
            + f"index holds {self.index_count} vectors"
            + (" (rebuilt from the store)" if self.index_rebuilt else ""),
        ]
        if self.index_compacted:
            out.append(self.index_compacted)
        for path, reason in self.failures[:max_failures]:
            out.append(f"  failed: {path}: {reason}")
        if len(self.failures) > max_failures:
            out.append(f"  ... and {len(self.failures) - max_failures} more ('clipsearch stats --failures' lists them)")
        for path, reason in self.unreadable[:max_failures]:
            out.append(f"  skipped unreadable: {path}: {reason}")
        return out


@dataclass
class Prepared:
    """A file after a worker has read it: decoded pixels, a content to reuse, or a failure."""

    info: FileInfo
    sha256: str | None = None
    pixels: torch.Tensor | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    error: str | None = None
    reusable: bool = False
    #: an already indexed file that only lacks its perceptual hashes (catalogs from before they existed)
    hash_only: bool = False
    hashes: dict[str, int] | None = None


@dataclass(frozen=True)
class PrepareOptions:
    """What preparing a file needs besides its bytes: the same for the local and the Ray engines."""

    max_pixels: int
    draft_size: int
    preprocess: Callable[[Image.Image], torch.Tensor]


@dataclass
class Plan:
    """The diff of a listing against the store: what to process, and what the store knew before."""

    todo: list[FileInfo]
    states: dict[str, FileState]
    #: paths in ``todo`` that are indexed and only lack their perceptual hashes
    hash_only: set[str]
    known_shas: set[str]


def prepare_bytes(
    info: FileInfo,
    data: bytes,
    options: PrepareOptions,
    known_shas: Container[str] = (),
    hash_only: bool = False,
    sha256: str | None = None,
) -> Prepared:
    """Content hash (unless given as ``sha256``), then (unless the content already has a vector) decode, perceptual
    hashes and the model's preprocessing. Never raises for a bad file: the reason is in ``error``."""
    sha = sha256 or sha256_bytes(data)
    if (known := known_content(info, sha, known_shas, hash_only)) is not None:
        return known
    try:
        decoded = decode_image(data, max_pixels=options.max_pixels, draft_size=options.draft_size)
        hashes = asdict(ImageHashes.of(decoded.image))
        if hash_only:
            return Prepared(
                info, sha256=sha, width=decoded.width, height=decoded.height, format=decoded.format,
                hash_only=True, hashes=hashes,
            )  # fmt: skip
        pixels = options.preprocess(decoded.image)
    except UnsupportedImage as exc:
        return Prepared(info, sha256=sha, error=str(exc))
    except Exception as exc:  # a decoder bug on one file must not stop the catalog
        log.exception("unexpected error decoding %s", info.path)
        return Prepared(info, sha256=sha, error=f"unexpected decode error: {exc.__class__.__name__}: {exc}")
    return Prepared(
        info,
        sha256=sha,
        pixels=pixels,
        width=decoded.width,
        height=decoded.height,
        format=decoded.format,
        hashes=hashes,
    )


def prepare_file(
    info: FileInfo,
    read: Callable[[str], bytes],
    options: PrepareOptions,
    known_shas: Container[str] = (),
    hash_only: bool = False,
) -> Prepared:
    """Read a file with ``read`` (a local open, an fsspec filesystem) and prepare it (see prepare_bytes)."""
    data = read_or_failure(info, read)
    if isinstance(data, Prepared):
        return data
    return prepare_bytes(info, data, options, known_shas, hash_only)


def read_or_failure(info: FileInfo, read: Callable[[str], bytes]) -> bytes | Prepared:
    """The file's bytes, or the failure to record when it cannot be read."""
    try:
        return read(info.path)
    except OSError as exc:
        return Prepared(info, error=f"cannot read file: {exc.strerror or exc}")


def known_content(info: FileInfo, sha: str, known_shas: Container[str], hash_only: bool) -> Prepared | None:
    """A file whose content the store already has a vector for (to reuse, not decode), else None; a file that only
    lacks its perceptual hashes is decoded whatever its content."""
    return Prepared(info, sha256=sha, reusable=True) if sha in known_shas and not hash_only else None


def read_local(path: str) -> bytes:
    return Path(path).read_bytes()


class PixelEncoder(Protocol):
    """What embedding prepared files needs of an encoder (app.encoder.Encoder; the Ray actors' shipped tower)."""

    dim: int

    def encode_pixels(self, batch: torch.Tensor) -> np.ndarray: ...


def embed_batch(
    encoder: PixelEncoder, batch: list[Prepared], encode: Callable[[torch.Tensor], np.ndarray] | None = None
) -> np.ndarray:
    """The model's vectors for prepared files with pixels, one row each, in order; ``encode``: the encoder call
    to use (default ``encoder.encode_pixels``; the encode lanes pass ``encode_pixels_in_lane``)."""
    if not batch:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    pixels = [item.pixels for item in batch]
    stacked = stack_pixels(pixels, getattr(encoder, "device", None))  # type: ignore[arg-type]
    return (encode or encoder.encode_pixels)(stacked)


def stack_pixels(pixels: list[torch.Tensor], device: torch.device | None) -> torch.Tensor:
    """One (N, C, H, W) batch of per-photo pixels, in order, on ``device`` when that is a GPU. There, pixels
    prepared on the CPU are stacked into pinned (page-locked) memory and sent in one non-blocking copy, and
    those the device lane prepared (already on the GPU) stay where they are; elsewhere, a plain stack."""
    import torch

    if device is None or device.type != "cuda":
        return torch.stack([p.cpu() for p in pixels])
    host = [i for i, p in enumerate(pixels) if p.device.type == "cpu"]
    sent = None
    if host:
        first = pixels[host[0]]
        pinned = torch.empty((len(host), *first.shape), dtype=first.dtype, pin_memory=True)
        torch.stack([pixels[i] for i in host], out=pinned)
        sent = pinned.to(device, non_blocking=True)
        if len(host) == len(pixels):
            return sent
    on_device = [i for i, p in enumerate(pixels) if p.device.type != "cpu"]
    out = torch.stack([pixels[i].to(device) for i in on_device])
    if sent is None:
        return out
    batch = torch.empty((len(pixels), *out.shape[1:]), dtype=out.dtype, device=device)
    batch[torch.tensor(host, device=device)] = sent
    batch[torch.tensor(on_device, device=device)] = out
    return batch


def indexed_result(item: Prepared, vector: np.ndarray | None = None) -> ImageResult:
    """The store row of a prepared, decodable file; without ``vector`` the stored vector is left as it is."""
    return ImageResult(
        path=item.info.path,
        size=item.info.size,
        mtime=item.info.mtime,
        sha256=item.sha256,
        status=ImageStatus.INDEXED,
        width=item.width,
        height=item.height,
        format=item.format,
        vector=vector,
        hashes=item.hashes,
    )


def embedded_results(batch: list[Prepared], vectors: np.ndarray) -> list[ImageResult]:
    """Store rows for prepared files and the vectors the model gave them."""
    return [indexed_result(item, vector) for item, vector in zip(batch, vectors, strict=True)]


BatchCallback = Callable[[int], None]
T = TypeVar("T")


@dataclass(frozen=True)
class _LaneEnd:
    """A thread of the two-lane stream or an encode lane has finished (with the exception that stopped it, if any)."""

    error: BaseException | None = None


def _results_of(threads: list[threading.Thread], out: queue.Queue[T | _LaneEnd]) -> Iterator[T]:
    """Start ``threads`` and yield what they put on ``out`` until each has put its _LaneEnd; the first error one
    reports is raised here (the caller's ``finally`` stops and joins the others)."""
    for thread in threads:
        thread.start()
    ended = 0
    while ended < len(threads):
        got = out.get()
        if isinstance(got, _LaneEnd):
            ended += 1
            if got.error is not None:
                raise got.error
            continue
        yield got


class Indexer:
    """Brings the store and the index in line with the files under some folders."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        encoder: Encoder | LazyEncoder,
        *,
        progress: bool = True,
        part_writer: PartWriter | None = None,
    ) -> None:
        """``encoder``: a ``LazyEncoder`` is built only if the run embeds or tags something. ``part_writer``: how an
        on-disk index build fills its parts (default: in this process, from the store; the Ray engine passes its
        own)."""
        self.settings = settings
        self.store = store
        self._encoder = encoder
        self.progress = progress
        self.model_key = encoder.spec.store_key
        if isinstance(encoder, LazyEncoder) and encoder.known_dim is None:
            encoder.known_dim = store.vector_dim(self.model_key)
        # Read (and validated) now, so that a bad vocabulary file fails before any image is processed.
        self.tagging = TaggingPlan.from_settings(settings)
        self.part_writer = part_writer or self._write_parts
        self._model_idle = threading.Event()  # cleared while a batch is embedded and committed (_decoders_paused)
        self._model_idle.set()

    @property
    def encoder(self) -> Encoder:
        """The encoder (a lazy one is built here, on first use)."""
        return self._encoder.get() if isinstance(self._encoder, LazyEncoder) else self._encoder

    @functools.cached_property
    def draft_size(self) -> int:
        return model_draft_size(self.encoder.image_size)

    def run(
        self,
        roots: Iterable[Path],
        *,
        rebuild: bool = False,
        retry_failed: bool = False,
        compact: bool = False,
        on_batch_committed: BatchCallback | None = None,
    ) -> IndexSummary:
        """Index ``roots`` incrementally. Batches are committed as they go, so an interrupted run can
        simply be started again: what was committed is not embedded twice. ``compact``: compact an on-disk
        index fully afterwards (it is otherwise compacted when its policy says so)."""
        started = time.perf_counter()
        summary = IndexSummary()
        found = scan(list(roots), exclude=[self.settings.data_dir])
        plan = self.plan(found, summary, retry_failed=retry_failed)
        touched: set[int] = set()
        self._process(plan, summary, touched, on_batch_committed)
        if summary.embedded:
            summary.image_tower = self.image_tower_line()
        self.finish(found, plan, summary, touched, rebuild=rebuild, compact=compact)
        summary.seconds = time.perf_counter() - started
        return summary

    def image_tower_line(self) -> str:
        """What embeds this run's images, e.g. 'torch bf16 products, 2 lanes' ('' for an encoder that cannot say)."""
        backend = getattr(self.encoder, "image_backend", "")
        lanes = self.encode_lanes
        return f"{backend}, {lanes} lanes" if backend and lanes > 1 else backend

    @functools.cached_property
    def prepare_options(self) -> PrepareOptions:
        """Built once per indexer: ``_prepare`` reads it for every file."""
        from app.preprocess import indexing_transform

        return PrepareOptions(
            self.settings.max_image_pixels, self.draft_size, indexing_transform(self.encoder.preprocess)
        )

    def plan(self, found: ScanResult, summary: IndexSummary, *, retry_failed: bool = False) -> Plan:
        """Diff a listing against the store before anything is read: unchanged files (same size and
        mtime, indexed with this model, or failed unless ``retry_failed``) are counted and left out."""
        summary.unreadable = found.unreadable
        states = self.store.file_states()
        todo: list[FileInfo] = []
        hash_only: set[str] = set()
        for info in found.files:
            state = states.get(info.path)
            if self._is_unchanged(state, info, retry_failed):
                assert state is not None
                if state.status == ImageStatus.INDEXED and not state.has_hashes:
                    hash_only.add(info.path)
                    todo.append(info)
                else:
                    summary.unchanged += 1
            else:
                todo.append(info)
        log.info("%d files found, %d to process", len(found.files), len(todo))
        # the contents that could be reused instead of embedded: read only when a file is to be read (2 s at 1M)
        known = self.store.embedded_shas(self.model_key) if todo else set()
        return Plan(todo, states, hash_only, known)

    def commit(
        self,
        embedded: list[Prepared],
        vectors: np.ndarray,
        others: list[Prepared],
        plan: Plan,
        summary: IndexSummary,
        touched: set[int],
    ) -> None:
        """Save one batch in one transaction: embedded files with their vectors, the rest (reused
        contents, failures, hash back-fills) as _finish resolves them; then count them."""
        results = embedded_results(embedded, vectors) + self._finish(others)
        ids = self.store.save_results(results, self.model_key)
        touched.update(ids.values())
        for item in embedded + others:
            self._count(item, plan.states, summary)

    def finish(
        self,
        found: ScanResult,
        plan: Plan,
        summary: IndexSummary,
        touched: set[int],
        *,
        rebuild: bool = False,
        compact: bool = False,
    ) -> None:
        """After every batch is committed: files gone from the listing leave the store, tags are brought
        up to date, and the saved index takes the changes."""
        seen = {f.path for f in found.files}
        skipped_roots = [folder for folder, _ in found.unreadable]
        gone = [
            state.id
            for path, state in plan.states.items()
            if state.status != ImageStatus.DELETED
            and path not in seen
            and is_under(path, found.roots)
            and not is_under(path, skipped_roots)
        ]
        summary.removed = self.store.mark_deleted(gone)
        touched.update(gone)

        # Before the index is saved: a service that swaps in the new index finds the new images' tags.
        tag_started = time.perf_counter()
        summary.tagged = self.tag()
        summary.tag_seconds = time.perf_counter() - tag_started

        summary.index_count, summary.index_rebuilt, summary.index_compacted = self._update_index(
            touched, rebuild, compact
        )

    def tag(self, *, everything: bool = False) -> int:
        """Tags and flags for the indexed images that lack them or have stale ones (``everything``: all),
        from their stored vectors. Returns how many images were labelled."""
        return tag_images(
            self.store,
            self.tagging,
            self._encoder,  # a lazy one is built only when some image needs labels
            self.model_key,
            cache_dir=classifier_cache_dir(self.settings),
            everything=everything,
            progress=self.progress,
        )

    def _is_unchanged(self, state: FileState | None, info: FileInfo, retry_failed: bool) -> bool:
        if state is None or state.size != info.size or state.mtime != info.mtime:
            return False
        if state.status == ImageStatus.INDEXED:
            return state.model == self.model_key
        return state.status == ImageStatus.FAILED and not retry_failed

    # --- the decode pool and batched encode -----------------------------------------------------

    def _prepare(self, info: FileInfo, known_shas: set[str], hash_only: bool = False) -> Prepared:
        self._model_idle.wait()  # see decode_between_batches (the encode lanes never pause it)
        return prepare_file(info, read_local, self.prepare_options, known_shas, hash_only)

    @property
    def decode_between_batches(self) -> bool:
        """Whether decode workers pause while the model runs (CLIPSEARCH_DECODE_OVERLAP). On a CPU the model's
        threads share out each operation and meet at its end: a decode thread that takes one of their cores
        delays all of them, so decoding between batches, on every core, loses less than decoding alongside."""
        mode = self.settings.decode_overlap
        if mode == "auto":
            device = getattr(self.encoder, "device", None)
            return getattr(device, "type", "cpu") == "cpu"
        return mode == "between-batches"

    @contextlib.contextmanager
    def _decoders_paused(self, pause: bool) -> Iterator[None]:
        """Decode workers wait (when ``pause`` and decode_between_batches) until the block is done: the model call
        and the batch's commit. A commit alongside the decode threads took about 8 ms per batch of 32 against 2 ms
        alone, and slowed them in turn. Measured on the 64 px model's ingest of 960 photos, committing while they
        wait gave 148.5 and 151.0 img/s against 141.7 and 143.4 (medians of 4 interleaved rounds, twice); on
        ViT-B-32, 16.95 against 16.75."""
        gate = pause and self.decode_between_batches
        if gate:
            self._model_idle.clear()
        try:
            yield
        finally:
            self._model_idle.set()

    @functools.cached_property
    def device_lane(self) -> DeviceJpegLane | None:
        """The lane that decodes JPEGs in batches on the model's device (CLIPSEARCH_JPEG_DECODER), or None."""
        mode = self.settings.jpeg_decoder
        import torch

        from indexer.device_jpeg import DeviceJpegLane

        device = getattr(self.encoder, "device", None) or torch.device("cpu")
        if mode == "pillow" or (mode == "auto" and device.type != "cuda"):
            return None
        lane = DeviceJpegLane.for_transform(self.prepare_options.preprocess, device, self.settings.max_image_pixels)
        if lane is None:
            log.info("the model's preprocessing is not a plain resize and centre crop: JPEGs are decoded by Pillow")
        return lane

    @functools.cached_property
    def decode_workers(self) -> int:
        """CLIPSEARCH_DECODE_WORKERS when set; by default min(4, cores) on a CPU, where the model needs the cores,
        and every core on a GPU, where the threads are what feeds it."""
        device = getattr(self.encoder, "device", None)
        if "decode_workers" in self.settings.model_fields_set or getattr(device, "type", "cpu") != "cuda":
            return self.settings.decode_workers
        return default_threads()

    def _prepared_stream(self, plan: Plan) -> Iterator[Prepared]:
        if self.device_lane is not None:
            yield from self._two_lane_stream(plan, self.device_lane)
            return
        yield from self._ordered_stream(plan)

    def _ordered_stream(self, plan: Plan) -> Iterator[Prepared]:
        """Decode on a thread pool, in order, with a bounded number of files in flight."""
        window = max(2 * self.settings.batch_size, 4 * self.decode_workers)
        with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode") as pool:
            pending: deque[Future[Prepared]] = deque()
            for info in plan.todo:
                pending.append(pool.submit(self._prepare, info, plan.known_shas, info.path in plan.hash_only))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _two_lane_stream(self, plan: Plan, lane: DeviceJpegLane) -> Iterator[Prepared]:
        """Prepared files as they are ready (not in order), from two lanes fed by the decode workers.

        Each worker reads a file and takes its sha256; a JPEG whose content is new then joins the device lane's
        queue while that holds under a batch (the lane works on another batch meanwhile), and is otherwise prepared
        by the worker itself (Pillow, draft mode), as is every other file. The lane takes up to a batch at a time.
        So the device decodes what it keeps up with and the CPU the rest, whichever is the faster. A file the lane
        cannot decode goes back to the CPU path, which reports it as it would without the lane. Once every file is
        read, the workers take back the queued files the lane has not started on, so neither lane waits on the
        other at the end."""
        from indexer.device_jpeg import LaneItem, is_jpeg

        batch_size = self.settings.batch_size
        workers = self.decode_workers
        options = self.prepare_options
        out: queue.Queue[Prepared | _LaneEnd] = queue.Queue(maxsize=max(2 * batch_size, 4 * workers))
        waiting: deque[LaneItem] = deque()
        changed = threading.Condition()
        stop = threading.Event()
        todo = iter(plan.todo)
        take = threading.Lock()
        running = [workers]  # decode workers still taking files (guarded by ``changed``)

        def put(item: Prepared | _LaneEnd) -> None:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    out.put(item, timeout=0.1)
                    return

        def cpu_path(item: LaneItem) -> Prepared:
            return prepare_bytes(item.info, item.data, options, plan.known_shas, item.hash_only, sha256=item.sha256)

        def worker() -> None:
            error: BaseException | None = None
            try:
                while not stop.is_set():
                    with take:
                        info = next(todo, None)
                    if info is None:
                        with changed:  # no files left to read: take back what the lane has not started on
                            left = waiting.pop() if waiting else None
                        if left is None:
                            break
                        self._model_idle.wait()
                        put(cpu_path(left))
                        continue
                    self._model_idle.wait()
                    hash_only = info.path in plan.hash_only
                    data = read_or_failure(info, read_local)
                    if isinstance(data, Prepared):
                        put(data)
                        continue
                    sha = sha256_bytes(data)
                    if (known := known_content(info, sha, plan.known_shas, hash_only)) is not None:
                        put(known)
                        continue
                    item = LaneItem(info, data, sha, hash_only)
                    if is_jpeg(data):
                        with changed:
                            if len(waiting) < batch_size:
                                waiting.append(item)
                                changed.notify_all()
                                continue
                    put(cpu_path(item))
            except BaseException as exc:  # handed to the consumer, which raises it
                error = exc
            finally:
                with changed:
                    running[0] -= 1
                    changed.notify_all()
                put(_LaneEnd(error))

        def device() -> None:
            error: BaseException | None = None
            try:
                while not stop.is_set():
                    with changed:
                        # a full batch, or whatever is there once the workers have stopped or after a short wait
                        changed.wait_for(lambda: len(waiting) >= batch_size or not running[0] or stop.is_set(), 0.02)
                        if not waiting and not running[0]:
                            break
                        batch = [waiting.popleft() for _ in range(min(batch_size, len(waiting)))]
                    if not batch:
                        continue
                    self._model_idle.wait()
                    for result in lane.prepare(batch):
                        item = result.item
                        if result.handed_back:
                            put(cpu_path(item))
                            continue
                        put(
                            Prepared(
                                item.info, sha256=item.sha256, pixels=result.pixels, width=result.width,
                                height=result.height, format=result.format, hash_only=item.hash_only,
                                hashes=result.hashes,
                            )
                        )  # fmt: skip
            except BaseException as exc:
                error = exc
            finally:
                put(_LaneEnd(error))

        threads = [threading.Thread(target=worker, name=f"decode-{i}", daemon=True) for i in range(workers)]
        threads.append(threading.Thread(target=device, name="decode-device", daemon=True))
        try:
            yield from _results_of(threads, out)
        finally:
            stop.set()
            with changed:
                changed.notify_all()
            for thread in threads:
                thread.join()
            log.info(
                "device lane (%s): prepared %d files, handed %d back to the decode workers",
                lane.device, lane.prepared, lane.handed_back,
            )  # fmt: skip

    @functools.cached_property
    def encode_lanes(self) -> int:
        """How many batches are prepared and encoded at once (the encoder's ``image_lanes``; see _lane_batches)."""
        lanes = int(getattr(self.encoder, "image_lanes", 1))
        return lanes if lanes > 1 and self.device_lane is None else 1

    def _lane_chunk(self, remaining: int) -> int:
        """Files a lane takes next: a batch, and towards the end an equal share of what is left (down to 4 files),
        so that the lanes finish together rather than one running the last batch alone on its cores."""
        share = -(-remaining // self.encode_lanes)
        return min(remaining, self.settings.batch_size, max(share, 4))

    def _lane_batches(self, plan: Plan) -> Iterator[tuple[list[Prepared], np.ndarray, list[Prepared]]]:
        """Embedded batches (files with pixels, their vectors, the other files of the chunk) as lanes finish them.

        Each lane is a thread that takes the next files, prepares them one after another and encodes them with its
        share of the cores (Encoder.encode_pixels_in_lane): on a CPU every core then alternates between preparing
        and encoding its own batches, and no core waits on another. With one batch at a time on every core, the
        model's threads meet at the end of each operation, so preparation had to wait for the model between
        batches (decode_between_batches), which left ViT-B-32 at 0.92-0.95x its model-only rate on 2 cores."""
        todo = plan.todo
        taken = [0]
        take = threading.Lock()
        stop = threading.Event()
        out: queue.Queue[tuple[list[Prepared], np.ndarray, list[Prepared]] | _LaneEnd] = queue.Queue()

        def next_chunk() -> list[FileInfo]:
            with take:
                start = taken[0]
                taken[0] += self._lane_chunk(len(todo) - start)
                return todo[start : taken[0]]

        def lane() -> None:
            error: BaseException | None = None
            try:
                self.encoder.enter_lane()
                while not stop.is_set() and (chunk := next_chunk()):
                    prepared = []
                    for info in chunk:
                        if stop.is_set():
                            return
                        prepared.append(self._prepare(info, plan.known_shas, info.path in plan.hash_only))
                    batch = [item for item in prepared if item.pixels is not None]
                    others = [item for item in prepared if item.pixels is None]
                    out.put((batch, embed_batch(self.encoder, batch, self.encoder.encode_pixels_in_lane), others))
            except BaseException as exc:  # handed to the consumer, which raises it
                error = exc
            finally:
                out.put(_LaneEnd(error))

        threads = [threading.Thread(target=lane, name=f"lane-{i}", daemon=True) for i in range(self.encode_lanes)]
        import torch

        threads_before = torch.get_num_threads()
        try:
            yield from _results_of(threads, out)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            torch.set_num_threads(threads_before)  # the lanes set theirs, which torch also keeps process-wide

    def _process(
        self, plan: Plan, summary: IndexSummary, touched: set[int], on_batch_committed: BatchCallback | None
    ) -> None:
        if not plan.todo:  # nothing new or changed: the model is not needed (a LazyEncoder stays unbuilt)
            return
        single_threaded_blas()  # photos are hashed on several threads beside the model
        batch: list[Prepared] = []
        others: list[Prepared] = []
        batches_done = 0
        bar = tqdm(total=len(plan.todo), unit="img", desc="indexing", disable=not self.progress, dynamic_ncols=True)

        def committed(count: int) -> None:
            nonlocal batches_done
            bar.update(count)
            batches_done += 1
            if on_batch_committed is not None:
                on_batch_committed(batches_done)

        def flush() -> None:
            with self._decoders_paused(bool(batch)):
                self.commit(batch, embed_batch(self.encoder, batch), others, plan, summary, touched)
            committed(len(batch) + len(others))
            batch.clear()
            others.clear()

        try:
            if self.encode_lanes > 1:
                for embedded, vectors, rest in self._lane_batches(plan):
                    self.commit(embedded, vectors, rest, plan, summary, touched)
                    committed(len(embedded) + len(rest))
                return
            for item in self._prepared_stream(plan):
                (batch if item.pixels is not None else others).append(item)
                if len(batch) >= self.settings.batch_size or len(others) >= 4 * self.settings.batch_size:
                    flush()
            if batch or others:
                flush()
        finally:
            bar.close()

    def _finish(self, items: list[Prepared]) -> list[ImageResult]:
        """Results for files that need no model call: reused contents and failures."""
        reusable = self.store.reusable_by_sha([i.sha256 for i in items if i.reusable and i.sha256], self.model_key)
        results = []
        for item in items:
            if item.hash_only:
                if item.hashes is not None:  # else leave the indexed row as it is (its decode failed now)
                    results.append(indexed_result(item))
                continue
            source = reusable.get(item.sha256 or "") if item.reusable else None
            if item.reusable and source is None:
                item.reusable, item.error = False, "content vanished from the store during the run; run again"
            if source is not None:
                results.append(
                    ImageResult(
                        path=item.info.path,
                        size=item.info.size,
                        mtime=item.info.mtime,
                        sha256=item.sha256,
                        status=ImageStatus.INDEXED,
                        width=source.width,
                        height=source.height,
                        format=source.format,
                        vector=source.vector,
                        hashes=source.hashes,
                    )
                )
            else:
                results.append(
                    ImageResult(
                        path=item.info.path,
                        size=item.info.size,
                        mtime=item.info.mtime,
                        sha256=item.sha256,
                        status=ImageStatus.FAILED,
                        error=item.error,
                    )
                )
        return results

    @staticmethod
    def _count(item: Prepared, states: dict[str, FileState], summary: IndexSummary) -> None:
        if item.hash_only:
            summary.hashed += item.hashes is not None
            summary.unchanged += 1
            return
        if item.error is not None:
            summary.failed += 1
            summary.failures.append((item.info.path, item.error))
            return
        if item.reusable:
            summary.reused += 1
            return
        summary.embedded += 1
        state = states.get(item.info.path)
        if state is None or state.status == ImageStatus.DELETED:
            summary.added += 1
        else:
            summary.updated += 1

    # --- the index -------------------------------------------------------------------------------

    def _update_index(self, touched: set[int], rebuild: bool, compact: bool = False) -> tuple[int, bool, str]:
        """Apply this run's changes to the saved index; rebuild from the store when they disagree,
        or when the catalog has grown past the size where another index type is chosen. An on-disk index
        is then compacted when its policy (or ``compact``) says so."""
        spec = self._encoder.spec
        settings = self.settings
        index: VectorIndex | None = None
        if not rebuild:
            try:
                index, _ = VectorIndex.load(
                    settings.index_dir, model=spec.name, pretrained=spec.pretrained, nprobe=settings.nprobe
                )
            except ModelMismatch as exc:
                # not an error (the catalog moves to the configured model), but not silent: a mistyped model or
                # weights path would otherwise leave an index of the images this run happened to embed
                log.warning(
                    "the saved index (%d vectors) was built with model %s; this run uses %s: the index is "
                    "rebuilt for it and holds the images embedded with it so far. The images not embedded again "
                    "keep their vectors of the other model in the store: configuring it again rebuilds its index",
                    exc.count, exc.built, exc.wanted,
                )  # fmt: skip
            except (NotReady, IndexMismatch) as exc:
                log.info("building the index from the store: %s", exc)
        expected = self.store.count_indexed(self.model_key)
        wanted_kind = choose_kind(expected, settings.index_type, settings.ivf_min_vectors, settings.ondisk_min_vectors)
        if wanted_kind == ONDISK and expected == 0:
            wanted_kind = FLAT  # nothing to train centroids on yet: an empty exact index until there is
        if index is not None and (index.dim != self._encoder.dim or index.kind != wanted_kind):
            log.info("switching the index to %s for %d vectors", wanted_kind, expected)
            index = None
        rebuilt = False
        if index is not None:
            ids = np.fromiter(touched, dtype=np.int64, count=len(touched))
            index.remove(ids)
            for chunk_ids, vectors in self._vectors_of(ids):
                index.add(chunk_ids, vectors)
            if index.ntotal != expected:
                log.warning("index and store disagree (%d vs %d): rebuilding", index.ntotal, expected)
                index = None
        if index is None:
            index, rebuilt = self._build_from_store(wanted_kind, expected), True
        if touched or rebuilt:
            index.save(settings.index_dir, model=spec.name, pretrained=spec.pretrained)
        compacted = ""
        if isinstance(index, OnDiskIndex):
            compacted = maybe_compact(settings, index, model=spec.name, pretrained=spec.pretrained, force=compact)
            index.close()
        return index.ntotal, rebuilt, compacted

    def compact_index(self) -> str:
        """Compact the saved on-disk index fully (every tombstone dropped, small shards merged), without a scan."""
        spec = self._encoder.spec
        index, _ = VectorIndex.load(
            self.settings.index_dir, model=spec.name, pretrained=spec.pretrained, nprobe=self.settings.nprobe
        )
        if not isinstance(index, OnDiskIndex):
            return f"nothing to compact: the index is {index.kind}, not {ONDISK}"
        try:
            done = maybe_compact(self.settings, index, model=spec.name, pretrained=spec.pretrained, force=True)
        finally:
            index.close()
        return done or f"nothing to compact: {len(index.shards)} shard(s), no deleted vectors"

    def _build_from_store(self, kind: str, expected: int) -> VectorIndex:
        training = None
        if kind != FLAT:
            training = self._training_sample(expected, training_size_for(nlist_for(expected)))
        if kind == ONDISK:
            assert training is not None
            return build_from_store(self.settings, training, expected, self.part_writer)
        index = VectorIndex.create(self._encoder.dim, kind, training, nprobe=self.settings.nprobe, count=expected)
        for chunk_ids, vectors in self.store.iter_vectors(self.model_key):
            index.add(chunk_ids, vectors)
        return index

    def _write_parts(self, template: faiss.IndexIVF, folder: Path) -> list[Path]:
        """The local build's parts: every stored vector, streamed through this process."""
        return write_store_parts(
            self.store, self.model_key, template, folder, max_vectors=self.settings.ondisk_part_vectors
        )

    def _training_sample(self, expected: int, size: int) -> np.ndarray:
        """A uniform random sample of the stored vectors (fixed seed) to train IVF centroids on."""
        rng = np.random.default_rng(0)
        keep = min(1.0, size / max(expected, 1))
        parts = [vectors[rng.random(len(vectors)) < keep] for _, vectors in self.store.iter_vectors(self.model_key)]
        return np.concatenate(parts) if parts else np.zeros((0, self._encoder.dim), dtype=np.float32)

    def _vectors_of(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        wanted = set(int(i) for i in ids)
        if not wanted:
            return
        # Touched rows are few next to the catalog; read them back by id from the store.
        yield from self.store.iter_vectors_for(sorted(wanted), self.model_key)

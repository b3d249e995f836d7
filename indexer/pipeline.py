"""Incremental indexing: only new or changed files are decoded, and only unseen contents are embedded."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from app.config import Settings
from app.dupes import ImageHashes
from app.encoder import Encoder
from app.errors import IndexMismatch, NotReady, UnsupportedImage
from app.imaging import decode_image, model_draft_size, sha256_bytes
from app.index import FLAT, VectorIndex, choose_kind, nlist_for, training_size_for
from app.store import FileState, ImageResult, ImageStatus, Store
from app.tagging import TaggingPlan, tag_images
from app.zeroshot import classifier_cache_dir
from indexer.walk import FileInfo, is_under, scan

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
    failures: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        seconds = self.seconds - self.tag_seconds
        return self.embedded / seconds if seconds > 0 else 0.0

    def lines(self, max_failures: int = 5) -> list[str]:
        out = [
            f"added {self.added}, updated {self.updated}, unchanged {self.unchanged}, reused {self.reused}, "
            f"removed {self.removed}, failed {self.failed}"
            + (f", hashes added to {self.hashed} existing" if self.hashed else ""),
            f"embedded {self.embedded} images in {self.seconds - self.tag_seconds:.1f}s ({self.rate:.1f} img/s); "
            + (f"tagged {self.tagged} in {self.tag_seconds:.1f}s; " if self.tagged else "")
            + f"index holds {self.index_count} vectors"
            + (" (rebuilt from the store)" if self.index_rebuilt else ""),
        ]
        for path, reason in self.failures[:max_failures]:
            out.append(f"  failed: {path}: {reason}")
        if len(self.failures) > max_failures:
            out.append(f"  ... and {len(self.failures) - max_failures} more ('clipsearch stats --failures' lists them)")
        for path, reason in self.unreadable[:max_failures]:
            out.append(f"  skipped unreadable: {path}: {reason}")
        return out


@dataclass
class _Prepared:
    """A file after the worker has read it: decoded pixels, a content to reuse, or a failure."""

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


BatchCallback = Callable[[int], None]


class Indexer:
    """Brings the store and the index in line with the files under some folders."""

    def __init__(self, settings: Settings, store: Store, encoder: Encoder, *, progress: bool = True) -> None:
        self.settings = settings
        self.store = store
        self.encoder = encoder
        self.progress = progress
        self.model_key = encoder.spec.name
        self.draft_size = model_draft_size(encoder.image_size)
        # Read (and validated) now, so that a bad vocabulary file fails before any image is processed.
        self.tagging = TaggingPlan.from_settings(settings)

    def run(
        self,
        roots: Iterable[Path],
        *,
        rebuild: bool = False,
        retry_failed: bool = False,
        on_batch_committed: BatchCallback | None = None,
    ) -> IndexSummary:
        """Index ``roots`` incrementally. Batches are committed as they go, so an interrupted run can
        simply be started again: what was committed is not embedded twice."""
        started = time.perf_counter()
        summary = IndexSummary()
        found = scan(list(roots), exclude=[self.settings.data_dir])
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

        touched: set[int] = set()
        known_shas = self.store.embedded_shas(self.model_key)
        self._process(todo, states, known_shas, hash_only, summary, touched, on_batch_committed)

        seen = {f.path for f in found.files}
        skipped_roots = [folder for folder, _ in found.unreadable]
        gone = [
            state.id
            for path, state in states.items()
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

        summary.index_count, summary.index_rebuilt = self._update_index(touched, rebuild)
        summary.seconds = time.perf_counter() - started
        return summary

    def tag(self, *, everything: bool = False) -> int:
        """Tags and flags for the indexed images that lack them or have stale ones (``everything``: all),
        from their stored vectors. Returns how many images were labelled."""
        return tag_images(
            self.store,
            self.tagging,
            self.encoder,
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

    def _prepare(self, info: FileInfo, known_shas: set[str], hash_only: bool = False) -> _Prepared:
        try:
            data = Path(info.path).read_bytes()
        except OSError as exc:
            return _Prepared(info, error=f"cannot read file: {exc.strerror or exc}")
        sha = sha256_bytes(data)
        if sha in known_shas and not hash_only:
            return _Prepared(info, sha256=sha, reusable=True)
        try:
            decoded = decode_image(data, max_pixels=self.settings.max_image_pixels, draft_size=self.draft_size)
            hashes = asdict(ImageHashes.of(decoded.image))
            if hash_only:
                return _Prepared(
                    info, sha256=sha, width=decoded.width, height=decoded.height, format=decoded.format,
                    hash_only=True, hashes=hashes,
                )  # fmt: skip
            pixels = self.encoder.preprocess_image(decoded.image)
        except UnsupportedImage as exc:
            return _Prepared(info, sha256=sha, error=str(exc))
        except Exception as exc:  # a decoder bug on one file must not stop the catalog
            log.exception("unexpected error decoding %s", info.path)
            return _Prepared(info, sha256=sha, error=f"unexpected decode error: {exc.__class__.__name__}: {exc}")
        return _Prepared(
            info,
            sha256=sha,
            pixels=pixels,
            width=decoded.width,
            height=decoded.height,
            format=decoded.format,
            hashes=hashes,
        )

    def _prepared_stream(self, todo: list[FileInfo], known_shas: set[str], hash_only: set[str]) -> Iterator[_Prepared]:
        """Decode on a thread pool, in order, with a bounded number of files in flight."""
        window = max(2 * self.settings.batch_size, 4 * self.settings.decode_workers)
        with ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="decode") as pool:
            pending: deque[Future[_Prepared]] = deque()
            files = iter(todo)
            for info in files:
                pending.append(pool.submit(self._prepare, info, known_shas, info.path in hash_only))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _process(
        self,
        todo: list[FileInfo],
        states: dict[str, FileState],
        known_shas: set[str],
        hash_only: set[str],
        summary: IndexSummary,
        touched: set[int],
        on_batch_committed: BatchCallback | None,
    ) -> None:
        batch: list[_Prepared] = []
        others: list[_Prepared] = []
        batches_done = 0
        bar = tqdm(total=len(todo), unit="img", desc="indexing", disable=not self.progress, dynamic_ncols=True)

        def flush() -> None:
            nonlocal batches_done
            results = self._embed(batch) + self._finish(others)
            ids = self.store.save_results(results, self.model_key)
            touched.update(ids.values())
            for item in batch + others:
                self._count(item, states, summary)
            bar.update(len(batch) + len(others))
            batch.clear()
            others.clear()
            batches_done += 1
            if on_batch_committed is not None:
                on_batch_committed(batches_done)

        try:
            for item in self._prepared_stream(todo, known_shas, hash_only):
                (batch if item.pixels is not None else others).append(item)
                if len(batch) >= self.settings.batch_size or len(others) >= 4 * self.settings.batch_size:
                    flush()
            if batch or others:
                flush()
        finally:
            bar.close()

    def _embed(self, batch: list[_Prepared]) -> list[ImageResult]:
        if not batch:
            return []
        vectors = self.encoder.encode_pixels(torch.stack([item.pixels for item in batch]))  # type: ignore[misc]
        return [
            ImageResult(
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
            for item, vector in zip(batch, vectors, strict=True)
        ]

    def _finish(self, items: list[_Prepared]) -> list[ImageResult]:
        """Results for files that need no model call: reused contents and failures."""
        reusable = self.store.reusable_by_sha([i.sha256 for i in items if i.reusable and i.sha256], self.model_key)
        results = []
        for item in items:
            if item.hash_only:
                if item.hashes is not None:  # else leave the indexed row as it is (its decode failed now)
                    results.append(
                        ImageResult(
                            path=item.info.path,
                            size=item.info.size,
                            mtime=item.info.mtime,
                            sha256=item.sha256,
                            status=ImageStatus.INDEXED,
                            width=item.width,
                            height=item.height,
                            format=item.format,
                            hashes=item.hashes,
                        )  # fmt: skip
                    )
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
    def _count(item: _Prepared, states: dict[str, FileState], summary: IndexSummary) -> None:
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

    def _update_index(self, touched: set[int], rebuild: bool) -> tuple[int, bool]:
        """Apply this run's changes to the saved index; rebuild from the store when they disagree,
        or when the catalog has grown past the size where another index type is chosen."""
        spec = self.encoder.spec
        settings = self.settings
        index: VectorIndex | None = None
        if not rebuild:
            try:
                index, _ = VectorIndex.load(
                    settings.index_dir, model=spec.name, pretrained=spec.pretrained, nprobe=settings.nprobe
                )
            except (NotReady, IndexMismatch) as exc:
                log.info("building the index from the store: %s", exc)
        expected = self.store.count_indexed(self.model_key)
        wanted_kind = choose_kind(expected, settings.index_type, settings.ivf_min_vectors)
        if index is not None and (index.dim != self.encoder.dim or index.kind != wanted_kind):
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
        return index.ntotal, rebuilt

    def _build_from_store(self, kind: str, expected: int) -> VectorIndex:
        training = None
        if kind != FLAT:
            training = self._training_sample(expected, training_size_for(nlist_for(expected)))
        index = VectorIndex.create(self.encoder.dim, kind, training, nprobe=self.settings.nprobe, count=expected)
        for chunk_ids, vectors in self.store.iter_vectors(self.model_key):
            index.add(chunk_ids, vectors)
        return index

    def _training_sample(self, expected: int, size: int) -> np.ndarray:
        """A uniform random sample of the stored vectors (fixed seed) to train IVF centroids on."""
        rng = np.random.default_rng(0)
        keep = min(1.0, size / max(expected, 1))
        parts = [vectors[rng.random(len(vectors)) < keep] for _, vectors in self.store.iter_vectors(self.model_key)]
        return np.concatenate(parts) if parts else np.zeros((0, self.encoder.dim), dtype=np.float32)

    def _vectors_of(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        wanted = set(int(i) for i in ids)
        if not wanted:
            return
        # Touched rows are few next to the catalog; read them back by id from the store.
        yield from self.store.iter_vectors_for(sorted(wanted), self.model_key)

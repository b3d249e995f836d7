"""FAISS vector index keyed by store row id, saved atomically beside a manifest."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np

from app.errors import IndexMismatch, ModelMismatch, NotReady

MANIFEST_FILE = "manifest.json"
FLAT = "flat"
IVF_SQ8 = "ivf-sq8"
#: IVF-SQ8 whose inverted lists are memory-mapped shard files (app.index_ondisk)
ONDISK = "ivf-ondisk"
INDEX_KINDS = (FLAT, IVF_SQ8, ONDISK)


def choose_kind(
    count: int, requested: str = "auto", ivf_min_vectors: int = 200_000, ondisk_min_vectors: int | None = None
) -> str:
    """Exact search for small catalogs; IVF with 8-bit scalar quantisation beyond ``ivf_min_vectors``, its lists
    in memory-mapped files on disk beyond ``ondisk_min_vectors`` (None: never chosen by ``auto``)."""
    if requested != "auto":
        if requested not in INDEX_KINDS:
            raise ValueError(f"unknown index type {requested!r}: use auto, {', '.join(INDEX_KINDS)}")
        return requested
    if ondisk_min_vectors is not None and count >= ondisk_min_vectors:
        return ONDISK
    return IVF_SQ8 if count >= ivf_min_vectors else FLAT


MIN_POINTS_PER_LIST = 39  # FAISS k-means warns below this many training points per centroid


def nlist_for(count: int, training_size: int | None = None) -> int:
    """Inverted lists for an IVF index over ``count`` vectors (the whole catalog, not the training sample):
    the power of two nearest 4 * sqrt(n), at least 16 (1M vectors: 4,096 lists); halved while a training
    sample of ``training_size`` points would hold fewer than 39 per list."""
    target = 4 * np.sqrt(max(count, 1))
    nlist = 1 << max(4, int(round(np.log2(target))))
    while training_size is not None and nlist > 16 and training_size < MIN_POINTS_PER_LIST * nlist:
        nlist //= 2
    return nlist


TRAINING_POINTS_PER_LIST = 256
MAX_TRAINING_SAMPLE = 200_000


def training_size_for(nlist: int) -> int:
    """How many vectors to train ``nlist`` centroids on: 256 per list, capped at 200k (k-means time),
    but never below FAISS's 39 per list."""
    return max(MIN_POINTS_PER_LIST * nlist, min(TRAINING_POINTS_PER_LIST * nlist, MAX_TRAINING_SAMPLE))


@dataclass(frozen=True)
class Manifest:
    model: str
    pretrained: str
    dim: int
    count: int
    built_at: str
    index_type: str
    index_file: str
    description: str = ""
    format_version: int = 1
    #: the on-disk kind (app.index_ondisk): its shard files, searched by fan-out; index_file is then the
    #: generation's tombstone list (deleted ids), a new file at every commit
    shards: list[str] = field(default_factory=list)


class VectorIndex:
    """Inner-product search over unit vectors (so scores are cosine similarities), keyed by row id.

    Two kinds: ``flat`` (exact, ``IndexIDMap2(IndexFlatIP)``) and ``ivf-sq8`` (``IndexIVFScalarQuantizer``
    with 8-bit codes and a hash-table direct map, so ids can still be removed and reconstructed).
    """

    def __init__(self, dim: int, faiss_index: faiss.Index | None = None, *, nprobe: int = 32) -> None:
        self.dim = dim
        self._index = faiss_index if faiss_index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._ivf = _as_ivf(self._index)
        self._quantizer: faiss.Index | None = None  # owned by an IVF index built here
        if self._ivf is not None:
            self._ivf.nprobe = nprobe

    @classmethod
    def create(
        cls,
        dim: int,
        kind: str,
        training: np.ndarray | None = None,
        *,
        nprobe: int = 32,
        count: int | None = None,
    ) -> VectorIndex:
        """An empty index of ``kind``; IVF kinds are trained on ``training`` (a sample of the vectors).

        ``count`` is the catalog size the index is built for and sets the number of lists (default: the
        sample size); lists are halved while the sample holds fewer than 39 points per list."""
        if kind == FLAT:
            return cls(dim)
        if kind == ONDISK:
            raise ValueError(f"an {ONDISK} index is built from parts and merged (app.index_ondisk), not created empty")
        if kind != IVF_SQ8:
            raise ValueError(f"unknown index type {kind!r}")
        if training is None or len(training) == 0:
            raise ValueError("an IVF index needs training vectors")
        nlist = nlist_for(count if count is not None else len(training), len(training))
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        ivf.train(np.ascontiguousarray(training, dtype=np.float32))
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        index = cls(dim, ivf, nprobe=nprobe)
        index._quantizer = quantizer  # keep the Python object alive as long as the index
        return index

    @property
    def kind(self) -> str:
        return IVF_SQ8 if self._ivf is not None else FLAT

    @property
    def description(self) -> str:
        if self._ivf is not None:
            return f"IVF{self._ivf.nlist},SQ8,IP (nprobe {self._ivf.nprobe})"
        return "IDMap2,Flat,IP"

    @property
    def nprobe(self) -> int | None:
        return int(self._ivf.nprobe) if self._ivf is not None else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self._ivf is not None:
            self._ivf.nprobe = int(value)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        self._index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> int:
        if len(ids) == 0:
            return 0
        return int(self._index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))  # type: ignore[arg-type]

    def reconstruct(self, image_id: int) -> np.ndarray | None:
        try:
            return np.asarray(self._index.reconstruct(int(image_id)), dtype=np.float32)
        except RuntimeError:
            return None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row; missing slots are dropped by callers via id -1."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if self.ntotal == 0 or k <= 0:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        scores, ids = self._index.search(queries, min(k, self.ntotal))
        return scores, ids

    # --- persistence -----------------------------------------------------------------------------

    def save(self, directory: Path, *, model: str, pretrained: str) -> Manifest:
        """Write a new index file, then switch the manifest to it with one os.replace.

        The manifest is the single commit point: a reader sees either the old index or the new one,
        never a half-written file or a manifest that disagrees with its index.
        """
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.now(UTC)
        index_file = f"index-{now.strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}.faiss"
        tmp = directory / f".{index_file}.tmp"
        try:
            faiss.write_index(self._index, str(tmp))
            _fsync_file(tmp)
            os.replace(tmp, directory / index_file)
        finally:
            tmp.unlink(missing_ok=True)
        manifest = Manifest(
            model=model,
            pretrained=pretrained,
            dim=self.dim,
            count=self.ntotal,
            built_at=now.isoformat(timespec="milliseconds"),
            index_type=self.kind,
            index_file=index_file,
            description=self.description,
        )
        try:
            previous = read_manifest(directory)
        except Exception:  # noqa: BLE001 - no manifest, or an unreadable one: nothing to keep for readers
            previous = None
        _atomic_write(directory / MANIFEST_FILE, json.dumps(asdict(manifest), indent=2).encode())
        _prune_old_index_files(directory, keep={index_file})
        if any(directory.glob("deleted-*.npz")):  # files of the on-disk kind, which this index replaced
            from app.index_ondisk import prune_generations

            keep = {index_file} | ({previous.index_file, *previous.shards} if previous is not None else set())
            prune_generations(directory, keep)
        return manifest

    @classmethod
    def load(
        cls, directory: Path, *, model: str, pretrained: str, nprobe: int = 32, mmap: bool = False
    ) -> tuple[VectorIndex, Manifest]:
        """Load the index named by the manifest. ``mmap`` maps the file instead of reading it (large
        read-only indexes: pages are shared between processes and loaded on demand)."""
        manifest = read_manifest(directory)
        check_manifest(manifest, model=model, pretrained=pretrained)
        if manifest.shards:  # memory-mapped shards searched by fan-out
            from app.index_ondisk import OnDiskIndex

            return OnDiskIndex.from_manifest(directory, manifest, nprobe=nprobe), manifest
        path = str(directory / manifest.index_file)
        try:
            index = _read_index(path, mmap)
        except RuntimeError as exc:
            raise IndexMismatch(
                f"the index file in {directory} is unreadable ({exc}); rebuild it with 'clipsearch index --rebuild'"
            ) from exc
        if index.d != manifest.dim or index.ntotal != manifest.count:
            raise IndexMismatch(
                f"the index in {directory} does not match its manifest; rebuild it with 'clipsearch index --rebuild'"
            )
        return cls(manifest.dim, index, nprobe=nprobe), manifest


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_FILE
    if not path.exists():
        raise NotReady(f"no index in {directory} yet: run 'clipsearch index PATH' to build one")
    try:
        manifest = Manifest(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise IndexMismatch(
            f"the manifest {path} is unreadable ({exc}); rebuild it with 'clipsearch index --rebuild'"
        ) from exc
    if not (directory / manifest.index_file).exists():
        raise IndexMismatch(
            f"the index file {manifest.index_file} named by {path} is missing; "
            "rebuild it with 'clipsearch index --rebuild'"
        )
    return manifest


def check_manifest(manifest: Manifest, *, model: str, pretrained: str) -> None:
    if manifest.model != model or manifest.pretrained != pretrained:
        built = f"{manifest.model} ({manifest.pretrained or 'no pretrained tag'})"
        wanted = f"{model} ({pretrained or 'no pretrained tag'})"
        raise ModelMismatch(
            f"the index was built with model {built} but {wanted} is configured. Either set "
            f"CLIPSEARCH_MODEL={manifest.model} CLIPSEARCH_PRETRAINED={manifest.pretrained} to use it, or "
            "re-embed the catalog with the new model: 'clipsearch index PATH...' (changed models are "
            "detected and re-embedded).",
            built=built,
            wanted=wanted,
            count=manifest.count,
        )


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _prune_old_index_files(directory: Path, keep: set[str]) -> None:
    """Remove superseded index files, keeping the newest previous one for readers mid-switch."""
    old = sorted(p for p in directory.glob("index-*.faiss") if p.name not in keep)
    for stale in old[:-1]:
        stale.unlink(missing_ok=True)


def _as_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _read_index(path: str, mmap: bool) -> faiss.Index:
    if mmap:
        try:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            pass  # this index type cannot be mapped: read it into memory
    return faiss.read_index(path)

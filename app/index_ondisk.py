# FAISS's type stubs know Index but not the IVF attributes, InvertedLists methods or SWIG ownership used here:
# mypy: disable-error-code="attr-defined,union-attr,assignment,arg-type,list-item,return-value"
"""An IVF index larger than RAM: shards built apart, merged into memory-mapped inverted lists, searched by fan-out.

The life of a large index:

1. ``train_template`` trains an empty IVF index (``IVF{nlist},SQ8`` by default) on a sample of the vectors.
2. Workers each fill a *part*: ``PartBuilder`` clones the template, takes that worker's vectors in chunks and
   writes one ``.faiss`` file. Parts never need to be in one process's memory together.
3. ``merge_parts`` merges parts into one *shard*: FAISS ``OnDiskInvertedLists`` in a ``.ivfdata`` file that the
   service memory-maps (pages are read on demand and shared by processes), plus an id directory (``.ids.npy``,
   ``.lists.npy``: sorted ids and their inverted list) used to reconstruct vectors and to check deletions.
4. ``commit_shards`` records the shards in the index manifest with the same atomic, versioned commit as the
   in-memory index (``app.index``); ``OnDiskIndex`` loads them and merges the shards' top-k (fan-out), with the
   interface of ``VectorIndex`` so ``SearchService`` needs no change.

Deletions are tombstones: the removed ids are written in a versioned file named by the manifest and filtered
inside the IVF scan (a FAISS ID selector), so the k results returned are k live ones. The mapped shard files
are never rewritten under a reader; ``compact`` drops tombstoned vectors by writing new shards.
Additions (``OnDiskIndex.add``) go into a small in-memory delta that ``save`` writes out as one more shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np

from app.errors import IndexMismatch
from app.index import MANIFEST_FILE, ONDISK, Manifest, VectorIndex, _atomic_write, _fsync_file, read_manifest

READ_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY


# --- building ------------------------------------------------------------------------------------


def train_template(sample: np.ndarray, nlist: int, codec: str = "SQ8", *, niter: int = 25) -> faiss.IndexIVF:
    """An empty IVF index over inner product (cosine on unit vectors), trained on ``sample``.

    ``codec`` is the FAISS code after ``IVF{nlist},``: ``SQ8`` (8-bit scalar, d bytes per vector), ``SQfp16``,
    or ``PQ{m}`` (product quantisation, m bytes per vector). ``niter``: k-means iterations for the centroids."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if sample.ndim != 2 or len(sample) < nlist:
        raise ValueError(f"training needs at least nlist={nlist} sample vectors, got shape {sample.shape}")
    index = faiss.index_factory(sample.shape[1], f"IVF{nlist},{codec}", faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).cp.niter = niter
    index.train(sample)
    if not isinstance(index, faiss.IndexIVF):
        raise ValueError(f"IVF{nlist},{codec} is not a plain IVF index")
    return index


def write_template(template: faiss.IndexIVF, path: Path) -> None:
    """Save the trained, empty index that every worker clones."""
    if template.ntotal:
        raise ValueError("a template must be empty: save it before adding vectors")
    _write_index(template, path)


class PartBuilder:
    """One worker's share of the index: a clone of the trained template, filled chunk by chunk."""

    def __init__(self, template: faiss.IndexIVF) -> None:
        self.index = faiss.clone_index(template)
        if self.index.ntotal:
            raise ValueError("parts must start from an empty template")

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.index.d:
            raise ValueError(f"expected vectors of shape (n, {self.index.d}), got {vectors.shape}")
        self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def write(self, path: Path) -> Path:
        _write_index(self.index, path)
        return path


def build_part(template: faiss.IndexIVF, ids: np.ndarray, vectors: np.ndarray, path: Path) -> Path:
    """Clone ``template``, add one worker's vectors and write the part to ``path``."""
    part = PartBuilder(template)
    part.add(ids, vectors)
    return part.write(path)


def write_parts(
    template: faiss.IndexIVF,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    folder: Path,
    *,
    max_vectors: int,
    prefix: str = "part",
) -> list[Path]:
    """Stream (ids, vectors) chunks into parts of at most ``max_vectors`` each, written to ``folder`` as
    ``{prefix}-00000.faiss``, ``{prefix}-00001.faiss``, ...: one part and one chunk in memory at a time."""
    if max_vectors < 1:
        raise ValueError("a part holds at least one vector")
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    part: PartBuilder | None = None

    def flush() -> None:
        nonlocal part
        if part is not None and part.index.ntotal:
            written.append(part.write(folder / f"{prefix}-{len(written):05d}.faiss"))
        part = None

    for ids, vectors in chunks:
        start = 0
        while start < len(ids):
            if part is None:
                part = PartBuilder(template)
            take = min(len(ids) - start, max_vectors - int(part.index.ntotal))
            part.add(ids[start : start + take], vectors[start : start + take])
            start += take
            if part.index.ntotal >= max_vectors:
                flush()
    flush()
    return written


def merge_parts(
    template: faiss.IndexIVF,
    parts: Sequence[Path | faiss.IndexIVF],
    directory: Path,
    name: str,
    *,
    drop_ids: np.ndarray | None = None,
) -> str:
    """Merge part files (read memory-mapped, so they need not fit in RAM) into the on-disk shard ``name``.

    Writes ``name.ivfdata`` (the inverted lists), ``name.faiss`` (quantizer and codec, naming the lists by file
    name) and the id directory. ``drop_ids`` are left out (compaction). Returns the shard's index file name."""
    if not parts:
        raise ValueError(f"shard {name} needs at least one part to merge")
    directory.mkdir(parents=True, exist_ok=True)
    ivfs = []
    keep_alive = []
    for part in parts:
        index = part if isinstance(part, faiss.Index) else _read_part(Path(part))
        ivf = _ivf_of(index)
        if ivf.nlist != template.nlist or ivf.code_size != template.code_size or ivf.d != template.d:
            raise IndexMismatch(f"part {part} was not built from this template (nlist, code size or dimension differ)")
        keep_alive.append(index)
        ivfs.append(ivf.invlists)
    merged = faiss.clone_index(template)
    if merged.ntotal:
        raise ValueError("the template must be empty")
    ivfdata = directory / f"{name}.ivfdata"
    ivfdata.unlink(missing_ok=True)
    invlists = faiss.OnDiskInvertedLists(merged.nlist, merged.code_size, str(ivfdata))
    vector = faiss.InvertedListsPtrVector()
    for lists in ivfs:
        vector.push_back(lists)
    ntotal = invlists.merge_from_multiple(vector.data(), vector.size(), False)
    merged.replace_invlists(invlists, True)
    invlists.this.disown()  # owned by ``merged`` now
    merged.ntotal = ntotal
    del keep_alive, ivfs, vector
    if drop_ids is not None and len(drop_ids):
        merged.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(drop_ids, dtype=np.int64)))
    ids, lists = _id_directory(merged)
    if len(np.unique(ids)) != len(ids):
        raise IndexMismatch(f"shard {name} holds some ids twice: every id must be in exactly one part")
    np.save(directory / f"{name}.ids.npy", ids)
    np.save(directory / f"{name}.lists.npy", lists)
    _write_index(merged, directory / f"{name}.faiss")
    del merged  # syncs and unmaps the lists
    for suffix in (".ivfdata", ".ids.npy", ".lists.npy"):
        _fsync_file(directory / f"{name}{suffix}")
    return f"{name}.faiss"


def commit_shards(
    directory: Path,
    shards: Sequence[str],
    *,
    model: str,
    pretrained: str,
    deleted: np.ndarray | None = None,
) -> Manifest:
    """Switch the manifest to ``shards`` (files in ``directory``) and the tombstones ``deleted`` in one step."""
    loaded = [_open_shard(directory, name) for name in shards]
    if not loaded:
        raise ValueError("an on-disk index needs at least one shard")
    dims = {shard.ivf.d for shard in loaded}
    if len(dims) != 1:
        raise IndexMismatch(f"the shards have different dimensions {sorted(dims)}: build them from one template")
    dead = np.unique(np.asarray(deleted if deleted is not None else [], dtype=np.int64))
    tombstones = {shard.name: dead[shard.contains(dead)] for shard in loaded}
    count = sum(shard.ntotal - len(tombstones[shard.name]) for shard in loaded)
    first = loaded[0].ivf
    description = f"IVF{first.nlist},{_codec_name(first)},IP on disk, {len(loaded)} shard(s)"
    del loaded
    return _commit(
        directory,
        list(shards),
        tombstones,
        dim=dims.pop(),
        count=count,
        description=description,
        model=model,
        pretrained=pretrained,
    )


def _commit(
    directory: Path,
    shards: list[str],
    tombstones: dict[str, np.ndarray],
    *,
    dim: int,
    count: int,
    description: str,
    model: str,
    pretrained: str,
) -> Manifest:
    now = datetime.now(UTC)
    # The tombstone file is the generation's index_file: every commit names a new one, which is how a
    # running service (SearchService.refresh_if_changed) notices new shards or new deletions. Tombstones
    # are kept per shard: an id deleted from one shard may live again, re-added, in a newer one.
    deleted_file = f"deleted-{now.strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}.npz"
    tmp = directory / f".{deleted_file}.tmp"
    with open(tmp, "wb") as handle:
        np.savez(handle, **{name: np.asarray(tombstones.get(name, []), dtype=np.int64) for name in shards})
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / deleted_file)
    try:
        previous = read_manifest(directory)
    except Exception:  # noqa: BLE001 - no manifest, or an unreadable one: nothing to keep for readers
        previous = None
    manifest = Manifest(
        model=model,
        pretrained=pretrained,
        dim=dim,
        count=count,
        built_at=now.isoformat(timespec="milliseconds"),
        index_type=ONDISK,
        index_file=deleted_file,
        description=description,
        shards=shards,
    )
    _atomic_write(directory / MANIFEST_FILE, json.dumps(asdict(manifest), indent=2).encode())
    keep = set(shards) | {deleted_file}
    if previous is not None:  # a reader may still be switching from the previous generation
        keep |= set(previous.shards) | {previous.index_file}
    prune_generations(directory, keep)
    return manifest


def prune_generations(directory: Path, keep: set[str]) -> None:
    """Delete the index files of ``directory`` that ``keep`` does not name: shards, tombstone lists, and the
    single-file indexes of the in-memory kinds (left when the index switched kind)."""
    stems = {name.removesuffix(".faiss") for name in keep if name.endswith(".faiss")}
    for pattern in ("deleted-*.npz", "index-*.faiss"):
        for path in directory.glob(pattern):
            if path.name not in keep:
                path.unlink(missing_ok=True)
    for path in directory.glob("shard-*"):
        stem = path.name.split(".", 1)[0]
        if stem not in stems:
            path.unlink(missing_ok=True)


def shard_files(name: str) -> list[str]:
    """The files of the shard whose index file is ``name``."""
    stem = name.removesuffix(".faiss")
    return [name, f"{stem}.ivfdata", f"{stem}.ids.npy", f"{stem}.lists.npy"]


# --- compaction ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardState:
    """What the compaction policy looks at in a shard."""

    name: str
    ntotal: int
    deleted: int

    @property
    def live(self) -> int:
        return self.ntotal - self.deleted


@dataclass(frozen=True)
class Compaction:
    """Shards to rewrite without their tombstones (``purge``) and groups of shards to merge into one each."""

    purge: tuple[str, ...] = ()
    merge: tuple[tuple[str, ...], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.purge or self.merge)

    def describe(self) -> str:
        parts = [f"merging {len(group)} shards into one" for group in self.merge]
        if self.purge:
            parts.append(f"dropping the tombstoned vectors of {len(self.purge)} shard(s)")
        return "; ".join(parts) or "nothing to do"


def plan_compaction(
    shards: Sequence[ShardState],
    *,
    small_vectors: int,
    max_small_shards: int,
    max_deleted_fraction: float,
    shard_vectors: int,
    force: bool = False,
) -> Compaction:
    """Which shards to rewrite, so that shards do not pile up and tombstones stay few.

    Automatic (``force`` False): when more than ``max_small_shards`` shards hold fewer than ``small_vectors``
    live vectors (the delta shards of incremental runs, and the first shard of a small catalog), they are
    merged into one; a shard whose tombstoned share exceeds ``max_deleted_fraction`` is rewritten without them.
    ``force`` (a manual compaction): every tombstone goes, and every shard under ``shard_vectors`` live vectors
    is merged with the others, in groups of at most ``shard_vectors``. Merged shards lose their tombstones too."""
    merge: list[tuple[str, ...]] = []
    if force:
        group: list[str] = []
        size = 0
        for shard in shards:
            if shard.live >= shard_vectors:
                continue
            if group and size + shard.live > shard_vectors:
                merge.append(tuple(group))
                group, size = [], 0
            group.append(shard.name)
            size += shard.live
        merge.append(tuple(group))
    else:
        small = [shard.name for shard in shards if shard.live < small_vectors]
        if len(small) > max_small_shards:
            merge.append(tuple(small))
    merge = [group for group in merge if len(group) > 1]
    merged = {name for group in merge for name in group}
    purge = tuple(
        shard.name
        for shard in shards
        if shard.name not in merged
        and shard.deleted
        and (force or shard.deleted > max_deleted_fraction * max(shard.ntotal, 1))
    )
    return Compaction(purge, tuple(merge))


def compact(
    directory: Path, *, model: str, pretrained: str, nprobe: int = 32, plan: Compaction | None = None
) -> Manifest:
    """Carry out ``plan`` (default: rewrite every shard that holds tombstoned vectors without them) and commit."""
    index, _ = OnDiskIndex.load(directory, model=model, pretrained=pretrained, nprobe=nprobe)
    try:
        if plan is None:
            plan = Compaction(purge=tuple(shard.name for shard in index.shards if len(shard.deleted)))
        return index.compact(plan, model=model, pretrained=pretrained)
    finally:
        index.close()


# --- serving -------------------------------------------------------------------------------------


class _Shard:
    """One memory-mapped shard and its id directory."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        stem = directory / name.removesuffix(".faiss")
        missing = [p.name for p in (directory / name, stem.with_suffix(".ivfdata")) if not p.exists()]
        missing += [p for p in (f"{stem.name}.ids.npy", f"{stem.name}.lists.npy") if not (directory / p).exists()]
        if missing:
            raise IndexMismatch(
                f"shard {name} of the index in {directory} is incomplete: missing {', '.join(missing)}. "
                "Copy the shard files back or rebuild the index ('clipsearch index --rebuild')."
            )
        try:
            self.index = faiss.read_index(str(directory / name), READ_FLAGS)
        except RuntimeError as exc:
            raise IndexMismatch(f"shard {name} in {directory} is unreadable ({exc}); rebuild the index") from exc
        self.ivf = _ivf_of(self.index)
        self.ids = np.load(f"{stem}.ids.npy", mmap_mode="r")
        self.lists = np.load(f"{stem}.lists.npy", mmap_mode="r")
        if len(self.ids) != self.ivf.ntotal:
            raise IndexMismatch(f"shard {name} and its id directory disagree; rebuild the index")
        self.set_deleted(np.zeros(0, dtype=np.int64))

    def set_deleted(self, deleted: np.ndarray) -> None:
        """Tombstones (sorted ids of this shard), filtered inside the IVF scan so a query still gets k live hits."""
        self.deleted = deleted
        self._batch = faiss.IDSelectorBatch(deleted) if len(deleted) else None
        self._selector = faiss.IDSelectorNot(self._batch) if self._batch is not None else None

    @property
    def live(self) -> int:
        return self.ntotal - len(self.deleted)

    def search(self, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        if self._selector is not None:
            params.sel = self._selector
        return self.index.search(queries, k, params=params)

    @property
    def ntotal(self) -> int:
        return int(self.ivf.ntotal)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        if not len(self.ids):
            return np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return np.asarray(self.ids[pos] == ids)

    def reconstruct(self, image_id: int) -> np.ndarray | None:
        if len(self.deleted) and _sorted_contains(self.deleted, image_id):
            return None
        pos = int(np.searchsorted(self.ids, image_id))
        if pos >= len(self.ids) or int(self.ids[pos]) != image_id:
            return None
        list_no = int(self.lists[pos])
        lists = self.ivf.invlists
        size = lists.list_size(list_no)
        pointer = lists.get_ids(list_no)
        try:
            in_list = faiss.rev_swig_ptr(pointer, size)
            offset = int(np.flatnonzero(in_list == image_id)[0])
        finally:
            lists.release_ids(list_no, pointer)
        vector = np.empty(self.ivf.d, dtype=np.float32)
        self.ivf.reconstruct_from_offset(list_no, offset, faiss.swig_ptr(vector))
        return vector


class OnDiskIndex(VectorIndex):
    """Memory-mapped IVF shards searched in parallel, their top-k merged; tombstones for deletions.

    Has the interface of ``VectorIndex`` (search, reconstruct, remove, add, ntotal, save)."""

    def __init__(self, directory: Path, shards: list[_Shard], *, nprobe: int = 32, threads: int = 0) -> None:
        if not shards:
            raise ValueError("an on-disk index needs at least one shard")
        self.directory = directory
        self.dim = int(shards[0].ivf.d)
        self.shards = shards
        self._nprobe = int(nprobe)
        self._pool = ThreadPoolExecutor(threads or min(len(shards), os.cpu_count() or 1)) if len(shards) > 1 else None
        self._delta: PartBuilder | None = None

    @classmethod
    def load(  # type: ignore[override]
        cls, directory: Path, *, model: str, pretrained: str, nprobe: int = 32, mmap: bool = True
    ) -> tuple[OnDiskIndex, Manifest]:
        from app.index import check_manifest

        manifest = read_manifest(directory)
        check_manifest(manifest, model=model, pretrained=pretrained)
        return cls.from_manifest(directory, manifest, nprobe=nprobe), manifest

    @classmethod
    def from_shards(cls, directory: Path, names: Sequence[str], *, nprobe: int = 32) -> OnDiskIndex:
        """Open shard files in ``directory`` (built, not yet committed: ``save`` commits them)."""
        return cls(directory, [_Shard(directory, name) for name in names], nprobe=nprobe)

    @classmethod
    def from_manifest(cls, directory: Path, manifest: Manifest, *, nprobe: int = 32) -> OnDiskIndex:
        if manifest.index_type != ONDISK or not manifest.shards:
            raise IndexMismatch(f"the manifest in {directory} does not describe an on-disk sharded index")
        shards = [_Shard(directory, name) for name in manifest.shards]
        with np.load(directory / manifest.index_file) as tombstones:
            for shard in shards:
                if shard.name in tombstones.files:
                    shard.set_deleted(np.asarray(tombstones[shard.name], dtype=np.int64))
        index = cls(directory, shards, nprobe=nprobe)
        if index.dim != manifest.dim or index.ntotal != manifest.count:
            raise IndexMismatch(
                f"the on-disk index in {directory} does not match its manifest ({index.ntotal} vectors of "
                f"{index.dim}-d, manifest says {manifest.count} of {manifest.dim}-d); rebuild it"
            )
        return index

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # --- VectorIndex interface -------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return ONDISK

    @property
    def description(self) -> str:
        first = self.shards[0].ivf
        return f"IVF{first.nlist},{_codec_name(first)},IP on disk, {len(self.shards)} shard(s) (nprobe {self._nprobe})"

    @property
    def nprobe(self) -> int | None:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = int(value)

    @property
    def deleted(self) -> np.ndarray:
        """Every tombstoned id (sorted)."""
        return np.unique(np.concatenate([np.zeros(0, dtype=np.int64)] + [shard.deleted for shard in self.shards]))

    @property
    def ntotal(self) -> int:
        live = sum(shard.live for shard in self.shards)
        return live + (self._delta.index.ntotal if self._delta is not None else 0)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        total = self.ntotal
        if total == 0 or k <= 0:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        k = min(k, total)
        nprobe = self._nprobe
        delta = self._delta.index if self._delta is not None and self._delta.index.ntotal else None

        def one(shard: _Shard | None) -> tuple[np.ndarray, np.ndarray]:
            if shard is None:
                assert delta is not None
                delta.nprobe = nprobe
                return delta.search(queries, k)
            return shard.search(queries, k, nprobe)

        targets: list[_Shard | None] = [*self.shards, *([None] if delta is not None else [])]
        pool = self._pool
        results = list(pool.map(one, targets) if pool is not None else map(one, targets))
        if len(results) == 1:
            return results[0]
        return merge_topk(results, k)

    def reconstruct(self, image_id: int) -> np.ndarray | None:
        image_id = int(image_id)
        for shard in self.shards:
            vector = shard.reconstruct(image_id)
            if vector is not None:
                return vector
        if self._delta is not None:
            try:
                return np.asarray(self._delta.index.reconstruct(image_id), dtype=np.float32)
            except RuntimeError:
                return None
        return None

    def remove(self, ids: np.ndarray) -> int:
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if not len(ids):
            return 0
        removed = 0
        if self._delta is not None and self._delta.index.ntotal:
            removed += int(self._delta.index.remove_ids(faiss.IDSelectorBatch(ids)))
        for shard in self.shards:
            fresh = ids[shard.contains(ids) & ~np.isin(ids, shard.deleted)]
            if len(fresh):
                shard.set_deleted(np.union1d(shard.deleted, fresh))
                removed += len(fresh)
        return removed

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """New vectors go to an in-memory delta shard; ``save`` writes it out as one more on-disk shard."""
        if len(ids) == 0:
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self._delta is None:
            self._delta = PartBuilder(_empty_like(self.shards[0].ivf))
        # An id added again replaces its old vector, as in VectorIndex (where callers remove first).
        self.remove(ids)
        self._delta.add(ids, vectors)

    def save(self, directory: Path, *, model: str, pretrained: str) -> Manifest:
        if Path(directory).resolve() != self.directory.resolve():
            raise ValueError(f"an on-disk index is saved where its shards are ({self.directory}), not in {directory}")
        names = [shard.name for shard in self.shards]
        if self._delta is not None and self._delta.index.ntotal:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
            names.append(
                merge_parts(
                    _empty_like(self.shards[0].ivf), [self._delta.index], self.directory, f"shard-{stamp}-delta"
                )
            )
            self.shards.append(_Shard(self.directory, names[-1]))
            self._delta = None
            if self._pool is None:
                self._pool = ThreadPoolExecutor(min(len(self.shards), os.cpu_count() or 1))
        return _commit(
            self.directory,
            names,
            {shard.name: shard.deleted for shard in self.shards},
            dim=self.dim,
            count=self.ntotal,
            description=self.description,
            model=model,
            pretrained=pretrained,
        )

    def shard_states(self) -> list[ShardState]:
        return [ShardState(shard.name, shard.ntotal, len(shard.deleted)) for shard in self.shards]

    def compact(self, plan: Compaction, *, model: str, pretrained: str) -> Manifest:
        """Rewrite the shards ``plan`` names and commit; the other shards keep their tombstones.

        Commit any delta (``save``) first. The rewritten shards are new files: readers of the previous
        generation keep theirs, and a crash before the commit leaves that generation in force."""
        if self._delta is not None and self._delta.index.ntotal:
            raise ValueError("save the index before compacting it: its added vectors are not in a shard yet")
        by_name = {shard.name: shard for shard in self.shards}
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        template = _empty_like(self.shards[0].ivf)
        replaced: dict[str, str | None] = {}  # old shard -> its new one (None: merged into another group's)

        emptied = {name for name in plan.purge if by_name[name].live == 0}
        if len(emptied) == len(self.shards):  # an index keeps one shard, even an empty one
            emptied.discard(plan.purge[0])
        for number, name in enumerate(plan.purge):
            shard = by_name[name]
            if name in emptied:  # every vector deleted: the shard goes
                replaced[name] = None
                continue
            replaced[name] = merge_parts(
                template, [shard.index], self.directory, f"shard-{stamp}-p{number:03d}", drop_ids=shard.deleted
            )
        for number, group in enumerate(plan.merge):
            # An id tombstoned in one shard may be live in a newer one: drop each shard's tombstones on its own
            # first, so the merge never sees an id twice.
            clean = []
            for member, name in enumerate(group):
                shard = by_name[name]
                if len(shard.deleted):
                    label = f"shard-{stamp}-m{number:03d}-{member:03d}"  # pruned once the commit names the merge
                    shard = _Shard(
                        self.directory,
                        merge_parts(template, [shard.index], self.directory, label, drop_ids=shard.deleted),
                    )
                clean.append(shard)
            merged = merge_parts(
                template, [shard.ivf for shard in clean], self.directory, f"shard-{stamp}-g{number:03d}"
            )
            for member, name in enumerate(group):
                replaced[name] = merged if member == 0 else None
            del clean
        names: list[str] = []
        tombstones: dict[str, np.ndarray] = {}
        for shard in self.shards:
            if shard.name not in replaced:
                names.append(shard.name)
                tombstones[shard.name] = shard.deleted
            elif replaced[shard.name] is not None:
                names.append(replaced[shard.name])  # type: ignore[arg-type]
        self.close()
        self.shards = [_Shard(self.directory, name) for name in names]
        for shard in self.shards:
            if shard.name in tombstones:
                shard.set_deleted(tombstones[shard.name])
        if len(self.shards) > 1:
            self._pool = ThreadPoolExecutor(min(len(self.shards), os.cpu_count() or 1))
        return _commit(
            self.directory,
            names,
            tombstones,
            dim=self.dim,
            count=self.ntotal,
            description=self.description,
            model=model,
            pretrained=pretrained,
        )


def merge_topk(results: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, ids) into the overall top-k by descending score; empty slots keep id -1."""
    pairs = list(results)
    scores = np.concatenate([s for s, _ in pairs], axis=1)
    ids = np.concatenate([i for _, i in pairs], axis=1)
    scores = np.where(ids < 0, -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_scores = np.where(top_ids < 0, np.float32(-1e30), top_scores).astype(np.float32)
    return top_scores, top_ids


# --- helpers -------------------------------------------------------------------------------------


def _write_index(index: faiss.Index, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        faiss.write_index(index, str(tmp))
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF:
    if isinstance(index, faiss.IndexIVF):
        return index
    return faiss.downcast_index(faiss.extract_index_ivf(index))


def _read_part(path: Path) -> faiss.Index:
    if not path.exists():
        raise IndexMismatch(f"index part {path} is missing: rebuild it from its worker's vectors")
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)


def _open_shard(directory: Path, name: str) -> _Shard:
    return _Shard(directory, name)


def _empty_like(ivf: faiss.IndexIVF) -> faiss.IndexIVF:
    """A trained, empty copy of ``ivf`` (same centroids and codec), with in-memory lists."""
    quantizer = faiss.clone_index(ivf.quantizer)
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        empty = faiss.IndexIVFScalarQuantizer(quantizer, ivf.d, ivf.nlist, ivf.sq.qtype, ivf.metric_type)
        empty.sq = ivf.sq
    elif isinstance(ivf, faiss.IndexIVFPQ):
        empty = faiss.IndexIVFPQ(quantizer, ivf.d, ivf.nlist, ivf.pq.M, ivf.pq.nbits, ivf.metric_type)
        empty.pq = ivf.pq
        empty.by_residual = ivf.by_residual
        empty.use_precomputed_table = ivf.use_precomputed_table
        empty.precompute_table()
    else:
        raise IndexMismatch(f"cannot add to an on-disk index of type {type(ivf).__name__}; rebuild it")
    empty.is_trained = True
    empty.own_fields = True
    quantizer.this.disown()
    return empty


def _codec_name(ivf: faiss.IndexIVF) -> str:
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        return {faiss.ScalarQuantizer.QT_8bit: "SQ8", faiss.ScalarQuantizer.QT_fp16: "SQfp16"}.get(ivf.sq.qtype, "SQ")
    if isinstance(ivf, faiss.IndexIVFPQ):
        return f"PQ{ivf.pq.M}x{ivf.pq.nbits}"
    return type(ivf).__name__


def _id_directory(ivf: faiss.IndexIVF) -> tuple[np.ndarray, np.ndarray]:
    """Every id in ``ivf`` (sorted) with the inverted list that holds it."""
    lists = ivf.invlists
    all_ids, all_lists = [], []
    for list_no in range(ivf.nlist):
        size = lists.list_size(list_no)
        if not size:
            continue
        pointer = lists.get_ids(list_no)
        try:
            all_ids.append(faiss.rev_swig_ptr(pointer, size).copy())
        finally:
            lists.release_ids(list_no, pointer)
        all_lists.append(np.full(size, list_no, dtype=np.int32))
    if not all_ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    ids = np.concatenate(all_ids).astype(np.int64)
    owner = np.concatenate(all_lists)
    order = np.argsort(ids, kind="stable")
    return ids[order], owner[order]


def _sorted_contains(sorted_ids: np.ndarray, value: int) -> bool:
    pos = int(np.searchsorted(sorted_ids, value))
    return pos < len(sorted_ids) and int(sorted_ids[pos]) == value

"""The indexer as a Ray Data job: the same plan, prepare, embed and commit as ``indexer.pipeline``, spread
over a Ray cluster (a local one started with ``ray.init()``, or an existing one by address).

    list (local folders, fsspec URLs) -> diff against the store (nothing read yet)
    -> partitions of the files to do, each keyed by a hash of its files (path, size, mtime) and the model
    -> CPU tasks: read, content hash, decode, perceptual hashes, preprocess (pipeline.prepare_file)
    -> an actor pool: the model, loaded once per actor, embeds each partition (pipeline.embed_batch); on a
       CPU-only cluster, when the driver's encoder runs its image tower in ONNX Runtime (the default 'auto' on a
       CPU), the actors run that very file, shipped through the object store, and never build the model
    -> the driver writes one shard per partition (tmp + rename), then commits it to the store
       (Indexer.commit) and deletes it -> Indexer.finish (removed files, tags, the vector index).

When the vector index is the on-disk kind (``ivf-ondisk``) and has to be built from the store, the driver trains
the template on a sample and Ray tasks fill the parts, each reading one id range of the stored vectors from the
store (``indexer.ondisk.write_store_parts``, as the local build) and writing its part file into the index dir;
the driver merges the parts into shards and commits them. The workers need the store's URL to reach the database
(SQLite only for a local Ray) and the index dir on a filesystem they share with the driver.

A killed job leaves committed partitions in the store and written shards on disk: the next run skips the
former (unchanged files) and loads the latter without computing them; only the rest is processed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from tqdm import tqdm

from app.config import Settings
from app.encoder import Encoder, resolve_device
from app.errors import ClipSearchError
from app.quantize import bf16_pays
from app.store import HASH_FIELDS, Store
from indexer.ondisk import write_store_parts
from indexer.pipeline import Indexer, IndexSummary, Plan, Prepared, PrepareOptions, embed_batch, prepare_file
from indexer.sources import is_process_local, list_sources, read_bytes
from indexer.walk import FileInfo

log = logging.getLogger(__name__)

SHARD_FOLDER = "ray-shards"
SHARD_VERSION = 1
#: Files per partition: the unit of work, of resumption and of one store transaction. 128 preprocessed
#: images of a 224 px model are ~77 MB in the object store.
DEFAULT_PARTITION_SIZE = 128

PartitionCallback = Callable[[int], None]


@dataclass
class RayIndexSummary(IndexSummary):
    partitions: int = 0
    #: partitions loaded from shards an earlier, interrupted run had written
    partitions_from_shards: int = 0
    partitions_computed: int = 0
    embed_workers: int = 0
    #: what the embedding actors ran, as they reported it: 'onnx'/'onnx-int8' (the driver's export), or the image
    #: backend of the model they loaded (Encoder.image_backend: 'torch fp32', 'torch bf16 products', ...)
    embed_backend: str = ""

    def lines(self, max_failures: int = 5) -> list[str]:
        lines = super().lines(max_failures)
        lines.insert(
            2,
            f"ray: {self.partitions} partitions ({self.partitions_computed} computed, "
            f"{self.partitions_from_shards} from saved shards) on {self.embed_workers} embedding worker(s)"
            + (f" ({self.embed_backend})" if self.embed_backend else ""),
        )
        return lines


@dataclass(frozen=True)
class Partition:
    id: str
    files: tuple[FileInfo, ...]
    hash_only: frozenset[str] = field(default_factory=frozenset)


def make_partitions(plan: Plan, model_key: str, size: int) -> list[Partition]:
    """Cut the sorted files to do into partitions of ``size``. A partition's id hashes its files and the model,
    so a shard is only ever reused for exactly the files (and versions of them) it was computed from. Whole
    partitions leave the to-do list when committed, so a re-run cuts what is left at the same places."""
    todo = sorted(plan.todo, key=lambda f: f.path)
    partitions = []
    for start in range(0, len(todo), size):
        files = tuple(todo[start : start + size])
        digest = hashlib.sha256(f"{SHARD_VERSION}\n{model_key}\n".encode())
        for info in files:
            digest.update(f"{info.path}\0{info.size}\0{info.mtime!r}\0{info.path in plan.hash_only}\n".encode())
        hash_only = frozenset(f.path for f in files if f.path in plan.hash_only)
        partitions.append(Partition(digest.hexdigest()[:32], files, hash_only))
    return partitions


# --- the two Ray stages (module level: workers import them by name) ----------------------------------------


def prepare_partitions(
    batch: dict[str, np.ndarray], options: PrepareOptions, known_shas: set[str]
) -> dict[str, np.ndarray]:
    """CPU task: read and prepare every file of each partition (the local indexer's prepare_file)."""
    out_ids, out_payloads = [], []
    for partition_id, payload in zip(batch["partition"], batch["payload"], strict=True):
        files, hash_only, inline = pickle.loads(payload)
        items = []
        for info in files:
            data = inline.get(info.path)
            read = read_bytes if data is None else (lambda _path, data=data: data)
            items.append(prepare_file(info, read, options, known_shas, info.path in hash_only))
        out_ids.append(partition_id)
        out_payloads.append(_pack_prepared(items))
    return {"partition": np.array(out_ids), "payload": np.array(out_payloads, dtype=object)}


@dataclass(frozen=True)
class ShippedImageTower:
    """The driver's ONNX export of the image tower, for CPU actors: ``model`` is a Ray object ref to the file's
    bytes (or the bytes themselves)."""

    model: Any
    mode: str
    dim: int
    store_key: str


class TowerEncoder:
    """An actor's encoder on a shipped ONNX image tower: ``encode_pixels`` is all that embedding needs."""

    device = None

    def __init__(self, tower: ShippedImageTower, threads: int = 0) -> None:
        import ray

        from app.onnx_encoder import OnnxTowers, new_session

        data = ray.get(tower.model) if isinstance(tower.model, ray.ObjectRef) else tower.model
        self.towers = OnnxTowers(mode=tower.mode, folder=Path(), text=None, image=new_session(bytes(data), threads))
        self.dim = tower.dim

    def encode_pixels(self, batch: torch.Tensor) -> np.ndarray:
        from app.onnx_encoder import normalise

        return normalise(self.towers.encode_image(batch.numpy()))


class EmbedPartitions:
    """Actor: loads the model once, then embeds the prepared files of each partition it is given and returns
    the partition's shard (as bytes: the driver writes it, so workers need no shared filesystem).

    With ``image_tower`` (the driver's ONNX export) the actor runs that file in ONNX Runtime and builds no model:
    the same vectors as the driver's encoder, and seconds less to start. Without it, the actor loads the model
    through torch; 'auto' then means torch fp32 (bf16 on a CPU that multiplies it natively and fast, as an indexing
    encoder under 'auto' runs its image tower there), as each actor would otherwise export the towers itself."""

    def __init__(self, settings: Settings, image_tower: ShippedImageTower | None = None) -> None:
        self.settings = settings
        self.encoder: Encoder | TowerEncoder
        if image_tower is not None:
            self.encoder = TowerEncoder(image_tower, settings.torch_threads)
            self.model_key, self.backend = image_tower.store_key, f"{image_tower.mode}, the driver's export"
        else:
            auto = settings.inference == "auto"
            self.encoder = Encoder.from_settings(
                settings.with_overrides(inference=_actor_auto_mode(settings)) if auto else settings
            )
            self.model_key, self.backend = self.encoder.spec.store_key, self.encoder.image_backend

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out_ids, out_shards = [], []
        for partition_id, payload in zip(batch["partition"], batch["payload"], strict=True):
            items = _unpack_prepared(payload)
            with_pixels = [item for item in items if item.pixels is not None]
            vectors = np.zeros((len(with_pixels), self.encoder.dim), dtype=np.float32)
            size = self.settings.batch_size
            for start in range(0, len(with_pixels), size):
                vectors[start : start + size] = embed_batch(self.encoder, with_pixels[start : start + size])
            out_ids.append(partition_id)
            out_shards.append(shard_bytes(str(partition_id), self.model_key, items, vectors))
        backends = np.array([self.backend] * len(out_ids))
        return {"partition": np.array(out_ids), "shard": np.array(out_shards, dtype=object), "backend": backends}


def _actor_auto_mode(settings: Settings) -> str:
    """What 'auto' means for an actor that loads the model itself: bf16 on a CPU that multiplies it natively and
    faster than fp32 (app.quantize.bf16_pays), else fp32 (no ONNX export per actor)."""
    return "bf16" if resolve_device(settings.device).type == "cpu" and bf16_pays() else "fp32"


def _pack_prepared(items: list[Prepared]) -> bytes:
    """Prepared files with their pixels as one float32 array, for the object store."""
    pixels = [item.pixels.numpy() for item in items if item.pixels is not None]
    bare = [Prepared(**{**item.__dict__, "pixels": None}) for item in items]
    flags = [item.pixels is not None for item in items]
    stacked = np.stack(pixels) if pixels else np.zeros((0,), dtype=np.float32)
    return pickle.dumps((bare, flags, stacked), protocol=pickle.HIGHEST_PROTOCOL)


def _unpack_prepared(payload: bytes) -> list[Prepared]:
    bare, flags, stacked = pickle.loads(payload)
    rows = iter(stacked)
    for item, has_pixels in zip(bare, flags, strict=True):
        if has_pixels:
            item.pixels = torch.from_numpy(np.array(next(rows)))
    return list(bare)


def write_part_range(
    database_url: str,
    model_key: str,
    template: np.ndarray,
    folder: str,
    after: int,
    upto: int,
    max_vectors: int,
    prefix: str,
) -> list[str]:
    """Ray task of an on-disk index build: the stored vectors with ids in (after, upto] as part file(s) in
    ``folder``, filled from the serialised ``template`` (the local build's write_store_parts)."""
    ivf = faiss.deserialize_index(template)
    if not isinstance(ivf, faiss.IndexIVF):
        raise ClipSearchError(f"the shipped index template is a {type(ivf).__name__}, not an IVF index")
    store = Store(database_url)
    try:
        parts = write_store_parts(
            store,
            model_key,
            ivf,
            Path(folder),
            max_vectors=max_vectors,
            after=after,
            upto=upto,
            prefix=prefix,
        )
    finally:
        store.close()
    return [str(part) for part in parts]


# --- shards -----------------------------------------------------------------------------------------------


def shard_bytes(partition_id: str, model_key: str, items: list[Prepared], vectors: np.ndarray) -> bytes:
    """One partition's outcome as an .npz: per file its path, size, mtime, content and perceptual hashes,
    image facts, what happened (embedded, reused, hash back-fill, failed with a reason) and its vector."""
    count = len(items)
    has_vector = np.array([item.pixels is not None for item in items], dtype=bool)
    all_vectors = np.full((count, vectors.shape[1] if vectors.ndim == 2 else 0), np.nan, dtype=np.float32)
    all_vectors[has_vector] = vectors
    hashes = np.zeros((count, len(HASH_FIELDS)), dtype=np.uint64)
    has_hashes = np.zeros(count, dtype=bool)
    for row, item in enumerate(items):
        if item.hashes is not None:
            hashes[row] = [item.hashes[key] for key in HASH_FIELDS]
            has_hashes[row] = True
    meta = {"version": SHARD_VERSION, "partition": partition_id, "model": model_key}
    buffer = io.BytesIO()
    np.savez(
        buffer,
        meta=np.array(json.dumps(meta)),
        path=np.array([item.info.path for item in items], dtype=str),
        size=np.array([item.info.size for item in items], dtype=np.int64),
        mtime=np.array([item.info.mtime for item in items], dtype=np.float64),
        sha256=np.array([item.sha256 or "" for item in items], dtype=str),
        width=np.array([-1 if item.width is None else item.width for item in items], dtype=np.int64),
        height=np.array([-1 if item.height is None else item.height for item in items], dtype=np.int64),
        format=np.array([item.format or "" for item in items], dtype=str),
        error=np.array([item.error or "" for item in items], dtype=str),
        has_error=np.array([item.error is not None for item in items], dtype=bool),
        reusable=np.array([item.reusable for item in items], dtype=bool),
        hash_only=np.array([item.hash_only for item in items], dtype=bool),
        hashes=hashes,
        has_hashes=has_hashes,
        has_vector=has_vector,
        vectors=all_vectors,
    )
    return buffer.getvalue()


@dataclass
class Shard:
    partition: str
    model: str
    embedded: list[Prepared]
    vectors: np.ndarray
    others: list[Prepared]


def read_shard(path: Path) -> Shard:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        embedded: list[Prepared] = []
        others: list[Prepared] = []
        for row in range(len(data["path"])):
            item = Prepared(
                FileInfo(str(data["path"][row]), int(data["size"][row]), float(data["mtime"][row])),
                sha256=str(data["sha256"][row]) or None,
                width=None if data["width"][row] < 0 else int(data["width"][row]),
                height=None if data["height"][row] < 0 else int(data["height"][row]),
                format=str(data["format"][row]) or None,
                error=str(data["error"][row]) if data["has_error"][row] else None,
                reusable=bool(data["reusable"][row]),
                hash_only=bool(data["hash_only"][row]),
                hashes=(
                    {key: int(value) for key, value in zip(HASH_FIELDS, data["hashes"][row], strict=True)}
                    if data["has_hashes"][row]
                    else None
                ),
            )
            (embedded if data["has_vector"][row] else others).append(item)
        vectors = np.ascontiguousarray(data["vectors"][data["has_vector"]], dtype=np.float32)
    return Shard(meta["partition"], meta["model"], embedded, vectors, others)


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# --- the driver -------------------------------------------------------------------------------------------


def local_ray_options(num_cpus: int | None = None, object_store_mb: int | None = None) -> dict[str, Any]:
    """ray.init arguments for a single-machine Ray: no dashboard, quiet logs."""
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if num_cpus is not None:
        options["num_cpus"] = num_cpus
    if object_store_mb is not None:
        options["object_store_memory"] = object_store_mb * 1024 * 1024
    return options


class RayIndexer:
    """Brings the store and the index in line with the files under some folders or URLs, as a Ray Data job.

    ``address``: a running cluster (``ray://host:10001``, ``host:6379`` or ``auto``); None starts a local Ray
    unless one is already initialised in this process. ``workers``: embedding actors (default: one per GPU
    of the cluster, else 1)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        encoder: Encoder,
        *,
        address: str | None = None,
        workers: int | None = None,
        partition_size: int = DEFAULT_PARTITION_SIZE,
        progress: bool = True,
        embedder: type[EmbedPartitions] = EmbedPartitions,
        ray_options: dict[str, Any] | None = None,
    ) -> None:
        if partition_size < 1:
            raise ClipSearchError("the partition size must be at least 1 file")
        self.settings = settings
        self.indexer = Indexer(settings, store, encoder, progress=progress, part_writer=self._write_index_parts)
        self.address = address
        self.workers = workers
        self.partition_size = partition_size
        self.progress = progress
        self.embedder = embedder
        self.ray_options = ray_options or {}
        self.shard_dir = settings.data_dir / SHARD_FOLDER
        self._owns_ray = False

    def run(
        self,
        roots: Iterable[str | Path],
        *,
        rebuild: bool = False,
        retry_failed: bool = False,
        compact: bool = False,
        on_partition_committed: PartitionCallback | None = None,
    ) -> RayIndexSummary:
        try:
            return self._run(roots, rebuild, retry_failed, compact, on_partition_committed)
        finally:
            self._release_ray()

    def _run(
        self,
        roots: Iterable[str | Path],
        rebuild: bool,
        retry_failed: bool,
        compact: bool,
        on_partition_committed: PartitionCallback | None,
    ) -> RayIndexSummary:
        started = time.perf_counter()
        summary = RayIndexSummary()
        found = list_sources(list(roots), exclude=[self.settings.data_dir])
        plan = self.indexer.plan(found, summary, retry_failed=retry_failed)
        partitions = make_partitions(plan, self.indexer.model_key, self.partition_size)
        summary.partitions = len(partitions)
        saved = [p for p in partitions if self._shard_path(p.id).exists()]
        missing = [p for p in partitions if not self._shard_path(p.id).exists()]
        touched: set[int] = set()
        committed = 0
        bar = tqdm(total=len(plan.todo), unit="img", desc="indexing (ray)", disable=not self.progress)
        try:
            for partition in saved:
                self._commit_shard(partition, plan, summary, touched)
                summary.partitions_from_shards += 1
                bar.update(len(partition.files))
                committed += 1
                if on_partition_committed is not None:
                    on_partition_committed(committed)
            if missing:
                by_id = {p.id: p for p in missing}
                for partition_id, data, backend in self._computed_shards(missing, plan, summary):
                    summary.embed_backend = backend
                    partition = by_id[partition_id]
                    write_atomically(self._shard_path(partition_id), data)
                    self._commit_shard(partition, plan, summary, touched)
                    summary.partitions_computed += 1
                    bar.update(len(partition.files))
                    committed += 1
                    if on_partition_committed is not None:
                        on_partition_committed(committed)
        finally:
            bar.close()
        self._remove_stale_shards()
        self.indexer.finish(found, plan, summary, touched, rebuild=rebuild, compact=compact)
        summary.seconds = time.perf_counter() - started
        return summary

    def _shard_path(self, partition_id: str) -> Path:
        return self.shard_dir / f"{partition_id}.npz"

    def _commit_shard(self, partition: Partition, plan: Plan, summary: IndexSummary, touched: set[int]) -> None:
        """Load a partition's shard into the store in one transaction, then delete it."""
        path = self._shard_path(partition.id)
        shard = read_shard(path)
        if shard.model != self.indexer.model_key or shard.partition != partition.id:
            raise ClipSearchError(f"shard {path} is not of this partition and model: delete it and run again")
        self.indexer.commit(shard.embedded, shard.vectors, shard.others, plan, summary, touched)
        path.unlink(missing_ok=True)

    def _remove_stale_shards(self) -> None:
        """Shards left from files that changed since they were computed: their partitions no longer exist."""
        if self.shard_dir.is_dir():
            for leftover in self.shard_dir.glob("*.npz"):
                leftover.unlink(missing_ok=True)

    def _computed_shards(
        self, partitions: list[Partition], plan: Plan, summary: RayIndexSummary
    ) -> Iterator[tuple[str, bytes, str]]:
        """Run the Ray Data job over ``partitions``; yield (partition id, shard bytes, what embedded it) as each
        finishes."""
        ray = self._ray()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = self.progress
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        workers = self.workers or max(1, gpus)
        # Without GPUs the actors share the CPUs with the decode tasks: leave those at least one CPU.
        embed_cpus = 0.0 if gpus else min(1.0, max(resources.get("CPU", 1.0) - 1.0, 1.0) / workers)
        summary.embed_workers = workers
        rows = [{"partition": p.id, "payload": self._partition_payload(p)} for p in partitions]
        dataset: Any = ray.data.from_items(rows, override_num_blocks=len(rows))
        dataset = dataset.map_batches(
            prepare_partitions,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"options": self.indexer.prepare_options, "known_shas": plan.known_shas},
            num_cpus=1,
            # A task holds one partition's preprocessed pixels (float32) and its source bytes. The request
            # also keeps Ray Data from fusing these tasks into the actors (their resources differ): decoding
            # then runs in parallel with the model instead of before it in the same process.
            memory=self._partition_memory(),
        )
        dataset = dataset.map_batches(
            self.embedder,
            batch_size=1,
            batch_format="numpy",
            fn_constructor_kwargs={"settings": self.settings, "image_tower": self._shipped_image_tower(ray, gpus)},
            # Ray Data restarts a dead actor and retries its partition (max_restarts=-1 by default).
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=1 if gpus else 0,
            num_cpus=embed_cpus,
        )
        log.info("ray: %d partitions, %d embedding worker(s), %d GPU(s)", len(partitions), workers, gpus)
        try:
            for row in dataset.iter_rows():
                yield str(row["partition"]), bytes(row["shard"]), str(row["backend"])
        except ray.exceptions.RayError as exc:
            raise ClipSearchError(
                f"the Ray job failed: {exc}\nFinished partitions are saved: fix the cause and run the same "
                "command again to finish."
            ) from exc

    def _shipped_image_tower(self, ray: Any, gpus: int) -> ShippedImageTower | None:
        """The driver's ONNX image tower in the object store, for CPU actors (None: GPUs, or a torch encoder)."""
        encoder = self.indexer.encoder
        found = encoder.image_tower_file()
        if gpus or found is None:
            return None
        path, mode = found
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("cannot read %s to ship it to the Ray workers (%s): they load the model instead", path, exc)
            return None
        return ShippedImageTower(ray.put(data), mode, encoder.dim, encoder.spec.store_key)

    def _ray(self) -> Any:
        """The ray module, connected: to the cluster at ``address``, to a Ray this process already runs, or to
        a local Ray started now (and shut down at the end of the run)."""
        import ray

        if not ray.is_initialized():
            options = {} if self.address else local_ray_options()
            try:
                ray.init(address=self.address, **{**options, **self.ray_options})
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
                raise ClipSearchError(
                    f"cannot start or reach {where}: {exc} (check --ray-address, or start a cluster with "
                    "'ray start --head')"
                ) from exc
            self._owns_ray = True
        return ray

    def _release_ray(self) -> None:
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False

    def _write_index_parts(self, template: faiss.IndexIVF, folder: Path) -> list[Path]:
        """The parts of an on-disk index build, one Ray task per id range of ondisk_part_vectors stored vectors."""
        size = self.settings.ondisk_part_vectors
        ranges = self.indexer.store.vector_id_ranges(self.indexer.model_key, size)
        if not ranges:
            return []
        ray = self._ray()
        shipped = ray.put(faiss.serialize_index(template))
        # A task holds one part's codes and ids, one chunk of float32 vectors read from the store, and a worker.
        memory = (512 << 20) + size * (int(template.code_size) + 8) + 10_000 * int(template.d) * 4
        task = ray.remote(write_part_range).options(num_cpus=1, memory=memory, max_retries=2)
        url = self.settings.effective_database_url
        refs = [
            task.remote(url, self.indexer.model_key, shipped, str(folder), after, upto, size, f"part-{number:05d}")
            for number, (after, upto) in enumerate(ranges)
        ]
        log.info("ray: building the on-disk index in %d part task(s)", len(refs))
        try:
            parts = [Path(path) for written in ray.get(refs) for path in written]
        except ray.exceptions.RayError as exc:
            raise ClipSearchError(
                f"building the on-disk index on Ray failed: {exc}\nThe store is up to date and the previous index "
                "still serves: fix the cause and run the same command again (or 'clipsearch index --rebuild')."
            ) from exc
        unseen = [path for path in parts if not path.exists()]
        if unseen:
            raise ClipSearchError(
                f"the Ray workers wrote {len(unseen)} index part(s) the driver cannot see (e.g. {unseen[0]}): put "
                f"the data dir ({self.settings.data_dir}) on a filesystem the workers share, or use --engine local"
            )
        return parts

    def _partition_memory(self) -> int:
        """A decode task's memory: the worker process (Python, torch, PIL: ~600 MB measured) and a partition's
        pixels, twice (the images as decoded, then the stacked copy)."""
        side = self.indexer.encoder.image_size
        return (768 << 20) + 2 * self.partition_size * 3 * side * side * 4

    @staticmethod
    def _partition_payload(partition: Partition) -> bytes:
        """The partition's files; those of a process-local filesystem (memory://) travel with their bytes."""
        inline = {}
        for info in partition.files:
            if is_process_local(info.path):
                # On failure the worker's own read fails too, and records the reason.
                with contextlib.suppress(OSError):
                    inline[info.path] = read_bytes(info.path)
        return pickle.dumps((list(partition.files), set(partition.hash_only), inline))

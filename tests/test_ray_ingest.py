"""`clipsearch index --engine ray`: the indexer as a Ray Data job on a local 2-CPU Ray, against the local indexer."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray

from app.config import Settings
from app.encoder import Encoder
from app.errors import ClipSearchError
from app.search import SearchService
from app.store import ImageStatus, Store
from indexer import Indexer
from indexer.pipeline import Plan
from indexer.ray_engine import EmbedPartitions, RayIndexer, RayIndexSummary, local_ray_options, make_partitions
from indexer.sources import modified_time
from indexer.walk import FileInfo
from tests.helpers import copy_photos

PHOTOS = 24
PARTITION = 8
BROKEN = b"this is not an image"


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole module (it takes seconds to start), as small as CI needs."""
    ray.init(**local_ray_options(num_cpus=2, object_store_mb=200), log_to_driver=False)
    logging.getLogger("ray").setLevel(logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    folder = tmp_path_factory.mktemp("ray-catalog") / "photos"
    copy_photos(folder, PHOTOS)
    (folder / "broken.jpg").write_bytes(BROKEN)
    return folder


def _settings(data_dir: Path, model_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, model=f"local-dir:{model_dir}", device="cpu", batch_size=8, decode_workers=2)


@dataclass
class Catalog:
    settings: Settings
    store: Store

    def vectors(self, model: str) -> dict[str, np.ndarray]:
        out = {}
        for ids, vectors in self.store.iter_vectors(model):
            records = self.store.get_many([int(i) for i in ids])
            for image_id, vector in zip(ids, vectors, strict=True):
                out[records[int(image_id)].path] = vector
        return out

    def rows(self) -> dict[str, tuple[str, str | None]]:
        return {path: (state.status, state.sha256) for path, state in self.store.file_states().items()}


@pytest.fixture(scope="module")
def local_catalog(
    tmp_path_factory: pytest.TempPathFactory, catalog_dir: Path, instrument_model_dir: Path, instrument_encoder: Encoder
) -> Iterator[Catalog]:
    settings = _settings(tmp_path_factory.mktemp("local-data"), instrument_model_dir)
    store = Store(settings.effective_database_url)
    Indexer(settings, store, instrument_encoder, progress=False).run([catalog_dir])
    yield Catalog(settings, store)
    store.close()


def _ray_indexer(catalog: Catalog, encoder: Encoder, **kwargs: object) -> RayIndexer:
    return RayIndexer(catalog.settings, catalog.store, encoder, partition_size=PARTITION, progress=False, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def fresh(tmp_path: Path, instrument_model_dir: Path) -> Iterator[Catalog]:
    settings = _settings(tmp_path / "data", instrument_model_dir)
    store = Store(settings.effective_database_url)
    yield Catalog(settings, store)
    store.close()


def _assert_same_vectors(ray_vectors: dict[str, np.ndarray], local_vectors: dict[str, np.ndarray]) -> None:
    assert ray_vectors.keys() == local_vectors.keys()
    cosines = [float(ray_vectors[p] @ local_vectors[p]) for p in local_vectors]
    assert min(cosines) >= 0.9999, f"lowest cosine {min(cosines):.6f}"


def test_ray_job_gives_the_local_vectors_results_and_failures_and_a_rerun_does_nothing(
    ray_session: None, fresh: Catalog, local_catalog: Catalog, catalog_dir: Path, instrument_encoder: Encoder
) -> None:
    summary = _ray_indexer(fresh, instrument_encoder).run([catalog_dir])
    assert (summary.added, summary.embedded, summary.failed) == (PHOTOS, PHOTOS, 1)
    assert summary.partitions == summary.partitions_computed == 4  # 25 files in partitions of 8
    assert summary.embed_backend == "torch fp32"  # the driver runs torch: the actors load the model themselves
    assert summary.index_count == PHOTOS
    broken = str(catalog_dir / "broken.jpg")
    assert summary.failures == [(broken, "not a recognised image format (is it really an image?)")]
    assert fresh.store.failures() == local_catalog.store.failures()

    model = instrument_encoder.spec.name
    _assert_same_vectors(fresh.vectors(model), local_catalog.vectors(model))
    assert fresh.rows() == local_catalog.rows()  # same paths, statuses and content hashes

    ray_service = SearchService(fresh.settings, instrument_encoder, fresh.store)
    local_service = SearchService(local_catalog.settings, instrument_encoder, local_catalog.store)
    ray_service.load_index()
    local_service.load_index()
    for query in ("a photo of a dog", "a plate of food", "a street with cars"):
        assert [h.path for h in ray_service.search_text(query, 10)] == [
            h.path for h in local_service.search_text(query, 10)
        ]
    query_image = catalog_dir / "photo_003.jpg"
    assert [h.path for h in ray_service.search_image_file(query_image, 10)] == [
        h.path for h in local_service.search_image_file(query_image, 10)
    ]

    again = _ray_indexer(fresh, instrument_encoder).run([catalog_dir])
    assert (again.partitions, again.embedded, again.added, again.unchanged) == (0, 0, 0, PHOTOS + 1)
    assert not list((fresh.settings.data_dir / "ray-shards").glob("*.npz"))


def crash_once(marker: Path) -> type[EmbedPartitions]:
    """An embedder whose worker process dies on its first partition, once across restarts (the marker file
    remembers). A local class: Ray ships it to the workers by value."""

    class CrashOnceEmbedder(EmbedPartitions):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if not marker.exists():
                marker.write_text("crashed")
                os._exit(1)
            return super().__call__(batch)

    return CrashOnceEmbedder


def test_a_killed_embedding_worker_is_restarted_and_nothing_is_lost(
    ray_session: None, fresh: Catalog, local_catalog: Catalog, catalog_dir: Path, instrument_encoder: Encoder,
    tmp_path: Path,
) -> None:  # fmt: skip
    marker = tmp_path / "crashed"
    summary = _ray_indexer(fresh, instrument_encoder, embedder=crash_once(marker)).run([catalog_dir])
    assert marker.read_text() == "crashed"  # the worker did die
    assert (summary.embedded, summary.failed, summary.partitions_computed) == (PHOTOS, 1, 4)
    model = instrument_encoder.spec.name
    _assert_same_vectors(fresh.vectors(model), local_catalog.vectors(model))
    assert fresh.store.counts()[ImageStatus.INDEXED.value] == PHOTOS


def test_an_interrupted_job_resumes_with_only_the_missing_partitions(
    ray_session: None, fresh: Catalog, local_catalog: Catalog, catalog_dir: Path, instrument_encoder: Encoder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Killed after one partition was committed and a second one's shard was written: the re-run loads that shard
    without computing it, computes the other two, and leaves one row per file."""
    real_commit = RayIndexer._commit_shard
    calls = []

    def commit_then_die(self: RayIndexer, *args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # after the shard is on disk, before the store has it
        real_commit(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RayIndexer, "_commit_shard", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        _ray_indexer(fresh, instrument_encoder).run([catalog_dir])
    monkeypatch.setattr(RayIndexer, "_commit_shard", real_commit)
    assert len(list((fresh.settings.data_dir / "ray-shards").glob("*.npz"))) == 1
    assert len(fresh.store.file_states()) == PARTITION  # the first partition only

    resumed: RayIndexSummary = _ray_indexer(fresh, instrument_encoder).run([catalog_dir])
    assert (resumed.partitions, resumed.partitions_from_shards, resumed.partitions_computed) == (3, 1, 2)
    assert resumed.unchanged == PARTITION
    assert resumed.embedded + resumed.failed == PHOTOS + 1 - PARTITION
    rows = fresh.store.file_states()
    assert len(rows) == PHOTOS + 1 and rows.keys() == local_catalog.store.file_states().keys()
    _assert_same_vectors(
        fresh.vectors(instrument_encoder.spec.name), local_catalog.vectors(instrument_encoder.spec.name)
    )
    assert resumed.index_count == PHOTOS


def test_the_index_command_ingests_an_fsspec_memory_filesystem_and_reuses_known_contents(
    ray_session: None, fresh: Catalog, local_catalog: Catalog, catalog_dir: Path, instrument_model_dir: Path,
    instrument_encoder: Encoder,
) -> None:  # fmt: skip
    import fsspec
    from click.testing import CliRunner

    from app.cli import main

    memory = fsspec.filesystem("memory")
    names = ["photo_000.jpg", "photo_001.jpg", "photo_002.jpg", "broken.jpg"]
    for name in names:
        memory.pipe(f"/ray-test/album/{name}", (catalog_dir / name).read_bytes())
    memory.pipe("/ray-test/album/.hidden/photo_009.jpg", (catalog_dir / "photo_009.jpg").read_bytes())
    memory.pipe("/ray-test/album/notes.txt", b"not listed")
    args = ["--data-dir", str(fresh.settings.data_dir), "--model", f"local-dir:{instrument_model_dir}", "--quiet"]
    try:
        result = CliRunner().invoke(main, ["index", "--engine", "ray", "memory://ray-test/album", *args])
        assert result.exit_code == 0, result.output
        assert "added 3, updated 0, unchanged 0, reused 0, removed 0, failed 1" in result.output
        assert "ray: 1 partitions (1 computed, 0 from saved shards)" in result.output
        assert "failed: memory:///ray-test/album/broken.jpg: not a recognised image format" in result.output
        got = fresh.vectors(instrument_encoder.spec.name)
        local = local_catalog.vectors(instrument_encoder.spec.name)
        _assert_same_vectors(got, {f"memory:///ray-test/album/{n}": local[str(catalog_dir / n)] for n in names[:3]})

        # A copy under a new name reuses the stored vector: its content hash is known, the model is not called.
        memory.pipe("/ray-test/album/copy_of_000.jpg", (catalog_dir / "photo_000.jpg").read_bytes())
        again = CliRunner().invoke(main, ["index", "--engine", "ray", "memory://ray-test/album", *args])
        assert again.exit_code == 0, again.output
        assert "added 0, updated 0, unchanged 4, reused 1, removed 0, failed 0" in again.output
        assert "embedded 0 images" in again.output
    finally:
        memory.rm("/ray-test", recursive=True)

    refused = CliRunner().invoke(main, ["index", "memory://ray-test/album", *args])
    assert refused.exit_code == 2 and "URLs need --engine ray" in refused.output


def test_a_failing_job_stops_with_a_message_that_says_what_to_do(
    ray_session: None, fresh: Catalog, catalog_dir: Path, instrument_encoder: Encoder
) -> None:
    class BrokenEmbedder(EmbedPartitions):
        def __init__(self, settings: Settings, image_tower: object = None) -> None:
            self.settings = settings  # no model: it fails before it would be used

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            raise RuntimeError("no such model on this worker")

    with pytest.raises(ClipSearchError, match="no such model on this worker") as failure:
        _ray_indexer(fresh, instrument_encoder, embedder=BrokenEmbedder).run([catalog_dir])
    assert "run the same command again" in str(failure.value)
    assert fresh.store.counts().get(ImageStatus.INDEXED.value, 0) == 0


@pytest.fixture(scope="module")
def onnx_driver_encoder(tmp_path_factory: pytest.TempPathFactory, instrument_model_dir: Path) -> Encoder:
    """The driver's encoder with its towers in ONNX Runtime (what 'auto' gives on a CPU)."""
    data_dir = tmp_path_factory.mktemp("onnx-driver")
    settings = Settings(data_dir=data_dir, model=f"local-dir:{instrument_model_dir}", device="cpu", inference="onnx")
    return Encoder.from_settings(settings)


def test_cpu_actors_run_the_drivers_onnx_image_tower_and_give_the_local_vectors(
    ray_session: None, fresh: Catalog, local_catalog: Catalog, catalog_dir: Path, onnx_driver_encoder: Encoder,
    instrument_encoder: Encoder,
) -> None:  # fmt: skip
    assert onnx_driver_encoder.image_tower_file() is not None
    summary = _ray_indexer(fresh, onnx_driver_encoder).run([catalog_dir])
    assert (summary.embedded, summary.failed, summary.partitions_computed) == (PHOTOS, 1, 4)
    # what the actors reported running: the driver's own export, not a model of their own
    assert summary.embed_backend == "onnx, the driver's export"
    assert "embedding worker(s) (onnx, the driver's export)" in "\n".join(summary.lines())
    model = instrument_encoder.spec.name
    _assert_same_vectors(fresh.vectors(model), local_catalog.vectors(model))
    assert fresh.rows() == local_catalog.rows()


def test_nothing_is_shipped_when_the_driver_runs_torch_or_the_actors_have_gpus(
    ray_session: None, fresh: Catalog, onnx_driver_encoder: Encoder, instrument_encoder: Encoder
) -> None:
    assert instrument_encoder.image_tower_file() is None
    assert _ray_indexer(fresh, instrument_encoder)._shipped_image_tower(ray, gpus=0) is None
    assert _ray_indexer(fresh, onnx_driver_encoder)._shipped_image_tower(ray, gpus=1) is None
    shipped = _ray_indexer(fresh, onnx_driver_encoder)._shipped_image_tower(ray, gpus=0)
    assert shipped is not None and shipped.mode == "onnx" and shipped.dim == onnx_driver_encoder.dim
    found = onnx_driver_encoder.image_tower_file()
    assert found is not None and ray.get(shipped.model) == found[0].read_bytes()


def test_the_shipped_tower_gives_the_drivers_vectors(onnx_driver_encoder: Encoder, instrument_encoder: Encoder) -> None:
    import torch

    from indexer.ray_engine import ShippedImageTower, TowerEncoder

    found = onnx_driver_encoder.image_tower_file()
    assert found is not None
    path, mode = found
    shipped = ShippedImageTower(path.read_bytes(), mode, onnx_driver_encoder.dim, onnx_driver_encoder.spec.store_key)
    tower = TowerEncoder(shipped, threads=1)
    size = instrument_encoder.image_size
    pixels = torch.rand(5, 3, size, size)
    got, want = tower.encode_pixels(pixels), instrument_encoder.encode_pixels(pixels)  # ORT vs torch fp32
    assert got.shape == (5, instrument_encoder.dim) == want.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert float(np.abs(got - want).max()) < 1e-5


def _plan(files: list[FileInfo]) -> Plan:
    return Plan(todo=files, states={}, hash_only=set(), known_shas=set())


def test_partitions_keep_their_ids_when_committed_ones_leave_and_change_with_their_files() -> None:
    files = [FileInfo(f"/photos/{i:03d}.jpg", 1000 + i, 1.5e9 + i) for i in range(20)]
    first = make_partitions(_plan(files), "model-a", 8)
    assert [len(p.files) for p in first] == [8, 8, 4]
    assert make_partitions(_plan(list(reversed(files))), "model-a", 8) == first  # the listing order does not matter

    left = [f for f in files if f not in first[1].files]  # the middle partition was committed
    assert [p.id for p in make_partitions(_plan(left), "model-a", 8)] == [first[0].id, first[2].id]

    touched = [FileInfo(f.path, f.size, f.mtime + 1) if f.path.endswith("017.jpg") else f for f in files]
    assert [p.id for p in make_partitions(_plan(touched), "model-a", 8)][:2] == [first[0].id, first[1].id]
    assert make_partitions(_plan(touched), "model-a", 8)[2].id != first[2].id
    assert {p.id for p in make_partitions(_plan(files), "model-b", 8)}.isdisjoint({p.id for p in first})


def test_listing_times_of_object_stores_become_seconds() -> None:
    from datetime import UTC, datetime

    stamp = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert modified_time({"LastModified": stamp}) == stamp.timestamp()  # S3
    assert modified_time({"updated": "2026-01-02T03:04:05Z"}) == stamp.timestamp()  # GCS
    assert modified_time({"mtime": 12.5}) == 12.5  # local
    assert modified_time({"size": 3}) == 0.0

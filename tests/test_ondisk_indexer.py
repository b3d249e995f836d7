"""`CLIPSEARCH_INDEX_TYPE=ivf-ondisk`: the indexer builds the on-disk index from the store part by part, keeps it
up to date with tombstones and delta shards, compacts it, survives a failed build, and builds the same on Ray.

A few Caltech-101 classes (150 photos) indexed with the trained model; the exact (flat) index of the same catalog
is the reference."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import indexer.ondisk
from app.cli import main
from app.config import Settings
from app.encoder import Encoder
from app.index import FLAT, ONDISK, VectorIndex, choose_kind, read_manifest
from app.index_ondisk import OnDiskIndex, PartBuilder, ShardState, plan_compaction, shard_files
from app.search import SearchService
from app.store import Store
from indexer import Indexer

CLASSES = ("Leopards", "airplanes", "Motorbikes", "watch", "pizza", "sunflower")
EXTRA_CLASSES = ("dalmatian", "starfish")
PER_CLASS = 25
PART_VECTORS = 40  # 150 photos: 4 parts
QUERIES = ("a photo of a leopard", "an airplane", "a motorbike", "a wrist watch", "a pizza", "a yellow flower")


@pytest.fixture(scope="module")
def caltech(shared_data: Path) -> Path:
    root = shared_data / "caltech101"
    if not all((root / name).is_dir() for name in CLASSES + EXTRA_CLASSES):
        pytest.skip(f"the Caltech-101 classes {CLASSES + EXTRA_CLASSES} are missing under {root}")
    return root


def _copy_classes(caltech: Path, target: Path, classes: tuple[str, ...]) -> list[Path]:
    copied = []
    for name in classes:
        (target / name).mkdir(parents=True, exist_ok=True)
        for photo in sorted((caltech / name).glob("*.jpg"))[:PER_CLASS]:
            copied.append(Path(shutil.copy(photo, target / name / photo.name)))
    return copied


@pytest.fixture
def photos(tmp_path: Path, caltech: Path) -> Path:
    folder = tmp_path / "photos"
    assert len(_copy_classes(caltech, folder, CLASSES)) == len(CLASSES) * PER_CLASS
    return folder


def _settings(data_dir: Path, model_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "model": f"local-dir:{model_dir}",
        "device": "cpu",
        "batch_size": 32,
        "decode_workers": 2,
        "nprobe": 1024,  # every list: only the 8-bit codes differ from the exact index
        "index_type": ONDISK,
        "ondisk_part_vectors": PART_VECTORS,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def flat_reference(
    tmp_path_factory: pytest.TempPathFactory, caltech: Path, instrument_model_dir: Path, instrument_encoder: Encoder
) -> Iterator[SearchService]:
    """The same 150 photos under an exact (flat) index, for comparison. Paths differ: compare by relative path."""
    root = tmp_path_factory.mktemp("flat") / "photos"
    _copy_classes(caltech, root, CLASSES)
    settings = _settings(root.parent / "data", instrument_model_dir, index_type=FLAT)
    store = Store(settings.effective_database_url)
    Indexer(settings, store, instrument_encoder, progress=False).run([root])
    service = SearchService(settings, instrument_encoder, store)
    service.load_index()
    yield service
    store.close()


class Catalog:
    """An on-disk catalog: its settings, store, and a service to query it."""

    def __init__(self, settings: Settings, encoder: Encoder, root: Path) -> None:
        self.settings = settings
        self.encoder = encoder
        self.root = root
        self.store = Store(settings.effective_database_url)

    def index(self, **overrides: object) -> object:
        settings = self.settings.with_overrides(**overrides) if overrides else self.settings
        return Indexer(settings, self.store, self.encoder, progress=False).run([self.root])

    def service(self) -> SearchService:
        service = SearchService(self.settings, self.encoder, self.store)
        service.load_index()
        return service

    def loaded(self) -> OnDiskIndex:
        spec = self.encoder.spec
        index, _ = VectorIndex.load(self.settings.index_dir, model=spec.name, pretrained=spec.pretrained, nprobe=1024)
        assert isinstance(index, OnDiskIndex)
        return index

    def id_of(self, path: Path) -> int:
        return self.store.file_states()[str(path)].id

    def all_hits(self, query: str) -> list[int]:
        return [hit.id for hit in self.service().search_text(query, k=1000)]

    def relative_top(self, service: SearchService, query: str, k: int = 10) -> list[str]:
        return [Path(hit.path).relative_to(self.root).as_posix() for hit in service.search_text(query, k)]


@pytest.fixture
def catalog(photos: Path, instrument_model_dir: Path, instrument_encoder: Encoder) -> Iterator[Catalog]:
    made = Catalog(_settings(photos.parent / "data", instrument_model_dir), instrument_encoder, photos)
    yield made
    made.store.close()


def _relative(service: SearchService, root: Path, query: str, k: int = 10) -> list[str]:
    return [Path(hit.path).relative_to(root).as_posix() for hit in service.search_text(query, k)]


def test_an_ondisk_catalog_is_built_in_bounded_parts_and_answers_like_the_exact_index(
    catalog: Catalog, flat_reference: SearchService, monkeypatch: pytest.MonkeyPatch
) -> None:
    largest = []
    real_add = PartBuilder.add

    def spy(self: PartBuilder, ids: np.ndarray, vectors: np.ndarray) -> None:
        real_add(self, ids, vectors)
        largest.append(int(self.index.ntotal))

    monkeypatch.setattr(PartBuilder, "add", spy)
    summary = catalog.index()
    monkeypatch.undo()

    n = len(CLASSES) * PER_CLASS
    assert summary.index_count == n and summary.index_rebuilt  # type: ignore[attr-defined]
    assert largest == [PART_VECTORS] * 3 + [n - 3 * PART_VECTORS]  # 4 parts, each builder filled to 40 at most
    manifest = read_manifest(catalog.settings.index_dir)
    assert manifest.index_type == ONDISK and manifest.count == n and len(manifest.shards) == 1
    for shard in manifest.shards:
        assert all((catalog.settings.index_dir / name).is_file() for name in shard_files(shard))
    leftovers = [p.name for p in catalog.settings.index_dir.iterdir() if p.name.startswith(".build-")]
    assert leftovers == [] and not list(catalog.settings.index_dir.rglob("part-*"))
    index = catalog.loaded()
    assert index.ntotal == n and index.kind == ONDISK

    ondisk = catalog.service()
    flat_root = Path(flat_reference.settings.data_dir).parent / "photos"
    overlaps = []
    for query in QUERIES:
        got = set(catalog.relative_top(ondisk, query))
        want = set(_relative(flat_reference, flat_root, query))
        overlaps.append(len(got & want) / 10)
    assert min(overlaps) >= 0.8 and np.mean(overlaps) >= 0.9, overlaps

    status = CliRunner().invoke(
        main, ["stats", "--data-dir", str(catalog.settings.data_dir), "--model", catalog.settings.model]
    )
    assert status.exit_code == 0, status.output
    assert f"{n} vectors" in status.output and "ivf-ondisk (1 shards)" in status.output


def test_deleted_files_are_tombstoned_and_added_files_land_in_a_delta_shard(catalog: Catalog, caltech: Path) -> None:
    catalog.index()
    before = read_manifest(catalog.settings.index_dir)
    gone = sorted((catalog.root / "Leopards").glob("*.jpg"))[:10]
    gone_ids = {catalog.id_of(path) for path in gone}
    for path in gone:
        path.unlink()
    summary = catalog.index()
    assert summary.removed == 10 and not summary.index_rebuilt  # type: ignore[attr-defined]
    after = read_manifest(catalog.settings.index_dir)
    assert after.shards == before.shards and after.index_file != before.index_file  # same shards, new tombstones
    assert set(catalog.loaded().deleted.tolist()) == gone_ids
    for query in ("a photo of a leopard", "a spotted wild cat"):
        hits = catalog.all_hits(query)
        assert len(hits) == len(CLASSES) * PER_CLASS - 10 and not gone_ids & set(hits)

    added = _copy_classes(caltech, catalog.root, ("dalmatian",))
    summary = catalog.index()
    assert summary.added == PER_CLASS and summary.index_count == len(CLASSES) * PER_CLASS - 10 + PER_CLASS  # type: ignore[attr-defined]
    grown = read_manifest(catalog.settings.index_dir)
    assert grown.shards[: len(after.shards)] == after.shards and len(grown.shards) == len(after.shards) + 1
    assert "delta" in grown.shards[-1]
    added_ids = {catalog.id_of(path) for path in added}
    assert added_ids <= set(catalog.all_hits("a dalmatian dog with black spots"))
    assert catalog.service().search_image_file(added[3], 1)[0].path == str(added[3])


def test_compaction_merges_delta_shards_and_drops_tombstones_without_changing_results(
    catalog: Catalog, caltech: Path
) -> None:
    catalog.index(ondisk_max_small_shards=10)
    for number, name in enumerate(EXTRA_CLASSES):
        _copy_classes(caltech, catalog.root, (name,))
        for path in sorted((catalog.root / CLASSES[number]).glob("*.jpg"))[:5]:
            path.unlink()
        catalog.index(ondisk_max_small_shards=10)
    manifest = read_manifest(catalog.settings.index_dir)
    assert len(manifest.shards) == 3 and len(catalog.loaded().deleted) == 10
    service = catalog.service()
    before = {query: [(h.id, round(h.score, 5)) for h in service.search_text(query, 10)] for query in QUERIES}

    result = CliRunner().invoke(
        main, ["index", "--compact", "--data-dir", str(catalog.settings.data_dir), "--model", catalog.settings.model]
    )
    assert result.exit_code == 0, result.output
    assert "merging 3 shards into one" in result.output and "3 -> 1 shard(s)" in result.output
    compacted = read_manifest(catalog.settings.index_dir)
    index = catalog.loaded()
    assert len(compacted.shards) == 1 and len(index.deleted) == 0
    assert index.shards[0].ntotal == compacted.count == (len(CLASSES) + len(EXTRA_CLASSES)) * PER_CLASS - 10
    assert not set(manifest.shards) & set(compacted.shards)
    service = catalog.service()
    after = {query: [(h.id, round(h.score, 5)) for h in service.search_text(query, 10)] for query in QUERIES}
    assert after == before


def test_an_index_run_compacts_by_policy_and_says_so(catalog: Catalog, caltech: Path) -> None:
    """Shards under ondisk_part_vectors (40 here: the delta shards) are merged beyond ondisk_max_small_shards (1);
    a shard with more than ondisk_max_deleted of its vectors deleted is rewritten without them."""
    catalog.index(ondisk_max_small_shards=1)
    _copy_classes(caltech, catalog.root, ("dalmatian",))
    catalog.index(ondisk_max_small_shards=1)
    first = read_manifest(catalog.settings.index_dir)
    assert len(first.shards) == 2
    _copy_classes(caltech, catalog.root, ("starfish",))
    summary = catalog.index(ondisk_max_small_shards=1)
    assert summary.index_compacted == "compacted the on-disk index (merging 2 shards into one): 3 -> 2 shard(s)"  # type: ignore[attr-defined]
    merged = read_manifest(catalog.settings.index_dir)
    assert merged.shards[0] == first.shards[0] and len(merged.shards) == 2 and merged.count == 200

    gone = sorted((catalog.root / "pizza").glob("*.jpg")) + sorted((catalog.root / "watch").glob("*.jpg"))
    gone_ids = {catalog.id_of(path) for path in gone}
    for path in gone:
        path.unlink()
    summary = catalog.index(ondisk_max_small_shards=1, ondisk_max_deleted=0.2)  # 50 of the first shard's 150
    assert "dropping the tombstoned vectors of 1 shard(s)" in summary.index_compacted  # type: ignore[attr-defined]
    index = catalog.loaded()
    assert len(index.deleted) == 0 and index.ntotal == 150 and index.shards[0].ntotal == 100
    assert index.shards[1].name == merged.shards[1]  # the merged delta shard was left as it was
    hits = set(catalog.all_hits("a pizza"))
    assert len(hits) == 150 and not hits & gone_ids

    for name in EXTRA_CLASSES:  # every vector of the merged delta shard deleted: the shard goes
        shutil.rmtree(catalog.root / name)
    summary = catalog.index(ondisk_max_small_shards=1, ondisk_max_deleted=0.2)
    assert "dropping the tombstoned vectors of 1 shard(s)" in summary.index_compacted  # type: ignore[attr-defined]
    assert read_manifest(catalog.settings.index_dir).shards == [index.shards[0].name]
    assert catalog.loaded().ntotal == len(catalog.all_hits("a pizza")) == 100


def test_a_failed_build_leaves_the_previous_index_serving(
    catalog: Catalog, caltech: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog.index(index_type=FLAT)
    flat = read_manifest(catalog.settings.index_dir)
    expected = catalog.relative_top(catalog.service(), "a motorbike")

    def broken_merge(*args: object, **kwargs: object) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(indexer.ondisk, "merge_parts", broken_merge)
    with pytest.raises(OSError, match="disk full"):
        catalog.index()  # the kind changed: a rebuild as on-disk, which fails in the merge
    monkeypatch.undo()
    assert read_manifest(catalog.settings.index_dir) == flat
    assert catalog.relative_top(catalog.service(), "a motorbike") == expected
    assert not [p for p in catalog.settings.index_dir.iterdir() if p.name.startswith(".build-")]

    summary = catalog.index()  # the next run builds it
    assert summary.index_rebuilt and read_manifest(catalog.settings.index_dir).index_type == ONDISK  # type: ignore[attr-defined]
    summary = catalog.index(index_type=FLAT)  # and switching back rebuilds the exact index
    assert summary.index_rebuilt and read_manifest(catalog.settings.index_dir).index_type == FLAT  # type: ignore[attr-defined]
    assert catalog.relative_top(catalog.service(), "a motorbike") == expected
    _copy_classes(caltech, catalog.root, ("starfish",))
    catalog.index(index_type=FLAT)  # one generation later, the on-disk files are gone
    assert not [p.name for p in catalog.settings.index_dir.iterdir() if p.name.startswith(("shard-", "deleted-"))]


def test_auto_picks_the_ondisk_index_from_its_threshold_and_plans_compaction() -> None:
    assert choose_kind(9_999_999, "auto", 200_000, 10_000_000) == "ivf-sq8"
    assert choose_kind(10_000_000, "auto", 200_000, 10_000_000) == ONDISK
    assert choose_kind(10, "ivf-ondisk", 200_000, 10_000_000) == ONDISK
    assert Settings(index_type="ivf-ondisk").index_type == ONDISK
    shards = [ShardState("base", 5_000, 100), *(ShardState(f"d{i}", 50, 0) for i in range(3))]
    policy = {"small_vectors": 1_000, "max_small_shards": 3, "max_deleted_fraction": 0.2, "shard_vectors": 10_000}
    assert not plan_compaction(shards, **policy)  # 3 small shards, 2 % deleted: nothing to do
    grown = plan_compaction([*shards, ShardState("d3", 50, 10)], **policy)
    assert grown.merge == (("d0", "d1", "d2", "d3"),) and grown.purge == ()
    assert plan_compaction([ShardState("base", 5_000, 1_001)], **policy).purge == ("base",)
    forced = plan_compaction(shards, **policy, force=True)
    assert forced.merge == (("base", "d0", "d1", "d2"),)
    assert plan_compaction([ShardState("a", 9_000, 0), ShardState("b", 2_000, 1)], **policy, force=True).purge == ("b",)


# --- Ray ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    from indexer.ray_engine import local_ray_options

    ray.init(**local_ray_options(num_cpus=2, object_store_mb=200), log_to_driver=False)
    logging.getLogger("ray").setLevel(logging.WARNING)
    yield
    ray.shutdown()


def test_ray_tasks_build_the_same_ondisk_index_as_the_local_build(
    ray_session: None, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    from indexer.ray_engine import RayIndexer

    catalog.index()
    local = catalog.loaded()
    ids = np.sort(np.concatenate([np.asarray(shard.ids) for shard in local.shards]))
    local_vectors = np.stack([local.reconstruct(int(i)) for i in ids])

    written: list[list[Path]] = []
    real = RayIndexer._write_index_parts

    def spy(self: RayIndexer, template: object, folder: Path) -> list[Path]:
        parts = real(self, template, folder)  # type: ignore[arg-type]
        written.append(parts)
        return parts

    monkeypatch.setattr(RayIndexer, "_write_index_parts", spy)
    ray_indexer = RayIndexer(catalog.settings, catalog.store, catalog.encoder, progress=False)
    summary = ray_indexer.run([catalog.root], rebuild=True)
    assert summary.index_rebuilt and summary.embedded == 0 and summary.unchanged == len(ids)
    assert [p.name for p in written[0]] == [f"part-{n:05d}-00000.faiss" for n in range(math.ceil(len(ids) / 40))]

    built = catalog.loaded()
    assert read_manifest(catalog.settings.index_dir).shards != [s.name for s in local.shards]
    ray_ids = np.sort(np.concatenate([np.asarray(shard.ids) for shard in built.shards]))
    np.testing.assert_array_equal(ray_ids, ids)
    np.testing.assert_array_equal(np.stack([built.reconstruct(int(i)) for i in ids]), local_vectors)

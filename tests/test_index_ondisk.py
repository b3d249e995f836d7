"""The on-disk index: parts built apart, merged into memory-mapped lists, fan-out over shards, tombstone deletions."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from app.errors import IndexMismatch
from app.index import MANIFEST_FILE, VectorIndex, read_manifest
from app.index_ondisk import (
    ONDISK,
    OnDiskIndex,
    build_part,
    commit_shards,
    compact,
    merge_parts,
    merge_topk,
    train_template,
)

DIM, N, NLIST, NPROBE = 32, 3000, 32, 6
MODEL = {"model": "ViT-test", "pretrained": "tag"}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered vectors (like embeddings), scattered non-contiguous ids, and queries near but not on them."""
    rng = np.random.default_rng(3)
    centres = _unit(rng.standard_normal((40, DIM)))
    vectors = _unit(centres[rng.integers(0, 40, N)] + 0.3 * rng.standard_normal((N, DIM)))
    ids = rng.choice(10**9, size=N, replace=False).astype(np.int64)
    queries = _unit(centres[rng.integers(0, 40, 25)] + 0.3 * rng.standard_normal((25, DIM)))
    return ids, vectors, queries


@pytest.fixture(scope="module")
def template(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> faiss.IndexIVF:
    return train_template(data[1][::2], NLIST)


def _in_memory(template: faiss.IndexIVF, ids: np.ndarray, vectors: np.ndarray) -> faiss.IndexIVF:
    index = faiss.clone_index(template)
    index.add_with_ids(vectors, ids)
    index.nprobe = NPROBE
    return index


def _build(directory: Path, template: faiss.IndexIVF, data: tuple, *, parts: int = 3, shards: int = 1) -> list[str]:
    """Split the vectors into ``parts`` worker parts, merged into ``shards`` on-disk shards."""
    ids, vectors, _ = data
    work = directory / "parts"
    work.mkdir(parents=True, exist_ok=True)
    files = [build_part(template, ids[p::parts], vectors[p::parts], work / f"part-{p}.faiss") for p in range(parts)]
    per_shard = parts // shards
    return [
        merge_parts(template, files[s * per_shard : (s + 1) * per_shard], directory, f"shard-{s}")
        for s in range(shards)
    ]


def _load(directory: Path) -> OnDiskIndex:
    index, _ = VectorIndex.load(directory, nprobe=NPROBE, **MODEL)
    assert isinstance(index, OnDiskIndex)
    return index


def test_merged_on_disk_index_answers_exactly_like_the_in_memory_ivf(tmp_path: Path, template, data) -> None:
    ids, vectors, queries = data
    commit_shards(tmp_path, _build(tmp_path, template, data), **MODEL)
    index = _load(tmp_path)
    expected_scores, expected_ids = _in_memory(template, ids, vectors).search(queries, 10)
    scores, got = index.search(queries, 10)
    np.testing.assert_array_equal(got, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)
    assert index.ntotal == N and index.kind == ONDISK


def test_the_inverted_lists_are_memory_mapped_from_the_ivfdata_file(tmp_path: Path, template, data) -> None:
    commit_shards(tmp_path, _build(tmp_path, template, data), **MODEL)
    index = _load(tmp_path)
    lists = faiss.downcast_InvertedLists(index.shards[0].ivf.invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: the lists file is mapped into this process, not copied
        assert str(tmp_path / "shard-0.ivfdata") in maps.read_text()


def test_fan_out_over_three_shards_equals_one_index(tmp_path: Path, template, data) -> None:
    ids, vectors, queries = data
    names = _build(tmp_path, template, data, parts=3, shards=3)
    commit_shards(tmp_path, names, **MODEL)
    index = _load(tmp_path)
    assert len(index.shards) == 3 and read_manifest(tmp_path).shards == names
    expected_scores, expected_ids = _in_memory(template, ids, vectors).search(queries, 10)
    scores, got = index.search(queries, 10)
    np.testing.assert_array_equal(got, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)
    # single queries (the service's path) agree too
    for q in range(3):
        np.testing.assert_array_equal(index.search(queries[q], 10)[1][0], expected_ids[q])


def test_removed_ids_are_never_returned_and_stay_removed_after_a_reload(tmp_path: Path, template, data) -> None:
    ids, vectors, _ = data
    commit_shards(tmp_path, _build(tmp_path, template, data, parts=3, shards=3), **MODEL)
    index = _load(tmp_path)
    gone = ids[:200]
    assert index.remove(np.concatenate([gone, np.array([-5, 7])])) == 200  # unknown ids are not counted
    assert index.remove(gone[:10]) == 0  # already removed
    assert index.ntotal == N - 200
    _, got = index.search(vectors[:200], 10)
    assert not np.isin(got, gone).any()
    assert (got >= 0).all(), "a query still gets k live results after deletions"
    assert index.reconstruct(int(gone[0])) is None
    index.save(tmp_path, **MODEL)

    reloaded = _load(tmp_path)
    assert reloaded.ntotal == N - 200 == read_manifest(tmp_path).count
    _, got = reloaded.search(vectors[:200], 10)
    assert not np.isin(got, gone).any()


def test_compaction_drops_tombstoned_vectors_from_the_shard_files(tmp_path: Path, template, data) -> None:
    ids, vectors, queries = data
    commit_shards(tmp_path, _build(tmp_path, template, data), **MODEL)
    index = _load(tmp_path)
    index.remove(ids[:300])
    index.save(tmp_path, **MODEL)
    before = index.search(queries, 10)
    index.close()

    manifest = compact(tmp_path, **MODEL)
    compacted = _load(tmp_path)
    assert len(compacted.deleted) == 0 and manifest.count == N - 300
    assert sum(shard.ntotal for shard in compacted.shards) == N - 300
    after = compacted.search(queries, 10)
    np.testing.assert_array_equal(after[1], before[1])


def test_added_vectors_are_searchable_at_once_and_saved_as_a_new_shard(tmp_path: Path, template, data) -> None:
    ids, vectors, _ = data
    commit_shards(tmp_path, _build(tmp_path, template, data), **MODEL)
    index = _load(tmp_path)
    rng = np.random.default_rng(11)
    new = _unit(rng.standard_normal((5, DIM)))
    new_ids = np.arange(5, dtype=np.int64) + 10**10
    index.add(new_ids, new)
    index.add(ids[:1], new[:1])  # an id added again replaces its vector
    assert index.ntotal == N + 5
    assert index.search(new[2], 1)[1][0, 0] == new_ids[2]
    index.save(tmp_path, **MODEL)

    reloaded = _load(tmp_path)
    assert len(reloaded.shards) == 2 and reloaded.ntotal == N + 5
    assert reloaded.search(new[2], 1)[1][0, 0] == new_ids[2]
    np.testing.assert_allclose(reloaded.reconstruct(int(ids[0])), new[0], atol=0.02)


def test_reconstruct_returns_the_stored_vector_of_any_shard(tmp_path: Path, template, data) -> None:
    ids, vectors, _ = data
    commit_shards(tmp_path, _build(tmp_path, template, data, shards=3), **MODEL)
    index = _load(tmp_path)
    for row in (0, 1, 2, 1500, N - 1):
        np.testing.assert_allclose(index.reconstruct(int(ids[row])), vectors[row], atol=0.02)  # 8-bit codes
    assert index.reconstruct(12345678901) is None


def test_manifest_records_the_shards_and_survives_a_round_trip(tmp_path: Path, template, data) -> None:
    names = _build(tmp_path, template, data, shards=3)
    written = commit_shards(tmp_path, names, **MODEL)
    on_disk = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert on_disk["index_type"] == ONDISK and on_disk["shards"] == names and on_disk["count"] == N
    assert read_manifest(tmp_path) == written
    with pytest.raises(IndexMismatch, match="built with model"):
        VectorIndex.load(tmp_path, model="other", pretrained="")


def test_a_missing_shard_file_is_a_clear_error(tmp_path: Path, template, data) -> None:
    commit_shards(tmp_path, _build(tmp_path, template, data, shards=3), **MODEL)
    (tmp_path / "shard-1.ivfdata").unlink()
    with pytest.raises(IndexMismatch, match=r"shard shard-1\.faiss .* missing shard-1\.ivfdata.*rebuild"):
        _load(tmp_path)


def test_a_part_from_another_template_is_refused(tmp_path: Path, template, data) -> None:
    ids, vectors, _ = data
    other = train_template(vectors[::2], NLIST // 2)
    part = build_part(other, ids[:100], vectors[:100], tmp_path / "other.faiss")
    with pytest.raises(IndexMismatch, match="not built from this template"):
        merge_parts(template, [part], tmp_path, "shard-x")


def test_merge_topk_orders_by_score_and_keeps_empty_slots_last() -> None:
    a = (np.array([[0.9, 0.5, -1.0]], dtype=np.float32), np.array([[1, 2, -1]]))
    b = (np.array([[0.7, 0.6, 0.1]], dtype=np.float32), np.array([[3, 4, 5]]))
    scores, ids = merge_topk([a, b], 4)
    np.testing.assert_array_equal(ids, [[1, 3, 4, 2]])
    np.testing.assert_allclose(scores, [[0.9, 0.7, 0.6, 0.5]])
    _, ids = merge_topk([a, (np.full((1, 3), -1.0, np.float32), np.full((1, 3), -1))], 4)
    np.testing.assert_array_equal(ids, [[1, 2, -1, -1]])


def test_the_search_service_answers_from_an_on_disk_index_unchanged(settings, store, tiny_encoder, photos) -> None:
    """Index real photos, rebuild the index as on-disk shards, and the service's text and similar-image searches
    return what the exact index returned (all lists probed, so only the 8-bit codes can differ)."""
    from app.search import SearchService
    from indexer import Indexer

    Indexer(settings, store, tiny_encoder, progress=False).run([photos[0].parent])
    service = SearchService(settings, tiny_encoder, store)
    service.load_index()
    exact_text = [hit.id for hit in service.search_text("a photo of a dog", k=5)]
    first = exact_text[0]
    exact_similar = [hit.id for hit in service.similar(first, k=5)]

    ids, vectors = (np.concatenate(parts) for parts in zip(*store.iter_vectors(tiny_encoder.spec.name), strict=True))
    template = train_template(vectors, 4)
    part = build_part(template, ids[::2], vectors[::2], settings.index_dir / "part-a.faiss")
    other = build_part(template, ids[1::2], vectors[1::2], settings.index_dir / "part-b.faiss")
    names = [merge_parts(template, [p], settings.index_dir, f"shard-{n}") for n, p in enumerate((part, other))]
    spec = tiny_encoder.spec
    commit_shards(settings.index_dir, names, model=spec.name, pretrained=spec.pretrained)

    assert service.refresh_if_changed()  # the new manifest is picked up like any other index
    assert isinstance(service._require_index(), OnDiskIndex)
    service._require_index().nprobe = 4
    assert service.index_count == len(ids)
    assert [hit.id for hit in service.search_text("a photo of a dog", k=5)][:3] == exact_text[:3]
    assert [hit.id for hit in service.similar(first, k=5)][:3] == exact_similar[:3]

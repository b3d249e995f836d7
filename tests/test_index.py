"""The FAISS index: exact results, atomic save/load, and refusal of an index built by another model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.errors import IndexMismatch, NotReady
from app.index import MANIFEST_FILE, VectorIndex, read_manifest


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_search_equals_exact_numpy_reference_on_seeded_vectors() -> None:
    rng = np.random.default_rng(7)
    vectors, queries = _unit(rng, 500, 64), _unit(rng, 20, 64)
    ids = rng.choice(10**9, size=500, replace=False).astype(np.int64)
    index = VectorIndex(64)
    index.add(ids, vectors)
    scores, got = index.search(queries, 10)
    sims = queries @ vectors.T
    for q in range(len(queries)):
        order = np.argsort(-sims[q], kind="stable")[:10]
        np.testing.assert_array_equal(got[q], ids[order])
        np.testing.assert_allclose(scores[q], sims[q][order], atol=1e-5)


def test_removed_ids_leave_the_results() -> None:
    rng = np.random.default_rng(1)
    vectors = _unit(rng, 50, 16)
    index = VectorIndex(16)
    index.add(np.arange(50), vectors)
    assert index.remove(np.array([3, 4, 99])) == 2
    _, ids = index.search(vectors[3], 50)
    assert 3 not in ids[0] and 4 not in ids[0] and index.ntotal == 48


def test_k_larger_than_index_returns_what_there_is() -> None:
    index = VectorIndex(8)
    index.add(np.array([5, 6]), np.eye(8, dtype=np.float32)[:2])
    scores, ids = index.search(np.eye(8, dtype=np.float32)[0], 10)
    assert list(ids[0]) == [5, 6] and scores[0][0] == pytest.approx(1.0)


def test_wrong_dimension_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        VectorIndex(8).add(np.array([1]), np.zeros((1, 9), dtype=np.float32))


def test_save_load_round_trip_keeps_ids_and_scores(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vectors = _unit(rng, 100, 32)
    index = VectorIndex(32)
    index.add(np.arange(1000, 1100), vectors)
    manifest = index.save(tmp_path, model="m", pretrained="p")
    loaded, read_back = VectorIndex.load(tmp_path, model="m", pretrained="p")
    assert read_back == manifest and read_back.count == 100 and read_back.dim == 32
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["index_type"] == manifest.index_type
    a, b = index.search(vectors[:5], 7), loaded.search(vectors[:5], 7)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0])
    np.testing.assert_allclose(loaded.reconstruct(1042), vectors[42])


def test_saving_again_switches_atomically_and_prunes_old_files(tmp_path: Path) -> None:
    index = VectorIndex(4)
    names = []
    for i in range(4):
        index.add(np.array([i]), np.eye(4, dtype=np.float32)[i : i + 1])
        names.append(index.save(tmp_path, model="m", pretrained="").index_file)
    assert len(set(names)) == 4
    assert read_manifest(tmp_path).index_file == names[-1]
    left = sorted(p.name for p in tmp_path.glob("index-*.faiss"))
    assert names[-1] in left and len(left) <= 2  # current + the one before it, for readers mid-switch
    assert not list(tmp_path.glob("*.tmp"))


def test_index_built_by_another_model_is_refused_with_a_fix(tmp_path: Path) -> None:
    VectorIndex(4).save(tmp_path, model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(IndexMismatch) as err:
        VectorIndex.load(tmp_path, model="ViT-L-14", pretrained="openai")
    message = str(err.value)
    assert "CLIPSEARCH_MODEL=ViT-B-32" in message and "clipsearch index" in message


def test_missing_index_is_not_ready(tmp_path: Path) -> None:
    with pytest.raises(NotReady, match="clipsearch index"):
        VectorIndex.load(tmp_path / "nothing", model="m", pretrained="")


def test_corrupt_manifest_or_missing_file_asks_for_rebuild(tmp_path: Path) -> None:
    manifest = VectorIndex(4).save(tmp_path, model="m", pretrained="")
    (tmp_path / manifest.index_file).unlink()
    with pytest.raises(IndexMismatch, match="--rebuild"):
        VectorIndex.load(tmp_path, model="m", pretrained="")
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(IndexMismatch, match="--rebuild"):
        read_manifest(tmp_path)


def test_index_kind_is_chosen_by_catalog_size() -> None:
    from app.index import FLAT, IVF_SQ8, choose_kind

    assert choose_kind(10, "auto", 1000) == FLAT and choose_kind(1000, "auto", 1000) == IVF_SQ8
    assert choose_kind(10**7, "flat") == FLAT
    with pytest.raises(ValueError, match="unknown index type"):
        choose_kind(5, "hnsw")


def test_ivf_sq8_index_finds_the_exact_neighbours_and_supports_removal(tmp_path: Path) -> None:
    from app.index import IVF_SQ8

    rng = np.random.default_rng(11)
    vectors, queries = _unit(rng, 5000, 32), _unit(rng, 30, 32)
    ids = np.arange(5000, dtype=np.int64) * 3
    index = VectorIndex.create(32, IVF_SQ8, vectors, nprobe=10_000)  # every list: only quantisation differs
    index.add(ids, vectors)
    _, got = index.search(queries, 10)
    exact = ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact, strict=True)])
    assert recall >= 0.9
    assert index.remove(ids[:100]) == 100 and index.ntotal == 4900
    np.testing.assert_allclose(index.reconstruct(int(ids[200])), vectors[200], atol=0.02)
    assert index.reconstruct(int(ids[0])) is None
    manifest = index.save(tmp_path, model="m", pretrained="")
    loaded, _ = VectorIndex.load(tmp_path, model="m", pretrained="", nprobe=10_000, mmap=True)
    assert manifest.index_type == IVF_SQ8 and loaded.kind == IVF_SQ8 and loaded.ntotal == 4900
    np.testing.assert_array_equal(loaded.search(queries, 5)[1], index.search(queries, 5)[1])


def test_ivf_lists_follow_the_catalog_size_not_the_training_sample() -> None:
    from app.index import IVF_SQ8, nlist_for, training_size_for

    assert nlist_for(1_000_000) == 4096 and nlist_for(100_000) == 1024 and nlist_for(10) == 16
    # The sample trains enough points per list for FAISS (>= 39) and stays bounded for k-means time.
    assert 39 * 4096 <= training_size_for(4096) <= 200_000
    assert training_size_for(256) == 256 * 256
    assert nlist_for(1_000_000, training_size_for(4096)) == 4096
    assert nlist_for(1_000_000, 80_000) == 2048  # a short sample: fewer lists, each with >= 39 points
    sample = _unit(np.random.default_rng(3), 5000, 4)
    assert VectorIndex.create(4, IVF_SQ8, sample).description.startswith("IVF128,")
    assert VectorIndex.create(4, IVF_SQ8, sample, count=100).description.startswith("IVF32,")

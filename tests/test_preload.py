"""app.preload: the index read on a background thread while the service starts, and when it is not used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.config import Settings
from app.errors import IndexMismatch
from app.index import VectorIndex
from app.preload import IndexPreload
from app.search import SearchService
from app.store import Store


def _save_index(directory: Path, count: int, *, model: str, dim: int = 8, seed: int = 0) -> VectorIndex:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex.create(dim, "flat")
    index.add(np.arange(1, count + 1, dtype=np.int64), vectors)
    index.save(directory, model=model, pretrained="")
    return index


def test_the_preloaded_index_is_the_saved_one(tmp_path: Path) -> None:
    saved = _save_index(tmp_path, 50, model="m")
    preload = IndexPreload(tmp_path)
    taken = preload.take(model="m", pretrained="")
    assert taken is not None
    index, manifest = taken
    assert manifest.count == index.ntotal == 50
    query = np.ones((1, 8), dtype=np.float32) / np.sqrt(8)
    np.testing.assert_array_equal(index.search(query, 5)[1], saved.search(query, 5)[1])
    assert preload.take(model="m", pretrained="") is None  # handed over once


def test_an_index_replaced_meanwhile_is_not_used(tmp_path: Path) -> None:
    _save_index(tmp_path, 50, model="m")
    preload = IndexPreload(tmp_path)
    preload._thread.join()
    _save_index(tmp_path, 70, model="m", seed=1)  # the indexer commits a new generation
    assert preload.take(model="m", pretrained="") is None


def test_an_index_of_another_model_is_refused_as_a_load_would(tmp_path: Path) -> None:
    _save_index(tmp_path, 10, model="other-model")
    with pytest.raises(IndexMismatch, match="other-model"):
        IndexPreload(tmp_path).take(model="m", pretrained="")


def test_no_index_yet_gives_nothing(tmp_path: Path) -> None:
    assert IndexPreload(tmp_path / "missing").take(model="m", pretrained="") is None


def test_the_service_starts_from_the_preload(settings: Settings, tiny_encoder, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    _save_index(settings.index_dir, 30, model=tiny_encoder.spec.name, dim=tiny_encoder.dim)
    preload = IndexPreload(settings.index_dir)
    preload._thread.join()

    def no_second_read(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the service read the index again instead of taking the preloaded one")

    monkeypatch.setattr(VectorIndex, "load", no_second_read)
    store = Store(settings.effective_database_url)
    try:
        service = SearchService(settings, tiny_encoder, store)
        readiness = service.start(preload)
        assert readiness.manifest is not None and readiness.manifest.count == 30
        assert service.index_count == 30
    finally:
        store.close()

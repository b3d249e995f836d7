"""The local-feature cache: `clipsearch index` prepares each catalog image once; a server maps what it stored.

A server that finds the cache complete prepares nothing (no decoding, no ORB) and still finds copies through
the ORB-vote shortlist; an index run after files were added or removed prepares only the new ones; a corrupt
or missing cache is rebuilt with a warning, and other feature parameters get a cache of their own.
"""

from __future__ import annotations

import importlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import app.duplicates as duplicates
from app.cli import main
from app.config import Settings
from app.dupes import PreparedImage, prepare_catalog_image
from app.dupes.cache import (
    CacheError,
    FeatureStore,
    features_path,
    merge_features,
    read_arrays,
    read_shortlist,
    shortlist_path,
    write_arrays,
)
from app.duplicates import update_feature_cache
from app.store import Store
from tests.helpers import copy_photos
from tests.test_duplicates import dupe_settings, edited_copies, open_catalog

CATALOG = 4
features_module = importlib.import_module("app.dupes.features")


class PrepareCounter:
    """Counts the catalog images prepared (decoded and described) anywhere in app.duplicates."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[tuple[int, int]] = []

        def counting(image: Image.Image) -> PreparedImage:
            self.paths.append(image.size)
            return prepare_catalog_image(image)

        monkeypatch.setattr(duplicates, "prepare_catalog_image", counting)

    @property
    def calls(self) -> int:
        return len(self.paths)


def cli_index(settings: Settings, folder: Path, **env: str) -> str:
    args = ["index", str(folder), "--data-dir", str(settings.data_dir), "--model", settings.model, "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "-q"], env={"CLIPSEARCH_TAG_VOCABULARY": "none", **env})
    assert result.exit_code == 0, result.output
    return result.output


def ids_by_name(settings: Settings) -> dict[str, int]:
    store = Store(settings.effective_database_url)
    try:
        return {Path(p).name: s.id for p, s in store.file_states().items() if s.status == "indexed"}
    finally:
        store.close()


def sync(settings: Settings) -> duplicates.FeatureSync:
    store = Store(settings.effective_database_url)
    try:
        return update_feature_cache(settings, store)
    finally:
        store.close()


@pytest.fixture
def indexed(tmp_path: Path, shared_data: Path, tiny_model_dir: Path) -> tuple[Settings, list[Path]]:
    photos = copy_photos(tmp_path / "catalog", CATALOG)
    settings = dupe_settings(tmp_path / "data", tiny_model_dir, dupe_clip_candidates=0, dupe_hash_candidates=0)
    output = cli_index(settings, tmp_path / "catalog")
    assert f"local features: {CATALOG} images cached, {CATALOG} prepared" in output
    return settings, photos


def test_an_index_run_stores_the_features_and_shortlist_of_every_image(indexed: tuple[Settings, list[Path]]) -> None:
    settings, photos = indexed
    stored = FeatureStore.load(features_path(settings.data_dir))
    assert len(stored) == CATALOG
    index, keys, _ = read_shortlist(shortlist_path(settings.data_dir))
    assert sorted(keys) == sorted(ids_by_name(settings).values()) and len(index) == CATALOG
    # What is stored is what preparing the file gives.
    with Image.open(photos[1]) as opened:
        fresh = prepare_catalog_image(opened.convert("RGB"))
    again = stored.get(keys[ids_by_name(settings)[photos[1].name]])
    assert again is not None and again.pixel_digest == fresh.pixel_digest and again.hashes == fresh.hashes
    assert np.array_equal(again.features.descriptors, fresh.features.descriptors)
    assert np.allclose(again.features.points, fresh.features.points) and again.thumb.shape == fresh.thumb.shape


def test_a_server_uses_the_stored_features_without_preparing_the_catalog(
    indexed: tuple[Settings, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, photos = indexed
    counter = PrepareCounter(monkeypatch)
    crop = edited_copies(photos[0])["crop_70"]
    for catalog in open_catalog(settings.with_overrides(dupe_feature_candidates=3), photos):

        def no_decoding(path: str) -> Image.Image:
            raise AssertionError(f"decoded the catalog file {path}")

        monkeypatch.setattr(catalog.dupes, "_decode_file", no_decoding)
        catalog.dupes.start()
        assert catalog.dupes.features.wait(timeout=60) and len(catalog.dupes.features) == CATALOG
        report = catalog.dupes.lookup_bytes(crop)  # found by ORB votes, verified against the stored features
        assert [m.id for m in report.matches] == [catalog.id_of(photos[0])]
    assert counter.calls == 0
    assert catalog.dupes.features.prepared_here == 0


def test_a_sync_reads_the_records_of_uncached_images_only(
    indexed: tuple[Settings, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every start of a server and every index run syncs: the catalog's content keys come from one light query, and
    whole records only for what is to be prepared (reading every record took 11 s and 1.6 GB at 1M images)."""
    settings, photos = indexed
    asked: list[int] = []
    get_many = Store.get_many

    def counting(self: Store, ids: list[int]) -> dict[int, object]:
        asked.extend(ids)
        return get_many(self, ids)

    monkeypatch.setattr(Store, "get_many", counting)
    assert sync(settings).prepared == 0 and asked == []
    # one more file: its record alone is read, and it alone is prepared
    shutil.copy(photos[0], photos[0].parent / "copy.jpg")
    with Image.open(photos[1]) as opened:
        opened.convert("RGB").rotate(90, expand=True).save(photos[0].parent / "turned.jpg", quality=90)
    cli_index(settings, photos[0].parent, CLIPSEARCH_DUPE_FEATURE_CACHE="false")  # indexed, features not cached
    asked.clear()
    done = sync(settings)
    turned = ids_by_name(settings)["turned.jpg"]
    assert done.prepared == 1 and asked == [turned], asked  # the copy shares its sha256 with a cached image


def test_an_index_run_prepares_only_added_images_and_drops_removed_ones(
    indexed: tuple[Settings, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, photos = indexed
    folder = photos[0].parent
    before = ids_by_name(settings)
    with Image.open(photos[0]) as image:
        width, height = image.size
        image.crop((width // 10, height // 10, width * 9 // 10, height * 9 // 10)).save(folder / "new.jpg")
    shutil.copy2(photos[1], folder / "same_as_1.jpg")  # known content: nothing to prepare
    photos[2].unlink()
    counter = PrepareCounter(monkeypatch)
    output = cli_index(settings, folder)
    assert counter.calls == 1
    assert "1 prepared, 1 dropped" in output
    after = ids_by_name(settings)
    stored = FeatureStore.load(features_path(settings.data_dir))
    assert len(stored) == CATALOG  # 4 - 1 removed + 1 new content (the byte copy shares its sha256)
    _, keys, _ = read_shortlist(shortlist_path(settings.data_dir))
    assert sorted(keys) == sorted(after.values())
    assert before[photos[2].name] not in keys and keys[after["same_as_1.jpg"]] == keys[after[photos[1].name]]
    counter.paths.clear()
    assert sync(settings).prepared == 0 and counter.calls == 0  # up to date: nothing to do


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_a_corrupt_or_missing_cache_is_rebuilt_with_a_warning(
    indexed: tuple[Settings, list[Path]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    settings, _ = indexed
    path = features_path(settings.data_dir)
    if damage == "garbage":
        path.write_bytes(b"not a cache at all" * 100)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    counter = PrepareCounter(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="app.duplicates"):
        result = sync(settings)
    assert result.prepared == CATALOG and counter.calls == CATALOG
    if damage != "missing":
        assert "cannot be used, preparing the catalog again" in caplog.text
    assert len(FeatureStore.load(path)) == CATALOG


def test_a_server_prepares_what_the_cache_lacks_and_stores_it_for_the_next_start(
    indexed: tuple[Settings, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, photos = indexed
    features_path(settings.data_dir).unlink()
    shortlist_path(settings.data_dir).write_bytes(b"damaged")
    counter = PrepareCounter(monkeypatch)
    served = settings.with_overrides(dupe_feature_candidates=3)
    for catalog in open_catalog(served, photos):
        catalog.dupes.start()
        assert catalog.dupes.features.wait(timeout=60) and len(catalog.dupes.features) == CATALOG
        assert catalog.dupes.features.prepared_here == CATALOG
    assert counter.calls == CATALOG
    for catalog in open_catalog(served, photos):  # the next start: everything is stored
        catalog.dupes.start()
        assert catalog.dupes.features.wait(timeout=60) and len(catalog.dupes.features) == CATALOG
        assert catalog.dupes.features.prepared_here == 0
    assert counter.calls == CATALOG


def test_other_feature_parameters_get_a_cache_of_their_own(
    indexed: tuple[Settings, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, _ = indexed
    first = features_path(settings.data_dir)
    monkeypatch.setattr(features_module, "CATALOG_FEATURES", 300)
    second = features_path(settings.data_dir)
    assert second != first and not second.exists()
    counter = PrepareCounter(monkeypatch)
    assert sync(settings).prepared == CATALOG and counter.calls == CATALOG
    stored = FeatureStore.load(second)
    assert all(len(stored.descriptors(sha)) <= 300 for sha in stored.shas())  # type: ignore[arg-type]
    assert first.exists()  # the other parameters' cache is left alone
    with pytest.raises(CacheError, match="other parameters"):
        FeatureStore.load(first)


def test_the_cache_can_be_turned_off(tmp_path: Path, shared_data: Path, tiny_model_dir: Path) -> None:
    copy_photos(tmp_path / "catalog", 2)
    settings = dupe_settings(tmp_path / "data", tiny_model_dir)
    output = cli_index(settings, tmp_path / "catalog", CLIPSEARCH_DUPE_FEATURE_CACHE="false")
    assert "local features" not in output
    assert not features_path(settings.data_dir).exists()


# --- the container, on its own -------------------------------------------------------------------


def test_arrays_come_back_memory_mapped_and_a_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    arrays = {"x": np.arange(10, dtype=np.int64), "y": np.ones((3, 32), np.uint8), "empty": np.zeros(0, np.uint8)}
    write_arrays(path, {"kind": "test"}, arrays)
    header, back = read_arrays(path)
    assert header == {"kind": "test"}
    assert isinstance(back["x"], np.memmap) and np.array_equal(back["x"], arrays["x"])
    assert np.array_equal(back["y"], arrays["y"]) and back["empty"].shape == (0,)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CacheError, match="truncated"):
        read_arrays(path)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    write_arrays(path, {"kind": "test"}, arrays)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by a server running as another user


def test_merging_keeps_stored_images_byte_for_byte(tmp_path: Path, shared_data: Path) -> None:
    photos = copy_photos(tmp_path / "photos", 2)
    prepared: list[PreparedImage] = []
    for photo in photos:
        with Image.open(photo) as opened:
            prepared.append(prepare_catalog_image(opened.convert("RGB")))
    path = tmp_path / "features.bin"
    first = merge_features(path, FeatureStore.empty(), [], {"a": prepared[0]})
    both = merge_features(path, first, ["a"], {"b": prepared[1]})
    assert sorted(both.shas()) == ["a", "b"]
    row_a, row_b = first.row("a"), both.row("a")
    assert row_a is not None and row_b is not None
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(row_a, row_b, strict=True))
    only_b = merge_features(path, both, ["b"], {})
    assert only_b.shas() == ["b"] and only_b.get("a") is None


def test_a_running_server_takes_the_features_a_later_index_run_stored(
    indexed: tuple[Settings, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, photos = indexed
    folder = photos[0].parent
    served = settings.with_overrides(dupe_feature_candidates=3)
    for catalog in open_catalog(served, photos):
        catalog.dupes.start()
        assert catalog.dupes.features.wait(timeout=60) and len(catalog.dupes.features) == CATALOG
        with Image.open(photos[0]) as image:
            width, height = image.size
            image.crop((width // 10, height // 10, width * 9 // 10, height * 9 // 10)).save(folder / "copy.jpg")
        cli_index(settings, folder)  # prepares copy.jpg and stores it
        counter = PrepareCounter(monkeypatch)
        report = catalog.dupes.lookup_bytes(edited_copies(photos[0])["flip"])  # notices the new index
        assert catalog.dupes.features.wait(timeout=60) and len(catalog.dupes.features) == CATALOG + 1
        report = catalog.dupes.lookup_bytes(edited_copies(photos[0])["crop_70"])
        assert "copy.jpg" in [Path(m.path).name for m in report.matches]
        assert counter.calls == 0 and catalog.dupes.features.prepared_here == 0

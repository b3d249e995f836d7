"""Tags and flags at index time: stored per image, kept up to date incrementally, recomputed from stored vectors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.config import Settings
from app.encoder import Encoder
from app.errors import ConfigError
from app.store import Store, TagKind
from app.tagging import TaggingPlan, effective_thresholds
from app.vocab import parse_vocabulary, resolve_vocabulary
from indexer import Indexer
from tests.helpers import CALTECH_TAG_VOCABULARY, DATA, copy_caltech

FRUIT = "name: fruit\ntemplates: single\nthreshold: 0.0\nlabels: [apple, banana, cherry, grape]\n"
ANIMALS = "name: animals\ntemplates: single\nthreshold: 0.0\nlabels: [horse, zebra, giraffe, camel]\n"


def _settings(settings: Settings, tmp_path: Path, vocabulary: str, **overrides: object) -> Settings:
    path = tmp_path / f"{vocabulary.split()[1]}.yaml"
    path.write_text(vocabulary)
    values: dict[str, object] = {"tag_vocabulary": str(path), "tag_top_k": 3, "safe_search_vocabulary": "none"}
    return settings.with_overrides(**(values | overrides))


def _run(settings: Settings, store: Store, encoder: Encoder, folder: Path):  # type: ignore[no-untyped-def]
    return Indexer(settings, store, encoder, progress=False).run([folder])


def _tags(store: Store, path: Path) -> list[str]:
    return [t.label for t in store.tags_of(store.file_states()[str(path)].id) if t.kind == TagKind.TAG]


def test_images_are_tagged_once_and_new_or_edited_ones_on_the_next_run(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path], tmp_path: Path
) -> None:
    fruit = _settings(settings, tmp_path, FRUIT)
    folder = photos[0].parent
    first = _run(fruit, store, tiny_encoder, folder)
    assert (first.embedded, first.tagged) == (24, 24)
    assert "tagged 24" in first.lines()[1]
    for photo in photos:
        stored = [t for t in store.tags_of(store.file_states()[str(photo)].id)]
        assert len(stored) == 3 and {t.label for t in stored} <= {"apple", "banana", "cherry", "grape"}
        assert [t.score for t in stored] == sorted((t.score for t in stored), reverse=True)
    assert sum(store.label_counts(TagKind.TAG).values()) == 24 * 3

    again = _run(fruit, store, tiny_encoder, folder)
    assert (again.embedded, again.tagged, again.unchanged) == (0, 0, 24)
    assert "tagged" not in again.lines()[1]

    shutil.copy(next((DATA / "caltech101" / "Leopards").glob("*.jpg")), folder / "new.jpg")
    Image.open(photos[3]).convert("RGB").rotate(90, expand=True).save(photos[3], "JPEG")
    third = _run(fruit, store, tiny_encoder, folder)
    assert (third.added, third.updated, third.embedded, third.tagged) == (1, 1, 2, 2)
    assert len(_tags(store, folder / "new.jpg")) == 3


def test_changed_vocabulary_or_thresholds_retag_without_re_embedding(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path], tmp_path: Path
) -> None:
    folder = photos[0].parent
    _run(_settings(settings, tmp_path, FRUIT), store, tiny_encoder, folder)
    vectors_before = store.vector(store.file_states()[str(photos[0])].id)

    animals = _settings(settings, tmp_path, ANIMALS)
    summary = _run(animals, store, tiny_encoder, folder)
    assert (summary.embedded, summary.tagged, summary.unchanged) == (0, 24, 24)
    assert set(store.label_counts(TagKind.TAG)) <= {"horse", "zebra", "giraffe", "camel"}  # no fruit left
    np.testing.assert_array_equal(store.vector(store.file_states()[str(photos[0])].id), vectors_before)

    fewer = _run(animals.with_overrides(tag_top_k=1), store, tiny_encoder, folder)
    assert (fewer.embedded, fewer.tagged) == (0, 24)
    assert sum(store.label_counts(TagKind.TAG).values()) == 24
    none_pass = _run(animals.with_overrides(tag_top_k=1, tag_threshold=1.0), store, tiny_encoder, folder)
    assert (none_pass.embedded, none_pass.tagged) == (0, 24)
    assert store.label_counts(TagKind.TAG) == {}

    flags = animals.with_overrides(safe_search_vocabulary="safe-search", safe_search_thresholds={"weapons": 0.0})
    flagged = _run(flags, store, tiny_encoder, folder)
    assert (flagged.embedded, flagged.tagged) == (0, 24)
    assert store.label_counts(TagKind.FLAG) == {"weapons": 24} and len(store.flagged_ids()) == 24

    off = _run(
        animals.with_overrides(tag_vocabulary="none", safe_search_thresholds={}), store, tiny_encoder, folder
    )  # both vocabularies off ("none" from _settings for safe search)
    assert (off.embedded, off.tagged) == (0, 24)
    assert store.label_counts(TagKind.TAG) == {} == store.label_counts(TagKind.FLAG)
    assert _run(animals.with_overrides(tag_vocabulary="none"), store, tiny_encoder, folder).tagged == 0


def test_a_catalog_indexed_before_tags_existed_is_tagged_without_re_embedding(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path], tmp_path: Path
) -> None:
    from sqlalchemy import text

    fruit = _settings(settings, tmp_path, FRUIT)
    _run(fruit, store, tiny_encoder, photos[0].parent)
    with store.engine.begin() as conn:  # what a version 2 catalog looks like after the migration
        conn.execute(text("DELETE FROM image_tags"))
        conn.execute(text("UPDATE images SET tags_key = NULL"))
    summary = _run(fruit, store, tiny_encoder, photos[0].parent)
    assert (summary.embedded, summary.tagged) == (0, 24)
    assert sum(store.label_counts(TagKind.TAG).values()) == 24 * 3


def test_bad_tag_settings_fail_before_any_image_is_indexed(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("labels: [a, b\n")
    with pytest.raises(ConfigError, match=r"CLIPSEARCH_TAG_VOCABULARY.*broken.yaml.*not valid YAML"):
        Indexer(settings.with_overrides(tag_vocabulary=str(broken)), store, tiny_encoder)
    with pytest.raises(ConfigError, match="CLIPSEARCH_SAFE_SEARCH_THRESHOLDS names 'gunz'.*weapons"):
        Indexer(settings.with_overrides(safe_search_thresholds={"gunz": 0.5}), store, tiny_encoder)
    with pytest.raises(ConfigError, match="'imagenett' is neither a built-in vocabulary"):
        TaggingPlan.from_settings(settings.with_overrides(tag_vocabulary="imagenett"))
    assert store.counts()["indexed"] == 0


def test_effective_thresholds_apply_one_number_or_named_labels() -> None:
    vocabulary = parse_vocabulary({"threshold": 0.2, "labels": ["a", {"name": "b", "threshold": 0.7}]})
    assert effective_thresholds(vocabulary, None, "X") == (0.2, 0.7)
    assert effective_thresholds(vocabulary, 0.5, "X") == (0.5, 0.5)
    assert effective_thresholds(vocabulary, {"b": 0.1}, "X") == (0.2, 0.1)
    with pytest.raises(ConfigError, match="X names 'c'"):
        effective_thresholds(vocabulary, {"c": 0.1}, "X")


def test_the_key_changes_with_whatever_changes_the_stored_labels(settings: Settings, tiny_encoder: Encoder) -> None:
    base = settings.with_overrides(tag_vocabulary="none")
    key = TaggingPlan.from_settings(base).key(tiny_encoder)
    assert key == TaggingPlan.from_settings(base).key(tiny_encoder)
    changed = [
        base.with_overrides(safe_search_thresholds={"nudity": 0.9}),
        base.with_overrides(safe_search_vocabulary="none"),
    ]
    assert len({key, *(TaggingPlan.from_settings(s).key(tiny_encoder) for s in changed)}) == 3


def test_instrument_model_tags_caltech_photos_with_their_class_and_flags_none(
    tmp_path: Path, instrument_model_dir: Path, instrument_encoder: Encoder, shared_data: Path
) -> None:
    """With a trained model, a leopard photo gets the tag 'leopard'; the default safe-search flags leave
    ordinary photos alone."""
    files = copy_caltech(tmp_path / "caltech")
    vocabulary = tmp_path / "caltech.yaml"
    vocabulary.write_text(CALTECH_TAG_VOCABULARY)
    settings = Settings(
        data_dir=tmp_path / "data",
        model=f"local-dir:{instrument_model_dir}",
        device="cpu",
        tag_vocabulary=str(vocabulary),
    )
    store = Store(settings.effective_database_url)
    try:
        summary = _run(settings, store, instrument_encoder, tmp_path / "caltech")
        assert summary.tagged == len(files) == 18
        for path, expected in files.items():
            assert _tags(store, path)[:1] == [expected], path.name
        assert store.ids_with_tags(["leopard"]) == {
            store.file_states()[str(p)].id for p, t in files.items() if t == "leopard"
        }
        assert store.flagged_ids() == set()
    finally:
        store.close()


@pytest.mark.slow
def test_default_vocabularies_tag_with_imagenet_labels_and_cache_them(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path], tmp_path: Path
) -> None:
    """The built-in defaults end to end (ImageNet's ~80k prompts: minutes on a CPU, once per model)."""
    defaults = settings.with_overrides(tag_vocabulary="imagenet", tag_threshold=0.0)
    assert defaults.safe_search_vocabulary == "safe-search"
    folder = tmp_path / "three"
    folder.mkdir()
    for photo in photos[:3]:
        shutil.copy2(photo, folder / photo.name)
    assert _run(defaults, store, tiny_encoder, folder).tagged == 3
    names = set(resolve_vocabulary("imagenet").label_names())
    for photo in photos[:3]:
        labels = _tags(store, folder / photo.name)
        assert len(labels) == 5 and set(labels) <= names
    cached = sorted(p.name.split("-")[0] for p in (defaults.data_dir / "classifiers").glob("*.json"))
    assert cached == ["imagenet", "safe"]  # class embeddings kept beside the index
    # another threshold: re-tagged from the cache, without encoding 80k prompts again
    again = _run(defaults.with_overrides(tag_threshold=0.001), store, tiny_encoder, folder)
    assert (again.embedded, again.tagged) == (0, 3) and again.tag_seconds < 30

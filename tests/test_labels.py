"""Tags and flags for search pages: the in-memory snapshot answers as the database does, and never serves
labels the store no longer holds."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert

import app.labels
from app.labels import CandidateLabels, Labels, LabelTable
from app.store import ImageLabels, ImageRow, Store, StoredTag, TagKind, utcnow

TAGS = ["dog", "cat", "beach", "car", "tree", "snow", "boat"]


def add_images(store: Store, count: int) -> None:
    now = utcnow()
    rows = [
        {"id": i, "path": f"/p/{i}.jpg", "sha256": f"{i:064x}", "size": 1, "mtime": 1.0, "width": 1, "height": 1,
         "format": "JPEG", "status": "indexed", "model": "m", "created_at": now, "updated_at": now}
        for i in range(1, count + 1)
    ]  # fmt: skip
    with store.engine.begin() as conn:
        conn.execute(insert(ImageRow), rows)


def random_labels(rng: np.random.Generator, ids: range) -> dict[int, list[StoredTag]]:
    """Some images with no label at all, some with flags only, most with 1-4 tags."""
    labels: dict[int, list[StoredTag]] = {}
    for i in ids:
        tags = [StoredTag(TagKind.TAG.value, t, 0.5) for t in rng.choice(TAGS, rng.integers(0, 5), replace=False)]
        if rng.random() < 0.2:
            tags.append(StoredTag(TagKind.FLAG.value, str(rng.choice(["nudity", "violence"])), 0.9))
        labels[i] = tags
    return labels


def naive_accepts(item: ImageLabels, tags: tuple[str, ...], safe: bool) -> bool:
    return not (safe and item.flagged) and all(t in item.tags for t in tags)


def naive_facets(items: list[ImageLabels], limit: int) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for item in items:
        for tag in item.tags:
            counts[tag] = counts.get(tag, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]


def test_filters_and_facets_over_candidates() -> None:
    dog, both, flagged = (
        ImageLabels(frozenset({"dog"})),
        ImageLabels(frozenset({"dog", "beach"})),
        ImageLabels(frozenset({"dog"}), flagged=True),
    )
    ids = np.array([1, 2, 3, 4], dtype=np.int64)  # 4 has no labels
    view = CandidateLabels.from_mapping(ids, {1: dog, 2: both, 3: flagged})
    assert view.accepts(("dog",), False).tolist() == [True, True, True, False]
    assert view.accepts(("dog", "beach"), False).tolist() == [False, True, False, False]
    assert view.accepts((), True).tolist() == [True, True, False, True]
    assert view.accepts(("unknown",), False).tolist() == [False] * 4
    assert view.facets([1, 2, 3, 4], 10) == [("dog", 3), ("beach", 1)]
    assert view.facets([1, 2], 1) == [("dog", 2)] and view.facets([1], 0) == [] and view.facets([4], 5) == []


@pytest.mark.parametrize("dense", [True, False], ids=["id-array", "binary-search"])
@pytest.mark.parametrize("any_store_url", ["sqlite", "postgresql"], indirect=True)
def test_the_snapshot_answers_as_the_database_and_a_plain_loop(
    any_store_url: str, dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not dense:  # as if the ids were too sparse for a look-up array
        monkeypatch.setattr(app.labels, "DENSE_IDS_FACTOR", 0)
        monkeypatch.setattr(app.labels, "DENSE_IDS_SLACK", 0)
    rng = np.random.default_rng(7)
    store = Store(any_store_url)
    try:
        add_images(store, 400)
        labels = random_labels(rng, range(1, 351))  # 351..400: never labelled
        store.save_tags(labels, key="k")
        table = LabelTable.load(store)
        assert table.generation == store.tags_generation()
        assert (table.position is not None) == dense
        for _ in range(20):
            # candidates in score order (not sorted by id), some unlabelled, some beyond every stored id
            cand = rng.choice(np.arange(1, 420), size=int(rng.integers(1, 300)), replace=False).astype(np.int64)
            db = store.labels_of_many(cand.tolist())
            items = [db.get(i, ImageLabels()) for i in cand.tolist()]
            snap, from_db = table.labels_of(cand), CandidateLabels.from_mapping(cand, db)
            for tags in [(), ("dog",), ("dog", "beach"), ("snow", "boat", "tree"), ("nothing",)]:
                for safe in (False, True):
                    expected = [naive_accepts(item, tags, safe) for item in items]
                    assert snap.accepts(tags, safe).tolist() == expected
                    assert from_db.accepts(tags, safe).tolist() == expected
            some = [i for i in cand.tolist() if rng.random() < 0.7]
            expected_facets = naive_facets([db.get(i, ImageLabels()) for i in some], 5)
            assert snap.facets(some, 5) == expected_facets == from_db.facets(some, 5)
            every = cand[::-1].tolist()  # all of them, in another order
            assert snap.facets(every, 5) == naive_facets(items, 5) == from_db.facets(every, 5)
    finally:
        store.close()


def wait_for_table(labels: Labels, generation: str, seconds: float = 10.0) -> LabelTable:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        labels.of(np.array([1], dtype=np.int64))
        table = labels.table
        if table is not None and table.generation == generation:
            return table
        time.sleep(0.01)
    raise AssertionError("no label snapshot was built")


def test_a_change_of_labels_is_served_at_once_and_the_snapshot_rebuilt_when_writes_settle(store: Store) -> None:
    add_images(store, 10)
    store.save_tags({1: [StoredTag(TagKind.TAG.value, "dog", 0.5)], 2: [StoredTag(TagKind.TAG.value, "cat", 0.5)]}, "k")
    labels = Labels(store, check_seconds=0.0, capacity=100, settle_seconds=0.5)
    labels.start()
    first = wait_for_table(labels, store.tags_generation())
    ids = np.array([1, 2, 3], dtype=np.int64)
    assert labels.of(ids).accepts(("dog",), False).tolist() == [True, False, False]

    # a retag: the next page reads the database (no stale 'dog'), and the old snapshot is gone
    store.save_tags({1: [StoredTag(TagKind.TAG.value, "cat", 0.5)], 3: [StoredTag(TagKind.FLAG.value, "x", 0.9)]}, "k")
    view = labels.of(ids)
    assert view.accepts(("dog",), False).tolist() == [False, False, False]
    assert view.accepts(("cat",), True).tolist() == [True, True, False]
    assert labels.table is None
    # not rebuilt before the writes have settled...
    assert not labels.building
    # ...and then rebuilt for the new generation, answering the same
    second = wait_for_table(labels, store.tags_generation())
    assert second is not first
    assert labels.of(ids).accepts(("cat",), True).tolist() == [True, True, False]
    assert labels.of(ids).facets([1, 2, 3], 5) == [("cat", 2)]


def test_a_failed_build_keeps_the_database_path_and_is_retried_after_the_settling_time(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_images(store, 3)
    store.save_tags({1: [StoredTag(TagKind.TAG.value, "dog", 0.5)]}, "k")
    calls: list[float] = []

    def broken(self: Store) -> object:
        calls.append(time.monotonic())
        raise RuntimeError("the database went away")

    monkeypatch.setattr(Store, "label_columns", broken)
    labels = Labels(store, check_seconds=0.0, capacity=10, settle_seconds=0.3)
    ids = np.array([1, 2], dtype=np.int64)
    assert labels.of(ids).accepts(("dog",), False).tolist() == [True, False]  # served from the database
    wait_until_idle(labels)
    for _ in range(5):  # checks right after the failure start no new build
        labels.of(ids)
    wait_until_idle(labels)
    assert len(calls) == 1 and labels.table is None
    time.sleep(0.35)
    labels.of(ids)
    wait_until_idle(labels)
    assert len(calls) == 2


def wait_until_idle(labels: Labels, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while labels.building and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not labels.building


def same_table(a: LabelTable, b: LabelTable) -> bool:
    x, y = a.every, b.every
    arrays = all(np.array_equal(getattr(x, k), getattr(y, k)) for k in ("ids", "offsets", "codes", "flagged"))
    positions = (a.position is None and b.position is None) or (
        a.position is not None and b.position is not None and np.array_equal(a.position, b.position)
    )
    return arrays and positions and list(x.names) == list(y.names) and a.generation == b.generation


def test_a_saved_snapshot_is_read_back_by_the_next_start_and_never_for_other_labels(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "labels"
    add_images(store, 60)
    store.save_tags(random_labels(np.random.default_rng(3), range(1, 51)), "k")
    generation = store.tags_generation()
    first = Labels(store, check_seconds=0.0, capacity=10, saved_in=folder)
    first.start()
    built = wait_for_table(first, generation)
    assert [p.name for p in folder.iterdir()] == [f"labels-{generation}.npz"]

    # the next start reads the file, not the database, and answers the same
    reads: list[int] = []
    real = Store.label_columns

    def counted(self: Store) -> tuple[str, list[tuple[str, np.ndarray]], np.ndarray]:
        reads.append(1)
        return real(self)

    monkeypatch.setattr(Store, "label_columns", counted)
    with caplog.at_level(logging.INFO, logger="app.labels"):
        second = Labels(store, check_seconds=0.0, capacity=10, saved_in=folder)
        second.start()
        read = wait_for_table(second, generation)
    assert reads == [] and same_table(read, built) and "read from its saved copy" in caplog.text
    ids = np.arange(1, 61, dtype=np.int64)
    assert read.labels_of(ids).facets(ids.tolist(), 7) == built.labels_of(ids).facets(ids.tolist(), 7)

    # new labels: a new generation, built from the database; the old file is replaced
    store.save_tags({1: [StoredTag(TagKind.TAG.value, "zebra", 0.5)]}, "k")
    third = Labels(store, check_seconds=0.0, capacity=10, saved_in=folder)
    third.start()
    table = wait_for_table(third, store.tags_generation())
    assert reads == [1] and table.labels_of(np.array([1])).facets([1], 5) == [("zebra", 1)]
    assert [p.name for p in folder.iterdir()] == [f"labels-{store.tags_generation()}.npz"]

    # a temp file a stopped process left behind goes once it is old, not while another process may be writing it
    old, fresh = folder / ".labels-x.npz.1.2.tmp", folder / ".labels-y.npz.3.4.tmp"
    old.write_bytes(b"half"), fresh.write_bytes(b"half")
    an_hour_ago = time.time() - app.labels.STALE_TEMP_SECONDS - 60
    os.utime(old, (an_hour_ago, an_hour_ago))
    table.save(folder)
    assert not old.exists() and fresh.exists()


def test_a_damaged_saved_snapshot_is_built_again_from_the_database(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "labels"
    add_images(store, 5)
    store.save_tags({2: [StoredTag(TagKind.TAG.value, "dog", 0.5)]}, "k")
    generation = store.tags_generation()
    first = Labels(store, check_seconds=0.0, capacity=10, saved_in=folder)
    first.start()
    good = wait_for_table(first, generation)
    path = LabelTable.path_in(folder, generation)
    every = good.every
    # a file that does not agree with itself (its offsets run past its codes), then one that is not a zip at all
    for damage in ("inconsistent", "truncated"):
        if damage == "inconsistent":
            np.savez(path, format=np.array(app.labels.SNAPSHOT_FORMAT), generation=np.array(generation), ids=every.ids,
                     offsets=every.offsets + 1, codes=every.codes, flagged=every.flagged,
                     names=np.array(list(every.names)))  # fmt: skip
        else:
            path.write_bytes(b"PK\x03\x04 not a whole file")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="app.labels"):
            labels = Labels(store, check_seconds=0.0, capacity=10, saved_in=folder)
            labels.start()
            table = wait_for_table(labels, generation)
        assert "the saved label table cannot be used" in caplog.text and same_table(table, good)
        assert LabelTable.read(folder, generation) is not None  # written again, whole


def test_a_folder_that_cannot_be_written_leaves_the_snapshot_in_memory(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    add_images(store, 3)
    store.save_tags({1: [StoredTag(TagKind.TAG.value, "dog", 0.5)]}, "k")
    with caplog.at_level(logging.WARNING, logger="app.labels"):
        labels = Labels(store, check_seconds=0.0, capacity=10, saved_in=blocked / "labels")
        labels.start()
        table = wait_for_table(labels, store.tags_generation())
        wait_until_idle(labels)
    assert table.labels_of(np.array([1])).facets([1], 5) == [("dog", 1)]
    assert "could not save the label table" in caplog.text

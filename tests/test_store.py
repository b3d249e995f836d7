"""The metadata store on SQLite and PostgreSQL: rows, vectors, statuses, schema version."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from sqlalchemy import select, update

from app.errors import NotFound, StoreError
from app.store import HASH_FIELDS, SCHEMA_VERSION, ImageResult, ImageRow, ImageStatus, Store, hash_to_db


def _result(path: str, sha: str, vector: np.ndarray | None, status: ImageStatus = ImageStatus.INDEXED) -> ImageResult:
    return ImageResult(
        path=path,
        size=123,
        mtime=1700000000.25,
        sha256=sha,
        status=status,
        width=640 if vector is not None else None,
        height=480 if vector is not None else None,
        format="JPEG" if vector is not None else None,
        error=None if vector is not None else "corrupt image data",
        vector=vector,
    )


def test_rows_and_vectors_round_trip(any_store_url: str) -> None:
    store = Store(any_store_url)
    try:
        v = np.linspace(-1, 1, 16, dtype=np.float32)
        ids = store.save_results(
            [_result("/p/a.jpg", "a" * 64, v), _result("/p/b.jpg", "b" * 64, None, ImageStatus.FAILED)], "m1"
        )
        assert store.schema_version() == SCHEMA_VERSION
        np.testing.assert_array_equal(store.vector(ids["/p/a.jpg"]), v)
        record = store.get(ids["/p/a.jpg"])
        assert (record.path, record.width, record.height, record.format) == ("/p/a.jpg", 640, 480, "JPEG")
        states = store.file_states()
        assert states["/p/a.jpg"].mtime == 1700000000.25 and states["/p/b.jpg"].status == "failed"
        assert store.counts() == {"indexed": 1, "failed": 1, "deleted": 0}
        assert store.failures() == [("/p/b.jpg", "corrupt image data")]
        assert store.count_indexed("m1") == 1 and store.count_indexed("m2") == 0
        # what a LazyEncoder learns of its model's dimension without the model (bytes of a stored float32 vector)
        assert store.vector_dim("m1") == 16 and store.vector_dim("m2") is None
        store.save_results([_result("/p/c.jpg", "c" * 64, np.ones(512, dtype=np.float32))], "m2")
        assert store.vector_dim("m2") == 512 and store.vector_dim("m1") == 16
    finally:
        store.close()


def test_saving_a_path_again_updates_the_same_row(any_store_url: str) -> None:
    store = Store(any_store_url)
    try:
        first = store.save_results([_result("/p/a.jpg", "a" * 64, np.ones(4, np.float32))], "m")
        second = store.save_results([_result("/p/a.jpg", "c" * 64, np.zeros(4, np.float32))], "m")
        assert first == second
        assert store.counts()["indexed"] == 1
        np.testing.assert_array_equal(store.vector(first["/p/a.jpg"]), np.zeros(4))
    finally:
        store.close()


def test_records_of_many_ids_in_any_number_and_order(any_store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.store as store_module

    store = Store(any_store_url)
    try:
        results = [_result(f"/p/{n}.jpg", f"{n:064x}", np.ones(4, np.float32) if n % 3 else None) for n in range(30)]
        results = [replace(r, size=1000 + n, mtime=float(n)) for n, r in enumerate(results)]
        ids = store.save_results(results, "m")
        expected = {
            ids[r.path]: (r.path, r.width, r.height, r.format, r.size, r.mtime, r.status.value, r.error, r.sha256)
            for r in results
        }
        unknown = max(ids.values()) + 7
        every = list(expected)
        for wanted in (every[:1], every[::-1], every[5:25:2] + [unknown], every[3:9] * 2, [unknown]):
            found = store.get_many(wanted)
            assert set(found) == set(wanted) - {unknown}
            for image_id, record in found.items():
                assert record.id == image_id
                assert (record.path, record.width, record.height, record.format, record.size, record.mtime,
                        record.status, record.error, record.sha256) == expected[image_id]  # fmt: skip
        assert store.get_many([]) == {}
        # more ids than one statement takes: read in chunks, the same records
        whole = store.get_many(every[::-1] + [unknown])
        monkeypatch.setattr(store_module, "GET_MANY_CHUNK", 4)
        assert store.get_many(every[::-1] + [unknown]) == whole and set(whole) == set(every)
    finally:
        store.close()


def test_a_hash_back_fill_keeps_the_vector_and_a_failure_clears_it(any_store_url: str) -> None:
    store = Store(any_store_url)

    def row(path: str) -> tuple:  # type: ignore[type-arg]
        columns = (ImageRow.embedding, ImageRow.model, ImageRow.tags_key, ImageRow.status, ImageRow.error)
        with store.engine.connect() as conn:
            found = conn.execute(
                select(*columns, *(getattr(ImageRow, k) for k in HASH_FIELDS)).where(ImageRow.path == path)
            )
            return tuple(found.one())

    hashes = {key: (1 << 63) + n for n, key in enumerate(HASH_FIELDS)}  # unsigned values above the signed range
    try:
        v = np.arange(4, dtype=np.float32)
        first = store.save_results([replace(_result("/p/a.jpg", "a" * 64, v), hashes=hashes)], "m")
        with store.engine.begin() as conn:
            conn.execute(update(ImageRow).values(tags_key="k"))
        embedding, model, tags_key, status, error, *stored = row("/p/a.jpg")
        assert (model, tags_key, status, error) == ("m", "k", "indexed", None) and embedding is not None
        assert stored == [hash_to_db(hashes[k]) for k in HASH_FIELDS]

        # one call, one known path (hashes only, no vector) and one new path
        back_fill = replace(
            _result("/p/a.jpg", "a" * 64, None, ImageStatus.INDEXED), error=None, hashes=dict.fromkeys(HASH_FIELDS, 5)
        )
        both = store.save_results([back_fill, _result("/p/b.jpg", "b" * 64, v)], "m")
        assert both["/p/a.jpg"] == first["/p/a.jpg"] and both["/p/b.jpg"] not in first.values()
        assert row("/p/a.jpg") == (embedding, "m", "k", "indexed", None, 5, 5, 5, 5)  # the vector and its tags stay
        np.testing.assert_array_equal(store.vector(both["/p/b.jpg"]), v)

        store.save_results([_result("/p/a.jpg", "a" * 64, None, ImageStatus.FAILED)], "m")
        assert row("/p/a.jpg") == (None, None, None, "failed", "corrupt image data", None, None, None, None)
    finally:
        store.close()


def test_reuse_by_content_finds_deleted_rows_but_only_for_the_same_model(any_store_url: str) -> None:
    store = Store(any_store_url)
    try:
        ids = store.save_results([_result("/p/old.jpg", "f" * 64, np.full(4, 0.5, np.float32))], "m")
        store.mark_deleted(ids.values())
        assert store.embedded_shas("m") == {"f" * 64}
        found = store.reusable_by_sha(["f" * 64, "0" * 64], "m")
        assert set(found) == {"f" * 64} and found["f" * 64].width == 640
        assert store.reusable_by_sha(["f" * 64], "other-model") == {}
        assert store.counts()["deleted"] == 1 and store.count_indexed("m") == 0
    finally:
        store.close()


def test_iter_vectors_pages_through_indexed_rows_only(any_store_url: str) -> None:
    store = Store(any_store_url)
    try:
        rng = np.random.default_rng(0)
        results = [_result(f"/p/{i}.jpg", f"{i:064d}", rng.random(8).astype(np.float32)) for i in range(25)]
        ids = store.save_results(results, "m")
        store.mark_deleted([ids["/p/3.jpg"]])
        chunks = list(store.iter_vectors("m", chunk=10))
        assert [len(c[0]) for c in chunks] == [10, 10, 4]
        all_ids = np.concatenate([c[0] for c in chunks])
        assert ids["/p/3.jpg"] not in all_ids and len(set(all_ids)) == 24
        # a stride sample is chosen by the database: every 4th id, still only indexed rows, with their vectors
        sampled = list(store.iter_vectors("m", chunk=3, stride=4))
        sample_ids = np.concatenate([c[0] for c in sampled])
        expected = sorted(i for i in all_ids if i % 4 == 0)
        assert sorted(sample_ids) == expected and len(expected) == 5  # 4 of ids 1..25 is deleted
        by_id = dict(zip(all_ids.tolist(), np.concatenate([c[1] for c in chunks]), strict=True))
        for chunk_ids, vectors in sampled:
            for i, v in zip(chunk_ids, vectors, strict=True):
                np.testing.assert_array_equal(v, by_id[int(i)])
    finally:
        store.close()


def test_unknown_id_is_not_found(any_store_url: str) -> None:
    store = Store(any_store_url)
    try:
        with pytest.raises(NotFound):
            store.get(424242)
        with pytest.raises(NotFound):
            store.vector(424242)
    finally:
        store.close()


def test_newer_schema_is_refused(any_store_url: str) -> None:
    from sqlalchemy import text

    store = Store(any_store_url)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE clipsearch_meta SET value = '999' WHERE key = 'schema_version'"))
    store.close()
    with pytest.raises(StoreError, match="upgrade clipsearch"):
        Store(any_store_url)


def test_unreachable_database_gives_a_clear_error() -> None:
    with pytest.raises(StoreError, match="cannot open the metadata store"):
        Store("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")


def test_version_1_database_is_migrated_in_place(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine, text

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:  # the version 1 schema, as the first release wrote it
        conn.execute(
            text(
                "CREATE TABLE images (id INTEGER PRIMARY KEY, path VARCHAR(4096) UNIQUE, sha256 VARCHAR(64), "
                "size BIGINT, mtime FLOAT, width INTEGER, height INTEGER, format VARCHAR(16), status VARCHAR(16), "
                "error TEXT, model VARCHAR(1024), embedding BLOB, created_at DATETIME, updated_at DATETIME)"
            )
        )
        conn.execute(text("CREATE TABLE clipsearch_meta (key VARCHAR(64) PRIMARY KEY, value TEXT)"))
        conn.execute(text("INSERT INTO clipsearch_meta VALUES ('schema_version', '1')"))
        conn.execute(
            text(
                "INSERT INTO images (path, sha256, size, mtime, status, model, embedding) "
                "VALUES ('/old.jpg', 'ab', 1, 2.0, 'indexed', 'm', :e)"
            ),
            {"e": np.ones(4, dtype="<f4").tobytes()},
        )
    engine.dispose()
    store = Store(url)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        state = store.file_states()["/old.jpg"]
        assert state.status == "indexed" and not state.has_hashes
        np.testing.assert_array_equal(store.vector(state.id), np.ones(4))
    finally:
        store.close()


def test_tags_and_flags_round_trip_and_are_replaced_as_a_whole(any_store_url: str) -> None:
    from app.store import StoredTag, TagKind

    store = Store(any_store_url)
    try:
        ids = store.save_results(
            [_result(f"/p/{n}.jpg", n * 64, np.ones(4, np.float32)) for n in "abc"]
            + [_result("/p/gone.jpg", "d" * 64, np.ones(4, np.float32))],
            "m",
        )
        a, b, c, gone = (ids[f"/p/{n}.jpg"] for n in ("a", "b", "c", "gone"))
        assert store.ids_to_tag("m", "k1") == sorted(ids.values())
        generation = store.tags_generation()
        dog, beach, nudity = (
            StoredTag("tag", "dog", 0.9),
            StoredTag("tag", "beach", 0.4),
            StoredTag("flag", "nudity", 0.8),
        )
        store.save_tags({a: [beach, dog], b: [dog, nudity], c: [], gone: [dog]}, "k1")
        assert store.tags_generation() != generation
        store.mark_deleted([gone])
        assert store.ids_to_tag("m", "k1") == [] and store.ids_to_tag("m", "k2") == [a, b, c]
        assert store.ids_to_tag("m", None) == [a, b, c]
        assert store.tags_of(a) == [dog, beach]  # tags first, best first
        assert store.tags_of(b) == [dog, nudity]
        assert store.label_counts(TagKind.TAG) == {"dog": 2, "beach": 1}  # the deleted image is not counted
        assert store.label_counts(TagKind.TAG, model="other") == {}
        assert store.label_counts(TagKind.FLAG) == {"nudity": 1}
        assert store.ids_with_tags(["dog"]) == {a, b} and store.ids_with_tags(["dog", "beach"]) == {a}
        assert store.flagged_ids() == {b}
        labels = store.labels_of_many([a, b, c])
        assert labels[a].tags == {"dog", "beach"} and not labels[a].flagged and labels[b].flagged and c not in labels
        store.save_tags({a: [StoredTag("tag", "cat", 0.5)]}, "k2")
        assert store.tags_of(a) == [StoredTag("tag", "cat", 0.5)]
        # a new vector means new tags are due
        store.save_results([_result("/p/b.jpg", "e" * 64, np.zeros(4, np.float32))], "m")
        assert store.ids_to_tag("m", "k1") == [a, b]
    finally:
        store.close()


def test_version_2_database_gains_tags_in_place(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine, inspect, text

    url = f"sqlite:///{tmp_path / 'v2.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:  # the version 2 schema: version 1 plus the perceptual hashes
        conn.execute(
            text(
                "CREATE TABLE images (id INTEGER PRIMARY KEY, path VARCHAR(4096) UNIQUE, sha256 VARCHAR(64), "
                "size BIGINT, mtime FLOAT, width INTEGER, height INTEGER, format VARCHAR(16), status VARCHAR(16), "
                "error TEXT, model VARCHAR(1024), embedding BLOB, phash BIGINT, dhash BIGINT, phash_mirror BIGINT, "
                "dhash_mirror BIGINT, created_at DATETIME, updated_at DATETIME)"
            )
        )
        conn.execute(text("CREATE TABLE clipsearch_meta (key VARCHAR(64) PRIMARY KEY, value TEXT)"))
        conn.execute(text("INSERT INTO clipsearch_meta VALUES ('schema_version', '2')"))
        conn.execute(
            text(
                "INSERT INTO images (path, size, mtime, status, model, embedding) "
                "VALUES ('/old.jpg', 1, 2.0, 'indexed', 'm', :e)"
            ),
            {"e": np.ones(4, dtype="<f4").tobytes()},
        )
    engine.dispose()
    store = Store(url)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        assert "image_tags" in inspect(store.engine).get_table_names()
        assert store.ids_to_tag("m", "any") == [1]  # untagged: the next index run tags it from its vector
    finally:
        store.close()


def test_a_version_3_database_gains_the_indexes_that_count_indexed_images_and_read_hashes(any_store_url: str) -> None:
    """And (version 6) the one that finds the images whose tags are stale."""
    from sqlalchemy import inspect, text

    store = Store(any_store_url)
    try:
        v = np.ones(4, np.float32)
        results = [_result(f"/p/{n}.jpg", n * 64, v) for n in "abc"]
        results.append(_result("/p/bad.jpg", "d" * 64, None, ImageStatus.FAILED))
        store.save_results(results, "m1")
        store.save_results([_result("/p/other.jpg", "e" * 64, v)], "m2")
        store.save_tags({store.file_states()["/p/b.jpg"].id: []}, "k1")
        # the database as version 3 left it: no index on (status, model), (status, id, hashes) or (..., tags_key)
        with store.engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_images_status_model"))
            conn.execute(text("DROP INDEX ix_images_status_hashes"))
            conn.execute(text("DROP INDEX ix_images_status_model_tags"))
            conn.execute(text("UPDATE clipsearch_meta SET value = '3' WHERE key = 'schema_version'"))
    finally:
        store.close()
    store = Store(any_store_url)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 6
        indexes = {ix["name"]: ix["column_names"] for ix in inspect(store.engine).get_indexes("images")}
        assert indexes["ix_images_status_model"] == ["status", "model"]
        assert indexes["ix_images_status_hashes"] == ["status", "id", *HASH_FIELDS]
        assert indexes["ix_images_status_model_tags"] == ["status", "model", "tags_key", "id"]
        ids = store.file_states()
        # untagged or tagged under another key; a failed image (no vector) and the other model's are not asked for
        assert store.ids_to_tag("m1", "k1") == sorted([ids["/p/a.jpg"].id, ids["/p/c.jpg"].id])
        assert store.ids_to_tag("m1", "k2") == sorted(ids[f"/p/{n}.jpg"].id for n in "abc")
        assert store.ids_to_tag("m1", None) == store.ids_to_tag("m1", "k2") and store.ids_to_tag("m3", None) == []
        # a failure clears the model with the vector: neither it nor the other model's image is counted
        assert store.count_indexed("m1") == 3 and store.count_indexed("m2") == 1 and store.count_indexed("m3") == 0
        store.mark_deleted([store.file_states()["/p/a.jpg"].id])
        assert store.count_indexed("m1") == 2
    finally:
        store.close()


def test_counting_images_and_reading_hashes_read_only_their_indexes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    store = Store(f"sqlite:///{tmp_path / 'plan.db'}")
    try:
        store.save_results([_result("/p/a.jpg", "a" * 64, np.ones(4, np.float32))], "m1")

        def plan(stmt: object) -> str:
            sql = stmt.compile(store.engine, compile_kwargs={"literal_binds": True})  # type: ignore[attr-defined]
            with store.engine.connect() as conn:
                return " ".join(str(row[-1]) for row in conn.execute(text(f"EXPLAIN QUERY PLAN {sql}")))

        # the images' rows (each with its vector) are not read: 0.1 s instead of 1.5-3 s at 1M images, and 0.08 s
        # instead of 2.7-5 s for the hashes
        counting, hashes = plan(store.count_indexed_statement("m1")), plan(store.hashes_statement(0, 100))
        assert "COVERING INDEX ix_images_status_model" in counting, counting
        stale = plan(store.ids_to_tag_statement("m1", "k1"))  # 1.2 s at 1M images reading every row
        assert "COVERING INDEX ix_images_status_model_tags" in stale, stale
        assert "COVERING INDEX ix_images_status_hashes" in hashes and "TEMP B-TREE" not in hashes, hashes
    finally:
        store.close()


def test_file_states_tell_each_path_what_incremental_indexing_compares(any_store_url: str) -> None:
    from app.store import HASH_FIELDS as FIELDS

    store = Store(any_store_url)
    try:
        hashed = replace(_result("/p/a.jpg", "a" * 64, np.ones(4, np.float32)), hashes=dict.fromkeys(FIELDS, 1 << 63))
        plain = _result("/p/b.jpg", "b" * 64, np.ones(4, np.float32))
        ids = store.save_results([hashed, plain, _result("/p/bad.jpg", "c" * 64, None, ImageStatus.FAILED)], "m")
        states = store.file_states()
        assert set(states) == {"/p/a.jpg", "/p/b.jpg", "/p/bad.jpg"}
        a, b, bad = states["/p/a.jpg"], states["/p/b.jpg"], states["/p/bad.jpg"]
        assert (a.id, a.path, a.sha256, a.status, a.model, a.has_hashes) == (
            ids["/p/a.jpg"],
            "/p/a.jpg",
            "a" * 64,
            ImageStatus.INDEXED,
            "m",
            True,
        )
        assert (a.size, a.mtime) == (hashed.size, hashed.mtime)
        assert b.has_hashes is False and bad.status == ImageStatus.FAILED and bad.model is None
    finally:
        store.close()


def test_hashes_are_read_in_chunks_in_id_order(any_store_url: str) -> None:
    from app.store import HASH_FIELDS as FIELDS

    store = Store(any_store_url)
    try:
        results = []
        for n in range(7):
            item = _result(f"/p/{n}.jpg", f"{n:064x}", np.ones(4, np.float32))
            hashes = None if n == 3 else {k: (n + 1) * 1000 + i + (1 << 63) for i, k in enumerate(FIELDS)}
            results.append(replace(item, hashes=hashes))
        results.append(_result("/p/bad.jpg", "f" * 64, None, ImageStatus.FAILED))
        ids = store.save_results(results, "m")
        read = list(store.iter_hashes(chunk=2))
        expected = [ids[f"/p/{n}.jpg"] for n in range(7) if n != 3]
        assert [image_id for image_id, _ in read] == sorted(expected)
        first = dict(read)[ids["/p/0.jpg"]]
        assert first == {k: 1000 + i + (1 << 63) for i, k in enumerate(FIELDS)}  # unsigned, as written
        # as arrays (a server's hash index): the same ids and unsigned values
        array_ids, array_hashes = store.hash_arrays(chunk=4)
        assert array_ids.tolist() == [image_id for image_id, _ in read]
        assert array_hashes.tolist() == [[h[k] for k in FIELDS] for _, h in read]
        # the duplicate look-up's catalog: the same images, with what its feature cache knows each one by
        keys = list(store.iter_catalog_keys(chunk=3))
        assert [row[0] for row in keys] == sorted(expected)
        record = store.get(ids["/p/5.jpg"])
        assert record is not None
        assert dict((row[0], row[1:]) for row in keys)[record.id] == (
            record.sha256,
            record.path,
            record.size,
            record.mtime,
        )
    finally:
        store.close()

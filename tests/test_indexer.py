"""Incremental indexing of a temp copy of real photos: what a user sees across runs."""

from __future__ import annotations

import io
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.config import Settings
from app.encoder import Encoder
from app.index import VectorIndex, read_manifest
from app.store import ImageStatus, Store
from indexer import Indexer


def _indexer(settings: Settings, store: Store, encoder: Encoder) -> Indexer:
    return Indexer(settings, store, encoder, progress=False)


def _index_ids(settings: Settings, encoder: Encoder) -> set[int]:
    index, _ = VectorIndex.load(settings.index_dir, model=encoder.spec.name, pretrained=encoder.spec.pretrained)
    _, ids = index.search(np.eye(encoder.dim, dtype=np.float32)[0], 10_000)
    return {int(i) for i in ids[0] if i >= 0}


def _id_of(store: Store, path: Path) -> int:
    return store.file_states()[str(path)].id


def test_first_run_indexes_all_and_second_run_embeds_nothing(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _indexer(settings, store, tiny_encoder).run([photos[0].parent])
    assert (first.added, first.embedded, first.failed, first.unchanged) == (24, 24, 0, 0)
    assert first.index_count == 24 and read_manifest(settings.index_dir).count == 24
    manifest_before = read_manifest(settings.index_dir)

    def not_needed(model: str) -> set[str]:
        raise AssertionError("nothing is read: no content to reuse")

    monkeypatch.setattr(store, "embedded_shas", not_needed)
    second = _indexer(settings, store, tiny_encoder).run([photos[0].parent])
    assert (second.embedded, second.added, second.updated, second.unchanged) == (0, 0, 0, 24)
    assert read_manifest(settings.index_dir) == manifest_before  # nothing rewritten


def test_edited_file_is_re_embedded_in_place(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path]
) -> None:
    _indexer(settings, store, tiny_encoder).run([photos[0].parent])
    target = photos[5]
    row_id, old = _id_of(store, target), store.vector(_id_of(store, target))
    Image.open(target).convert("RGB").rotate(180).save(target, "JPEG", quality=90)
    summary = _indexer(settings, store, tiny_encoder).run([photos[0].parent])
    assert (summary.updated, summary.embedded, summary.unchanged) == (1, 1, 23)
    assert _id_of(store, target) == row_id
    assert not np.allclose(store.vector(row_id), old)
    assert len(_index_ids(settings, tiny_encoder)) == 24


def test_renamed_file_reuses_its_vector_without_model_time(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path]
) -> None:
    _indexer(settings, store, tiny_encoder).run([photos[0].parent])
    old_id = _id_of(store, photos[2])
    vector = store.vector(old_id)
    renamed = photos[2].with_name("renamed.jpg")
    photos[2].rename(renamed)
    copy = photos[0].parent / "sub" / "copy-of-3.jpg"
    copy.parent.mkdir()
    shutil.copy(photos[3], copy)
    summary = _indexer(settings, store, tiny_encoder).run([photos[0].parent])
    assert (summary.embedded, summary.reused, summary.removed) == (0, 2, 1)
    new_id = _id_of(store, renamed)
    np.testing.assert_array_equal(store.vector(new_id), vector)
    assert store.get(old_id).status == ImageStatus.DELETED
    ids = _index_ids(settings, tiny_encoder)
    assert new_id in ids and old_id not in ids and len(ids) == 25


def test_deleted_file_leaves_the_index(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path]
) -> None:
    _indexer(settings, store, tiny_encoder).run([photos[0].parent])
    gone = _id_of(store, photos[7])
    photos[7].unlink()
    summary = _indexer(settings, store, tiny_encoder).run([photos[0].parent])
    assert summary.removed == 1 and summary.index_count == 23
    assert gone not in _index_ids(settings, tiny_encoder)
    assert store.counts() == {"indexed": 23, "failed": 0, "deleted": 1}


def test_files_outside_the_given_folders_are_not_swept(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path], tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(photos[0], other / "x.jpg")
    _indexer(settings, store, tiny_encoder).run([photos[0].parent, other])
    summary = _indexer(settings, store, tiny_encoder).run([other])
    assert summary.removed == 0 and store.counts()["indexed"] == 25


def test_killed_run_resumes_without_duplicates_or_re_embedding(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path]
) -> None:
    def crash_after_two_batches(batches: int) -> None:
        if batches == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _indexer(settings, store, tiny_encoder).run([photos[0].parent], on_batch_committed=crash_after_two_batches)
    committed = store.counts()["indexed"]
    assert committed == 2 * settings.batch_size  # batches commit as they go

    resumed = _indexer(settings, store, tiny_encoder).run([photos[0].parent])
    assert resumed.embedded == 24 - committed and resumed.unchanged == committed
    assert store.counts()["indexed"] == 24
    assert len(store.file_states()) == 24  # no duplicate rows
    assert _index_ids(settings, tiny_encoder) == {s.id for s in store.file_states().values()}


def test_index_is_rebuilt_from_the_store_when_lost(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path]
) -> None:
    _indexer(settings, store, tiny_encoder).run([photos[0].parent])
    shutil.rmtree(settings.index_dir)
    summary = _indexer(settings, store, tiny_encoder).run([photos[0].parent])
    assert summary.embedded == 0 and summary.index_rebuilt and summary.index_count == 24


def test_changing_the_model_re_embeds_everything(
    settings: Settings,
    store: Store,
    tiny_encoder: Encoder,
    photos: list[Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.helpers import save_local_dir_model

    _indexer(settings, store, tiny_encoder).run([photos[0].parent])
    other_settings = settings.with_overrides(model=f"local-dir:{save_local_dir_model(tmp_path / 'm2', seed=1)}")
    other = Encoder.from_settings(other_settings)
    with caplog.at_level(logging.WARNING, logger="indexer.pipeline"):
        summary = _indexer(other_settings, store, other).run([photos[0].parent])
    assert summary.embedded == 24 and summary.index_rebuilt
    assert read_manifest(settings.index_dir).model == other.spec.name
    # said, not silent: a mistyped model or weights path would leave an index of what this run embedded
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("saved index (24 vectors) was built with model" in m and other.spec.name in m for m in warned), warned


def test_changing_only_the_pretrained_weights_re_embeds_everything(
    settings: Settings, store: Store, photos: list[Path], tmp_path: Path
) -> None:
    """Same architecture, other weights (CLIPSEARCH_PRETRAINED): the stored vectors belong to the old weights and
    must not be reused or served under the new ones."""
    from app.search import SearchService
    from tests.helpers import register_tiny_architecture, save_checkpoint

    name = register_tiny_architecture(tmp_path / "arch", "clipsearch-test-tiny-pretrained")
    first = settings.with_overrides(model=name, pretrained=str(save_checkpoint(tmp_path / "a.pt", seed=0)))
    second = settings.with_overrides(model=name, pretrained=str(save_checkpoint(tmp_path / "b.pt", seed=1)))
    first_encoder, second_encoder = Encoder.from_settings(first), Encoder.from_settings(second)
    assert first_encoder.spec.store_key != second_encoder.spec.store_key
    _indexer(first, store, first_encoder).run([photos[0].parent])
    photo_id = store.file_states()[str(photos[0])].id
    before = store.vector(photo_id)
    summary = _indexer(second, store, second_encoder).run([photos[0].parent])
    assert summary.embedded == 24 and summary.reused == 0 and summary.index_rebuilt
    assert read_manifest(settings.index_dir).pretrained == second_encoder.spec.pretrained
    assert float(np.abs(store.vector(photo_id) - before).max()) > 1e-3  # new weights, new vectors
    service = SearchService(second, second_encoder, store)
    assert service.load_index().count == 24


def _write_bad_files(folder: Path) -> dict[str, str]:
    """Each awkward file with the word its failure reason must contain ('' when it must index fine)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = Image.new("RGB", (80, 60), "teal")
    buf = io.BytesIO()
    good.save(buf, "JPEG")
    jpeg = buf.getvalue()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture\n")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    from tests.test_imaging import _png_header_only

    (folder / "huge.png").write_bytes(_png_header_only(60_000, 60_000))
    Image.new("CMYK", (40, 40), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(folder / "sixteen.png")
    Image.new("RGBA", (30, 30), (255, 0, 0, 128)).save(folder / "alpha.png")
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (90, 30), "white").save(folder / "rotated.JPG", exif=exif.tobytes())
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return {
        "zero.jpg": "empty",
        "text.jpg": "not a recognised image",
        "truncated.jpg": "truncated",
        "corrupt.png": "",
        "huge.png": "above the limit",
        "cmyk.jpg": "",
        "sixteen.png": "",
        "alpha.png": "",
        "anim.gif": "",
        "rotated.JPG": "",
    }


def test_bad_files_are_recorded_with_reasons_and_the_run_goes_on(
    settings: Settings, store: Store, tiny_encoder: Encoder, tmp_path: Path
) -> None:
    expected = _write_bad_files(tmp_path / "bad")
    summary = _indexer(settings, store, tiny_encoder).run([tmp_path / "bad"])
    states = {Path(p).name: s for p, s in store.file_states().items()}
    assert set(states) == set(expected)  # notes.txt was never considered
    reasons = dict((Path(p).name, r) for p, r in store.failures())
    for name, word in expected.items():
        if name == "corrupt.png":
            assert states[name].status == ImageStatus.FAILED and reasons[name]
        elif word:
            assert states[name].status == ImageStatus.FAILED, name
            assert word in reasons[name], (name, reasons[name])
        else:
            assert states[name].status == ImageStatus.INDEXED, (name, reasons.get(name))
    assert summary.failed == 5 and summary.added == 5
    rotated = store.get(states["rotated.JPG"].id)
    assert (rotated.width, rotated.height) == (30, 90)
    # an unchanged failed file is not retried; --retry-failed does retry it
    again = _indexer(settings, store, tiny_encoder).run([tmp_path / "bad"])
    assert again.failed == 0 and again.unchanged == 10
    retry = _indexer(settings, store, tiny_encoder).run([tmp_path / "bad"], retry_failed=True)
    assert retry.failed == 5


def test_symlink_loops_and_case_insensitive_extensions(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path]
) -> None:
    root = photos[0].parent
    (root / "loop").symlink_to(root, target_is_directory=True)
    shutil.copy(photos[0], root / "UPPER.JPEG")
    (root / ".hidden").mkdir()
    shutil.copy(photos[1], root / ".hidden" / "secret.jpg")
    summary = _indexer(settings, store, tiny_encoder).run([root])
    assert summary.added + summary.reused == 25
    assert not any(".hidden" in p for p in store.file_states())


def test_missing_folder_is_a_clear_fatal_error(settings: Settings, store: Store, tiny_encoder: Encoder) -> None:
    from app.errors import ClipSearchError

    with pytest.raises(ClipSearchError, match="no such file or folder"):
        _indexer(settings, store, tiny_encoder).run([Path("/definitely/not/here")])
    assert store.counts()["indexed"] == 0


def test_indexing_works_on_every_supported_database(
    any_store_url: str, settings: Settings, tiny_encoder: Encoder, photos: list[Path]
) -> None:
    store = Store(any_store_url)
    try:
        first = _indexer(settings, store, tiny_encoder).run([photos[0].parent])
        photos[0].unlink()
        second = _indexer(settings, store, tiny_encoder).run([photos[0].parent])
        assert (first.added, second.removed, second.embedded, second.index_count) == (24, 1, 0, 23)
    finally:
        store.close()


def test_growing_past_the_threshold_switches_to_an_ivf_index(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path]
) -> None:
    small = settings.with_overrides(ivf_min_vectors=30, nprobe=64)
    _indexer(small, store, tiny_encoder).run([photos[0].parent])
    assert read_manifest(settings.index_dir).index_type == "flat"
    for i in range(8):
        shutil.copy(photos[i], photos[0].parent / f"extra-{i}.png")  # new paths, reused vectors
    Image.open(photos[9]).save(photos[0].parent / "new.png")
    summary = _indexer(small, store, tiny_encoder).run([photos[0].parent])
    assert summary.index_rebuilt and read_manifest(settings.index_dir).index_type == "ivf-sq8"
    assert _index_ids(small, tiny_encoder) == {s.id for s in store.file_states().values()}


def test_perceptual_hashes_are_stored_and_backfilled_without_re_embedding(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path]
) -> None:
    from sqlalchemy import text

    from app.dupes import ImageHashes

    _indexer(settings, store, tiny_encoder).run([photos[0].parent])
    hashes = dict(store.iter_hashes())
    assert len(hashes) == 24
    first = hashes[_id_of(store, photos[0])]
    from app.dupes import hamming
    from app.imaging import decode_image, model_draft_size

    same_decode = decode_image(
        photos[0].read_bytes(), max_pixels=10**8, draft_size=model_draft_size(tiny_encoder.image_size)
    )
    assert first["phash"] == ImageHashes.of(same_decode.image).phash
    full_decode = ImageHashes.of(Image.open(photos[0]).convert("RGB"))
    assert hamming(first["phash"], full_decode.phash) <= 6  # draft decoding moves a pHash by a few bits at most
    assert any(h >= 1 << 63 for v in hashes.values() for h in v.values())  # unsigned values survive the DB

    with store.engine.begin() as conn:  # a catalog indexed before hashes existed
        conn.execute(text("UPDATE images SET phash = NULL, dhash = NULL, phash_mirror = NULL, dhash_mirror = NULL"))
    summary = _indexer(settings, store, tiny_encoder).run([photos[0].parent])
    assert (summary.embedded, summary.hashed, summary.unchanged) == (0, 24, 24)
    assert dict(store.iter_hashes()) == hashes
    again = _indexer(settings, store, tiny_encoder).run([photos[0].parent])
    assert (again.embedded, again.hashed) == (0, 0)


class _SlowRecordingEncoder:
    """The tiny encoder, with each model call held 100 ms longer and its time span recorded."""

    def __init__(self, encoder: Encoder) -> None:
        self._encoder = encoder
        self.spans: list[tuple[float, float]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._encoder, name)

    def encode_pixels(self, batch):  # type: ignore[no-untyped-def]
        import time

        start = time.perf_counter()
        out = self._encoder.encode_pixels(batch)
        time.sleep(0.1)
        self.spans.append((start, time.perf_counter()))
        return out


@pytest.mark.parametrize("mode", ["between-batches", "always"])
def test_decode_workers_pause_while_the_model_runs_unless_told_to_overlap(
    settings: Settings,
    store: Store,
    tiny_encoder: Encoder,
    photos: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    import time

    from indexer import pipeline

    started: list[float] = []
    real_prepare = pipeline.prepare_file

    def recording_prepare(*args, **kwargs):  # type: ignore[no-untyped-def]
        started.append(time.perf_counter())
        # 50 ms a file: workers cannot finish the files in flight before a model call starts, so with
        # 'always' some start during it whatever the machine's speed
        time.sleep(0.05)
        return real_prepare(*args, **kwargs)

    commits: list[tuple[float, float]] = []
    real_save = store.save_results

    def recording_save(*args, **kwargs):  # type: ignore[no-untyped-def]
        begun = time.perf_counter()
        time.sleep(0.05)  # a commit long enough for workers to start files during it, were they not paused
        try:
            return real_save(*args, **kwargs)
        finally:
            commits.append((begun, time.perf_counter()))

    monkeypatch.setattr(pipeline, "prepare_file", recording_prepare)
    monkeypatch.setattr(store, "save_results", recording_save)
    encoder = _SlowRecordingEncoder(tiny_encoder)
    run_settings = settings.with_overrides(batch_size=4, decode_workers=2, decode_overlap=mode)
    indexer = Indexer(run_settings, store, encoder, progress=False)  # type: ignore[arg-type]
    assert indexer.decode_between_batches == (mode == "between-batches")
    summary = indexer.run([photos[0].parent])
    assert summary.added == len(photos) and len(encoder.spans) >= 3 and len(commits) >= 3
    # 20 ms of grace: a worker that passed the gate just before the model call began may start its file
    during = [t for t in started if any(a + 0.02 < t < b for a, b in encoder.spans)]
    in_commits = [t for t in started if any(a + 0.02 < t < b for a, b in commits)]
    if mode == "between-batches":
        assert not during, f"{len(during)} files started decoding while the model ran"
        assert not in_commits, f"{len(in_commits)} files started decoding while a batch was committed"
    else:
        assert during, "no file was decoded alongside the model"


def test_decode_overlap_auto_pauses_decoding_on_a_cpu_only(
    settings: Settings, store: Store, tiny_encoder: Encoder
) -> None:
    assert Indexer(settings, store, tiny_encoder, progress=False).decode_between_batches  # the tiny encoder: CPU

    class OnGpu(_SlowRecordingEncoder):
        device = type("Device", (), {"type": "cuda"})()

    assert not Indexer(settings, store, OnGpu(tiny_encoder), progress=False).decode_between_batches  # type: ignore[arg-type]


def test_the_summary_gives_a_rate_only_when_images_were_embedded() -> None:
    from indexer import IndexSummary

    idle = IndexSummary(unchanged=79, seconds=0.4, index_count=79, image_tower="torch bf16 products, 2 lanes")
    assert idle.lines()[1] == "embedded 0 images; index holds 79 vectors"
    busy = IndexSummary(embedded=10, seconds=3.0, tag_seconds=1.0, tagged=10, index_count=10, image_tower="ONNX")
    assert (
        busy.lines()[1] == "embedded 10 images in 2.0s (5.0 img/s on ONNX); tagged 10 in 1.0s; index holds 10 vectors"
    )
    assert IndexSummary(embedded=4, seconds=2.0).lines()[1].startswith("embedded 4 images in 2.0s (2.0 img/s); ")


def test_a_run_with_nothing_to_embed_or_tag_never_builds_the_model(
    settings: Settings, store: Store, photos: list[Path], tmp_path: Path
) -> None:
    """What a re-run of `clipsearch index` does: its LazyEncoder is built only when a file is new or changed, or
    when some image needs labels (here: another tag vocabulary); the summary names the image tower only then."""
    from app.lazy_encoder import LazyEncoder

    folder = photos[0].parent
    first_encoder = LazyEncoder(settings, indexing=True)
    first = Indexer(settings, store, first_encoder, progress=False).run([folder])
    assert first_encoder.built and (first.embedded, first.tagged) == (24, 24) and first.image_tower
    manifest = read_manifest(settings.index_dir)

    again = LazyEncoder(settings, indexing=True)
    summary = Indexer(settings, store, again, progress=False).run([folder])
    assert not again.built
    assert (summary.unchanged, summary.embedded, summary.tagged, summary.index_count) == (24, 0, 0, 24)
    assert summary.image_tower == "" and "embedded 0 images" in "\n".join(summary.lines())
    assert again.dim == first_encoder.dim and not again.built  # the store's vectors say it
    assert read_manifest(settings.index_dir) == manifest

    other_tags = tmp_path / "other-tags.yaml"
    other_tags.write_text("name: other-tags\ntemplates: single\nlabels: [dog, bicycle]\n")
    relabelling = settings.with_overrides(tag_vocabulary=str(other_tags))
    relabel = LazyEncoder(relabelling, indexing=True)
    summary = Indexer(relabelling, store, relabel, progress=False).run([folder])
    assert relabel.built and (summary.embedded, summary.tagged) == (0, 24)  # the text tower labels them

    Image.open(photos[3]).convert("RGB").rotate(90).save(photos[3], "JPEG", quality=90)
    changed = LazyEncoder(settings, indexing=True)
    summary = Indexer(settings, store, changed, progress=False).run([folder])
    assert changed.built and (summary.updated, summary.embedded) == (1, 1) and summary.image_tower

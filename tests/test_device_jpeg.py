"""The indexer's device JPEG lane (CLIPSEARCH_JPEG_DECODER=torchvision), run on the CPU device: the same torch code
that runs on a GPU with nvjpeg, checked against the CPU lane (Pillow) and the reference preprocessing."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from app.config import Settings
from app.dupes import ImageHashes
from app.encoder import Encoder
from app.imaging import decode_image
from app.preprocess import TorchCropResize, indexing_transform
from app.store import ImageStatus, Store
from indexer import Indexer
from indexer.device_jpeg import DeviceJpegLane, LaneItem, grey_levels, lanczos
from indexer.pipeline import prepare_bytes, stack_pixels
from indexer.walk import FileInfo
from tests.helpers import embedding_fidelity, interrupted_then_resumed
from tests.test_indexer import _write_bad_files


def _lane(encoder: Encoder) -> tuple[DeviceJpegLane, TorchCropResize]:
    transform = indexing_transform(encoder.preprocess)
    assert isinstance(transform, TorchCropResize)
    lane = DeviceJpegLane.for_transform(transform, "cpu", max_pixels=10**8)
    assert lane is not None
    return lane, transform


def _items(paths: list[Path]) -> list[LaneItem]:
    return [LaneItem(FileInfo(str(p), 0, 0.0), p.read_bytes(), "sha") for p in paths]


def _prepare(lane: DeviceJpegLane, items: list[LaneItem], batch: int = 16) -> list:  # type: ignore[type-arg]
    out = []
    for start in range(0, len(items), batch):
        out += lane.prepare(items[start : start + batch])
    return out


def _real_photos(shared_data: Path, count: int) -> list[Path]:
    """COCO (640 px), the photo samples (up to 1.4 MP: some go through the 1,024 px reduction) and Caltech."""
    pools = [
        sorted((shared_data / "coco-mini" / "images").glob("*.jpg"))[:40],
        sorted((shared_data / "photo-samples").glob("*/*.jpg")),
        sorted((shared_data / "caltech101").glob("*/*.jpg"))[::40],
    ]
    photos = [p for pool in pools for p in pool]
    return photos[:count]


def _hash_bits_apart(a: dict[str, int], b: dict[str, int]) -> int:
    return sum((a[k] ^ b[k]).bit_count() for k in a)


def test_pixels_and_hashes_are_the_cpu_lanes_on_real_photos(shared_data: Path, tiny_encoder: Encoder) -> None:
    lane, transform = _lane(tiny_encoder)
    photos = _real_photos(shared_data, 150)
    results = _prepare(lane, _items(photos))
    grey_level = float(transform.scale.min())  # one 8-bit level in normalised units, for the smallest std
    apart, worst_pixel, big = [], 0.0, 0
    for path, result in zip(photos, results, strict=True):
        assert not result.handed_back, path
        full = decode_image(path.read_bytes(), max_pixels=10**8)  # no draft: the lane decodes every pixel too
        assert (result.width, result.height) == (full.width, full.height)
        worst_pixel = max(worst_pixel, float((result.pixels - transform(full.image)).abs().max()))
        apart.append(_hash_bits_apart(result.hashes, ImageHashes.of(full.image).as_dict()))
        big += max(full.image.size) > 1024
    assert big >= 2  # the reduction before hashing was exercised
    # torch's uint8 resize (the CPU lane) and the lane's float passes round differently now and then
    assert worst_pixel <= 2.01 * grey_level
    # the same integer arithmetic as Pillow for grey levels and the Lanczos shrinks; photos over 1,024 px are
    # reduced in another order (grey first), which may move a bit or two
    assert np.mean(np.array(apart) == 0) >= 0.97 and max(apart) <= 6, apart


def test_vectors_meet_the_default_paths_fidelity_bar_with_the_trained_model(
    shared_data: Path, instrument_encoder: Encoder
) -> None:
    lane, _ = _lane(instrument_encoder)
    photos = _real_photos(shared_data, 150)
    pixels = torch.stack([r.pixels for r in _prepare(lane, _items(photos))])
    reference = torch.stack(
        [instrument_encoder.reference_preprocess(decode_image(p.read_bytes(), max_pixels=10**8).image) for p in photos]
    )
    cosine, overlap = embedding_fidelity(
        instrument_encoder.encode_pixels(reference), instrument_encoder.encode_pixels(pixels)
    )
    assert cosine >= 0.999 and overlap >= 0.98, (cosine, overlap)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(tiny_encoder: Encoder, tmp_path: Path, orientation: int) -> None:
    lane, transform = _lane(tiny_encoder)
    rng = np.random.default_rng(orientation)
    # an asymmetric picture: smooth noise with a bright corner, so every orientation gives other pixels
    base = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    base[:3, :3] = 255
    image = Image.fromarray(base).resize((200, 120), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "oriented.jpg"
    image.save(path, quality=95, exif=exif.tobytes())
    (result,) = lane.prepare(_items([path]))
    upright = ImageOps.exif_transpose(Image.open(path).convert("RGB"))
    assert (result.width, result.height) == upright.size
    assert float((result.pixels - transform(upright)).abs().max()) <= 2.01 * float(transform.scale.min())
    assert result.hashes == ImageHashes.of(upright).as_dict()


def test_grey_levels_and_lanczos_shrinks_are_pillows_bit_for_bit() -> None:
    rng = np.random.default_rng(7)
    for width, height in [(640, 480), (33, 200), (200, 33), (31, 29), (50, 91), (1024, 17)]:
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        grey = grey_levels(torch.from_numpy(rgb).permute(2, 0, 1))
        expected = np.asarray(Image.fromarray(rgb).convert("L"))
        np.testing.assert_array_equal(grey.numpy(), expected)
        for size in [(32, 32), (9, 8)]:
            shrunk = lanczos(grey.to(torch.float64), *size).numpy()
            np.testing.assert_array_equal(shrunk, np.asarray(Image.fromarray(expected).resize(size, Image.LANCZOS)))


def test_a_phones_multi_picture_jpeg_is_its_first_picture(tiny_encoder: Encoder, tmp_path: Path) -> None:
    lane, transform = _lane(tiny_encoder)
    rng = np.random.default_rng(3)
    first, second = (Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)) for _ in range(2))
    path = tmp_path / "phone.jpg"
    first.save(path, "MPO", save_all=True, append_images=[second], quality=95)
    (result,) = lane.prepare(_items([path]))
    cpu = decode_image(path.read_bytes(), max_pixels=10**8)
    assert cpu.format == result.format == "MPO" and not result.handed_back
    assert float((result.pixels - transform(cpu.image)).abs().max()) <= 2.01 * float(transform.scale.min())
    assert result.hashes == ImageHashes.of(cpu.image).as_dict()


def test_files_the_lane_cannot_take_are_handed_back(tiny_encoder: Encoder, tmp_path: Path) -> None:
    lane, _ = _lane(tiny_encoder)
    good = tmp_path / "good.jpg"
    Image.new("RGB", (90, 60), "teal").save(good)
    buf = io.BytesIO()
    Image.new("RGB", (90, 60), "navy").save(buf, "JPEG")
    others = {
        "cmyk.jpg": None,
        "picture.png": None,
        "truncated.jpg": buf.getvalue()[: len(buf.getvalue()) // 2],
        "garbage.jpg": b"\xff\xd8\xff" + bytes(300),
    }
    Image.new("CMYK", (40, 40), (10, 200, 30, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("RGB", (40, 40), "red").save(tmp_path / "picture.png")
    for name, data in others.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    paths = [good, *(tmp_path / name for name in others)]
    results = lane.prepare(_items(paths))
    assert [r.handed_back for r in results] == [False, True, True, True, True]
    assert results[0].pixels is not None and results[0].hashes is not None
    small = DeviceJpegLane.for_transform(indexing_transform(tiny_encoder.preprocess), "cpu", max_pixels=90 * 60 - 1)
    assert small is not None and small.prepare(_items([good]))[0].handed_back  # over the pixel limit


def test_indexing_through_both_lanes_gives_the_cpu_lanes_catalog(
    settings: Settings, tiny_encoder: Encoder, tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    folder = tmp_path / "catalog"
    _write_bad_files(folder)
    for path in _real_photos(shared_data, 40):
        shutil.copy2(path, folder / f"{path.parent.name}-{path.name}")
    shutil.copy2(folder / "rotated.JPG", folder / "same-content.jpg")  # reused by content within one run
    taken: list[int] = []
    prepare = DeviceJpegLane.prepare
    monkeypatch.setattr(DeviceJpegLane, "prepare", lambda self, items: taken.append(len(items)) or prepare(self, items))
    from indexer import pipeline

    on_cpu = pipeline.prepare_bytes

    def slow_cpu_path(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.05)  # so that the lane surely gets its batches before the workers take the last files back
        return on_cpu(*args, **kwargs)

    monkeypatch.setattr(pipeline, "prepare_bytes", slow_cpu_path)

    catalogs = {}
    for decoder in ("pillow", "torchvision"):
        ours = settings.model_copy(update={"data_dir": tmp_path / decoder, "jpeg_decoder": decoder})
        store = Store(ours.effective_database_url)
        indexer = Indexer(ours, store, tiny_encoder, progress=False)
        assert (indexer.device_lane is not None) == (decoder == "torchvision")
        summary = indexer.run([folder])
        catalogs[decoder] = (summary, store.file_states(), dict(store.failures()), store)
    # the lane took JPEGs while its queue had room; the decode workers prepared the rest themselves
    assert sum(taken) >= settings.batch_size

    (cpu_summary, cpu_states, cpu_failures, cpu_store), (summary, states, failures, store) = catalogs.values()
    counts = ("added", "embedded", "reused", "failed")
    assert [getattr(summary, c) for c in counts] == [getattr(cpu_summary, c) for c in counts]
    assert failures == cpu_failures  # the same reasons, from the same CPU code
    assert {p: s.status for p, s in states.items()} == {p: s.status for p, s in cpu_states.items()}
    indexed = [p for p, s in states.items() if s.status == ImageStatus.INDEXED]
    ours = np.stack([store.vector(states[p].id) for p in indexed])
    theirs = np.stack([cpu_store.vector(cpu_states[p].id) for p in indexed])
    # the CPU lane decodes big JPEGs in draft mode, the lane every pixel: close, not equal
    assert float(np.sum(ours * theirs, axis=1).min()) >= 0.99
    rotated = store.get(states[str(folder / "rotated.JPG")].id)
    assert (rotated.width, rotated.height) == (30, 90)
    for s in (cpu_store, store):
        s.close()


def test_an_error_in_the_lane_stops_the_run_with_that_error(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: DeviceJpegLane, items: list[LaneItem]) -> list[object]:
        raise RuntimeError("device lost")

    monkeypatch.setattr(DeviceJpegLane, "prepare", broken)
    ours = settings.model_copy(update={"jpeg_decoder": "torchvision"})
    with pytest.raises(RuntimeError, match="device lost"):
        Indexer(ours, store, tiny_encoder, progress=False).run([photos[0].parent])
    # nothing half-done: what was committed is whole, and a run without the lane completes the catalog
    summary = Indexer(settings, store, tiny_encoder, progress=False).run([photos[0].parent])
    assert store.counts()["indexed"] == 24 and summary.failed == 0


def test_resumed_and_hash_backfilled_runs_work_through_the_lane(
    settings: Settings, store: Store, tiny_encoder: Encoder, photos: list[Path]
) -> None:
    from sqlalchemy import text

    ours = settings.model_copy(update={"jpeg_decoder": "torchvision"})
    indexer = Indexer(ours, store, tiny_encoder, progress=False)
    # Which lane prepares a photo depends on timing (the lane takes JPEGs while its queue has room), and the two
    # lanes' bits may differ by a few (the CPU lane's draft decode): each stored photo must have one lane's, exactly.
    lane, _ = _lane(tiny_encoder)
    items = _items(photos)
    by_path = {
        item.info.path: (on_lane.hashes, prepare_bytes(item.info, item.data, indexer.prepare_options).hashes)
        for item, on_lane in zip(items, _prepare(lane, items), strict=True)
    }
    assert any(a != b for a, b in by_path.values())  # the photos where the lanes differ are what this checks

    def stored_hashes_are_a_lanes() -> None:
        stored = dict(store.iter_hashes())
        assert len(stored) == 24
        records = store.get_many(list(stored))
        for image_id, hashes in stored.items():
            assert hashes in by_path[records[image_id].path], records[image_id].path

    interrupted_then_resumed(indexer.run, photos[0].parent, store, 24)
    stored_hashes_are_a_lanes()
    with store.engine.begin() as conn:  # a catalog indexed before hashes existed
        conn.execute(text("UPDATE images SET phash = NULL, dhash = NULL, phash_mirror = NULL, dhash_mirror = NULL"))
    assert not dict(store.iter_hashes())
    backfill = Indexer(ours, store, tiny_encoder, progress=False).run([photos[0].parent])
    assert (backfill.embedded, backfill.hashed) == (0, 24)
    stored_hashes_are_a_lanes()


def test_auto_uses_the_lane_on_a_gpu_only(
    settings: Settings, store: Store, tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Indexer(settings, store, tiny_encoder, progress=False).device_lane is None  # auto on the CPU
    pillow = settings.model_copy(update={"jpeg_decoder": "pillow"})
    assert Indexer(pillow, store, tiny_encoder, progress=False).device_lane is None

    class OnGpu:
        def __init__(self, encoder: Encoder) -> None:
            self._encoder = encoder
            self.device = torch.device("cuda")

        def __getattr__(self, name: str) -> object:
            return getattr(self._encoder, name)

    built: list[torch.device] = []
    monkeypatch.setattr(DeviceJpegLane, "__init__", lambda self, transform, device, max_pixels: built.append(device))
    assert Indexer(settings, store, OnGpu(tiny_encoder), progress=False).device_lane is not None  # type: ignore[arg-type]
    assert built == [torch.device("cuda")]
    assert Indexer(pillow, store, OnGpu(tiny_encoder), progress=False).device_lane is None  # type: ignore[arg-type]


def test_on_a_gpu_every_core_decodes_unless_told_otherwise(
    tiny_model_dir: Path, store: Store, tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    class OnGpu:
        device = torch.device("cuda")

        def __getattr__(self, name: str) -> object:
            return getattr(tiny_encoder, name)

    monkeypatch.delenv("CLIPSEARCH_DECODE_WORKERS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    default = Settings(model=f"local-dir:{tiny_model_dir}")
    assert default.decode_workers <= 4
    assert Indexer(default, store, OnGpu(), progress=False).decode_workers == 16  # type: ignore[arg-type]
    assert Indexer(default, store, tiny_encoder, progress=False).decode_workers == default.decode_workers  # CPU
    chosen = Settings(model=f"local-dir:{tiny_model_dir}", decode_workers=3)
    assert Indexer(chosen, store, OnGpu(), progress=False).decode_workers == 3  # type: ignore[arg-type]
    monkeypatch.setenv("CLIPSEARCH_DECODE_WORKERS", "5")
    assert Indexer(Settings(model=f"local-dir:{tiny_model_dir}"), store, OnGpu(), progress=False).decode_workers == 5  # type: ignore[arg-type]


def test_batches_are_stacked_in_order_on_the_cpu() -> None:
    pixels = [torch.full((3, 4, 4), float(i)) for i in range(5)]
    batch = stack_pixels(pixels, torch.device("cpu"))
    assert batch.shape == (5, 3, 4, 4) and batch[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned memory, nvjpeg)")
def test_on_a_gpu_mixed_batches_keep_their_order_and_nvjpeg_matches_the_cpu_lane(
    shared_data: Path, tiny_encoder: Encoder
) -> None:
    cuda = torch.device("cuda")
    pixels = [torch.full((3, 4, 4), float(i), device=cuda if i % 2 else "cpu") for i in range(6)]
    batch = stack_pixels(pixels, cuda)
    assert batch.device.type == "cuda" and batch[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    transform = indexing_transform(tiny_encoder.preprocess)
    gpu = DeviceJpegLane.for_transform(transform, cuda, max_pixels=10**8)
    cpu, _ = _lane(tiny_encoder)
    items = _items(_real_photos(shared_data, 64))
    for on_gpu, on_cpu in zip(_prepare(gpu, items), _prepare(cpu, items), strict=True):  # type: ignore[arg-type]
        assert float((on_gpu.pixels.cpu() - on_cpu.pixels).abs().max()) <= 0.1  # nvjpeg's IDCT rounds differently
        assert _hash_bits_apart(on_gpu.hashes, on_cpu.hashes) <= 6

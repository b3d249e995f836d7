"""The indexer's encode lanes (CLIPSEARCH_ENCODE_LANES): on a CPU, threads that each prepare and encode their own
batches at once, checked against the one-lane path (the model on every core, decode workers between batches)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from app.config import Settings
from app.encoder import MAX_AUTO_LANES, Encoder, resolve_lanes
from app.store import ImageStatus, Store
from indexer import Indexer
from tests.helpers import interrupted_then_resumed
from tests.test_device_jpeg import _real_photos
from tests.test_indexer import _write_bad_files


@pytest.fixture(scope="module")
def lane_encoder(tiny_model_dir: Path) -> Encoder:
    """The tiny model as an indexing run builds it, with two lanes (torch, one thread each on 2 cores)."""
    settings = Settings(model=f"local-dir:{tiny_model_dir}", device="cpu", encode_lanes=2)
    encoder = Encoder.from_settings(settings, indexing=True)
    assert encoder.image_lanes == 2
    return encoder


@pytest.fixture
def lanes_used(lane_encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(thread name, batch length) of every lane encode call, in the order they are made."""
    calls: list[tuple[str, int]] = []
    encode = Encoder.encode_pixels_in_lane

    def recorded(self: Encoder, batch: torch.Tensor) -> np.ndarray:
        calls.append((threading.current_thread().name, len(batch)))
        return encode(self, batch)

    monkeypatch.setattr(Encoder, "encode_pixels_in_lane", recorded)
    return calls


def test_lanes_give_the_one_lane_catalog(
    settings: Settings,
    tiny_encoder: Encoder,
    lane_encoder: Encoder,
    lanes_used: list[tuple[str, int]],
    tmp_path: Path,
    shared_data: Path,
) -> None:
    folder = tmp_path / "catalog"
    _write_bad_files(folder)
    for path in _real_photos(shared_data, 40):
        shutil.copy2(path, folder / f"{path.parent.name}-{path.name}")
    shutil.copy2(folder / "rotated.JPG", folder / "same-content.jpg")
    catalogs = []
    for name, encoder in (("one", tiny_encoder), ("lanes", lane_encoder)):
        ours = settings.model_copy(update={"data_dir": tmp_path / name})
        store = Store(ours.effective_database_url)
        indexer = Indexer(ours, store, encoder, progress=False)
        assert indexer.encode_lanes == (2 if name == "lanes" else 1)
        summary = indexer.run([folder])
        catalogs.append((summary, store.file_states(), dict(store.failures()), store))
    # both lanes encoded batches, and every file with pixels went through one of them once
    assert {thread for thread, _ in lanes_used} == {"lane-0", "lane-1"}
    (one_summary, one_states, one_failures, one_store), (summary, states, failures, store) = catalogs
    assert sum(n for _, n in lanes_used) == summary.embedded
    counts = ("added", "embedded", "reused", "failed")
    assert [getattr(summary, c) for c in counts] == [getattr(one_summary, c) for c in counts]
    assert summary.embedded > 40 and summary.failed >= 3
    assert failures == one_failures
    assert {p: s.status for p, s in states.items()} == {p: s.status for p, s in one_states.items()}
    indexed = [p for p, s in states.items() if s.status == ImageStatus.INDEXED]
    ours = np.stack([store.vector(states[p].id) for p in indexed])
    theirs = np.stack([one_store.vector(one_states[p].id) for p in indexed])
    # the same pixels through the same model, on one thread instead of two: equal up to float rounding
    assert float(np.sum(ours * theirs, axis=1).min()) >= 0.99999
    # the perceptual hashes are the same CPU code's, whichever lane
    assert {store.get(i).path: h for i, h in store.iter_hashes()} == {
        one_store.get(i).path: h for i, h in one_store.iter_hashes()
    }
    for s in (one_store, store):
        s.close()


def test_lanes_encode_at_the_same_time(
    settings: Settings, store: Store, lane_encoder: Encoder, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each lane's first encode waits for the other's: a run whose lanes took turns would break the barrier."""
    barrier = threading.Barrier(2, timeout=60)
    first_call: set[str] = set()
    encode = Encoder.encode_pixels_in_lane

    def together(self: Encoder, batch: torch.Tensor) -> np.ndarray:
        name = threading.current_thread().name
        if name not in first_call:
            first_call.add(name)
            barrier.wait()
        return encode(self, batch)

    monkeypatch.setattr(Encoder, "encode_pixels_in_lane", together)
    summary = Indexer(settings, store, lane_encoder, progress=False).run([photos[0].parent])
    assert summary.embedded == 24 and first_call == {"lane-0", "lane-1"}


def test_lanes_share_the_last_files_out(
    settings: Settings, store: Store, lane_encoder: Encoder, lanes_used: list[tuple[str, int]], photos: list[Path]
) -> None:
    """Batches of 8 while there are plenty, then the rest split between the lanes (down to 4 files): 24 photos
    give 8, 8, 4, 4, not 8, 8, 8 with one lane running the last batch alone."""
    summary = Indexer(settings, store, lane_encoder, progress=False).run([photos[0].parent])
    assert summary.embedded == 24 and store.counts()["indexed"] == 24
    assert sorted((n for _, n in lanes_used), reverse=True) == [8, 8, 4, 4]


def test_an_error_in_a_lane_stops_the_run_and_loses_nothing_committed(
    settings: Settings, store: Store, lane_encoder: Encoder, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = [0]
    encode = Encoder.encode_pixels_in_lane
    guard = threading.Lock()

    def fails_on_the_third(self: Encoder, batch: torch.Tensor) -> np.ndarray:
        with guard:
            calls[0] += 1
            third = calls[0] == 3
        if third:
            raise RuntimeError("out of memory in a lane")
        return encode(self, batch)

    monkeypatch.setattr(Encoder, "encode_pixels_in_lane", fails_on_the_third)
    with pytest.raises(RuntimeError, match="out of memory in a lane"):
        Indexer(settings, store, lane_encoder, progress=False).run([photos[0].parent])
    committed = store.counts()["indexed"]
    assert committed <= 24 - 4  # the failed batch was not committed
    monkeypatch.setattr(Encoder, "encode_pixels_in_lane", encode)
    summary = Indexer(settings, store, lane_encoder, progress=False).run([photos[0].parent])
    assert summary.embedded == 24 - committed and store.counts()["indexed"] == 24 and summary.failed == 0


def test_an_interrupted_lanes_run_resumes_where_it_stopped(
    settings: Settings, store: Store, lane_encoder: Encoder, photos: list[Path]
) -> None:
    interrupted_then_resumed(Indexer(settings, store, lane_encoder, progress=False).run, photos[0].parent, store, 24)


def test_torch_threads_are_restored_after_the_lanes(
    settings: Settings, store: Store, lane_encoder: Encoder, photos: list[Path]
) -> None:
    """Each lane sets its thread's torch count to its share (1 here); torch also keeps that number process-wide,
    for threads started later: the run puts the caller's count back."""
    before = torch.get_num_threads()
    Indexer(settings, store, lane_encoder, progress=False).run([photos[0].parent])
    later: list[int] = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert torch.get_num_threads() == before and later == [before]


def test_how_many_lanes() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_lanes(0, cpu, threads=2) == 2
    assert resolve_lanes(0, cpu, threads=1) == 1
    assert resolve_lanes(0, cpu, threads=16) == MAX_AUTO_LANES
    assert resolve_lanes(3, cpu, threads=16) == 3
    assert resolve_lanes(0, gpu, threads=16) == resolve_lanes(4, gpu) == 1


def test_only_an_indexing_encoder_has_lanes_and_one_lane_is_the_shared_path(
    tiny_model_dir: Path, settings: Settings, store: Store
) -> None:
    base = Settings(model=f"local-dir:{tiny_model_dir}", device="cpu", encode_lanes=2, torch_threads=2)
    assert Encoder.from_settings(base).image_lanes == 1  # the service's, a search, an evaluation
    indexing = Encoder.from_settings(base, indexing=True)
    assert (indexing.image_lanes, indexing.lane_threads) == (2, 1)
    one = Encoder.from_settings(base.with_overrides(encode_lanes=1), indexing=True)
    assert one.image_lanes == 1 and Indexer(settings, store, one, progress=False).encode_lanes == 1


def test_onnx_lanes_share_one_image_session_with_the_cores_they_leave(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(
        model=f"local-dir:{tiny_model_dir}", device="cpu", inference="onnx", data_dir=tmp_path, torch_threads=2
    )
    plain = Encoder.from_settings(settings)
    lanes = Encoder.from_settings(settings, indexing=True)
    assert lanes._onnx is not None and plain._onnx is not None and lanes._onnx.image is not None
    threads = {
        name: (session.get_session_options().intra_op_num_threads if session is not None else None)
        for name, session in (("image", lanes._onnx.image), ("text", lanes._onnx.text), ("plain", plain._onnx.image))
    }
    # two lanes on two threads: each lane's own thread runs its call, the session's pool adds none
    assert threads == {"image": 1, "text": 2, "plain": 2}
    pixels = torch.rand(6, 3, plain.image_size, plain.image_size)
    results: dict[int, np.ndarray] = {}

    def lane(i: int) -> None:
        results[i] = lanes.encode_pixels_in_lane(pixels[3 * i : 3 * i + 3])

    workers = [threading.Thread(target=lane, args=(i,)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    expected = plain.encode_pixels(pixels)
    assert np.allclose(np.concatenate([results[0], results[1]]), expected, atol=1e-5)


def test_the_index_command_builds_an_indexing_encoder(
    settings: Settings, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.cli import main
    from tests.test_cli import _args

    lanes: list[int] = []
    run = Indexer.run

    def recorded(self: Indexer, *args: object, **kwargs: object) -> object:
        lanes.append(self.encode_lanes)
        return run(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Indexer, "run", recorded)
    result = CliRunner().invoke(main, ["index", str(photos[0].parent), *_args(settings), "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["index", str(photos[0].parent), *_args(settings), "--lanes", "1"])
    assert result.exit_code == 0, result.output
    assert lanes == [resolve_lanes(0, torch.device("cpu")), 1]

"""The service's ONNX start: a torch start records what it exported, the next start serves from it without
importing torch, with the same vectors; anything out of date falls back to torch, which records it afresh."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.api import create_app
from app.config import Settings
from app.encoder import Encoder
from app.errors import ModelLoadError
from app.imaging import decode_image, model_draft_size
from app.model_spec import ModelSpec
from app.onnx_encoder import (
    LaunchRecord,
    OnnxEncoder,
    load_encoder,
    record_path,
    set_query_spin,
    weights_identity,
)
from app.search import open_service
from tests.api.conftest import api_settings, build_index
from tests.helpers import copy_photos, register_tiny_architecture, save_local_dir_model

TEXTS = ["a dog", "a photo of a leopard", "two people walking on a beach at sunset", "", "it's 2024 &amp; caf\u00e9"]
ROOT = Path(__file__).resolve().parents[1]


def onnx_settings(data_dir: Path, model_dir: Path, mode: str = "onnx-int8") -> Settings:
    return Settings(data_dir=data_dir, model=f"local-dir:{model_dir}", device="cpu", inference=mode)


@pytest.fixture
def model_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A private copy of the tiny model: some tests change its weights."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def photos(shared_data: Path, count: int = 12) -> list:
    paths = sorted((shared_data / "caltech101").glob("*/*.jpg"))[:: 3345 // count][:count]
    return [decode_image(p.read_bytes(), max_pixels=10**9, draft_size=model_draft_size(64)).image for p in paths]


@pytest.mark.parametrize("mode", ["onnx", "onnx-int8"])
def test_a_torch_start_records_and_the_next_start_gives_the_same_vectors(
    tmp_path: Path, instrument_model_dir: Path, shared_data: Path, mode: str
) -> None:
    settings = onnx_settings(tmp_path / "data", instrument_model_dir, mode)
    assert OnnxEncoder.open(settings) is None  # nothing exported yet
    torch_encoder = load_encoder(settings)
    assert isinstance(torch_encoder, Encoder) and torch_encoder.inference == mode
    spec = ModelSpec.from_settings(settings)
    record = LaunchRecord.from_json(record_path(tmp_path / "data" / "onnx", spec.store_key, mode).read_text())
    assert record.mode == mode and record.dim == torch_encoder.dim and record.image_size == 64

    light = load_encoder(settings)
    assert isinstance(light, OnnxEncoder)
    assert (light.spec, light.dim, light.image_size, light.inference) == (spec, 256, 64, mode)
    np.testing.assert_allclose(light.encode_texts(TEXTS), torch_encoder.encode_texts(TEXTS), rtol=0, atol=1e-6)
    if mode == "onnx":  # the full 77-token pass too (int8 quantises activations over all positions: not equal)
        full = light.encode_texts(TEXTS[:2], truncate=False)
        np.testing.assert_allclose(full, torch_encoder.encode_texts(TEXTS[:2], truncate=False), rtol=0, atol=1e-5)
    images = photos(shared_data)
    torch_pixels = np.stack([torch_encoder.preprocess_image(im).numpy() for im in images])
    np.testing.assert_array_equal(np.stack([light.preprocess_image(im) for im in images]), torch_pixels)
    np.testing.assert_allclose(light.encode_images(images), torch_encoder.encode_images(images), rtol=0, atol=1e-6)
    assert light.encode_images([]).shape == (0, 256) and light.encode_texts([]).shape == (0, 256)


def test_a_lazy_start_opens_each_tower_at_its_first_use(tmp_path: Path, model_dir: Path, shared_data: Path) -> None:
    # One-off commands (clipsearch similar / search / dupes) open only the sessions their query needs.
    settings = onnx_settings(tmp_path / "data", model_dir, "onnx")
    load_encoder(settings)  # the torch start exports and records
    eager = load_encoder(settings)
    lazy = load_encoder(settings, lazy_towers=True)
    assert isinstance(eager, OnnxEncoder) and isinstance(lazy, OnnxEncoder)
    assert eager.towers.text is not None and eager.towers.image is not None
    assert (lazy.towers.text, lazy.towers.image) == (None, None)
    np.testing.assert_array_equal(lazy.encode_texts(TEXTS), eager.encode_texts(TEXTS))
    assert lazy.towers.text is not None and lazy.towers.image is None
    images = photos(shared_data, 4)
    np.testing.assert_array_equal(lazy.encode_images(images), eager.encode_images(images))
    assert lazy.towers.image is not None

    # a tower file broken after the start is reported when it is first needed, saying what to do
    broken = load_encoder(settings, lazy_towers=True)
    assert isinstance(broken, OnnxEncoder)
    image_file = Path(broken.record.image_file[0])
    image_file.write_bytes(b"\0" * image_file.stat().st_size)
    with pytest.raises(ModelLoadError, match="image tower .* cannot be loaded .* delete that file"):
        broken.encode_images(images)
    np.testing.assert_array_equal(broken.encode_texts(TEXTS[:1]), eager.encode_texts(TEXTS[:1]))

    # the service a command opens: `similar` needs neither tower, and finds what an eager service finds
    command = api_settings(tmp_path / "cmd", model_dir, inference="onnx")
    copy_photos(tmp_path / "catalog", 6)
    build_index(command, Encoder.from_settings(command), [tmp_path / "catalog"])
    load_encoder(command)  # exports and records for this data dir
    found = []
    for lazy_towers in (True, False):
        service = open_service(command, lazy_towers=lazy_towers)
        try:
            assert isinstance(service.encoder, OnnxEncoder)
            image_id = min(state.id for state in service.store.file_states().values())
            found.append([(hit.id, round(hit.score, 6)) for hit in service.similar(image_id, 3)])
            opened = (service.encoder.towers.text is not None, service.encoder.towers.image is not None)
            assert opened == ((False, False) if lazy_towers else (True, True))
        finally:
            service.store.close()
    assert found[0] == found[1] and len(found[0]) == 3


def spins(session: object) -> tuple[str, str]:
    """A session's spin-wait settings: (during a run, stopped after it)."""
    options = session.get_session_options()  # type: ignore[attr-defined]

    def entry(key: str) -> str:
        try:
            return str(options.get_session_config_entry(key))
        except RuntimeError:  # not set
            return ""

    return entry("session.intra_op.allow_spinning"), entry("session.force_spinning_stop")


def test_query_sessions_spin_during_a_run_and_the_indexers_image_sessions_do_not(
    tmp_path: Path, model_dir: Path
) -> None:
    # a one-query encode is hundreds of short operators: the threads spin between them, and stop after the run
    settings = onnx_settings(tmp_path / "data", model_dir, "onnx")
    torch_start = load_encoder(settings)  # exports through torch, then records
    eager = load_encoder(settings)
    lazy = load_encoder(settings, lazy_towers=True)
    assert isinstance(torch_start, Encoder) and isinstance(eager, OnnxEncoder) and isinstance(lazy, OnnxEncoder)
    lazy.encode_texts(TEXTS[:1])
    lazy.encode_pixels(np.zeros((1, 3, lazy.image_size, lazy.image_size), dtype=np.float32))
    assert torch_start._onnx is not None
    for towers in (torch_start._onnx, eager.towers, lazy.towers):
        assert spins(towers.text) == spins(towers.image) == ("1", "1")
    for lanes in (2, 1):  # the indexer's image sessions share the cores with photo preparation: never
        indexing = Encoder.from_settings(settings.with_overrides(encode_lanes=lanes), indexing=True)
        assert indexing._onnx is not None and indexing._onnx.image is not None
        assert spins(indexing._onnx.text) == ("1", "1") and spins(indexing._onnx.image) == ("0", ""), lanes
    try:  # CLIPSEARCH_QUERY_SPIN=false: every session sleeps between operators
        quiet = load_encoder(settings.model_copy(update={"query_spin": False}))
        assert isinstance(quiet, OnnxEncoder)
        assert spins(quiet.towers.text) == spins(quiet.towers.image) == ("0", "")
    finally:
        set_query_spin(True)


def test_the_service_starts_without_importing_torch(tmp_path: Path, model_dir: Path) -> None:
    settings = onnx_settings(tmp_path / "data", model_dir)
    expected = Encoder.from_settings(settings).encode_texts(["a red bicycle"])[0]  # exports and records
    script = f"""
import json, sys
from app.config import Settings
from app.search import open_service
service = open_service(Settings(data_dir={str(tmp_path / "data")!r}, model={settings.model!r}, device="cpu",
                                inference="onnx-int8"), require_index=False)
vector = service.encoder.encode_texts(["a red bicycle"])[0]
heavy = sorted(m for m in ("torch", "torchvision", "open_clip", "transformers") if m in sys.modules)
print(json.dumps({{"encoder": type(service.encoder).__name__, "heavy": heavy, "vector": vector.tolist()}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["encoder"] == "OnnxEncoder" and out["heavy"] == []
    np.testing.assert_allclose(out["vector"], expected, rtol=0, atol=1e-6)


def test_changed_weights_start_through_torch_which_records_again(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = onnx_settings(tmp_path / "data", model_dir)
    first = load_encoder(settings)
    assert isinstance(first, Encoder) and isinstance(load_encoder(settings), OnnxEncoder)
    old = first.encode_texts(TEXTS)

    save_local_dir_model(model_dir, seed=1)  # other weights under the same name
    with caplog.at_level(logging.INFO, logger="app.onnx_encoder"):
        assert OnnxEncoder.open(settings) is None
    assert "the weights changed" in caplog.text
    second = load_encoder(settings)
    assert isinstance(second, Encoder)
    light = load_encoder(settings)
    assert isinstance(light, OnnxEncoder)
    new = light.encode_texts(TEXTS)
    np.testing.assert_allclose(new, second.encode_texts(TEXTS), rtol=0, atol=1e-6)
    assert np.abs(new - old).max() > 0.1  # the new weights' vectors, not the old export's


def test_a_missing_export_or_a_broken_record_starts_through_torch(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = onnx_settings(tmp_path / "data", model_dir)
    load_encoder(settings)
    path = record_path(settings.data_dir / "onnx", ModelSpec.from_settings(settings).store_key, "onnx-int8")
    record = LaunchRecord.from_json(path.read_text())
    assert OnnxEncoder.open(onnx_settings(tmp_path / "data", model_dir, "onnx")) is None  # another mode

    Path(record.text_file[0]).unlink()
    with caplog.at_level(logging.INFO, logger="app.onnx_encoder"):
        assert OnnxEncoder.open(settings) is None
    assert "changed or is missing" in caplog.text
    assert isinstance(load_encoder(settings), Encoder)  # re-exports the text tower and records it
    assert isinstance(load_encoder(settings), OnnxEncoder)

    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="app.onnx_encoder"):
        assert OnnxEncoder.open(settings) is None
    assert "unreadable ONNX launch record" in caplog.text
    assert isinstance(load_encoder(settings), Encoder)
    assert isinstance(load_encoder(settings), OnnxEncoder)

    for other in ("fp32", "int8"):  # the ONNX start is only for the ONNX modes
        assert OnnxEncoder.open(onnx_settings(tmp_path / "data", model_dir, other)) is None


def test_only_weights_that_stay_the_same_qualify(tmp_path: Path, model_dir: Path) -> None:
    assert weights_identity(ModelSpec("ViT-B-32", "")) is None  # random weights: new at every start
    assert weights_identity(ModelSpec("ViT-B-32", "laion2b_s34b_b79k")) == {"tag": "laion2b_s34b_b79k"}
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"x" * 10)
    assert weights_identity(ModelSpec("ViT-B-32", str(checkpoint)))["files"][0][:2] == [str(checkpoint), 10]
    local = weights_identity(ModelSpec(f"local-dir:{model_dir}", ""))
    assert {Path(f[0]).name for f in local["files"]} == {"open_clip_config.json", "open_clip_model.safetensors"}


def test_the_api_serves_the_same_results_after_an_onnx_start(tmp_path: Path, model_dir: Path) -> None:
    data_dir = tmp_path / "data"
    copy_photos(tmp_path / "catalog", 6)
    build_index(
        api_settings(data_dir, model_dir),
        Encoder.from_settings(api_settings(data_dir, model_dir)),
        [tmp_path / "catalog"],
    )
    results = []
    for expected_encoder in ("Encoder", "OnnxEncoder"):  # the first start exports and records
        with TestClient(create_app(api_settings(data_dir, model_dir, inference="onnx-int8"))) as client:
            assert type(client.app.state.service.encoder).__name__ == expected_encoder  # type: ignore[attr-defined]
            ready = client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["inference"] == "onnx-int8", ready.text
            hits = client.get("/search", params={"q": "a photo of an animal", "k": 6}).json()["hits"]
            photo = (tmp_path / "catalog").glob("*.jpg").__next__().read_bytes()
            by_image = client.post("/search/image", files={"file": ("x.jpg", photo, "image/jpeg")})
            assert by_image.status_code == 200, by_image.text
            results.append(([(h["id"], round(h["score"], 5)) for h in hits], by_image.json()["hits"][0]["id"]))
    assert results[0] == results[1] and len(results[0][0]) == 6


def test_auto_means_onnx_on_a_cpu_with_fixed_weights_and_torch_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from app.onnx_encoder import resolve_inference

    monkeypatch.delenv("CLIPSEARCH_INFERENCE")  # tests run torch by default (tests/conftest.py): the product's own
    assert Settings().inference == "auto"
    fixed, random_weights = ModelSpec("ViT-B-32", "laion2b_s34b_b79k"), ModelSpec("ViT-B-32", "")
    assert resolve_inference("auto", fixed, on_cpu=True) == "onnx"
    assert resolve_inference("auto", random_weights, on_cpu=True) == "fp32"  # random weights: nothing to cache
    assert resolve_inference("auto", fixed, on_cpu=False) == "fp32"  # a GPU keeps torch (autocast)
    for mode in ("fp32", "int8", "onnx", "onnx-int8"):  # a chosen mode stays as chosen
        assert resolve_inference(mode, random_weights, on_cpu=True) == mode

    name = register_tiny_architecture(tmp_path / "configs")
    random = Settings(data_dir=tmp_path / "random", model=name, pretrained="", device="cpu", inference="auto")
    assert OnnxEncoder.open(random) is None
    encoder = load_encoder(random)
    assert isinstance(encoder, Encoder) and encoder.inference == "fp32"
    assert not (tmp_path / "random" / "onnx").exists()  # nothing exported for weights that change every start
    gpu = Settings(data_dir=tmp_path / "gpu", model=name, pretrained="", device="cuda", inference="auto")
    assert OnnxEncoder.open(gpu) is None


def test_the_default_exports_once_then_starts_without_torch_with_the_same_vectors(
    tmp_path: Path, instrument_model_dir: Path, shared_data: Path
) -> None:
    settings = onnx_settings(tmp_path / "data", instrument_model_dir, "auto")
    reference = Encoder.from_settings(settings.with_overrides(inference="fp32"))
    first = load_encoder(settings)  # a torch start: exports the towers and writes the launch record
    assert isinstance(first, Encoder) and first.inference == "onnx"
    spec = ModelSpec.from_settings(settings)
    assert record_path(tmp_path / "data" / "onnx", spec.store_key, "onnx").exists()
    light = load_encoder(settings)
    assert isinstance(light, OnnxEncoder) and light.inference == "onnx"
    np.testing.assert_allclose(light.encode_texts(TEXTS), reference.encode_texts(TEXTS), rtol=0, atol=1e-5)
    images = photos(shared_data)
    np.testing.assert_allclose(light.encode_images(images), reference.encode_images(images), rtol=0, atol=1e-5)
    np.testing.assert_allclose(first.encode_images(images), reference.encode_images(images), rtol=0, atol=1e-5)


def test_a_server_serves_on_torch_while_the_default_exports_then_switches(
    tmp_path: Path, instrument_model_dir: Path
) -> None:
    settings = onnx_settings(tmp_path / "data", instrument_model_dir, "auto")
    reference = Encoder.from_settings(settings.with_overrides(inference="fp32"))
    first = load_encoder(settings, export_in_background=True)  # as `clipsearch serve` starts
    assert isinstance(first, Encoder)
    # returned before the export (which takes seconds) finished: torch serves meanwhile
    assert first.inference == "fp32" and not first.onnx_ready.is_set()
    # usable at once, on torch or (if the thread was quick) already on ONNX Runtime: the same vectors either way
    np.testing.assert_allclose(first.encode_texts(TEXTS), reference.encode_texts(TEXTS), rtol=0, atol=1e-5)
    assert first.onnx_ready.wait(300), "the background export did not finish"
    assert first.inference == "onnx" and first._onnx is not None
    np.testing.assert_allclose(first.encode_texts(TEXTS), reference.encode_texts(TEXTS), rtol=0, atol=1e-5)
    spec = ModelSpec.from_settings(settings)
    assert record_path(tmp_path / "data" / "onnx", spec.store_key, "onnx").exists()
    assert isinstance(load_encoder(settings, export_in_background=True), OnnxEncoder)  # the next start

    chosen = onnx_settings(tmp_path / "chosen", instrument_model_dir, "onnx")
    encoder = load_encoder(chosen, export_in_background=True)  # a mode the user chose is ready when returned
    assert isinstance(encoder, Encoder) and encoder.inference == "onnx" and encoder.onnx_ready.is_set()

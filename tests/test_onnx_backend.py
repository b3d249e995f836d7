"""The opt-in ONNX Runtime paths: the same vectors as torch (fp32), within the quantised bars (int8), exports
cached per model and weights, rebuilt when broken, and torch kept for a tower that cannot be exported."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from app import onnx_backend
from app.config import Settings
from app.encoder import Encoder, ModelSpec
from app.errors import ModelLoadError
from app.imaging import decode_image, model_draft_size
from app.quantize import check_inference
from tests.helpers import embedding_fidelity, save_local_dir_model

QUERIES = [
    "a dog",
    "red car",
    "a photo of a leopard",
    "a red bicycle leaning on a wall",
    "an airplane in the sky",
    "two people walking on a beach at sunset",
    "a grand piano in a concert hall",
    "snow covered mountains under a clear blue sky at sunrise",
    "",
]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def trained_onnx(instrument_model_dir: Path, onnx_cache: Path) -> dict[str, Encoder]:
    spec = ModelSpec.from_settings(Settings(model=f"local-dir:{instrument_model_dir}"))
    return {
        mode: Encoder(spec, torch.device("cpu"), inference=mode, onnx_cache_dir=onnx_cache)
        for mode in ("onnx", "onnx-int8")
    }


@pytest.fixture(scope="module")
def caltech_images(shared_data: Path, instrument_encoder: Encoder) -> list:
    paths = sorted((shared_data / "caltech101").glob("*/*.jpg"))
    paths = paths[:: len(paths) // 200][:200]
    draft = model_draft_size(instrument_encoder.image_size)
    return [decode_image(p.read_bytes(), max_pixels=10**9, draft_size=draft).image for p in paths]


def caltech_prompts(shared_data: Path) -> list[str]:
    classes = sorted(p.name.replace("_", " ").lower() for p in (shared_data / "caltech101").iterdir() if p.is_dir())
    return [f"a photo of a {c}" for c in classes] + QUERIES


def test_onnx_fp32_gives_the_vectors_torch_gives(
    trained_onnx: dict[str, Encoder], instrument_encoder: Encoder, caltech_images: list
) -> None:
    encoder = trained_onnx["onnx"]
    assert encoder.inference == "onnx"
    assert encoder._onnx is not None and encoder._onnx.text is not None and encoder._onnx.image is not None
    # one query at a time (each its own length) and as a batch (padded to the longest)
    want = instrument_encoder.encode_texts(QUERIES)
    np.testing.assert_allclose(np.stack([encoder.encode_texts([q])[0] for q in QUERIES]), want, atol=2e-5)
    np.testing.assert_allclose(encoder.encode_texts(QUERIES), want, atol=2e-5)
    images = caltech_images[:40]
    np.testing.assert_allclose(encoder.encode_images(images), instrument_encoder.encode_images(images), atol=2e-5)


def test_onnx_int8_keeps_the_trained_models_embeddings_and_neighbours(
    trained_onnx: dict[str, Encoder], instrument_encoder: Encoder, caltech_images: list, shared_data: Path
) -> None:
    """The bar of an opt-in quantised path: mean cosine >= 0.995 and top-10 overlap >= 0.95 (200 real photos,
    Caltech class prompts and queries)."""
    int8 = trained_onnx["onnx-int8"]
    cosine, overlap = embedding_fidelity(
        instrument_encoder.encode_images(caltech_images, batch_size=64), int8.encode_images(caltech_images, 64)
    )
    assert cosine >= 0.995 and overlap >= 0.95, (cosine, overlap)
    texts = caltech_prompts(shared_data)
    cosine, overlap = embedding_fidelity(instrument_encoder.encode_texts(texts), int8.encode_texts(texts))
    assert cosine >= 0.995 and overlap >= 0.95, (cosine, overlap)
    # and it is not the fp32 export under another name
    assert abs(cosine - 1.0) > 1e-6


def test_exports_are_reused_per_model_and_weights(
    trained_onnx: dict[str, Encoder], instrument_model_dir: Path, onnx_cache: Path, tmp_path: Path, monkeypatch
) -> None:
    folder = trained_onnx["onnx-int8"]._onnx.folder  # type: ignore[union-attr]
    assert folder.parent == onnx_cache and folder == trained_onnx["onnx"]._onnx.folder  # type: ignore[union-attr]
    assert sorted(p.name for p in folder.iterdir()) == ["image-int8.onnx", "image.onnx", "text-int8.onnx", "text.onnx"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_export(*args: object) -> None:
        raise AssertionError("exported again although the cache holds the model")

    monkeypatch.setattr(onnx_backend, "export_text_tower", no_export)
    monkeypatch.setattr(onnx_backend, "export_image_tower", no_export)
    monkeypatch.setattr(onnx_backend, "quantize_file", no_export)
    spec = ModelSpec.from_settings(Settings(model=f"local-dir:{instrument_model_dir}"))
    again = Encoder(spec, torch.device("cpu"), inference="onnx-int8", onnx_cache_dir=onnx_cache)
    assert again._onnx is not None and again._onnx.folder == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    np.testing.assert_array_equal(again.encode_texts(QUERIES), trained_onnx["onnx-int8"].encode_texts(QUERIES))

    # other weights under the same model name (a re-saved local-dir folder) get their own export
    monkeypatch.undo()
    tiny = Settings(model=f"local-dir:{save_local_dir_model(tmp_path / 'tiny', seed=0)}", device="cpu")
    first = Encoder.from_settings(tiny.with_overrides(inference="onnx", data_dir=tmp_path / "data"))
    save_local_dir_model(tmp_path / "tiny", seed=1)
    second = Encoder.from_settings(tiny.with_overrides(inference="onnx", data_dir=tmp_path / "data"))
    assert first._onnx is not None and second._onnx is not None
    assert first._onnx.folder.parent == tmp_path / "data" / "onnx" and first._onnx.folder != second._onnx.folder
    np.testing.assert_allclose(
        second.encode_texts(QUERIES), Encoder.from_settings(tiny).encode_texts(QUERIES), atol=1e-5
    )


def test_a_broken_cache_file_is_rebuilt(tmp_path: Path, tiny_model_dir: Path, tiny_encoder: Encoder, caplog) -> None:
    settings = Settings(model=f"local-dir:{tiny_model_dir}", device="cpu", data_dir=tmp_path, inference="onnx-int8")
    folder = Encoder.from_settings(settings)._onnx.folder  # type: ignore[union-attr]
    (folder / "text-int8.onnx").write_bytes((folder / "text-int8.onnx").read_bytes()[:1000])  # a cut-off write
    (folder / "image.onnx").write_bytes(b"not a model")
    (folder / "image-int8.onnx").unlink()  # the int8 file is then made from a broken fp32 one
    with caplog.at_level(logging.WARNING, logger="app.onnx_backend"):
        encoder = Encoder.from_settings(settings)
    assert encoder.inference == "onnx-int8" and encoder._onnx is not None
    assert encoder._onnx.text is not None and encoder._onnx.image is not None
    assert "text-int8.onnx does not load" in caplog.text and "image.onnx does not quantise" in caplog.text
    cosine, _ = embedding_fidelity(tiny_encoder.encode_texts(QUERIES), encoder.encode_texts(QUERIES))
    assert cosine >= 0.995
    pixels = torch.rand(4, 3, tiny_encoder.image_size, tiny_encoder.image_size)
    cosine, _ = embedding_fidelity(tiny_encoder.encode_pixels(pixels), encoder.encode_pixels(pixels))
    assert cosine >= 0.995


@pytest.mark.parametrize("mode", ["onnx", "auto"])
def test_a_tower_that_cannot_be_exported_stays_on_torch_with_a_warning(
    tmp_path: Path, tiny_model_dir: Path, tiny_encoder: Encoder, caplog, monkeypatch, mode: str
) -> None:
    # as for a Hugging Face text tower (bidirectional, mean/CLS pooling): no download needed to check the path
    monkeypatch.setattr(onnx_backend, "text_tower_exportable", lambda model: "its text tower is a Hugging Face one")
    settings = Settings(model=f"local-dir:{tiny_model_dir}", device="cpu", data_dir=tmp_path, inference=mode)
    with caplog.at_level(logging.INFO, logger="app.onnx_backend"):
        encoder = Encoder.from_settings(settings)
    said = [r for r in caplog.records if "ONNX Runtime not used for the text tower" in r.getMessage()]
    assert len(said) == 1 and "Hugging Face" in said[0].getMessage()
    # a warning when the user chose an ONNX mode; with the default ('auto'), which picked it, only information
    assert said[0].levelno == (logging.WARNING if mode == "onnx" else logging.INFO)
    assert encoder.inference == "onnx"
    assert encoder._onnx is not None and encoder._onnx.text is None and encoder._onnx.image is not None
    np.testing.assert_allclose(encoder.encode_texts(QUERIES), tiny_encoder.encode_texts(QUERIES), atol=1e-6)
    assert not (encoder._onnx.folder / "text.onnx").exists()


def test_onnx_modes_run_on_the_cpu_only() -> None:
    with pytest.raises(ModelLoadError, match="CLIPSEARCH_INFERENCE=onnx runs on the CPU only"):
        check_inference("onnx", torch.device("cuda"))
    assert check_inference("onnx-int8", torch.device("cpu")) == "onnx-int8"


def test_a_torch_built_index_is_served_through_onnx_runtime_and_the_service_says_so(
    tmp_path: Path, tiny_model_dir: Path, tiny_encoder: Encoder, shared_data: Path
) -> None:
    from tests.api.conftest import assert_served_in_mode

    data_dir = assert_served_in_mode(tmp_path, tiny_model_dir, tiny_encoder, "onnx-int8")
    # the export went to the data dir, where the next start finds it
    assert sorted(p.name for p in (data_dir / "onnx").glob("*/*.onnx")) == [
        "image-int8.onnx",
        "image.onnx",
        "text-int8.onnx",
        "text.onnx",
    ]


def test_an_export_left_half_done_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    """A server stopped mid-export (the background export under 'auto') leaves a temporary file: the next export
    of that file removes it once it is old enough not to belong to an export still running elsewhere."""
    import os
    import time

    target = tmp_path / "text.onnx"
    old, fresh, other = tmp_path / ".text.abc123.onnx", tmp_path / ".text.def456.onnx", tmp_path / ".image.x1.onnx"
    for path in (old, fresh, other):
        path.write_bytes(b"partial")
    stale = time.time() - onnx_backend.STALE_TEMP_SECONDS - 60
    os.utime(old, (stale, stale))
    os.utime(other, (stale, stale))
    onnx_backend._atomic_file(target, lambda p: p.write_bytes(b"model"))
    assert target.read_bytes() == b"model"
    assert not old.exists() and fresh.exists() and other.exists()  # only this file's stale leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, fresh.name, other.name])

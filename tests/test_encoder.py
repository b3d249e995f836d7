"""Model loading through open_clip's real paths (local-dir, checkpoint file) and the vectors it returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.config import Settings
from app.encoder import Encoder, ModelSpec, resolve_device
from app.errors import ModelLoadError
from tests.helpers import register_tiny_architecture, save_checkpoint


def test_local_dir_model_loads_and_gives_unit_float32_vectors(tiny_encoder: Encoder) -> None:
    texts = tiny_encoder.encode_texts(["a red bicycle leaning on a wall", "a dog", ""])
    images = tiny_encoder.encode_images([Image.new("RGB", (50, 40), c) for c in ("red", "green")])
    for vectors, n in ((texts, 3), (images, 2)):
        assert vectors.dtype == np.float32 and vectors.shape == (n, tiny_encoder.dim)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(texts[0], texts[1])


def test_checkpoint_file_loads_same_weights_as_local_dir(tmp_path: Path, tiny_encoder: Encoder) -> None:
    name = register_tiny_architecture(tmp_path / "configs")
    checkpoint = save_checkpoint(tmp_path / "weights" / "tiny.pt", seed=0)  # same seed as the fixture
    encoder = Encoder.from_settings(Settings(model=name, pretrained=str(checkpoint), device="cpu"))
    assert encoder.spec.pretrained == str(checkpoint.resolve())
    np.testing.assert_allclose(encoder.encode_texts(["a cat"]), tiny_encoder.encode_texts(["a cat"]), atol=1e-6)


def test_batched_image_encoding_matches_one_by_one(tiny_encoder: Encoder, shared_data: Path) -> None:
    photos = [Image.open(p).convert("RGB") for p in sorted((shared_data / "coco-mini" / "images").glob("*.jpg"))[:5]]
    batched = tiny_encoder.encode_images(photos, batch_size=5)
    single = np.concatenate([tiny_encoder.encode_images([p]) for p in photos])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_instrument_model_understands_its_classes(instrument_encoder: Encoder, shared_data: Path) -> None:
    """The trained model in ../shared/models must rank a leopard photo closest to 'leopard'."""
    labels = ["leopard", "airplane", "motorbike", "face"]
    texts = instrument_encoder.encode_texts([f"a photo of a {label}." for label in labels])
    photo = Image.open(sorted((shared_data / "caltech101" / "Leopards").glob("*.jpg"))[0])
    image = instrument_encoder.encode_images([photo.convert("RGB")])
    assert labels[int(np.argmax(image @ texts.T))] == "leopard"


def test_local_dir_ignores_pretrained_and_resolves_path(tiny_model_dir: Path) -> None:
    spec = ModelSpec.from_settings(Settings(model=f"local-dir:{tiny_model_dir}", pretrained="laion2b_s34b_b79k"))
    assert spec.pretrained == "" and spec.name == f"local-dir:{tiny_model_dir.resolve()}"


def test_default_settings_name_the_real_model() -> None:
    spec = ModelSpec.from_settings(Settings())
    assert (spec.name, spec.pretrained) == ("ViT-B-32", "laion2b_s34b_b79k")


@pytest.mark.parametrize(
    ("model", "pretrained", "message"),
    [
        ("no-such-arch", "", "unknown model"),
        ("ViT-B-32", "/nonexistent/weights.pt", "neither a known tag"),
        ("local-dir:/nonexistent/folder", "", "open_clip_config.json"),
    ],
)
def test_load_failures_say_what_to_fix(model: str, pretrained: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        Encoder.from_settings(Settings(model=model, pretrained=pretrained, device="cpu"))


def test_device_auto_falls_back_to_cpu_and_cuda_is_refused_without_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            resolve_device("cuda")

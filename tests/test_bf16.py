"""CLIPSEARCH_INFERENCE=bf16: the image tower's matrix products and the attention and MLP activations between them in
bfloat16, its residual stream, layer norms and the text tower in fp32,
close enough to the fp32 reference to meet the default path's bar (cosine >= 0.999, top-10 overlap >= 0.98)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from app import quantize
from app.config import Settings
from app.encoder import Encoder, ModelSpec
from app.errors import ModelLoadError
from app.store import ImageStatus, Store
from indexer import Indexer
from tests.helpers import embedding_fidelity
from tests.test_device_jpeg import _real_photos
from tests.test_quantize import QUERIES, _photos


def _tower_dtypes(encoder: Encoder) -> tuple[set[torch.dtype], set[torch.dtype]]:
    """The dtypes of the image tower's matrix-product weights, and of every text tower parameter."""
    visual = {m.weight.dtype for m in encoder.model.visual.modules() if isinstance(m, nn.Linear | quantize.Bf16Linear)}
    visual |= {torch.float32 for m in encoder.model.visual.modules() if isinstance(m, nn.MultiheadAttention)}
    text = {p.dtype for n, p in encoder.model.named_parameters() if not n.startswith("visual.")}
    return visual, text


@pytest.mark.slow
def test_bf16_meets_the_default_bar_on_the_trained_model(
    instrument_encoder: Encoder, instrument_model_dir: Path, shared_data: Path
) -> None:
    """200 real photos: image vectors within the fp32 path's bar, the same neighbours for text queries, and the
    text tower untouched (fp32, the same vectors)."""
    from app.imaging import decode_image, model_draft_size

    settings = Settings(model=f"local-dir:{instrument_model_dir}", device="cpu", inference="bf16")
    bf16 = Encoder.from_settings(settings)
    assert bf16.inference == "bf16"
    assert _tower_dtypes(bf16) == ({torch.bfloat16}, {torch.float32})
    assert ModelSpec.from_settings(settings) == instrument_encoder.spec  # the same embedding space, same manifest
    draft = model_draft_size(instrument_encoder.image_size)
    images = [decode_image(d, max_pixels=10**9, draft_size=draft).image for d in _photos(shared_data)]
    reference = instrument_encoder.encode_images(images, batch_size=64)
    ours = bf16.encode_images(images, batch_size=64)
    assert ours.dtype == np.float32
    cosine, overlap = embedding_fidelity(reference, ours)
    assert cosine >= 0.999 and overlap >= 0.98, (cosine, overlap)
    texts = instrument_encoder.encode_texts(QUERIES)
    np.testing.assert_allclose(bf16.encode_texts(QUERIES), texts, atol=1e-6)
    # what a user sees: each query's top 10 photos are (nearly) the fp32 path's
    top = [set(np.argsort(-(reference @ q))[:10]) for q in texts]
    ours_top = [set(np.argsort(-(ours @ q))[:10]) for q in texts]
    assert np.mean([len(a & b) / 10 for a, b in zip(top, ours_top, strict=True)]) >= 0.95


def test_bf16_lanes_index_what_the_fp32_path_indexes(
    settings: Settings, tiny_encoder: Encoder, tmp_path: Path, shared_data: Path
) -> None:
    """An indexing run in bf16 on two lanes: the same files indexed and failed, vectors within 1e-3 of fp32's."""
    folder = tmp_path / "catalog"
    folder.mkdir()
    for path in _real_photos(shared_data, 24):
        shutil.copy2(path, folder / f"{path.parent.name}-{path.name}")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    bf16_settings = settings.model_copy(update={"inference": "bf16", "encode_lanes": 2})
    bf16 = Encoder.from_settings(bf16_settings, indexing=True)
    assert bf16.inference == "bf16" and bf16.image_lanes == 2
    catalogs = []
    for name, ours, encoder in (("fp32", settings, tiny_encoder), ("bf16", bf16_settings, bf16)):
        ours = ours.model_copy(update={"data_dir": tmp_path / name})
        store = Store(ours.effective_database_url)
        summary = Indexer(ours, store, encoder, progress=False).run([folder])
        catalogs.append((summary, store))
    (ref_summary, ref_store), (summary, store) = catalogs
    assert (summary.embedded, summary.failed) == (ref_summary.embedded, ref_summary.failed) == (24, 1)
    # the summary says what embedded the images
    assert "img/s on torch fp32); " in ref_summary.lines()[1]
    assert "img/s on torch bf16 products, 2 lanes); " in summary.lines()[1]
    ref_states, states = ref_store.file_states(), store.file_states()
    indexed = sorted(p for p, s in states.items() if s.status == ImageStatus.INDEXED)
    assert indexed == sorted(p for p, s in ref_states.items() if s.status == ImageStatus.INDEXED)
    ours_v = np.stack([store.vector(states[p].id) for p in indexed])
    ref_v = np.stack([ref_store.vector(ref_states[p].id) for p in indexed])
    cosines = np.sum(ours_v * ref_v, axis=1)
    assert cosines.min() >= 0.999 and cosines.max() < 1.0 - 1e-7, cosines  # close, and really bf16 (not fp32)
    for s in (ref_store, store):
        s.close()


def test_bf16_is_cpu_only_and_warns_where_the_cpu_emulates_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ModelLoadError, match="CLIPSEARCH_DEVICE=cpu"):
        quantize.check_inference("bf16", torch.device("cuda"))
    monkeypatch.setattr(quantize, "native_bf16", lambda: True)
    monkeypatch.setattr(quantize, "bf16_pays", lambda: True)
    with caplog.at_level(logging.WARNING, logger="app.quantize"):
        assert quantize.check_inference("bf16", torch.device("cpu")) == "bf16"
    assert not caplog.records
    monkeypatch.setattr(quantize, "native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="app.quantize"):
        assert quantize.check_inference("bf16", torch.device("cpu")) == "bf16"
    assert "no native bfloat16" in caplog.text and "use 'auto'" in caplog.text
    caplog.clear()
    monkeypatch.setattr(quantize, "native_bf16", lambda: True)
    monkeypatch.setattr(quantize, "bf16_pays", lambda: False)  # the instructions, but slow products
    with caplog.at_level(logging.WARNING, logger="app.quantize"):
        assert quantize.check_inference("bf16", torch.device("cpu")) == "bf16"
    assert "no faster than fp32" in caplog.text and "use 'auto'" in caplog.text


def test_auto_takes_bf16_only_where_its_products_run_faster_than_fp32(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    measured: list[int] = []

    def speedup(value: float) -> object:
        return lambda: measured.append(1) or value

    quantize.bf16_pays.cache_clear()
    try:
        monkeypatch.setattr(quantize, "native_bf16", lambda: False)
        monkeypatch.setattr(quantize, "bf16_product_speedup", speedup(3.0))
        assert quantize.bf16_pays() is False and not measured  # no instructions: nothing to measure
        for ratio, expected in ((3.4, True), (1.8, True), (0.53, False), (1.1, False)):
            quantize.bf16_pays.cache_clear()
            monkeypatch.setattr(quantize, "native_bf16", lambda: True)
            monkeypatch.setattr(quantize, "bf16_product_speedup", speedup(ratio))
            with caplog.at_level(logging.INFO, logger="app.quantize"):
                assert quantize.bf16_pays() is expected, ratio
                assert quantize.bf16_pays() is expected  # measured once per process
            assert f"at {ratio:.2f}x fp32's speed" in caplog.text
            assert ("image tower in bf16" if expected else "image tower in fp32") in caplog.text
            caplog.clear()
        assert len(measured) == 4
    finally:
        quantize.bf16_pays.cache_clear()


def test_the_bf16_probe_times_real_products() -> None:
    ratio = quantize.bf16_product_speedup(rows=32, width=64, reps=2)
    assert np.isfinite(ratio) and ratio > 0


def test_native_bf16_reads_the_cpus_bfloat16_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    for avx512_bf16, amx, expected in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert quantize.native_bf16() is expected
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert quantize.native_bf16() is False  # a torch without the probes: assume emulation


def test_bf16_needs_an_image_tower() -> None:
    with pytest.raises(ModelLoadError, match="image tower"):
        quantize.quantize(torch.nn.Linear(2, 2), "bf16")


def test_an_index_built_in_fp32_is_served_by_a_bf16_service_that_says_so(
    tmp_path: Path, tiny_model_dir: Path, tiny_encoder: Encoder
) -> None:
    from tests.api.conftest import assert_served_in_mode

    assert_served_in_mode(tmp_path, tiny_model_dir, tiny_encoder, "bf16")


@pytest.mark.parametrize("native", [True, False])
def test_auto_indexing_runs_images_on_bf16_where_the_cpu_multiplies_it(
    native: bool,
    tiny_model_dir: Path,
    tiny_encoder: Encoder,
    tmp_path: Path,
    shared_data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """'auto' on a CPU: the indexing encoder's image tower on torch bf16 where the CPU has bf16 instructions (its
    ORT image session let go), ORT fp32 elsewhere; the text tower on ORT either way, and the service's start keeps
    the image export in its launch record."""
    from app import encoder as encoder_module
    from app import onnx_backend
    from app.onnx_encoder import OnnxEncoder

    monkeypatch.setattr(encoder_module, "bf16_pays", lambda: native)
    opened: list[str] = []
    real_session = onnx_backend.new_session

    def recording_session(path: Path, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path).name)
        return real_session(path, *args, **kwargs)

    monkeypatch.setattr(onnx_backend, "new_session", recording_session)
    settings = Settings(model=f"local-dir:{tiny_model_dir}", device="cpu", inference="auto", data_dir=tmp_path)
    for first_run in (True, False):  # exporting the towers, then finding them cached
        opened.clear()
        indexing = Encoder.from_settings(settings, indexing=True)
        # no ORT session for an image tower that runs on torch bf16 (its export is still written, for the service)
        assert opened == (["text.onnx"] if native else ["text.onnx", "image.onnx"]), first_run
        assert indexing.image_inference == ("bf16" if native else "onnx")
    service = Encoder.from_settings(settings)
    assert indexing.inference == service.inference == service.image_inference == "onnx"
    assert indexing.image_inference == ("bf16" if native else "onnx")
    assert (indexing.image_tower_file() is None) is native  # Ray ships the tower only when it is ORT's
    assert indexing.image_backend == ("torch bf16 products" if native else "ONNX Runtime fp32")
    assert _tower_dtypes(indexing)[0] == ({torch.bfloat16} if native else {torch.float32})
    images = [Image.open(p).convert("RGB") for p in _real_photos(shared_data, 16)]
    reference = tiny_encoder.encode_images(images)
    cosines = np.sum(indexing.encode_images(images) * reference, axis=1)
    assert cosines.min() >= 0.999
    assert bool(cosines.max() < 1.0 - 1e-7) is native
    np.testing.assert_allclose(indexing.encode_texts(QUERIES), service.encode_texts(QUERIES), atol=1e-6)
    light = OnnxEncoder.open(settings)
    assert light is not None and light.towers.image is not None  # the service starts without torch, images too
    explicit = Encoder.from_settings(settings.with_overrides(inference="onnx"), indexing=True)
    assert explicit.image_inference == "onnx"  # only 'auto' chooses bf16


def test_ray_actors_under_auto_run_bf16_where_native_else_fp32(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from indexer import ray_engine

    auto = settings.with_overrides(inference="auto", device="cpu")
    monkeypatch.setattr(ray_engine, "bf16_pays", lambda: True)
    assert ray_engine._actor_auto_mode(auto) == "bf16"
    monkeypatch.setattr(ray_engine, "resolve_device", lambda requested: torch.device("cuda"))
    assert ray_engine._actor_auto_mode(auto) == "fp32"  # a GPU actor: autocast, not bf16 weights
    monkeypatch.undo()
    monkeypatch.setattr(ray_engine, "bf16_pays", lambda: False)
    assert ray_engine._actor_auto_mode(auto) == "fp32"


def test_bf16_runs_every_product_of_the_image_tower_in_bf16_and_nothing_else(tiny_model_dir: Path) -> None:
    encoder = Encoder.from_settings(Settings(model=f"local-dir:{tiny_model_dir}", device="cpu", inference="bf16"))
    visual = list(encoder.model.visual.modules())
    assert not [m for m in visual if isinstance(m, nn.Linear | nn.MultiheadAttention)]  # all converted
    products = [m for m in visual if isinstance(m, quantize.Bf16Linear)]
    assert len(products) >= 4 * len(encoder.model.visual.transformer.resblocks)  # qkv, out, fc, proj per block
    # around the products the tower stays fp32: patch embedding, norms, positional embedding
    assert {p.dtype for n, p in encoder.model.visual.named_parameters() if "ln_" in n or "conv1" in n} == {
        torch.float32
    }
    assert any(isinstance(m, nn.MultiheadAttention) for m in encoder.model.transformer.modules())  # text untouched


def test_a_bf16_linear_layer_is_the_product_of_bf16_rounded_operands() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = quantize.Bf16Linear.of(linear)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        got = layer(x)
        rounded = nn.functional.linear(x.bfloat16().float(), linear.weight.bfloat16().float()) + linear.bias
        exact = linear(x)
    assert got.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.float32
    torch.testing.assert_close(got, rounded, atol=2e-2, rtol=1e-2)  # the product's own rounding to bf16 only
    assert 0 < float((got - exact).abs().max()) < 0.05


def test_bf16_keeps_the_activations_between_its_products_in_bf16(tiny_model_dir: Path) -> None:
    """Each block's attention and MLP hand bf16 from one product to the next (the residual stream and the layer
    norms stay fp32), and the tower still computes what the fp32 one does."""
    import open_clip

    torch.manual_seed(0)
    reference = open_clip.create_model(f"local-dir:{tiny_model_dir}").visual.eval()
    tower = open_clip.create_model(f"local-dir:{tiny_model_dir}").visual.eval()
    tower.load_state_dict(reference.state_dict())
    quantize.to_bf16_products(tower)
    blocks = list(tower.transformer.resblocks)
    assert blocks and all(
        isinstance(b.attn, quantize.Bf16SelfAttention) and isinstance(b.mlp, quantize.Bf16Mlp) for b in blocks
    )
    assert not any(type(m) is nn.Linear for m in tower.modules())  # every other product is a Bf16Linear
    seen: dict[str, set[torch.dtype]] = {"activation in": set(), "out_proj in": set(), "block out": set()}

    def record(name: str, value: torch.Tensor) -> None:
        seen[name].add(value.dtype)

    for block in blocks:
        block.mlp.activation.register_forward_hook(lambda _m, args, _o: record("activation in", args[0]))
        block.attn.out_proj.register_forward_hook(lambda _m, args, _o: record("out_proj in", args[0]))
        block.register_forward_hook(lambda _m, _a, out: record("block out", out))
    pixels = torch.randn(6, 3, *reference.image_size)
    with torch.inference_mode():
        ours, ref = tower(pixels), reference(pixels)
    assert seen == {"activation in": {torch.bfloat16}, "out_proj in": {torch.bfloat16}, "block out": {torch.float32}}
    assert ours.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(ours, ref)
    assert float(cosine.min()) >= 0.9999 and float(cosine.max()) < 1.0 - 1e-7, cosine  # close, and really bf16


@pytest.mark.parametrize("mask", ["none", "causal bool", "causal float"])
def test_bf16_self_attention_computes_multihead_attention(mask: str) -> None:
    torch.manual_seed(1)
    attention = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(3, 10, 64)
    causal = torch.triu(torch.ones(10, 10, dtype=torch.bool), diagonal=1)
    attn_mask = {
        "none": None,
        "causal bool": causal,
        "causal float": torch.zeros(10, 10).masked_fill(causal, float("-inf")),
    }[mask]
    ours = quantize.Bf16SelfAttention(quantize.LinearSelfAttention(attention))
    with torch.inference_mode():
        expected = attention(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        got = ours(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
    assert got.dtype == torch.float32
    assert float((got - expected).abs().max()) <= 0.02 * float(expected.abs().max()), (got - expected).abs().max()
    with pytest.raises(ValueError, match="self-attention"):
        ours(x, torch.randn(3, 10, 64), x)


def test_only_plain_mlps_get_a_bf16_hidden_layer() -> None:
    plain = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    assert quantize.Bf16Mlp.parts(plain) == tuple(plain)
    for other in (
        nn.Sequential(nn.Linear(8, 32), nn.PReLU(), nn.Linear(32, 8)),  # an activation with weights of its own
        nn.Sequential(nn.Linear(8, 32), nn.GELU()),
        nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(), nn.Linear(32, 8)),
        nn.Linear(8, 8),
    ):
        assert quantize.Bf16Mlp.parts(other) is None
    mlp = quantize.Bf16Mlp(*plain)
    x = torch.randn(5, 8)
    with torch.inference_mode():
        got, expected = mlp(x), plain(x)
    assert got.dtype == torch.float32
    assert float((got - expected).abs().max()) <= 0.02 * float(expected.abs().max())

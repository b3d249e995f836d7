"""The past-aware ONNX text tower and its prefix cache (app.onnx_text): the full encode's vectors whatever was
cached, only the new tokens run, the cache within its bound, none in the int8 mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app import onnx_text
from app.api import create_app
from app.config import Settings
from app.encoder import Encoder, _pooled_positions
from app.model_spec import ModelSpec
from app.onnx_text import PastTextRunner, is_past_tower
from tests.api.conftest import api_settings, build_index
from tests.api.test_operations import metric_value
from tests.helpers import copy_photos

# typed one after another (each a prefix of the next, or sharing its first words), then unrelated ones
TYPED = ["a red", "a red bic", "a red bicycle", "a red bicycle leaning on a wall", "a red car", "a photo of a dog"]
OTHERS = ["leopard", "two cats asleep on a sofa in the sun", "x", "the", "a photo of a leopard in the grass at night"]


@pytest.fixture(scope="module")
def onnx_encoders(instrument_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Encoder]:
    spec = ModelSpec.from_settings(Settings(model=f"local-dir:{instrument_model_dir}"))
    cache = tmp_path_factory.mktemp("onnx-text")
    return {
        mode: Encoder(spec, torch.device("cpu"), inference=mode, onnx_cache_dir=cache) for mode in ("onnx", "onnx-int8")
    }


def full_encode(encoder: Encoder, texts: list[str]) -> np.ndarray:
    """The reference: the torch tower on all 77 positions, normalised."""
    with torch.inference_mode():
        features = encoder.model.encode_text(encoder.tokenizer(texts)).numpy()
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def runner_of(encoder: Encoder) -> PastTextRunner:
    assert encoder._onnx is not None and encoder._onnx.text is not None
    runner = encoder._onnx.text_runner
    assert runner is not None
    return runner


def test_the_text_tower_is_exported_with_its_past(onnx_encoders: dict[str, Encoder]) -> None:
    for encoder in onnx_encoders.values():
        assert encoder._onnx is not None and is_past_tower(encoder._onnx.text)
        names = [o.name for o in encoder._onnx.text.get_outputs()]
        assert names == ["features", "keys", "values"]


def test_vectors_are_the_full_encodes_cold_warm_and_batched(onnx_encoders: dict[str, Encoder]) -> None:
    encoder = onnx_encoders["onnx"]
    runner = runner_of(encoder)
    runner.clear()
    texts = TYPED + OTHERS
    want = full_encode(encoder, texts)
    cold = np.stack([encoder.encode_texts([t])[0] for t in texts])  # each after the ones before it
    assert runner.rows_cached > 0
    warm = np.stack([encoder.encode_texts([t])[0] for t in reversed(texts)])[::-1]  # every prefix cached now
    batch = encoder.encode_texts(texts)
    runner.clear()
    batch_cold = encoder.encode_texts(texts)
    for got in (cold, warm, batch, batch_cold):
        assert np.abs(got - want).max() <= 1e-5


def test_a_query_runs_only_the_tokens_after_its_cached_prefix(
    onnx_encoders: dict[str, Encoder], monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = onnx_encoders["onnx"]
    assert encoder._onnx is not None
    real_session = encoder._onnx.text
    fed: list[tuple[int, ...]] = []

    class Spy:  # ORT's session type does not take new attributes: wrap it
        def __getattr__(self, name: str) -> object:
            return getattr(real_session, name)

        def run(self, outputs: object, feeds: dict[str, np.ndarray]) -> object:
            fed.append(tuple(feeds["tokens"].shape) + (feeds["past_keys"].shape[2],))
            return real_session.run(outputs, feeds)

    monkeypatch.setattr(encoder._onnx, "text", Spy())
    runner = runner_of(encoder)  # a runner of the spy, its cache empty
    assert runner.session is encoder._onnx.text and runner.cached_positions == 0
    tokens = encoder.tokenizer(["a photo of a dog", "a photo of a cat"])
    dog_len, cat_len = (int(n) + 1 for n in _pooled_positions(encoder.model, tokens))
    encoder.encode_texts(["a photo of a dog"])
    encoder.encode_texts(["a photo of a cat"])
    encoder.encode_texts(["a photo of a cat"])
    # cold: every token from the start; then everything before "cat" was cached ("<start> a photo of a"); the
    # same query again: everything but its pooled end token
    assert fed[0] == (1, dog_len, 0)
    assert fed[1] == (1, 2, cat_len - 2)
    assert fed[2] == (1, 1, cat_len - 1)
    assert runner.cached_positions == dog_len - 1 + 1  # the dog prefix's positions, and "cat"


def test_the_cache_keeps_within_its_bound_and_evicts_extensions_before_their_prefixes(
    onnx_encoders: dict[str, Encoder],
) -> None:
    encoder = onnx_encoders["onnx"]
    session = runner_of(encoder).session
    bound = 12 * PastTextRunner(session, cache_bytes=0).position_bytes
    runner = PastTextRunner(session, cache_bytes=bound)
    assert runner.max_positions == 12
    texts = [f"a photo of a {word} in the snow" for word in ("dog", "cat", "car", "boat", "tree", "bird")]
    tokens = encoder.tokenizer(texts).numpy()
    pooled = _pooled_positions(encoder.model, torch.from_numpy(tokens)).numpy()
    want = full_encode(encoder, texts)
    for i in range(len(texts)):
        length = int(pooled[i]) + 1
        got = runner.encode(tokens[i : i + 1, :length], pooled[i : i + 1])
        assert runner.cached_positions <= 12
        assert np.abs(got / np.linalg.norm(got) - want[i]).max() <= 1e-5
    # the last query's whole prefix is there, and the start token, shared by all, was never evicted
    before = runner.rows_cached
    last = int(pooled[-1]) + 1
    runner.encode(tokens[-1:, :last], pooled[-1:])
    assert runner.rows_cached - before == last - 1
    start_only = np.array([[tokens[0, 0], tokens[0, pooled[0]]]])  # <start> <end>
    before = runner.rows_cached
    runner.encode(start_only, np.array([1]))
    assert runner.rows_cached - before == 1


def test_a_prefix_evicted_while_its_query_runs_is_not_extended(onnx_encoders: dict[str, Encoder]) -> None:
    """Two threads share the runner: while one query's run computes (the lock released), another query's run
    evicts the positions the first one took from the cache. The first must still get its vector, store nothing
    unreachable and keep the bound (it raised a KeyError while touching the evicted positions: a flaky CI run)."""
    encoder = onnx_encoders["onnx"]
    real = runner_of(encoder).session
    texts = ["a photo of a dog in the snow", "a photo of a dog in the city", "two red boats on a quiet lake"]
    tokens = encoder.tokenizer(texts).numpy()
    pooled = _pooled_positions(encoder.model, torch.from_numpy(tokens)).numpy()
    want = full_encode(encoder, texts)

    def ask(i: int) -> np.ndarray:
        got = runner.encode(tokens[i : i + 1, : int(pooled[i]) + 1], pooled[i : i + 1])[0]
        return got / np.linalg.norm(got)

    class Interleaving:
        """The real session, but its second run first lets another query run (and evict) in between."""

        def __init__(self) -> None:
            self.runs = 0

        def get_inputs(self) -> list[object]:
            return real.get_inputs()  # type: ignore[no-any-return]

        def run(self, *args: object, **kwargs: object) -> list[np.ndarray]:
            self.runs += 1
            if self.runs == 2:
                assert np.abs(ask(2) - want[2]).max() <= 1e-5  # evicts the first query's prefix
            return real.run(*args, **kwargs)  # type: ignore[no-any-return]

    bound = 9  # the second query's prefix (8 positions) fits; with the third's, the oldest go
    runner = PastTextRunner(Interleaving(), cache_bytes=bound * PastTextRunner(real, cache_bytes=0).position_bytes)
    assert np.abs(ask(0) - want[0]).max() <= 1e-5  # caches "a photo of a dog in the"
    assert np.abs(ask(1) - want[1]).max() <= 1e-5  # takes most of it from the cache, then the third runs
    assert runner.cached_positions <= bound
    # what is cached is reachable: every cached prefix's beginnings are cached too
    cached = list(runner._cache)
    assert all(key[:end] in runner._cache for key in cached for end in range(1, len(key)))
    for i in range(3):  # and serves every query exactly again
        assert np.abs(ask(i) - want[i]).max() <= 1e-5


def test_no_cache_in_the_int8_mode_nor_when_turned_off(onnx_encoders: dict[str, Encoder]) -> None:
    encoder = onnx_encoders["onnx-int8"]
    runner = runner_of(encoder)
    assert runner.max_positions == 0
    first = encoder.encode_texts(["a photo of a dog"])
    second = encoder.encode_texts(["a photo of a dog"])
    np.testing.assert_array_equal(first, second)  # nothing asked before changes a vector
    assert runner.rows_cached == 0 and runner.cached_positions == 0
    session = runner_of(onnx_encoders["onnx"]).session
    try:
        onnx_text.set_prefix_cache_bytes(0)
        assert PastTextRunner(session).max_positions == 0
        onnx_text.set_prefix_cache_bytes(1 << 20)
        assert PastTextRunner(session).max_positions == (1 << 20) // PastTextRunner(session).position_bytes
    finally:
        onnx_text.set_prefix_cache_bytes(Settings().text_prefix_cache_mb << 20)


def test_bad_positions_are_refused_with_a_reason(onnx_encoders: dict[str, Encoder]) -> None:
    runner = runner_of(onnx_encoders["onnx"])
    tokens = np.array([[49406, 320, 49407]])
    with pytest.raises(ValueError, match="outside the 3 tokens"):
        runner.encode(tokens, np.array([3]))
    with pytest.raises(ValueError, match="one pooled position per row"):
        runner.encode(tokens, np.array([2, 2]))


def test_a_tower_not_taken_apart_is_exported_whole_and_encodes_as_before(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app import text_prefix

    # a tower whose blocks app.text_prefix does not take (custom blocks) is written as the plain truncated graph
    monkeypatch.setattr(text_prefix.PrefixTower, "of", classmethod(lambda cls, model, bf16=False: None))
    spec = ModelSpec.from_settings(Settings(model=f"local-dir:{tiny_model_dir}"))
    encoder = Encoder(spec, torch.device("cpu"), inference="onnx", onnx_cache_dir=tmp_path)
    assert encoder._onnx is not None and encoder._onnx.text is not None
    assert not is_past_tower(encoder._onnx.text) and encoder._onnx.text_runner is None
    texts = ["a red bicycle", "two dogs", "a photo of a leopard in the grass"]
    want = full_encode(encoder, texts)
    assert np.abs(np.stack([encoder.encode_texts([t])[0] for t in texts]) - want).max() <= 1e-5
    assert np.abs(encoder.encode_texts(texts) - want).max() <= 1e-5


def test_the_export_reads_its_sizes_once_not_per_layer(tiny_model_dir: Path, tmp_path: Path) -> None:
    import copy

    import onnx

    from app import onnx_backend

    model = Encoder.from_settings(Settings(model=f"local-dir:{tiny_model_dir}", device="cpu")).model
    shallow = copy.deepcopy(model)
    shallow.transformer.resblocks = shallow.transformer.resblocks[:1]
    assert len(model.transformer.resblocks) > 1

    def shape_reads(tower: torch.nn.Module, name: str) -> int:
        onnx_backend.export_text_tower(tower, tmp_path / name)
        return sum(node.op_type == "Shape" for node in onnx.load(tmp_path / name).graph.node)

    # a size read off a layer's own tensor is a chain of nodes per layer that ORT cannot merge across layers (609
    # nodes after its optimisation instead of 368 for ViT-B-32): the graph reads its inputs' sizes only
    assert shape_reads(model, "deep.onnx") == shape_reads(shallow, "shallow.onnx")


def test_the_service_reuses_prefixes_and_reports_its_rows(tiny_model_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    copy_photos(tmp_path / "catalog", 4)
    settings = api_settings(data_dir, tiny_model_dir, inference="onnx")
    build_index(settings, Encoder.from_settings(settings), [tmp_path / "catalog"])
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["inference"] == "onnx"
        first = client.get("/search", params={"q": "a photo of an animal", "k": 4})
        second = client.get("/search", params={"q": "a photo of an animal in the snow", "k": 4})
        assert first.status_code == second.status_code == 200
        text = client.get("/metrics").text
    computed = metric_value(text, 'clipsearch_text_token_rows{kind="computed"}')
    cached = metric_value(text, 'clipsearch_text_token_rows{kind="cached"}')
    # the second query took "<start> a photo of an animal" from the first: at least those 6 rows
    assert cached >= 6 and computed > 0


def test_threads_sharing_the_runner_get_the_full_encodes(onnx_encoders: dict[str, Encoder]) -> None:
    import threading

    encoder = onnx_encoders["onnx"]
    session = runner_of(encoder).session
    runner = PastTextRunner(session, cache_bytes=40 * PastTextRunner(session, cache_bytes=0).position_bytes)
    texts = [
        f"a {adj} {noun} in the {place}"
        for adj in ("red", "small")
        for noun in ("dog", "car")
        for place in ("snow", "city")
    ]
    texts += TYPED + OTHERS
    tokens = encoder.tokenizer(texts).numpy()
    pooled = _pooled_positions(encoder.model, torch.from_numpy(tokens)).numpy()
    want = full_encode(encoder, texts)
    errors: list[str] = []

    def worker(offset: int) -> None:  # every thread asks every text, each from another starting point
        for step in range(len(texts)):
            i = (offset * 5 + step) % len(texts)
            got = runner.encode(tokens[i : i + 1, : int(pooled[i]) + 1], pooled[i : i + 1])[0]
            if np.abs(got / np.linalg.norm(got) - want[i]).max() > 1e-5:
                errors.append(texts[i])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert runner.cached_positions <= 40 and runner.rows_cached > 0

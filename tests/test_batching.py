"""Concurrent text queries share model calls (app.batching), and each caller still gets its own vectors."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from app.batching import TextBatcher
from app.encoder import Encoder


def fake_vectors(texts: Sequence[str]) -> np.ndarray:
    """A deterministic vector per text: its length and the code of its first letter."""
    return np.array([[len(t), ord(t[0])] for t in texts], dtype=np.float32)


class GatedEncoder:
    """The first call blocks until released, so that other callers queue up behind it."""

    def __init__(self, inner=fake_vectors) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.calls: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if len(self.calls) == 1:
            self.started.set()
            assert self.release.wait(10)
        if any(t.startswith("boom") for t in texts):
            raise ValueError("the model failed")
        return self.inner(texts)  # type: ignore[no-any-return]


def counted(batcher: TextBatcher) -> list[int]:
    """The texts of each model call the batcher makes from now on, through its ``on_batch`` hook."""
    sizes: list[int] = []
    batcher.on_batch = sizes.append
    return sizes


def wait_until(condition, seconds: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = threading.Event()
    timer = threading.Timer(seconds, deadline.set)
    timer.start()
    try:
        while not condition():
            assert not deadline.wait(0.005), "timed out"
    finally:
        timer.cancel()


def test_a_lone_query_runs_at_once_and_queued_ones_share_one_call() -> None:
    model = GatedEncoder()
    batcher = TextBatcher(model, max_texts=32)
    batches = counted(batcher)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher.encode, ["alone"])
        assert model.started.wait(10)  # the first caller found the model idle and runs alone
        texts = [[f"q{i}", f"r{i}x"] if i % 2 else [f"q{i}"] for i in range(6)]
        later = [pool.submit(batcher.encode, t) for t in texts]
        wait_until(lambda: len(batcher._waiting) == len(texts))  # noqa: SLF001 - all queued behind the first
        model.release.set()
        np.testing.assert_array_equal(first.result(timeout=30), fake_vectors(["alone"]))
        for t, future in zip(texts, later, strict=True):
            np.testing.assert_array_equal(future.result(timeout=30), fake_vectors(t))
    assert model.calls[0] == ["alone"]
    assert len(model.calls) == 2 and sorted(model.calls[1]) == sorted(t for ts in texts for t in ts)
    assert batches == [1, 9]


def test_a_batch_holds_at_most_max_texts_and_the_lead_passes_on() -> None:
    model = GatedEncoder()
    batcher = TextBatcher(model, max_texts=3)
    batches = counted(batcher)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher.encode, ["a"])
        assert model.started.wait(10)
        later = [pool.submit(batcher.encode, [f"t{i}", f"u{i}"]) for i in range(4)]
        wait_until(lambda: len(batcher._waiting) == 4)  # noqa: SLF001
        model.release.set()
        for i, future in enumerate(later):
            np.testing.assert_array_equal(future.result(timeout=30), fake_vectors([f"t{i}", f"u{i}"]))
        first.result(timeout=30)
    # 2 + 2 texts would pass 3: each request of two texts goes alone, in arrival order
    assert batches == [1, 2, 2, 2, 2]
    assert not batcher._busy and not batcher._waiting  # noqa: SLF001 - idle again


def test_an_error_reaches_every_caller_of_its_batch_and_later_calls_work() -> None:
    model = GatedEncoder()
    batcher = TextBatcher(model)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(batcher.encode, ["fine"])
        assert model.started.wait(10)
        failing = [pool.submit(batcher.encode, [text]) for text in ("boom", "ok")]
        wait_until(lambda: len(batcher._waiting) == 2)  # noqa: SLF001
        model.release.set()
        first.result(timeout=30)
        for future in failing:
            with pytest.raises(ValueError, match="the model failed"):
                future.result(timeout=30)
    np.testing.assert_array_equal(batcher.encode(["next"]), fake_vectors(["next"]))


def test_a_real_tower_gives_the_same_vectors_batched_as_alone(tiny_encoder: Encoder) -> None:
    """Padding short queries to the batch's longest one changes nothing (the causal mask): callers whose texts
    were encoded together get the vectors of their texts encoded alone."""
    texts = ["a dog", "a red bicycle leaning on a wall", "snow", "a photo of a small boat at night", "cat"]
    alone = np.concatenate([tiny_encoder.encode_texts([t]) for t in texts])
    model = GatedEncoder(tiny_encoder.encode_texts)
    batcher = TextBatcher(model)
    batches = counted(batcher)
    with ThreadPoolExecutor(len(texts)) as pool:
        first = pool.submit(batcher.encode, texts[:1])
        assert model.started.wait(10)
        later = [pool.submit(batcher.encode, [t]) for t in texts[1:]]
        wait_until(lambda: len(batcher._waiting) == len(later))  # noqa: SLF001
        model.release.set()
        got = np.concatenate([first.result(timeout=30)] + [f.result(timeout=30) for f in later])
    assert batches == [1, len(later)]
    np.testing.assert_allclose(got, alone, atol=1e-5)

"""Coalescing concurrent text queries into one model call.

A text tower answering one short query on a CPU is bound by reading its weights (ViT-B-32's text tower: 151 MB of
fp32 matrices per call), not by arithmetic, so a batch of queries costs little more than one: with ONNX Runtime on
the 2-core host of the README, 1 query took 10.3 ms, 8 took 35 ms and 32 took 124 ms. Under concurrent load the
service therefore encodes together the queries that arrived while the model was busy, instead of one after
another. A query that finds the model idle runs at once, alone, so a single client sees no delay.

No thread of its own: the first caller to find the model idle leads, runs one batch (its own texts first, then
whatever else is waiting, up to ``max_texts``), hands every caller its vectors, and passes the lead to the next
waiting caller, if any.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)
class _Request:
    texts: Sequence[str]
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    vectors: np.ndarray | None = None
    error: BaseException | None = None


class TextBatcher:
    """``encode(texts)`` through ``encode_many``, merged with the texts of concurrent callers. Thread-safe."""

    def __init__(self, encode_many: Callable[[Sequence[str]], np.ndarray], max_texts: int = 32) -> None:
        self.encode_many = encode_many
        self.max_texts = max(1, max_texts)
        self._lock = threading.Lock()
        self._waiting: list[_Request] = []
        self._busy = False
        #: called with the number of texts of each model call (the service's metrics)
        self.on_batch: Callable[[int], object] | None = None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        request = _Request(list(texts))
        with self._lock:
            self._waiting.append(request)
            lead = request.lead = not self._busy
            self._busy = True
        if not lead:
            request.done.wait()  # answered by a leader, or made the leader
        if request.lead:
            self._run_batch()
        if request.error is not None:
            raise request.error
        assert request.vectors is not None
        return request.vectors

    def _run_batch(self) -> None:
        """One model call for the oldest waiting requests (the leader's is the oldest), then the lead moves on."""
        with self._lock:
            batch = [self._waiting.pop(0)]
            count = len(batch[0].texts)
            while self._waiting and count + len(self._waiting[0].texts) <= self.max_texts:
                count += len(self._waiting[0].texts)
                batch.append(self._waiting.pop(0))
        texts = [text for request in batch for text in request.texts]
        try:
            vectors = self.encode_many(texts)
            if self.on_batch is not None:
                self.on_batch(len(texts))
            start = 0
            for request in batch:
                request.vectors = vectors[start : start + len(request.texts)]
                start += len(request.texts)
        except BaseException as exc:  # noqa: BLE001 - raised on every caller of this batch
            for request in batch:
                request.error = exc
        with self._lock:
            if self._waiting:
                successor = self._waiting[0]
                successor.lead = True
                successor.done.set()
            else:
                self._busy = False
        for request in batch[1:]:
            request.done.set()

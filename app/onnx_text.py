"""The exported text tower with its past: a query computes only the tokens after a prefix it shares with earlier ones.

open_clip's text towers attend causally, so the keys and values of position i in every layer depend only on the
tokens up to i. ``app.onnx_backend.PastTextTower`` is exported with that made explicit: it takes the keys and values
of the first P positions (``past_keys``, ``past_values``: layers x heads x P x head width, shared by every row of
the batch) and the tokens after them, and returns the features pooled at each row's EOT together with the new
positions' keys and values. Its last layer computes the pooled row only (nothing else of that layer is read).

:class:`PastTextRunner` keeps the keys and values of recent token prefixes in a bounded LRU and feeds each query
the longest one it has. Typing a query ("a red", "a red bicy", "a red bicycle") or asking many that open alike
("a photo of ...") then runs only the new tokens: on a 2-core AVX2 CPU the fp32 ViT-B-32 tower costs about 6 ms
of weight reading plus 0.25 ms per token row, and 1.3 ms more for each further 6 rows (ORT's AVX2 kernel takes 6
rows per pass over the weights), so a 7- or 8-token query whose first word is cached runs in one pass instead of
two (docs/PERFORMANCE.md, session 18). Even a cold query skips its start token, which is always cached.

The vectors are the full encode's to float rounding (tests/test_onnx_text.py: within 1e-5 with and without a
cached prefix). The int8 mode runs without the cache: it quantises activations over the rows it is given, so a
cached prefix would change a query's vector with what was asked before it.

Torch-free (numpy only): the service's ONNX start (``app.onnx_encoder``) runs it too.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

#: the graph's inputs that mark a past-aware text tower (older exports take ``tokens`` and ``pooled_at`` only)
PAST_INPUTS = ("past_keys", "past_values")
#: the prefix cache's bound for runners made from now on (CLIPSEARCH_TEXT_PREFIX_CACHE_MB, set by the service's
#: ``load_encoder``; ViT-B-32: 48 KB per token position, so 32 MB hold about 680 positions)
_cache_bytes = 32 << 20


def set_prefix_cache_bytes(size: int) -> None:
    """Bound the prefix cache of the runners made from now on (0: none)."""
    global _cache_bytes
    _cache_bytes = max(0, int(size))


def prefix_cache_bytes() -> int:
    return _cache_bytes


def is_past_tower(session: Any) -> bool:
    """Whether ``session`` runs a past-aware text tower."""
    names = {i.name for i in session.get_inputs()}
    return all(name in names for name in PAST_INPUTS)


class PastTextRunner:
    """Runs a past-aware text tower session, with an LRU of token prefixes' keys and values of at most
    ``cache_bytes`` (default: ``set_prefix_cache_bytes``'s; 0: no cache, every query computed from its first
    token)."""

    def __init__(self, session: Any, cache_bytes: int | None = None) -> None:
        self.session = session
        shape = next(i.shape for i in session.get_inputs() if i.name == "past_keys")
        self.layers, self.heads, self.head_width = int(shape[0]), int(shape[1]), int(shape[3])
        self.position_bytes = 2 * self.layers * self.heads * self.head_width * 4  # keys and values, float32
        self.max_positions = (prefix_cache_bytes() if cache_bytes is None else cache_bytes) // self.position_bytes
        # prefix (the tokens up to and including a position) -> that position's (keys, values), layers x heads x
        # head width each; the most recently used last, every prefix's ancestors after it (evicted after it)
        self._cache: OrderedDict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        #: token rows run and token rows taken from the cache since the runner was made
        self.rows_run = 0
        self.rows_cached = 0

    @property
    def cached_positions(self) -> int:
        return len(self._cache)

    def encode(self, tokens: np.ndarray, pooled_at: np.ndarray) -> np.ndarray:
        """Features (not normalised) of ``tokens`` (batch, length) pooled at ``pooled_at`` (batch,): what the whole
        tower gives on ``tokens``. The rows' common prefix before their first pooled position is taken from the
        cache as far as it is there; what this call computes of that prefix is added to it."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        pooled_at = np.asarray(pooled_at, dtype=np.int64)
        if tokens.ndim != 2 or pooled_at.shape != (tokens.shape[0],):
            raise ValueError(f"tokens must be (batch, length) with one pooled position per row, got {tokens.shape}")
        if tokens.shape[0] == 0:
            raise ValueError("no texts to encode")
        if int(pooled_at.min()) < 0 or int(pooled_at.max()) >= tokens.shape[1]:
            raise ValueError(f"pooled positions {pooled_at.tolist()} outside the {tokens.shape[1]} tokens given")
        shared = self._shared_length(tokens, int(pooled_at.min()))
        prefix = tuple(tokens[0, :shared].tolist())
        with self._lock:
            keys, values, past = self._lookup(prefix)
            self.rows_run += tokens.shape[0] * (tokens.shape[1] - past)
            self.rows_cached += tokens.shape[0] * past
        features, new_keys, new_values = self.session.run(
            None,
            {
                "tokens": tokens[:, past:],
                "pooled_at": pooled_at - past,
                "past_keys": keys,
                "past_values": values,
            },
        )
        if self.max_positions and shared > past:
            with self._lock:
                self._store(prefix, past, new_keys[:, 0], new_values[:, 0])
        result: np.ndarray = features
        return result

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def _shared_length(self, tokens: np.ndarray, limit: int) -> int:
        """How many first tokens all rows share, at most ``limit`` (the first pooled position: never a pooled row)."""
        if not self.max_positions:
            return 0
        if tokens.shape[0] == 1:
            return limit
        differs = (tokens[:, :limit] != tokens[0, :limit]).any(axis=0)
        return int(differs.argmax()) if differs.any() else limit

    def _lookup(self, prefix: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int]:
        """The cached keys and values of ``prefix``'s longest cached beginning, and its length (hold _lock)."""
        found: list[tuple[np.ndarray, np.ndarray]] = []
        for end in range(1, len(prefix) + 1):
            entry = self._cache.get(prefix[:end])
            if entry is None:
                break
            found.append(entry)
        self._touch(prefix, len(found))
        if not found:
            empty = np.zeros((self.layers, self.heads, 0, self.head_width), dtype=np.float32)
            return empty, empty, 0
        keys = np.stack([k for k, _ in found], axis=2)
        values = np.stack([v for _, v in found], axis=2)
        return keys, values, len(found)

    def _store(self, prefix: tuple[int, ...], past: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Cache positions ``past`` .. len(prefix) - 1 from the run's new ``keys``/``values`` (layers x heads x new
        positions x head width), then evict the least recently used beyond the bound (hold _lock). Nothing when a
        position before ``past`` left the cache while the run computed (another thread's run evicted it): its
        extensions would be unreachable, and touching it failed (a KeyError in the calling query)."""
        if any(prefix[:end] not in self._cache for end in range(1, past + 1)):
            return
        for position in range(past, len(prefix)):
            column = position - past
            self._cache[prefix[: position + 1]] = (
                np.ascontiguousarray(keys[:, :, column]),
                np.ascontiguousarray(values[:, :, column]),
            )
        self._touch(prefix, len(prefix))
        while len(self._cache) > self.max_positions:
            self._cache.popitem(last=False)

    def _touch(self, prefix: tuple[int, ...], length: int) -> None:
        """Mark the first ``length`` positions of ``prefix`` used, the deepest first, so that a prefix is always
        more recent than its extensions and eviction takes the extensions first."""
        for end in range(length, 0, -1):
            self._cache.move_to_end(prefix[:end])

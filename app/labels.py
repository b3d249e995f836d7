"""Tags and flags of a page's candidates, for tag filters, safe search and facets.

A search page reads the labels of up to 1,000 candidates (``search_max_candidates``) to count facets, which every
``/search`` does by default. From the database that costs about 17 ms at 5 tags per image (SQLite, 1,000 ids;
6 ms of it in SQLite itself), more than the text tower. So the service keeps a read-only snapshot of every
image's labels in numpy arrays (about 40 bytes per image at 5 tags) and answers from it in well under a
millisecond; the database is read only while no snapshot matches the store's tags generation:

- a snapshot is valid for one tags generation (``Store.tags_generation``, a new token on every write of labels);
  when the generation changes the snapshot is dropped at once and pages read the database (through a small
  cache), so that no stale tag is ever served;
- a new snapshot is built on a background thread once the generation has stayed the same for
  ``SETTLE_SECONDS`` (an indexer writing labels every batch would otherwise rebuild it non-stop), and on
  start-up straight away;
- a snapshot built is also saved under the data dir (``labels/labels-<generation>.npz``), so that a start whose
  store has the same labels reads it back instead of the database: 1M images with 5 tags each took 2.4-3.2 s
  from the database, during which pages read the database too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.id_cache import IdCache
from app.store import ImageLabels, Store

log = logging.getLogger(__name__)

#: how long the tags generation must stay unchanged before a new snapshot is built
SETTLE_SECONDS = 10.0
#: the snapshot looks ids up in an array indexed by id while the largest id is at most this many times the number
#: of labelled images plus the slack (else by binary search)
DENSE_IDS_FACTOR = 4
DENSE_IDS_SLACK = 1_000_000
#: the saved snapshot's layout (LabelTable.save); a file of another format is built again from the database
SNAPSHOT_FORMAT = 1
SNAPSHOT_PREFIX = "labels-"
STALE_TEMP_SECONDS = 3600.0


@dataclass(frozen=True)
class CandidateLabels:
    """The labels of some images, as arrays: image ``ids[j]`` has tag codes ``codes[offsets[j]:offsets[j+1]]``
    (``names[code]``; the names are sorted, so codes compare as names do) and a safe-search flag if
    ``flagged[j]``."""

    ids: np.ndarray
    offsets: np.ndarray
    codes: np.ndarray
    flagged: np.ndarray
    names: Sequence[str]
    code_of: Mapping[str, int]

    @classmethod
    def from_mapping(cls, ids: np.ndarray, labels: Mapping[int, ImageLabels]) -> CandidateLabels:
        """From per-image labels (the database path); ids missing from ``labels`` have none."""
        items = [labels.get(i) for i in ids.tolist()]
        names = sorted({tag for item in items if item is not None for tag in item.tags})
        code_of = {name: code for code, name in enumerate(names)}
        codes: list[int] = []
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        flagged = np.zeros(len(ids), dtype=bool)
        for j, item in enumerate(items):
            if item is not None:
                codes.extend(code_of[tag] for tag in item.tags)
                flagged[j] = item.flagged
            offsets[j + 1] = len(codes)
        return cls(ids, offsets, np.asarray(codes, dtype=np.int32), flagged, names, code_of)

    def _owners(self) -> np.ndarray:
        """For each entry of ``codes``, the position of its image."""
        return np.repeat(np.arange(len(self.ids)), np.diff(self.offsets))

    def accepts(self, tags: Sequence[str], safe: bool) -> np.ndarray:
        """Per image: carries every one of ``tags``, and (``safe``) no flag."""
        keep = ~self.flagged if safe else np.ones(len(self.ids), dtype=bool)
        if tags:
            wanted = [self.code_of.get(tag, -1) for tag in tags]
            if min(wanted) < 0:  # a tag no candidate carries
                return np.zeros(len(self.ids), dtype=bool)
            matches = np.isin(self.codes, wanted)
            found = np.bincount(self._owners()[matches], minlength=len(self.ids))
            keep &= found == len(wanted)
        return keep

    def facets(self, ids: Sequence[int], limit: int) -> list[tuple[str, int]]:
        """The ``limit`` most frequent tags over the images ``ids`` (a subset of ``self.ids``), as (tag, count),
        ties by name."""
        if limit <= 0 or not len(self.codes):
            return []
        if len(ids) == len(self.ids):  # a subset as large as the whole: all of them (a page without filters)
            chosen_codes = self.codes
        else:
            chosen_codes = self.codes[np.isin(self.ids, np.asarray(ids, dtype=np.int64))[self._owners()]]
        counts = np.bincount(chosen_codes, minlength=len(self.names))
        present = np.flatnonzero(counts)
        top = present[np.lexsort((present, -counts[present]))][:limit]  # codes follow the names' order
        return [(self.names[c], int(counts[c])) for c in top.tolist()]


@dataclass(frozen=True)
class LabelTable:
    """Every labelled image's tags and flags (``every``, its ids sorted) at one tags generation."""

    generation: str
    every: CandidateLabels
    #: image id -> position in ``every`` (-1: no labels), when the ids are dense enough for an array
    position: np.ndarray | None = None

    @classmethod
    def load(cls, store: Store) -> LabelTable:
        generation, tag_columns, flagged_ids = store.label_columns()
        names = [name for name, _ in tag_columns]
        sizes = [len(ids) for _, ids in tag_columns]
        tagged = np.concatenate([ids for _, ids in tag_columns]) if tag_columns else np.zeros(0, dtype=np.int64)
        codes = np.repeat(np.arange(len(names), dtype=np.int32), sizes)
        order = np.argsort(tagged, kind="stable")
        tagged, codes = tagged[order], codes[order]
        # the ids once each, from the sorted column (np.union1d would sort all 5M rows of 1M images again: 0.76 s)
        first = np.ones(len(tagged), dtype=bool)
        np.not_equal(tagged[1:], tagged[:-1], out=first[1:])
        ids = tagged[first]
        flagged_only = np.setdiff1d(flagged_ids, ids, assume_unique=True)  # flagged, no tag above its threshold
        if len(flagged_only):
            ids = np.union1d(ids, flagged_only)
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.bincount(np.searchsorted(ids, tagged), minlength=len(ids)))
        every = CandidateLabels(
            ids, offsets, codes, np.isin(ids, flagged_ids), names, {n: i for i, n in enumerate(names)}
        )
        return cls.of(generation, every)

    @classmethod
    def of(cls, generation: str, every: CandidateLabels) -> LabelTable:
        # Store ids are dense (autoincrement): a direct look-up array costs 4 bytes per id and spares a binary
        # search over millions of ids per candidate.
        ids = every.ids
        position = None
        if len(ids) and int(ids[-1]) <= DENSE_IDS_FACTOR * len(ids) + DENSE_IDS_SLACK:
            position = np.full(int(ids[-1]) + 1, -1, dtype=np.int32)
            position[ids] = np.arange(len(ids), dtype=np.int32)
        return cls(generation, every, position)

    @staticmethod
    def path_in(folder: Path, generation: str) -> Path:
        return folder / f"{SNAPSHOT_PREFIX}{generation}.npz"

    def save(self, folder: Path) -> Path:
        """Write the snapshot to ``folder`` (written to a temporary file, then renamed into place) and remove the
        files of other generations. Raises OSError."""
        folder.mkdir(parents=True, exist_ok=True)
        path = self.path_in(folder, self.generation)
        temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        every = self.every
        try:
            with temp.open("wb") as handle:
                np.savez(
                    handle,
                    format=np.array(SNAPSHOT_FORMAT),
                    generation=np.array(self.generation),
                    ids=every.ids,
                    offsets=every.offsets,
                    codes=every.codes,
                    flagged=every.flagged,
                    names=np.array(list(every.names), dtype=str),
                )
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        for old in folder.glob(f"{SNAPSHOT_PREFIX}*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
        # what a process stopped while writing left behind (the writing thread is a daemon): an hour is past any write
        for stale in folder.glob(f".{SNAPSHOT_PREFIX}*.tmp"):
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > STALE_TEMP_SECONDS:
                    stale.unlink()
        return path

    @classmethod
    def read(cls, folder: Path, generation: str) -> LabelTable | None:
        """The snapshot saved for ``generation``, or None when there is none. Raises ValueError for a file that
        does not hold a consistent snapshot of that generation (and what numpy and zipfile raise for one that
        cannot be read)."""
        path = cls.path_in(folder, generation)
        try:
            npz = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        with npz:
            if int(npz["format"]) != SNAPSHOT_FORMAT or str(npz["generation"]) != generation:
                raise ValueError(f"{path} is not a snapshot of this generation in format {SNAPSHOT_FORMAT}")
            ids, offsets, codes, flagged = (npz[key] for key in ("ids", "offsets", "codes", "flagged"))
            names = [str(name) for name in npz["names"]]
        consistent = (
            ids.dtype == np.int64
            and offsets.dtype == np.int64
            and codes.dtype == np.int32
            and flagged.dtype == np.bool_
            and len(offsets) == len(ids) + 1
            and len(flagged) == len(ids)
            and int(offsets[0]) == 0
            and int(offsets[-1]) == len(codes)
            and bool(np.all(np.diff(offsets) >= 0))
            and bool(np.all(np.diff(ids) > 0))
            and (not len(codes) or 0 <= int(codes.min()) <= int(codes.max()) < len(names))
        )
        if not consistent:
            raise ValueError(f"{path} does not hold a consistent label snapshot")
        every = CandidateLabels(ids, offsets, codes, flagged, names, {n: i for i, n in enumerate(names)})
        return cls.of(generation, every)

    def labels_of(self, ids: np.ndarray) -> CandidateLabels:
        """The labels of ``ids`` (in their order; ids without labels get none)."""
        every = self.every
        if self.position is not None:
            found = self.position[np.clip(ids, 0, len(self.position) - 1)]
            present = (found >= 0) & (ids >= 0) & (ids < len(self.position))
            pos = np.maximum(found, 0)
        else:
            pos = np.minimum(np.searchsorted(every.ids, ids), max(len(every.ids) - 1, 0))
            present = every.ids[pos] == ids if len(every.ids) else np.zeros(len(ids), dtype=bool)
        starts = np.where(present, every.offsets[pos], 0)
        sizes = np.where(present, every.offsets[pos + 1] - starts, 0)
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        # positions in every.codes of each candidate's codes, in candidate order
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], sizes)
        codes = every.codes[np.repeat(starts, sizes) + within]
        flagged = present & every.flagged[pos] if len(every.ids) else present
        return CandidateLabels(ids, offsets, codes, flagged, every.names, every.code_of)

    @property
    def nbytes(self) -> int:
        every, position = self.every, self.position
        arrays = every.ids.nbytes + every.offsets.nbytes + every.codes.nbytes + every.flagged.nbytes
        return int(arrays + (position.nbytes if position is not None else 0))


class Labels:
    """The labels a search page needs: from the snapshot when it matches the store's tags generation, else from
    the database through an LRU cache (see the module's docstring). Thread-safe."""

    def __init__(
        self,
        store: Store,
        check_seconds: float,
        capacity: int,
        *,
        settle_seconds: float = SETTLE_SECONDS,
        in_memory: bool = True,
        saved_in: Path | None = None,
    ) -> None:
        """``in_memory`` False: never build the snapshot (CLIPSEARCH_LABELS_IN_MEMORY). ``saved_in``: the folder
        where snapshots are saved and read back (None: built from the database every time)."""
        self.store = store
        self.in_memory = in_memory
        self.saved_in = saved_in
        self.check_seconds = check_seconds
        self.settle_seconds = settle_seconds
        self._cache: IdCache[ImageLabels] = IdCache(store.labels_of_many, capacity, default=ImageLabels())
        self._lock = threading.Lock()
        self._generation: str | None = None
        self._changed_at = float("-inf")  # when the generation last changed (start-up: long ago)
        self._next_check = 0.0
        self._table: LabelTable | None = None
        self._building = False

    @property
    def table(self) -> LabelTable | None:
        """The snapshot in use (None while pages read the database)."""
        return self._table

    @property
    def building(self) -> bool:
        """Whether a snapshot is being built on the background thread."""
        return self._building

    def of(self, ids: np.ndarray) -> CandidateLabels:
        self._check_generation()
        table = self._table
        if table is not None:
            return table.labels_of(ids)
        return CandidateLabels.from_mapping(ids, self._cache.get_many(ids.tolist()))

    def _check_generation(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.check_seconds
        generation = self.store.tags_generation()
        with self._lock:
            if generation != self._generation:
                self._cache.clear()
                if self._generation is not None:  # a change seen while serving (not the first look)
                    self._changed_at = now
                self._generation = generation
            table = self._table
            if table is not None and table.generation != generation:
                self._table = table = None  # never serve labels the store no longer holds
            settled = now - self._changed_at >= self.settle_seconds
            start = self.in_memory and table is None and not self._building and settled
            if start:
                self._building = True
        if start:
            threading.Thread(target=self._build, name="label-table", daemon=True).start()

    def _build(self) -> None:
        started = time.perf_counter()
        with self._lock:
            generation = self._generation
        table, source = self._read_saved(generation), "read from its saved copy"
        if table is None:
            source = "built"
            try:
                table = LabelTable.load(self.store)
            except Exception:  # noqa: BLE001 - the database path keeps serving; a later check tries again
                log.warning(
                    "could not build the in-memory label table; reading labels from the database", exc_info=True
                )
                table = None
            if table is not None:
                self._save(table)
        with self._lock:
            self._building = False
            if table is None:
                self._changed_at = time.monotonic()  # try again once settle_seconds have passed, not at once
            if table is not None and table.generation == self._generation:
                self._table = table
        if table is not None:
            log.info(
                "label table: %d labelled images, %d tags, %.1f MB, %s in %.2fs",
                len(table.every.ids),
                len(table.every.codes),
                table.nbytes / 1e6,
                source,
                time.perf_counter() - started,
            )

    def _read_saved(self, generation: str | None) -> LabelTable | None:
        """The snapshot saved for ``generation`` (not for '': no labels were ever written through the store, which
        marks every write with a new generation), or None."""
        if self.saved_in is None or not generation:
            return None
        try:
            return LabelTable.read(self.saved_in, generation)
        except Exception as exc:  # noqa: BLE001 - a damaged file (a bad zip, a missing array...): build it again
            log.warning("the saved label table cannot be used (%s): building it from the database", exc)
            return None

    def _save(self, table: LabelTable) -> None:
        if self.saved_in is None or not table.generation:
            return
        try:
            table.save(self.saved_in)
        except Exception as exc:  # noqa: BLE001 - a full disk, a read-only data dir: the table still serves
            log.warning("could not save the label table in %s (%s): the next start builds it again", self.saved_in, exc)

    def start(self) -> None:
        """Begin building the snapshot now (service start), rather than at the first page that needs it."""
        self._next_check = 0.0
        self._check_generation()

    def clear(self) -> None:
        self._cache.clear()

"""The on-disk index (``app.index_ondisk``) in the indexer: built from the store part by part, kept compact.

A build never holds the catalog: the template is trained on the indexer's training sample, then the stored
vectors stream into parts of at most ``ondisk_part_vectors`` (``write_store_parts``: by this process, or by Ray
tasks, one id range each), written to a temporary folder inside the index dir; the parts are merged into shards
of at most ``SHARD_VECTORS`` and the folder is removed. The shards are committed by ``OnDiskIndex.save`` like any
other index: until then the previous manifest (of any kind) stays in force, and files of an interrupted build are
deleted by the next commit.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np

from app.config import Settings
from app.index import nlist_for
from app.index_ondisk import Compaction, OnDiskIndex, merge_parts, plan_compaction, train_template, write_parts
from app.store import Store

log = logging.getLogger(__name__)

#: Vectors per shard of a build (SQ8 at 512-d: ~27 GB, the unit of copy and of rebuild; see docs/SCALE.md).
SHARD_VECTORS = 50_000_000
BUILD_FOLDER_PREFIX = ".build-"

#: Writes the parts of a build into a folder from the trained template; returns their files in id order.
PartWriter = Callable[[faiss.IndexIVF, Path], list[Path]]


def write_store_parts(
    store: Store,
    model_key: str,
    template: faiss.IndexIVF,
    folder: Path,
    *,
    max_vectors: int,
    after: int = 0,
    upto: int | None = None,
    prefix: str = "part",
) -> list[Path]:
    """The stored vectors with ids in (after, upto] as part files of at most ``max_vectors`` (the local build
    writes all of them; each Ray task, one id range)."""
    chunks = store.iter_vectors(model_key, after=after, upto=upto)
    return write_parts(template, chunks, folder, max_vectors=max_vectors, prefix=prefix)


def build_from_store(
    settings: Settings,
    training: np.ndarray,
    expected: int,
    write: PartWriter,
) -> OnDiskIndex:
    """Train the template on ``training``, let ``write`` fill the parts, merge them into shards in the index dir.

    Returns the index, not yet committed: ``save`` switches the manifest to it."""
    directory = settings.index_dir
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{BUILD_FOLDER_PREFIX}*"):  # a build killed before it could clean up
        shutil.rmtree(stale, ignore_errors=True)
    nlist = max(1, min(nlist_for(expected, len(training)), len(training)))
    template = train_template(training, nlist)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    folder = directory / f"{BUILD_FOLDER_PREFIX}{stamp}"
    try:
        parts = write(template, folder)
        if not parts:
            raise ValueError("the store gave no vectors to build the on-disk index from")
        names = [
            merge_parts(template, group, directory, f"shard-{stamp}-{number:03d}")
            for number, group in enumerate(_shard_groups(parts, settings.ondisk_part_vectors))
        ]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    log.info("built an on-disk index: %d vectors in %d part(s), %d shard(s)", expected, len(parts), len(names))
    return OnDiskIndex.from_shards(directory, names, nprobe=settings.nprobe)


def _shard_groups(parts: list[Path], part_vectors: int) -> list[list[Path]]:
    per_shard = max(1, SHARD_VECTORS // max(part_vectors, 1))
    return [parts[start : start + per_shard] for start in range(0, len(parts), per_shard)]


def compaction_for(settings: Settings, index: OnDiskIndex, *, force: bool = False) -> Compaction:
    """The settings' compaction policy (``app.index_ondisk.plan_compaction``) applied to ``index``."""
    return plan_compaction(
        index.shard_states(),
        small_vectors=settings.ondisk_part_vectors,
        max_small_shards=settings.ondisk_max_small_shards,
        max_deleted_fraction=settings.ondisk_max_deleted,
        shard_vectors=SHARD_VECTORS,
        force=force,
    )


def maybe_compact(settings: Settings, index: OnDiskIndex, *, model: str, pretrained: str, force: bool = False) -> str:
    """Compact a saved on-disk index when the policy asks for it (always, with ``force``); says what it did."""
    plan = compaction_for(settings, index, force=force)
    if not plan:
        return ""
    before = len(index.shards)
    index.compact(plan, model=model, pretrained=pretrained)
    done = f"compacted the on-disk index ({plan.describe()}): {before} -> {len(index.shards)} shard(s)"
    log.info(done)
    return done

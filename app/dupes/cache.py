"""The prepared catalog images and the ORB-vote shortlist, kept on disk between runs.

Preparing a catalog image (decode + ORB + thumbnail) costs 30-70 ms; a server that prepared its whole catalog
at every start spent minutes of CPU before its shortlist was complete. ``clipsearch index`` stores what it
prepares in two files under ``data_dir/dupes``, named after the feature parameters (a change of parameters
starts new files, never mixes features of two kinds):

* ``features-<key>.bin``: the prepared images, keyed by content sha256 (a renamed or copied file reuses them);
* ``shortlist-<key>.bin``: the FAISS binary index of the ORB-vote shortlist, with the (id, sha256) pairs it
  holds, so that a server only adds and removes what changed since.

Both use one container format: a JSON header and raw arrays, read back memory-mapped (opening a 15k-image
cache reads the header only; the pages of an image are read when it is first compared). Writes are atomic
(temporary file + ``os.replace``): a reader keeps the version it mapped, a crash leaves the previous file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from app.dupes.features import DESCRIPTOR_BYTES, LocalFeatures, PreparedImage, _encode_thumb
from app.dupes.hashing import HASH_FIELDS, ImageHashes
from app.dupes.shortlist import FeatureIndex

# The modules, not their names: parameters are read when asked for (app.dupes exports a function `shortlist`).
_features = importlib.import_module("app.dupes.features")
_shortlist = importlib.import_module("app.dupes.shortlist")

MAGIC = b"CLIPSEARCH-ARRAYS\n"
#: Bump when the layout of the files changes.
FORMAT_VERSION = 1
_ALIGN = 64


class CacheError(ValueError):
    """A cache file that cannot be used (truncated, corrupt, another format): build it again."""


def feature_params() -> dict[str, int]:
    """Everything that changes what a stored catalog image or the shortlist holds (read at call time)."""
    return {
        "format": FORMAT_VERSION,
        "features_version": _features.FEATURES_VERSION,
        "work_size": _features.WORK_SIZE,
        "min_work_size": _features.MIN_WORK_SIZE,
        "catalog_features": _features.CATALOG_FEATURES,
        "fast_threshold": _features.FAST_THRESHOLD,
        "soft_fast_threshold": _features.SOFT_FAST_THRESHOLD,
        "thumb_size": _features.THUMB_SIZE,
        "per_image": _shortlist.PER_IMAGE,
    }


def params_key() -> str:
    text = json.dumps(feature_params(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "dupes"


def features_path(data_dir: Path) -> Path:
    return cache_dir(data_dir) / f"features-{params_key()}.bin"


def shortlist_path(data_dir: Path) -> Path:
    return cache_dir(data_dir) / f"shortlist-{params_key()}.bin"


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of a file, None when there is none: os.replace gives a new stamp."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


# --- the container -------------------------------------------------------------------------------


def write_arrays(path: Path, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Write a JSON header and raw arrays (64-byte aligned) atomically to ``path``."""
    layout: dict[str, list[Any]] = {}
    offset = 0
    contiguous = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    for name, array in contiguous.items():
        layout[name] = [array.dtype.str, list(array.shape), offset]
        offset += -(-array.nbytes // _ALIGN) * _ALIGN
    meta = json.dumps({"header": dict(header), "arrays": layout}).encode()
    start = -(-(len(MAGIC) + 8 + len(meta)) // _ALIGN) * _ALIGN
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(MAGIC + struct.pack("<Q", len(meta)) + meta)
            out.write(b"\0" * (start - out.tell()))
            for name, array in contiguous.items():
                out.seek(start + layout[name][2])
                out.write(array.tobytes())
            out.truncate(start + offset)
            out.flush()
            os.fchmod(out.fileno(), 0o644)  # mkstemp's 0600 would hide the cache from a server run as another user
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_arrays(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header and the arrays (read-only memory maps) of a file written by ``write_arrays``.

    Raises FileNotFoundError when there is no file, CacheError when it is not a whole, readable one.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if handle.read(len(MAGIC)) != MAGIC:
            raise CacheError(f"{path} is not a clipsearch cache file")
        try:
            (length,) = struct.unpack("<Q", handle.read(8))
            meta = json.loads(handle.read(length)) if length < size else None
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise CacheError(f"{path} has an unreadable header: {exc}") from exc
    if not isinstance(meta, dict) or "arrays" not in meta:
        raise CacheError(f"{path} has an unreadable header")
    start = -(-(len(MAGIC) + 8 + length) // _ALIGN) * _ALIGN
    arrays: dict[str, np.ndarray] = {}
    try:
        for name, (dtype, shape, offset) in meta["arrays"].items():
            dt = np.dtype(dtype)
            count = int(np.prod(shape)) if shape else 1
            if start + offset + count * dt.itemsize > size:
                raise CacheError(f"{path} is truncated (array {name!r} runs past its end)")
            if count == 0:
                arrays[name] = np.zeros(shape, dtype=dt)
            else:
                arrays[name] = np.memmap(path, dtype=dt, mode="r", offset=start + offset, shape=tuple(shape))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CacheError):
            raise
        raise CacheError(f"{path} has an unreadable array layout: {exc}") from exc
    return meta.get("header", {}), arrays


# --- prepared catalog images ---------------------------------------------------------------------


class FeatureStore:
    """Prepared catalog images by content sha256, memory-mapped from a features file (or empty)."""

    def __init__(self, shas: list[str], arrays: Mapping[str, np.ndarray], path: Path | None = None) -> None:
        self.path = path
        #: which version of the file this is (file_stamp), to notice that another process replaced it
        self.stamp = file_stamp(path) if path is not None else None
        self._row = {sha: row for row, sha in enumerate(shas)}
        self._a = arrays

    @classmethod
    def empty(cls) -> FeatureStore:
        return cls([], {})

    @classmethod
    def load(cls, path: Path) -> FeatureStore:
        """The store in ``path``; FileNotFoundError without one, CacheError for a corrupt or foreign one."""
        header, arrays = read_arrays(path)
        if header.get("kind") != "features" or header.get("params") != feature_params():
            raise CacheError(f"{path} holds features of other parameters")
        shas = header.get("shas")
        needed = ("sizes", "scales", "digests", "hashes", "kp_offsets", "points", "descriptors", "thumb_offsets")
        if not isinstance(shas, list) or any(name not in arrays for name in (*needed, "thumbs")):
            raise CacheError(f"{path} misses part of its content")
        n = len(shas)
        if len(arrays["sizes"]) != n or len(arrays["kp_offsets"]) != n + 1 or len(arrays["thumb_offsets"]) != n + 1:
            raise CacheError(f"{path} is inconsistent ({n} images, arrays of other lengths)")
        if n and (
            int(arrays["kp_offsets"][-1]) != len(arrays["descriptors"])
            or int(arrays["thumb_offsets"][-1]) != len(arrays["thumbs"])
        ):
            raise CacheError(f"{path} is inconsistent (offsets past the data)")
        return cls(shas, arrays, path)

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, sha: object) -> bool:
        return sha in self._row

    def shas(self) -> list[str]:
        return list(self._row)

    def descriptors(self, sha: str) -> np.ndarray | None:
        """The descriptors of an image (a view of the map), strongest first: what the shortlist indexes."""
        row = self._row.get(sha)
        if row is None:
            return None
        start, end = int(self._a["kp_offsets"][row]), int(self._a["kp_offsets"][row + 1])
        return np.asarray(self._a["descriptors"][start:end])

    def get(self, sha: str | None) -> PreparedImage | None:
        row = self._row.get(sha) if sha else None
        if row is None:
            return None
        a = self._a
        width, height, work_w, work_h = (int(v) for v in a["sizes"][row])
        start, end = int(a["kp_offsets"][row]), int(a["kp_offsets"][row + 1])
        features = LocalFeatures(
            np.array(a["points"][start:end], dtype=np.float32),
            np.array(a["descriptors"][start:end], dtype=np.uint8),
            (work_w, work_h),
            float(a["scales"][row]),
        )
        t0, t1 = int(a["thumb_offsets"][row]), int(a["thumb_offsets"][row + 1])
        thumb = cv2.imdecode(np.asarray(a["thumbs"][t0:t1]), cv2.IMREAD_GRAYSCALE)
        if thumb is None:
            return None
        hashes = ImageHashes(*(int(v) for v in a["hashes"][row]))
        digest = bytes(np.asarray(a["digests"][row])).hex()
        return PreparedImage(width, height, digest, hashes, features, np.asarray(thumb, dtype=np.uint8))

    def row(self, sha: str) -> Row | None:
        """An image as stored (thumbnail still encoded), to copy into a new file."""
        row = self._row.get(sha)
        if row is None:
            return None
        a = self._a
        start, end = int(a["kp_offsets"][row]), int(a["kp_offsets"][row + 1])
        t0, t1 = int(a["thumb_offsets"][row]), int(a["thumb_offsets"][row + 1])
        w, h, ww, wh = (int(v) for v in a["sizes"][row])
        return (
            (w, h, ww, wh),
            float(a["scales"][row]),
            np.asarray(a["digests"][row]),
            [int(v) for v in a["hashes"][row]],
            np.asarray(a["points"][start:end]),
            np.asarray(a["descriptors"][start:end]),
            np.asarray(a["thumbs"][t0:t1]),
        )


#: One stored image: (width, height, work width, work height), scale, digest, hashes, points, descriptors, thumb JPEG
Row = tuple[tuple[int, int, int, int], float, np.ndarray, list[int], np.ndarray, np.ndarray, np.ndarray]


def row_of(prepared: PreparedImage) -> Row:
    features = prepared.features
    return (
        (prepared.width, prepared.height, *features.work_size),
        features.scale,
        np.frombuffer(bytes.fromhex(prepared.pixel_digest), dtype=np.uint8),
        [getattr(prepared.hashes, k) for k in HASH_FIELDS],
        np.asarray(features.points, dtype=np.float32).reshape(-1, 2),
        np.asarray(features.descriptors, dtype=np.uint8).reshape(-1, DESCRIPTOR_BYTES),
        _encode_thumb(prepared.thumb),
    )


def feature_arrays(rows: Iterable[Row]) -> dict[str, np.ndarray]:
    """The arrays of a features file from its rows, in order."""
    sizes, scales, digests, hashes, points, descriptors, thumbs = [], [], [], [], [], [], []
    kp_offsets, thumb_offsets = [0], [0]
    for size, scale, digest, hash_values, row_points, row_descriptors, thumb in rows:
        sizes.append(size)
        scales.append(scale)
        digests.append(digest)
        hashes.append(hash_values)
        points.append(row_points)
        descriptors.append(row_descriptors)
        thumbs.append(thumb)
        kp_offsets.append(kp_offsets[-1] + len(row_descriptors))
        thumb_offsets.append(thumb_offsets[-1] + len(thumb))
    n = len(sizes)
    return {
        "sizes": np.array(sizes, dtype=np.int32).reshape(n, 4),
        "scales": np.array(scales, dtype=np.float64),
        "digests": np.array(digests, dtype=np.uint8).reshape(n, 32),
        "hashes": np.array(hashes, dtype=np.uint64).reshape(n, len(HASH_FIELDS)),
        "kp_offsets": np.array(kp_offsets, dtype=np.int64),
        "points": np.concatenate(points) if points else np.zeros((0, 2), np.float32),
        "descriptors": np.concatenate(descriptors) if descriptors else np.zeros((0, DESCRIPTOR_BYTES), np.uint8),
        "thumb_offsets": np.array(thumb_offsets, dtype=np.int64),
        "thumbs": np.concatenate(thumbs) if thumbs else np.zeros(0, np.uint8),
    }


def merge_features(
    path: Path | None, old: FeatureStore, keep: Iterable[str], new: Mapping[str, PreparedImage]
) -> FeatureStore:
    """The images of ``old`` listed in ``keep`` (copied as stored) plus ``new``, written to ``path`` and mapped
    back; kept in memory when ``path`` is None. Raises OSError when the file cannot be written."""
    shas: list[str] = []
    rows: list[Row] = []
    for sha in keep:
        row = old.row(sha)
        if row is not None and sha not in new:
            shas.append(sha)
            rows.append(row)
    for sha, prepared in new.items():
        shas.append(sha)
        rows.append(row_of(prepared))
    arrays = feature_arrays(rows)
    if path is None:
        return FeatureStore(shas, arrays)
    write_arrays(path, {"kind": "features", "params": feature_params(), "shas": shas}, arrays)
    return FeatureStore.load(path)


# --- the shortlist index -------------------------------------------------------------------------


def write_shortlist(path: Path, index: FeatureIndex, keys: Mapping[int, str], built_size: int) -> None:
    """The serialised FeatureIndex and the (id -> sha256) it holds."""
    header = {
        "kind": "shortlist",
        "params": feature_params(),
        "ids": [int(i) for i in keys],
        "shas": list(keys.values()),
        "built_size": int(built_size),
    }
    write_arrays(path, header, {"index": index.serialize()})


def read_shortlist(path: Path) -> tuple[FeatureIndex, dict[int, str], int]:
    """(index, id -> sha256 it holds, catalog size it was built for); FileNotFoundError or CacheError."""
    header, arrays = read_arrays(path)
    if header.get("kind") != "shortlist" or header.get("params") != feature_params():
        raise CacheError(f"{path} holds a shortlist of other parameters")
    ids, shas = header.get("ids"), header.get("shas")
    if not isinstance(ids, list) or not isinstance(shas, list) or len(ids) != len(shas) or "index" not in arrays:
        raise CacheError(f"{path} misses part of its content")
    try:
        index = FeatureIndex.deserialize(np.asarray(arrays["index"]), [int(i) for i in ids])
    except RuntimeError as exc:  # FAISS refuses a damaged index
        raise CacheError(f"{path} holds a damaged index: {exc}") from exc
    keys = dict(zip((int(i) for i in ids), (str(s) for s in shas), strict=True))
    return index, keys, int(header.get("built_size", 0))

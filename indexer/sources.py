"""Where image files come from: local folders, or any fsspec URL (``s3://bucket/prefix``, ``memory://...``).

Local paths and ``file://`` URLs go through ``indexer.walk.scan`` (so a folder indexed by either engine keeps the
same rows); other URLs are listed with fsspec. A file's store key is its local absolute path, or its full URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from app.errors import ClipSearchError
from app.imaging import is_image_path
from indexer.walk import FileInfo, ScanResult, scan

#: Filesystems whose contents live in one process's memory: a Ray worker cannot open their files, so the
#: driver reads them and the bytes travel with the work.
PROCESS_LOCAL_PROTOCOLS = frozenset({"memory"})
#: Listing keys that carry a modification time, by filesystem (local, S3, GCS, Azure, memory).
_TIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "mtime_ns", "created")


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def protocol_of(location: str | Path) -> str:
    text = str(location)
    return text.split("://", 1)[0].lower() if is_url(text) else "file"


def local_path(location: str | Path) -> Path | None:
    """The local path of a plain path or a ``file://`` URL; None for other URLs."""
    text = str(location)
    if not is_url(text):
        return Path(text)
    if protocol_of(text) in ("file", "local"):
        return Path(text.split("://", 1)[1])
    return None


def is_process_local(path: str) -> bool:
    return protocol_of(path) in PROCESS_LOCAL_PROTOCOLS


def list_sources(roots: Sequence[str | Path], *, exclude: Sequence[Path] = ()) -> ScanResult:
    """List image files under each root (a folder, a file, or a URL of either), each once, sorted by key."""
    local_roots = [p for p in (local_path(r) for r in roots) if p is not None]
    result = scan(local_roots, exclude=list(exclude)) if local_roots else ScanResult()
    seen = {f.path for f in result.files}
    for root in roots:
        if local_path(root) is None:
            _list_url(str(root), result, seen)
    result.files.sort(key=lambda f: f.path)
    return result


def _list_url(url: str, result: ScanResult, seen: set[str]) -> None:
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ClipSearchError(f"cannot open {url}: {exc} (install the fsspec backend for this URL scheme)") from exc
    try:
        if not fs.exists(root):
            raise ClipSearchError(f"no such file or folder: {url} (check the URL you passed to 'index')")
        listing: dict[str, dict[str, Any]] = (
            {root: fs.info(root)} if fs.isfile(root) else fs.find(root, detail=True, withdirs=False)
        )
    except OSError as exc:
        result.roots.append(fs.unstrip_protocol(root))
        result.unreadable.append((url, exc.strerror or str(exc)))
        return
    result.roots.append(fs.unstrip_protocol(root).rstrip("/"))
    for name, info in listing.items():
        relative = name[len(root) :] if name.startswith(root) else name
        if any(part.startswith(".") for part in relative.split("/")) or not is_image_path(name):
            continue
        key = fs.unstrip_protocol(name)
        if key in seen:
            continue
        seen.add(key)
        result.files.append(FileInfo(path=key, size=int(info.get("size") or 0), mtime=modified_time(info)))


def modified_time(info: dict[str, Any]) -> float:
    """A listing entry's modification time in seconds (0.0 when the filesystem reports none)."""
    for key in _TIME_KEYS:
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value) / (1e9 if key == "mtime_ns" else 1.0)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0


def read_bytes(path: str) -> bytes:
    """The bytes of a file listed by list_sources (a local path or a URL)."""
    if not is_url(path):
        with open(path, "rb") as handle:
            return handle.read()
    import fsspec

    try:
        with fsspec.open(path, "rb") as handle:
            data: bytes = handle.read()
    except OSError:
        raise
    except Exception as exc:  # backends raise their own errors; the pipeline records OSError as a failure
        raise OSError(f"{exc.__class__.__name__}: {exc}") from exc
    return data

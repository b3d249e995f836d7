"""Find image files under folders: case-insensitive extensions, symlink loops and unreadable folders handled."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import ClipSearchError
from app.imaging import is_image_path


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime: float


@dataclass
class ScanResult:
    files: list[FileInfo] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)
    #: folders that could not be listed: their files are neither added nor swept as deleted
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def scan(roots: list[Path], *, exclude: list[Path] | None = None) -> ScanResult:
    """List image files under each root (a folder or a single file), each file once, in sorted order."""
    result = ScanResult()
    excluded = {os.path.realpath(p) for p in (exclude or [])}
    seen_files: set[str] = set()
    for root in roots:
        root_abs = os.path.abspath(os.path.expanduser(str(root)))
        if not os.path.exists(root_abs):
            raise ClipSearchError(f"no such file or folder: {root} (check the path you passed to 'index')")
        result.roots.append(root_abs)
        if os.path.isfile(root_abs):
            _add_file(root_abs, result, seen_files)
            continue
        _walk(root_abs, result, seen_files, excluded)
    result.files.sort(key=lambda f: f.path)
    return result


def _walk(root: str, result: ScanResult, seen_files: set[str], excluded: set[str]) -> None:
    visited: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as exc:
            result.unreadable.append((folder, exc.strerror or str(exc)))
            continue
        key = (st.st_dev, st.st_ino)
        if key in visited or os.path.realpath(folder) in excluded:
            continue  # a symlink loop, a folder reached twice, or our own data dir
        visited.add(key)
        try:
            with os.scandir(folder) as entries:
                listed = list(entries)
        except OSError as exc:
            result.unreadable.append((folder, exc.strerror or str(exc)))
            continue
        for entry in listed:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                continue
            if is_dir:
                stack.append(entry.path)
            elif is_image_path(entry.name):
                _add_file(entry.path, result, seen_files)


def _add_file(path: str, result: ScanResult, seen_files: set[str]) -> None:
    if path in seen_files:
        return
    try:
        st = os.stat(path)
    except OSError as exc:
        result.unreadable.append((path, exc.strerror or str(exc)))
        return
    if not stat.S_ISREG(st.st_mode):
        return
    seen_files.add(path)
    result.files.append(FileInfo(path=path, size=st.st_size, mtime=st.st_mtime))


def is_under(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)

"""Shared by every benchmark: what machine it ran on, and writing the results (JSON + Markdown)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
VERSIONED = (
    "torch",
    "open_clip_torch",
    "faiss-cpu",
    "numpy",
    "pillow",
    "opencv-python-headless",
    "imagehash",
    "sqlalchemy",
    "fastapi",
)


#: the SIMD extensions that move these benchmarks most (ONNX Runtime's and torch's fp32 kernels, int8 dot products)
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")


def cpu_model() -> str:
    """The CPU's name with its family/model numbers and SIMD extensions: virtual machines often name only the
    vendor ("AMD EPYC"), and two hosts so named differed by 2-4x in the same benchmark (Zen 3 without AVX-512,
    Zen 5 with AVX-512 VNNI)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
            if not line.strip():
                break  # the first processor is enough
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    simd = [flag for flag in SIMD_FLAGS if flag in flags]
    family = f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else ""
    details = ", ".join(part for part in (family, " ".join(simd)) if part)
    return f"{name} ({details})" if details else name


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_names() -> list[str]:
    """GPUs as nvidia-smi lists them (without importing torch); empty when there are none."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


#: bytes each thread sums per pass of the memory probe: far beyond any L3 of these hosts (32 MB on the Zen 3)
PROBE_BYTES = 128 << 20


def memory_read_gbps(threads: int = 0, passes: int = 5) -> float:
    """GB/s that ``threads`` threads (0: every usable core) read from memory, summing PROBE_BYTES each (numpy
    releases the GIL in the sum), the best of ``passes``. The 2-core VMs of these benchmarks share a host's memory
    with other VMs: the Zen 3's read 29 GB/s on two threads in session 18 and 12-22 GB/s on a later day, which moved
    every memory-bound figure (the text tower reads its 151 MB of weights per query) by up to 1.8x, so each result
    records the probe beside the load average."""
    import numpy as np

    count = threads or usable_cores()
    arrays = [np.ones(PROBE_BYTES // 8) for _ in range(count)]
    best = 0.0
    for _ in range(passes):
        workers = [threading.Thread(target=np.sum, args=(a,)) for a in arrays]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = max(best, count * PROBE_BYTES / (time.perf_counter() - start) / 1e9)
    return round(best, 1)


def library_versions(names: tuple[str, ...] = VERSIONED) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """The facts a reader needs to compare runs: CPU, cores, GPU, load, memory bandwidth, date, versions, commit."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "gpu": gpu_names() or None,
        "load_average": load,
        "memory_read_gbps": {"1": memory_read_gbps(1), str(usable_cores()): memory_read_gbps()},
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "versions": library_versions(),
    }


def machine_lines(machine: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    load = "/".join(str(x) for x in machine["load_average"]) or "n/a"
    reads = machine.get("memory_read_gbps") or {}  # results written before session 22 lack it
    memory = ", ".join(f"{gbps} GB/s on {threads} thread{'s' * (threads != '1')}" for threads, gbps in reads.items())
    return [
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, GPU: {', '.join(machine['gpu'] or ['none'])}",
        f"- Load average (1/5/15 min) at the end: {load}",
        *([f"- Memory read at the end (`memory_read_gbps`): {memory}"] if memory else []),
        f"- Date: {machine['date']}, commit {machine['commit'] or 'unknown'}",
        f"- Versions: {versions}",
    ]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(
    name: str, data: dict[str, Any], table: str, *, notes: str = "", results_dir: Path | None = None
) -> tuple[Path, Path]:
    """Write results/<name>.json (machine + data) and results/<name>.md (machine, table, notes); print the table.

    Returns the two paths.
    """
    folder = results_dir or RESULTS_DIR
    machine = machine_info()
    payload = {"benchmark": name, "machine": machine, **data}
    json_path, md_path = folder / f"{name}.json", folder / f"{name}.md"
    _atomic_write(json_path, json.dumps(payload, indent=2, default=str) + "\n")
    parts = [f"# Benchmark: {name}", "", *machine_lines(machine), "", table.rstrip()]
    if notes:
        parts += ["", notes.rstrip()]
    _atomic_write(md_path, "\n".join(parts) + "\n")
    print(table.rstrip())
    if notes:
        print()
        print(notes.rstrip())
    print(f"\nwrote {json_path} and {md_path}")
    return json_path, md_path


def reusable_dir(folder: Path | None, wanted: dict[str, Any], record: str, prefix: str) -> tuple[Path, bool]:
    """Where a benchmark builds its data: a new temp dir (``folder`` None), or ``folder``, reused when its record
    file (``record``, JSON) says it holds ``wanted`` (True), else emptied for a new build (False). After a build
    into ``folder``, ``write_record`` marks it."""
    if folder is None:
        return Path(tempfile.mkdtemp(prefix=prefix)), False
    data_dir = folder.resolve()
    path = data_dir / record
    if path.exists() and json.loads(path.read_text()) == wanted:
        return data_dir, True
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    return data_dir, False


def write_record(folder: Path | None, wanted: dict[str, Any], record: str) -> None:
    """Mark ``folder`` (when given) as holding ``wanted`` (``reusable_dir``)."""
    if folder is not None:
        (folder.resolve() / record).write_text(json.dumps(wanted))

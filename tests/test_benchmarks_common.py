"""The machine header every benchmark result carries (benchmarks/common.py)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import common


def test_memory_probe_reads_a_plausible_rate() -> None:
    rate = common.memory_read_gbps(1, passes=2)
    # a 128 MB sum cannot run from cache on these hosts, nor slower than a very slow disk
    assert math.isfinite(rate)
    assert 0.5 < rate < 1000


def test_results_record_the_memory_probe(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def probe(threads: int = 0, passes: int = 5) -> float:
        calls.append(threads)
        return 12.5 if threads == 1 else 21.0

    monkeypatch.setattr(common, "memory_read_gbps", probe)
    monkeypatch.setattr(common, "usable_cores", lambda: 2)
    json_path, md_path = common.write_results("probe", {"rows": []}, "| a |\n| --- |", results_dir=tmp_path)
    assert json.loads(json_path.read_text())["machine"]["memory_read_gbps"] == {"1": 12.5, "2": 21.0}
    assert "- Memory read at the end (`memory_read_gbps`): 12.5 GB/s on 1 thread, 21.0 GB/s on 2 threads" in (
        md_path.read_text().splitlines()
    )
    assert sorted(calls) == [0, 1]


def test_older_results_without_the_probe_still_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "memory_read_gbps", lambda threads=0, passes=5: 20.0)
    machine = common.machine_info()
    del machine["memory_read_gbps"]
    lines = common.machine_lines(machine)
    assert not any("Memory read" in line for line in lines)
    assert lines[0].startswith("- Machine: ")

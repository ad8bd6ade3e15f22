# syntax=docker/dockerfile:1
# The code image of the full stack (docker-compose.yml, docs/DEPLOYMENT.md). One image serves
# the Dagster code server, webserver and daemon, every run container that DockerRunLauncher
# starts, the model server and the CDC watcher. The laptop path (`make run`) does not use it.
#
#   CPU (default):  docker compose build
#   CUDA:           docker compose -f docker-compose.yml -f deploy/docker-compose.gpu.yml build
#                   (= --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128; pick
#                   the CUDA variant of the torch release that matches the host's driver)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# torch comes first, from this index: from PyPI, Linux gets the multi-GB CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG APP_UID=10001
ARG APP_GID=10001

# HF_HOME: the Hugging Face model cache, a volume (llm_twin_models in docker-compose.yml), so a
# model downloads once for the model server and any run that loads one itself.
# HF_HUB_OFFLINE=0: the stack downloads models from the hub into /models. Set explicitly, it
# stays 0 after the code loads the bundled model (which sets it to 1 with setdefault when it is
# unset). A service whose environment sets it to 1 never downloads.
# DAGSTER_HOME: deploy/dagster.yaml and deploy/workspace.yaml are copied there (below).
# LLM_TWIN_DATA_DIR: the embedded stores are not used in the stack (MONGO_URI and QDRANT_URL
# are set); this only keeps the data dir somewhere writable.
# (hadolint reads "TOKENIZERS" as a secret; it is not one.)
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/models \
    HF_HUB_OFFLINE=0 \
    DAGSTER_HOME=/opt/dagster/home \
    LLM_TWIN_DATA_DIR=/opt/llm-twin/data

RUN groupadd --gid "${APP_GID}" twin \
    && useradd --uid "${APP_UID}" --gid twin --home-dir /opt/llm-twin --no-create-home \
        --shell /usr/sbin/nologin twin

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/llm-twin

# The dependencies alone first: this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(deps))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the package, installed in place: `definitions.py` loads the `defs/` folder through the
# `dg` project (pyproject.toml's [tool.dg]) it finds beside the source; the sample corpus for
# the ingest demo stays here too.
COPY README.md ./
COPY llm_twin_features ./llm_twin_features
RUN pip install --no-deps -e . \
    && rm -rf build

# The stack's Dagster instance and workspace (the laptop ones are the top-level files).
COPY deploy/dagster.yaml deploy/workspace.yaml /opt/dagster/home/

RUN mkdir -p /models /opt/dagster/home/storage /opt/llm-twin/data \
    && chown twin:twin /models /opt/dagster/home /opt/dagster/home/storage /opt/llm-twin/data

USER ${APP_UID}:${APP_GID}
VOLUME ["/models"]
EXPOSE 3000 4000

# The code server; docker-compose.yml gives the other services their own command.
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", \
     "-m", "llm_twin_features.definitions", "--location-name", "llm_twin_features"]

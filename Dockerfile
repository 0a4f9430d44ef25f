# The narthex service images, built from the repository root; one image per service.
#
#   docker build --target service --build-arg SERVICE=gateway -t narthex/gateway:<commit> .
#   docker build --target inference-cpu --build-arg SERVICE=inference -t narthex/inference:<commit> .
#   docker build --target analytics --build-arg SERVICE=analytics -t narthex/analytics:<commit> .
#   (deploy/compose/build.sh builds them all, tags them with the commit, labels the models)
#
# One image per service rather than one for all: each carries only its own dependency closure
# (the gateway has no onnxruntime or numpy, inference no SQLAlchemy), each is deployed, scaled,
# rolled back and scanned on its own (mesh/ runs one Deployment per service), and only the
# inference image carries models and their digests (analytics carries their baselines). They
# share every layer up to the dependencies, so the cost on disk is each service's own packages.
#
# Works with the legacy builder and BuildKit alike (no cache mounts, no heredocs).

# Any python 3.11 Debian-style image: python:3.11-slim-bookworm by default; machines without
# Docker Hub use deploy/compose/make-base.sh's debootstrapped one.
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9
# onnxruntime-gpu 1.2x wants CUDA 12 and cuDNN 9.
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${UV_IMAGE} AS uv

# The workspace's metadata, not its code: what the dependency layer depends on.
FROM ${BASE_IMAGE} AS workspace
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_NO_CACHE=1 \
    UV_FROZEN=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY libs/common/pyproject.toml libs/common/
COPY libs/transactions/pyproject.toml libs/transactions/
COPY gateway/pyproject.toml gateway/
COPY services/auth/pyproject.toml services/auth/
COPY services/features/pyproject.toml services/features/
COPY services/inference/pyproject.toml services/inference/
COPY services/analytics/pyproject.toml services/analytics/
COPY cli/pyproject.toml cli/
# A wheelhouse made from uv.lock on the host (deploy/compose/wheelhouse.sh), for builds that
# cannot reach PyPI. The glob lets the build go on without one; uv.lock makes it match once.
COPY uv.lock .wheelhouse* /wheels/
COPY deploy/docker/install-deps.sh deploy/docker/install-code.sh /usr/local/lib/narthex/

# Third-party dependencies only, exactly as locked (hashes checked): cached until the lock or
# a pyproject.toml changes.
FROM workspace AS deps
ARG SERVICE
ARG EXTRAS=""
RUN uv venv --python python3 /opt/venv \
    && sh /usr/local/lib/narthex/install-deps.sh "narthex-${SERVICE}" ${EXTRAS}

# Then the code: the service's workspace members, installed (not editable) into the venv.
FROM deps AS code
ARG SERVICE
ARG EXTRAS=""
# auth's image also runs the provisioning step (narthex.cli.provision): the CLI's code comes
# along, none of its dependencies.
ARG ALSO=""
COPY libs/ libs/
COPY gateway/ gateway/
COPY services/ services/
COPY cli/ cli/
RUN sh /usr/local/lib/narthex/install-code.sh "narthex-${SERVICE}" "${ALSO}" ${EXTRAS}

# What runs: the venv, a non-root user, nothing else from the build.
FROM ${BASE_IMAGE} AS service
ARG SERVICE
ARG PORT=8000
ARG GIT_COMMIT=unknown
RUN groupadd --system --gid 10001 narthex \
    && useradd --system --uid 10001 --gid narthex --home-dir /nonexistent \
        --shell /usr/sbin/nologin narthex \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/narthex /var/lib/narthex/keys \
        /run/narthex /run/narthex/provision
COPY --from=code /opt/venv /opt/venv
COPY deploy/docker/entrypoint.sh /usr/local/bin/narthex-entrypoint
# Every service binds all interfaces in a container; each reads only its own prefix.
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 NARTHEX_SERVICE=${SERVICE} \
    NARTHEX_HEALTHCHECK_URL=http://127.0.0.1:${PORT}/healthz \
    NARTHEX_GATEWAY_HOST=0.0.0.0 NARTHEX_AUTH_HOST=0.0.0.0 NARTHEX_FEATURES_HOST=0.0.0.0 \
    NARTHEX_INFERENCE_HOST=0.0.0.0 NARTHEX_ANALYTICS_HOST=0.0.0.0
LABEL org.opencontainers.image.title="narthex-${SERVICE}" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
USER 10001:10001
WORKDIR /var/lib/narthex
EXPOSE ${PORT}
# uvicorn drains on SIGTERM: in-flight requests finish (10 s at most), then lifespan shutdown
# (inference drains its batcher); compose's stop_grace_period leaves room for both.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['NARTHEX_HEALTHCHECK_URL'], timeout=2)"]
ENTRYPOINT ["/usr/local/bin/narthex-entrypoint"]
CMD []

# The model repository's metadata.json files alone (each version's score baseline, what drift
# compares with), for analytics: the models themselves stay in the inference image.
FROM ${BASE_IMAGE} AS baselines
ARG MODELS_DIR=.state/models
COPY ${MODELS_DIR} /opt/narthex/models
RUN find /opt/narthex/models -type f ! -name metadata.json -delete \
    && find /opt/narthex/models -type d -empty -delete

# Analytics with the built-in models' baselines: without them drift has nothing to compare.
FROM service AS analytics
COPY --from=baselines --chown=0:0 /opt/narthex/models /opt/narthex/models
ENV NARTHEX_ANALYTICS_MODEL_REPOSITORY=/opt/narthex/models

# Inference on CPU (onnxruntime) with the built-in models baked in: built on the host by
# `narthex models build` (deterministic; minilm's export needs torch and the Hugging Face
# weights, which no image build should fetch), copied here, never downloaded at run time.
FROM service AS inference-cpu
ARG MODELS_DIR=.state/models
COPY --chown=0:0 ${MODELS_DIR} /opt/narthex/models
ENV NARTHEX_INFERENCE_MODEL_REPOSITORY=/opt/narthex/models

# Inference on GPU: onnxruntime-gpu on a CUDA runtime base, with uv's own Python 3.11 (the
# CUDA images' Ubuntu ships another). Needs network at build time; not built in CI.
FROM ${CUDA_BASE_IMAGE} AS gpu-workspace
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_NO_CACHE=1 UV_FROZEN=1
RUN uv python install 3.11 && uv venv --python 3.11 /opt/venv
WORKDIR /src
COPY --from=workspace /src /src
COPY --from=workspace /wheels /wheels
COPY --from=workspace /usr/local/lib/narthex /usr/local/lib/narthex
COPY libs/ libs/
COPY services/ services/
RUN sh /usr/local/lib/narthex/install-deps.sh narthex-inference --extra gpu \
    && sh /usr/local/lib/narthex/install-code.sh narthex-inference "" --extra gpu

FROM ${CUDA_BASE_IMAGE} AS inference-gpu
ARG GIT_COMMIT=unknown
ARG MODELS_DIR=.state/models
RUN groupadd --system --gid 10001 narthex \
    && useradd --system --uid 10001 --gid narthex --home-dir /nonexistent \
        --shell /usr/sbin/nologin narthex \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/narthex /run/narthex \
        /run/narthex/provision
COPY --from=gpu-workspace /opt/python /opt/python
COPY --from=gpu-workspace /opt/venv /opt/venv
COPY deploy/docker/entrypoint.sh /usr/local/bin/narthex-entrypoint
COPY --chown=0:0 ${MODELS_DIR} /opt/narthex/models
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 NARTHEX_SERVICE=inference \
    NARTHEX_HEALTHCHECK_URL=http://127.0.0.1:8003/healthz \
    NARTHEX_INFERENCE_HOST=0.0.0.0 NARTHEX_INFERENCE_PROVIDER=auto \
    NARTHEX_INFERENCE_MODEL_REPOSITORY=/opt/narthex/models
LABEL org.opencontainers.image.title="narthex-inference-gpu" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
USER 10001:10001
WORKDIR /var/lib/narthex
EXPOSE 8003
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['NARTHEX_HEALTHCHECK_URL'], timeout=2)"]
ENTRYPOINT ["/usr/local/bin/narthex-entrypoint"]
CMD []

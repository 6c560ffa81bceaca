"""The translation worker app (FastAPI): a thin HTTP shell over icma.pipeline, icma.jobs and icma.scheduler."""

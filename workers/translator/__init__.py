"""The translation worker app (FastAPI): a thin HTTP shell over icma.generation.pipeline, icma.jobs.store and icma.generation.scheduler."""

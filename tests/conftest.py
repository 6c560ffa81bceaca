"""Shared test fixtures: the reference data folder beside the repository."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"reference data folder {SHARED} is missing (it sits beside the repository)")
    return SHARED


@pytest.fixture(scope="session")
def chebi_val(shared):
    from icma.corpus import read_corpus

    corpus, _ = read_corpus(shared / "data/chebi20/validation.txt")
    return corpus

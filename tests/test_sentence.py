"""Sentence-embedding caption retrieval with the packaged all-MiniLM-L6-v2 (offline)."""

import numpy as np
import pytest

from icma.core.errors import IndexMismatchError, InputError
from icma.retrieval import Exclusion, build_index, load_index


@pytest.fixture(scope="module")
def small(chebi_val):
    return chebi_val.subset(range(150), name="val150")


@pytest.fixture(scope="module")
def index(small):
    return build_index("sentence", small)


def test_caption_finds_itself_and_paraphrase_ranks_high(index, small):
    hits = index.search([small.descriptions[7]], 3)[0]
    assert hits[0].cid == small.cids[7] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    # a reworded caption still finds its molecule among the top hits
    paraphrase = small.descriptions[7].replace("The molecule is", "This compound is")
    assert small.cids[7] in [h.cid for h in index.search([paraphrase], 5)[0]]
    assert small.cids[7] not in [h.cid for h in index.search(
        [small.descriptions[7]], 3, [Exclusion(cids=frozenset([small.cids[7]]))])[0]]


def test_embeddings_are_unit_vectors_and_match_a_direct_forward(index, small):
    assert np.allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)
    again = index.encoder.embed([small.descriptions[0]])[0]
    np.testing.assert_allclose(again, index.embeddings[0], atol=1e-5)  # batch padding is masked


def test_round_trip_and_errors(tmp_path, index, small):
    index.save(tmp_path / "s")
    back = load_index(tmp_path / "s", kind="sentence", corpus=small)
    q = [small.descriptions[3], "The molecule is an amino acid."]
    assert [[h.cid for h in r] for r in back.search(q, 4)] == \
        [[h.cid for h in r] for r in index.search(q, 4)]
    with pytest.raises(InputError, match="caption"):
        index.search(["   "], 2)
    with pytest.raises(IndexMismatchError, match="not 'graph'"):
        load_index(tmp_path / "s", kind="graph")
    with pytest.raises(InputError, match="no model folder"):
        build_index("sentence", small, model=str(tmp_path / "nothing"))

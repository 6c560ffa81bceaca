"""Fingerprint indexes against RDKit's own Tanimoto (the oracle)."""

import numpy as np
import pytest
from rdkit import DataStructs

from icma.core import chem
from icma.core.errors import IndexMismatchError, InputError
from icma.retrieval import Exclusion, build_index, load_index


@pytest.fixture(scope="module")
def small(chebi_val):
    return chebi_val.subset(range(400), name="val400")


@pytest.mark.parametrize("kind,fp", [("morgan", chem.morgan_fp), ("rdkit", chem.rdkit_path_fp)])
def test_scores_equal_rdkit_tanimoto(small, kind, fp):
    index = build_index(kind, small)
    queries = [small.smiles[i] for i in (0, 17, 123, 399)] + ["CCO", "c1ccccc1O"]
    scores = index.scores(queries)
    table = [fp(chem.parse_smiles(s)) for s in small.smiles]
    for qi, q in enumerate(queries):
        ref = np.array(DataStructs.BulkTanimotoSimilarity(fp(chem.parse_smiles(q)), table)
                       if kind == "morgan" else
                       [DataStructs.FingerprintSimilarity(fp(chem.parse_smiles(q)), t) for t in table])
        np.testing.assert_allclose(scores[qi], ref, atol=1e-12)


def test_rdkit_path_fp_is_molregpts_fingerprintmol():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from rdkit.Chem.Fingerprints import FingerprintMols
    for s in ["CCO", "c1ccccc1C(=O)O", "C[C@H](N)C(=O)O", "CCCCCCCCCCCCCCCCCC(=O)OCC(O)CO"]:
        mol = chem.parse_smiles(s)
        assert chem.rdkit_path_fp(mol) == FingerprintMols.FingerprintMol(mol)
    # folding really happens: small molecules get short fingerprints
    assert chem.rdkit_path_fp(chem.parse_smiles("CCO")).GetNumBits() < 2048


def test_search_self_first_and_exclusions(small):
    index = build_index("morgan", small)
    q = small.smiles[5]
    hits = index.search([q], 3)[0]
    assert hits[0].cid == small.cids[5] and hits[0].score == pytest.approx(1.0)
    hits = index.search([q], 3, [Exclusion(cids=frozenset([small.cids[5]]))])[0]
    assert small.cids[5] not in [h.cid for h in hits] and len(hits) == 3
    same = index.search([q], 3, [Exclusion(canonical_smiles=small.canonical[5])])[0]
    assert all(small.canonical[h.row] != small.canonical[5] for h in same)


def test_save_load_round_trip(tmp_path, small):
    for kind in ("morgan", "rdkit"):
        index = build_index(kind, small)
        index.save(tmp_path / kind)
        back = load_index(tmp_path / kind, kind=kind, corpus=small)
        q = [small.smiles[3], "CCN"]
        assert back.search(q, 5) == index.search(q, 5)
    with pytest.raises(IndexMismatchError, match="not 'bm25'"):
        load_index(tmp_path / "morgan", kind="bm25")
    with pytest.raises(IndexMismatchError, match="built over corpus"):
        load_index(tmp_path / "morgan", corpus=small.subset(range(10)))


def test_bad_query_names_position(small):
    index = build_index("morgan", small)
    with pytest.raises(InputError, match=r"queries\[1\].*syntax"):
        index.search(["CCO", "C1CC"], 2)
    with pytest.raises(InputError, match="k must be"):
        index.search(["CCO"], 0)


def test_random_index_is_seeded(small):
    a = build_index("random", small, seed=1)
    assert a.search(["x"], 4) == a.search(["x"], 4)
    assert a.search(["x"], 4) != a.search(["y"], 4)
    assert a.search(["x"], 4) != build_index("random", small, seed=2).search(["x"], 4)
    with pytest.raises(InputError, match="seed"):
        build_index("random", small, seed=-1)

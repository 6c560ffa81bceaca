"""GraphIndex: GNN embeddings + FAISS cosine search over ChEBI-20 molecules."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from rdkit import Chem

from icma.core import chem
from icma.core.corpus import Corpus, Record
from icma.retrieval.encoders import load_encoder
from icma.core.errors import IndexMismatchError, InputError
from icma.core.settings import get_settings
from icma.retrieval import Exclusion, ExclusionRule, build_index, load_index
from icma.retrieval.graph import GraphIndex

# A ChEBI-20 test molecule with tetrahedral stereo and bond directions.
STEROID = "C[C@]12CCC(=O)C=C1CC[C@@H]3[C@@H]2C(=O)C[C@]\\\\4([C@H]3CC/C4=C/C(=O)OC)C"


def _record(cid: str, smiles: str) -> Record:
    return Record(cid, smiles, chem.canonical_smiles(smiles), "")


def _rewritten(smiles: str, seed: int) -> str:
    """The same structure written another way (atoms in a shuffled order, not canonical)."""
    mol = chem.parse_smiles(smiles)
    perm = np.random.default_rng(seed).permutation(mol.GetNumAtoms()).tolist()
    out = Chem.MolToSmiles(Chem.RenumberAtoms(mol, perm), canonical=False)
    assert out != smiles and chem.canonical_smiles(out) == chem.canonical_smiles(smiles)
    return out


@pytest.fixture(scope="module")
def index(chebi_train_300):
    return build_index("graph", chebi_train_300, settings=get_settings())


@pytest.fixture(scope="module")
def with_duplicates(chebi_train_300):
    """300 molecules, then the steroid at rows 300 and 302 (written two ways), CID 'x' between."""
    records = list(chebi_train_300.records) + [
        _record("steroid-a", STEROID), _record("x", "CCO"),
        _record("steroid-b", _rewritten(STEROID, 3))]
    corpus = Corpus(records, name="with-duplicates", has_captions=False)
    return GraphIndex.build(corpus, settings=get_settings())


def test_manifest_names_the_encoder(index):
    enc = load_encoder(settings=get_settings())
    assert index.params["encoder"] == "gcn_supervised_contextpred"
    assert index.params["arch"] == "gcn" and index.params["encoder_sha256"] == enc.sha256
    assert index.embeddings.shape == (300, 300)
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("row", [0, 57, 123, 299])
def test_corpus_molecule_finds_itself(index, chebi_train_300, row):
    rec = chebi_train_300[row]
    assert chebi_train_300.canonical.count(rec.canonical) == 1
    (hits,) = index.search([rec.smiles], 5)
    assert len(hits) == 5 and hits[0].row == row and hits[0].cid == rec.cid
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    (excluded,) = index.search([rec.smiles], 5, [Exclusion(cids=frozenset([rec.cid]))])
    assert len(excluded) == 5 and row not in [h.row for h in excluded]
    assert [h.row for h in excluded[:4]] == [h.row for h in hits[1:]]


def test_identical_structures_tie_and_come_by_row(with_duplicates):
    query = _rewritten(STEROID, 5)
    (hits,) = with_duplicates.search([query], 4)
    assert [h.cid for h in hits[:2]] == ["steroid-a", "steroid-b"]
    assert [h.row for h in hits[:2]] == [300, 302]
    assert hits[0].score == hits[1].score  # one embedding per structure: an exact tie
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_same_structure_exclusion(with_duplicates):
    corpus = with_duplicates.corpus
    rule = ExclusionRule(self_cid=True, same_structure=True)
    exclusion = rule.for_record(corpus[300])
    (hits,) = with_duplicates.search([corpus[300].smiles], 5, [exclusion])
    assert len(hits) == 5 and not {300, 302} & {h.row for h in hits}
    (only_self,) = with_duplicates.search([corpus[300].smiles], 5,
                                          [ExclusionRule().for_record(corpus[300])])
    assert only_self[0].row == 302  # the other copy stays when only the CID is excluded


def test_ties_beyond_the_fetch_margin(chebi_train_300):
    """20 copies of one structure (more than k + the fetch margin): the first rows must win."""
    records = []
    for i, rec in enumerate(chebi_train_300.records[:60]):
        records.append(rec)
        if i % 3 == 1 and len(records) < 90:
            records.append(_record(f"copy{i}", "OC(=O)c1ccccc1O"))
    copies = [i for i, r in enumerate(records) if r.cid.startswith("copy")]
    index = GraphIndex.build(Corpus(records, name="copies", has_captions=False),
                             settings=get_settings())
    assert len(copies) == 20
    (hits,) = index.search(["O=C(O)c1ccccc1O"], 3)
    assert [h.row for h in hits] == copies[:3]
    (hits,) = index.search(["O=C(O)c1ccccc1O"], 25)
    assert [h.row for h in hits[:20]] == copies
    assert len({h.score for h in hits[:20]}) == 1


def test_save_load_round_trip(index, chebi_train_300, tmp_path):
    queries = [chebi_train_300[i].smiles for i in (3, 40, 200)] + ["CC(=O)Oc1ccccc1C(=O)O"]
    before = index.search(queries, 10)
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx/manifest.json").read_text())
    assert manifest["kind"] == "graph"
    assert manifest["params"]["encoder_sha256"] == load_encoder(settings=get_settings()).sha256
    loaded = load_index(tmp_path / "idx", kind="graph", corpus=chebi_train_300,
                        settings=get_settings())
    assert isinstance(loaded, GraphIndex) and loaded.encoder.sha256 == index.encoder.sha256
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
    assert loaded.search(queries, 10) == before
    # the same checkpoint, passed explicitly, is accepted
    again = GraphIndex.load(tmp_path / "idx", encoder=load_encoder(settings=get_settings()),
                            settings=get_settings())
    assert again.search(queries, 10) == before


def test_another_encoder_is_refused(index, pretrain_gnns, tmp_path):
    directory = index.save(tmp_path / "idx")
    other = load_encoder(pretrain_gnns / "gcn_contextpred.pth", settings=get_settings())
    with pytest.raises(IndexMismatchError, match="gcn_supervised_contextpred.*not comparable"):
        GraphIndex.load(directory, encoder=other, settings=get_settings())
    # a manifest whose checkpoint hash differs from the file found under its name
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["params"]["encoder_sha256"] = "0" * 64
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match="sha256 000000000000"):
        load_index(directory, settings=get_settings())
    # a manifest naming a checkpoint that is not here
    manifest["params"]["encoder"] = str(tmp_path / "gone_gcn.pth")
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match="cannot be loaded here"):
        load_index(directory, settings=get_settings())


def test_corrupt_index_data(index, tmp_path):
    directory = index.save(tmp_path / "idx")
    (directory / "graph.faiss").write_bytes(b"not faiss")
    with pytest.raises(IndexMismatchError, match="graph.faiss is damaged"):
        load_index(directory, settings=get_settings())
    # a save from before the manifest listed its files: found when the data is read
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["files"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match="cannot be read"):
        load_index(directory, settings=get_settings())


def test_ivf(index, chebi_train_300):
    ivf = GraphIndex.build(chebi_train_300, ivf_nlist=8, nprobe=8, settings=get_settings())
    assert ivf.params["faiss"] == "IndexIVFFlat" and ivf.params["nprobe"] == 8
    queries = [chebi_train_300[i].smiles for i in (1, 77, 250)]
    assert ivf.search(queries, 5) == index.search(queries, 5)  # nprobe == nlist: exhaustive
    narrow = GraphIndex.build(chebi_train_300, ivf_nlist=8, nprobe=1, settings=get_settings())
    for q, hits in zip(queries, narrow.search(queries, 5)):
        assert 1 <= len(hits) <= 5 and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_k_larger_than_corpus(chebi_train_300):
    small = GraphIndex.build(chebi_train_300.subset(range(5)), settings=get_settings())
    (hits,) = small.search(["CCO"], 50)
    assert sorted(h.row for h in hits) == list(range(5))


def test_inputs_are_checked(index, chebi_train_300):
    with pytest.raises(InputError, match=r"queries\[1\]"):
        index.search(["CCO", "C1CC"], 3)
    with pytest.raises(InputError, match="ivf_nlist"):
        GraphIndex.build(chebi_train_300, ivf_nlist=0, settings=get_settings())
    with pytest.raises(InputError, match="nprobe"):
        GraphIndex.build(chebi_train_300, ivf_nlist=4, nprobe="all", settings=get_settings())
    broken = Corpus(list(chebi_train_300.records[:3]) + [Record("bad", "C1CC", None, "")],
                    name="broken", has_captions=False)
    with pytest.raises(InputError, match="invalid SMILES skipped"):
        GraphIndex.build(broken, settings=get_settings())


def test_encoder_choice(chebi_train_300, pretrain_gnns, tmp_path):
    path = tmp_path / "encoder.pth"  # a GraphSAGE file whose name says nothing
    shutil.copy(pretrain_gnns / "graphsage_contextpred.pth", path)
    sage = GraphIndex.build(chebi_train_300.subset(range(20)), encoder=str(path), arch="graphsage",
                            settings=get_settings())
    assert sage.params["arch"] == "graphsage" and sage.params["encoder"] == str(path.resolve())
    directory = sage.save(tmp_path / "sage")
    # the manifest's arch is used
    assert load_index(directory, settings=get_settings()).encoder.arch == "graphsage"

import json

import pytest

from icma.core.corpus import Corpus, embedded_corpus, parse_corpus_text, read_corpus, write_corpus
from icma.core.errors import CorpusError


def test_chebi_validation_reads_fully_and_keeps_doubled_backslashes(chebi_val, shared):
    assert len(chebi_val) == 3301
    doubled = [r for r in chebi_val.records if "\\\\" in r.smiles]
    assert len(doubled) == 502  # as the data README counts them
    r = doubled[0]
    single = r.smiles.replace("\\\\", "\\")
    from icma.core.chem import canonical_smiles
    assert r.canonical == canonical_smiles(single)
    raw_line = next(line for line in (shared / "data/chebi20/validation.txt").read_text().splitlines()
                    if line.startswith(r.cid + "\t"))
    assert raw_line.split("\t")[1] == r.smiles


def test_embedded_corpus_is_validation_plus_test():
    c = embedded_corpus()
    assert len(c) == 6601
    assert c.has_captions and all(c.descriptions)
    assert len(c.checksum) == 64


def test_partial_train_without_descriptions(shared):
    c, report = read_corpus(shared / "data/chebi20/partial/train_PARTIAL_cid_smiles_no_description.tsv")
    assert not c.has_captions
    assert report.rows == 26409 and len(c) == report.kept


def test_pubchem_partial_reports_missing_smiles(shared):
    c, report = read_corpus(shared / "data/pubchem324k/partial/train_PARTIAL_cid_smiles_no_description.tsv")
    assert report.rows == 12000
    assert len(report.invalid_smiles) == 12000 - len(c)
    assert len(c) >= 11600
    assert "empty SMILES" in report.invalid_smiles[0][2]


def test_iupac_duplicate_cids_are_reported_and_kept(shared):
    c, report = read_corpus(shared / "data/pubchem324k-iupac/train.txt", on_invalid="keep")
    assert len(c) == 11856
    assert len(report.duplicate_cids) == 2


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_invalid_smiles_skip_keep_fail(tmp_path):
    p = write(tmp_path, "c.tsv", "cid\tSMILES\tdescription\n1\tCCO\tThe molecule is ethanol.\n"
                                 "2\tC1CC\tbroken ring\n3\tC(C)(C)(C)(C)C\tpentavalent\n")
    c, rep = read_corpus(p)
    assert c.cids == ["1"] and len(rep.invalid_smiles) == 2
    assert rep.invalid_smiles[0][0] == 3  # header is line 1
    assert "syntax" in rep.invalid_smiles[0][2] and "valence" in rep.invalid_smiles[1][2].lower()
    c, _ = read_corpus(p, on_invalid="keep")
    assert c.canonical == ["CCO", None, None]
    with pytest.raises(CorpusError, match="line 3: CID 2"):
        read_corpus(p, strict=True)


def test_malformed_rows_and_header(tmp_path):
    p = write(tmp_path, "m.tsv", "CID\tSMILES\tdescription\n1\tCCO\tok text\n2\tCCC\n")
    c, rep = read_corpus(p)
    assert len(c) == 1 and rep.malformed == [(3, "2 fields, header has 3")]
    with pytest.raises(CorpusError, match="malformed"):
        read_corpus(p, strict=True)
    with pytest.raises(CorpusError, match="lacks column"):
        read_corpus(write(tmp_path, "h.tsv", "id,smiles,description\n1,CCO,x\n"))
    with pytest.raises(CorpusError, match="empty file"):
        read_corpus(write(tmp_path, "e.tsv", ""))
    with pytest.raises(CorpusError, match="no such file"):
        read_corpus(tmp_path / "missing.tsv")
    with pytest.raises(CorpusError, match="no usable rows"):
        read_corpus(write(tmp_path, "bad.tsv", "CID\tSMILES\tdescription\n1\tXx\tq\n"))


def test_empty_description_is_reported(tmp_path):
    p = write(tmp_path, "d.tsv", "CID\tSMILES\tdescription\n1\tCCO\t\n2\tCC\tethane\n")
    c, rep = read_corpus(p)
    assert c.cids == ["2"] and rep.empty_descriptions == [(2, "1")]


def test_quotes_and_unicode_survive(tmp_path):
    p = write(tmp_path, "q.tsv", 'CID\tSMILES\tdescription\n1\tCCO\tA "quoted" word at 25 ℃.\n')
    c, _ = read_corpus(p)
    assert c.descriptions == ['A "quoted" word at 25 ℃.']


def test_jsonl_and_round_trip(tmp_path, chebi_val):
    small = chebi_val.subset(range(50))
    for name in ("x.jsonl", "x.tsv"):
        write_corpus(small, tmp_path / name)
        back, rep = read_corpus(tmp_path / name)
        assert back.checksum == small.checksum and not rep.malformed
    p = write(tmp_path, "bad.jsonl", '{"cid": 1, "smiles": "CCO", "description": "x"}\nnot json\n[1]\n')
    c, rep = read_corpus(p)
    assert len(c) == 1 and [m[0] for m in rep.malformed] == [2, 3]


def test_saved_form_round_trip(tmp_path, chebi_val):
    small = chebi_val.subset(range(20), name="s")
    small.save(tmp_path / "c.jsonl")
    back = Corpus.load_saved(tmp_path / "c.jsonl")
    assert back.records == small.records and back.name == "s"


def test_parse_text_and_position():
    c, _ = parse_corpus_text("CID\tSMILES\tdescription\n7\tCCO\tethanol\n", name="up")
    assert c.position("7") == 0
    with pytest.raises(Exception, match="not in corpus"):
        c.position("8")
    json.dumps(c.records[0].__dict__)

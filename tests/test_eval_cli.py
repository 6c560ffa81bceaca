"""`icma eval`: MolT5's metrics from the command line, on MolT5's real prediction files and on
broken input (each broken file is one line on stderr and exit code 2, never a traceback)."""

import json

import pytest

from icma.evaluation import metrics
from icma.cli import main
from icma.evaluation.predictions import guess_format, read_predictions

PREDICTIONS = "data/molt5-predictions"
MOL2CAP_KEYS = {"bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor"}
CAP2MOL_KEYS = {"bleu", "exact_match", "levenshtein", "validity", "maccs_fts", "rdk_fts",
                "morgan_fts", "fcd"}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    import nltk

    def refuse(*args, **kwargs):
        raise AssertionError("nltk.download called")

    monkeypatch.setattr(nltk, "download", refuse)


# --- the real MolT5-large files ------------------------------------------------------------------

def test_mol2cap_on_molt5_large_json(shared, capsys):
    code, out, err = run(capsys, "eval", "mol2cap", "--predictions",
                         shared / PREDICTIONS / "molt5-large-smiles2caption.txt", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert MOL2CAP_KEYS <= report.keys()
    assert report["n"] == 3300 and report["format"] == "molt5" and report["task"] == "mol2cap"
    assert report["tokenizer"].startswith("SciBERT")
    assert report["text2mol"] == "not computed (weights unavailable)"
    assert {"nltk", "rouge_score", "transformers", "wordnet"} <= report["versions"].keys()
    assert report["versions"]["wordnet"] == "3.0"
    for key, want in {"bleu2": 0.588, "bleu4": 0.502, "rouge1": 0.653, "rouge2": 0.508,
                      "rougeL": 0.593, "meteor": 0.614}.items():
        assert report[key] == pytest.approx(want, abs=1e-3), key


def test_cap2mol_on_molt5_large_table(shared, capsys):
    # FCD on the real file is pinned in test_metrics; here it is skipped to save two CPU minutes.
    code, out, err = run(capsys, "eval", "cap2mol", "--predictions",
                         shared / PREDICTIONS / "molt5-large-caption2smiles.txt", "--no-fcd")
    assert code == 0, err
    rows = dict(line.strip().rsplit(None, 1) for line in out.splitlines()
                if line.startswith("  ") and "Text2Mol" not in line)
    assert rows == {"BLEU": "0.858", "Exact match": "0.318", "Levenshtein": "15.957",
                    "Validity": "0.958", "MACCS FTS": "0.889", "RDK FTS": "0.807",
                    "Morgan FTS": "0.750", "FCD": "skipped"}
    assert "Text2Mol     not computed (weights unavailable)" in out
    assert "3300 pairs" in out and "3163 of 3300" in out and "fcd 1.2" in out


# --- small files ---------------------------------------------------------------------------------

def test_cap2mol_json_keys_with_fcd(tmp_path, capsys):
    smiles = ["CCO", "CCN", "c1ccccc1", "CC(=O)O", "CCCCCl", "OCC(O)CO"]
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": i, "input": f"caption {i}", "reference": s, "prediction": s}
        for i, s in enumerate(smiles)])
    code, out, err = run(capsys, "eval", "cap2mol", "--predictions", path, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert CAP2MOL_KEYS <= report.keys() and report["format"] == "jsonl"
    assert report["n"] == 6 and report["exact_match"] == 1.0 and report["levenshtein"] == 0.0
    assert report["fcd"] == pytest.approx(0.0, abs=1e-3) and "fcd_note" not in report
    assert {"nltk", "rdkit", "fcd", "torch"} <= report["versions"].keys()
    assert report["versions"]["fcd"].startswith("1.2.")
    assert report["text2mol"] == "not computed (weights unavailable)"


def test_cap2mol_fcd_needs_two_valid_molecules(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"reference": "CCO", "prediction": "CCO"},
                                              {"reference": "CCN", "prediction": "xyz"}])
    code, out, _ = run(capsys, "eval", "cap2mol", "--predictions", path, "--json")
    report = json.loads(out)
    assert code == 0 and report["fcd"] is None and "not computed" in report["fcd_note"]
    assert report["validity"] == 0.5


def test_mol2cap_table_and_cls_prefix(tmp_path, capsys):
    caption = "The molecule is a monocarboxylic acid anion."
    plain = tmp_path / "plain.txt"
    plain.write_text(f"SMILES\tground truth\toutput\nCC(=O)[O-]\t{caption}\t{caption}\n",
                     encoding="utf-8")
    cls = tmp_path / "cls.tsv"
    cls.write_text(f"SMILES\tground truth\toutput\nCC(=O)[O-]\t{caption}\t[CLS] {caption}\n",
                   encoding="utf-8")
    code, out, err = run(capsys, "eval", "mol2cap", "--predictions", plain)
    assert code == 0, err
    assert "ROUGE-L      1.000" in out and "METEOR" in out and "tokenizer: SciBERT" in out
    assert run(capsys, "eval", "mol2cap", "--predictions", cls)[1] == out.replace(
        str(plain), str(cls))


def test_format_guessed_from_extension_or_given(tmp_path, capsys):
    assert guess_format(tmp_path / "a.jsonl") == guess_format(tmp_path / "a.NDJSON") == "jsonl"
    assert guess_format(tmp_path / "a.txt") == guess_format(tmp_path / "a.tsv") == "molt5"
    path = write_jsonl(tmp_path / "results.txt", [{"reference": "CCO", "prediction": "CCO"}])
    code, _, err = run(capsys, "eval", "cap2mol", "--predictions", path, "--no-fcd")
    assert code == 2 and "use --format jsonl" in err
    code, out, _ = run(capsys, "eval", "cap2mol", "--predictions", path, "--no-fcd",
                       "--format", "jsonl", "--json")
    assert code == 0 and json.loads(out)["exact_match"] == 1.0


def test_reader_keeps_ids_inputs_and_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 7, "input": "CCO", "reference": "r", "prediction": "p"}\n\n'
                    '{"reference": "r2", "prediction": "", "extra": 1}\n', encoding="utf-8")
    preds = read_predictions(path, "mol2cap")
    assert [(r.line, r.id, r.input) for r in preds.rows] == [(1, "7", "CCO"), (3, None, None)]
    assert preds.predictions == ["p", ""] and preds.references == ["r", "r2"]


# --- bad input -----------------------------------------------------------------------------------

def fails(capsys, *argv, expect):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("icma: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for text in expect if isinstance(expect, tuple) else (expect,):
        assert text in err, err
    return err


TSV_HEADER = "SMILES\tground truth\toutput\n"


@pytest.mark.parametrize("name, content, expect", [
    ("empty.txt", "", "empty file"),
    ("blank.txt", "\n  \n", "empty file"),
    ("header.txt", TSV_HEADER, "no predictions"),
    ("columns.txt", "SMILES\tground truth\nCCO\tThe molecule.\n", ("lacks column(s) 'output'",
                                                                  "line 1")),
    ("fields.txt", TSV_HEADER + "CCO\tA.\tB.\nCCN\tjust two\n", ("line 3",
                                                                 "2 tab-separated fields")),
    ("noref.txt", TSV_HEADER + "CCO\t\tB.\n", ("line 2", "empty ground truth")),
    ("json.txt", '{"reference": "a", "prediction": "b"}\n', "use --format jsonl"),
    ("other.txt", "description\tground truth\toutput\nA.\tCCO\tCCO\n", "this is a cap2mol file"),
    ("bad.jsonl", '{"reference": "a", "prediction": "b"}\n{"reference": "a"\n',
     ("line 2", "not JSON")),
    ("tsv.jsonl", TSV_HEADER + "CCO\tA.\tB.\n", ("line 1", "use --format molt5")),
    ("noprediction.jsonl", '{"reference": "a", "prediction": "b"}\n{"reference": "a"}\n',
     ("line 2", "no 'prediction' field")),
    ("null.jsonl", '{"reference": "a", "prediction": null}\n', ("line 1", "got null")),
    ("array.jsonl", '["a", "b"]\n', ("line 1", "expected a JSON object")),
    ("emptyref.jsonl", '{"reference": " ", "prediction": "b"}\n', "empty 'reference'"),
    ("ids.jsonl", '{"id": "x", "reference": "a", "prediction": "b"}\n'
                  '{"id": "x", "reference": "a", "prediction": "b"}\n', "id 'x' repeats line 1"),
])
def test_bad_files(tmp_path, capsys, name, content, expect):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    fails(capsys, "eval", "mol2cap", "--predictions", path, expect=expect)


def test_not_utf8_names_the_line(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes((TSV_HEADER + "CCO\tA.\tB.\nCCN\tcaf\xe9\tB.\n").encode("latin-1"))
    fails(capsys, "eval", "mol2cap", "--predictions", path, expect=("line 3", "not UTF-8"))


def test_missing_file_directory_and_flags(tmp_path, capsys):
    fails(capsys, "eval", "mol2cap", "--predictions", tmp_path / "nope.txt",
          expect="no such file")
    fails(capsys, "eval", "mol2cap", "--predictions", tmp_path, expect="is a directory")
    path = write_jsonl(tmp_path / "p.jsonl", [{"reference": "a", "prediction": "b"}])
    fails(capsys, "eval", "mol2cap", "--predictions", path, "--no-fcd",
          expect="--no-fcd applies to cap2mol only")


def test_wrong_task_file_on_the_real_data(shared, capsys):
    fails(capsys, "eval", "cap2mol", "--predictions",
          shared / PREDICTIONS / "molt5-large-smiles2caption.txt",
          expect=("this is a mol2cap file", "'description'"))


@pytest.fixture()
def no_debian_wordnet(tmp_path, monkeypatch):
    """A fresh data directory and no Debian WordNet: METEOR has nothing to build its copy from."""
    from icma.core.settings import get_settings

    monkeypatch.setenv("ICMA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(metrics, "WORDNET_DEBIAN_DIR", tmp_path / "no-wordnet")
    get_settings.cache_clear()
    metrics.wordnet_reader.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()
    metrics.wordnet_reader.cache_clear()


def test_missing_wordnet_names_the_apt_command(tmp_path, capsys, no_debian_wordnet):
    path = write_jsonl(tmp_path / "p.jsonl", [{"reference": "The molecule.", "prediction": "A."}])
    fails(capsys, "eval", "mol2cap", "--predictions", path,
          expect=("apt-get install", "wordnet-base", "wordnet-sense-index"))

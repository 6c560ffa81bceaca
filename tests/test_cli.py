"""The icma command line, in-process and as the installed console script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from icma.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tsv(tmp_path, chebi_val):
    from icma.core.corpus import write_corpus

    path = tmp_path / "db.tsv"
    write_corpus(chebi_val.subset(range(200)), path)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_build_retrieve_neighbours_format(tmp_path, tsv, capsys, chebi_val):
    code, _, err = run(capsys, "index", "build", "--corpus", tsv, "--kind", "morgan",
                       "--out", tmp_path / "ix")
    assert code == 0 and "built morgan index over 200 records" in err
    code, out, _ = run(capsys, "retrieve", "--index", tmp_path / "ix", "--queries", tsv, "--k", 3,
                       "--exclude-self")
    lines = [line.split("\t") for line in out.splitlines()]
    assert len(lines) == 600
    first_cid = chebi_val.cids[0]
    mine = [line for line in lines if line[0] == first_cid]
    assert len(mine) == 3 and first_cid not in [m[1] for m in mine]
    scores = [float(m[2]) for m in mine]
    assert scores == sorted(scores, reverse=True)
    code, out, _ = run(capsys, "retrieve", "--index", tmp_path / "ix", "--queries", tsv, "--k", 1,
                       "--format", "json")
    first = json.loads(out.splitlines()[0])
    assert first["neighbours"][0]["cid"] == first_cid and first["neighbours"][0]["score"] == 1.0
    code, out, _ = run(capsys, "index", "info", tmp_path / "ix")
    assert json.loads(out)["kind"] == "morgan"


def test_bm25_index_and_prompt(tmp_path, tsv, capsys):
    assert run(capsys, "index", "build", "--corpus", tsv, "--kind", "bm25",
               "--out", tmp_path / "bm")[0] == 0
    code, out, _ = run(capsys, "prompt", "--task", "cap2mol", "--index", tmp_path / "bm",
                       "--caption", "The molecule is a steroid ester.", "--n-shot", 2, "--json")
    data = json.loads(out)
    assert code == 0 and len(data["examples"]) == 2
    assert data["prompt"].startswith("Generate a molecule for the caption:")
    assert data["prompt"].endswith("generate a molecule for the caption: "
                                   "The molecule is a steroid ester.")
    # a molecule index cannot serve cap2mol
    run(capsys, "index", "build", "--corpus", tsv, "--kind", "random", "--out", tmp_path / "r")
    code, _, err = run(capsys, "prompt", "--task", "cap2mol", "--index", tmp_path / "r",
                       "--caption", "x")
    assert code == 2 and "retrieves by caption" in err


def test_user_errors_are_one_line_exit_2(tmp_path, tsv, capsys):
    cases = [
        (["index", "build", "--corpus", tsv, "--kind", "tfidf", "--out", tmp_path / "x"],
         "unknown index kind 'tfidf'"),
        (["index", "build", "--corpus", tmp_path / "nope.tsv", "--kind", "bm25", "--out",
          tmp_path / "x"], "no such file"),
        (["retrieve", "--index", tmp_path / "none", "--queries", tsv], "no index directory"),
        (["index", "build", "--corpus", tsv, "--kind", "bm25", "--encoder", "x", "--out",
          tmp_path / "x"], "--encoder applies to graph indexes only"),
    ]
    (tmp_path / "bad.tsv").write_text("id\tsmiles\n1\tCCO\n")
    cases.append((["index", "build", "--corpus", tmp_path / "bad.tsv", "--kind", "morgan",
                   "--out", tmp_path / "x"], "lacks column"))
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        assert message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


def test_prompt_with_bad_smiles(tmp_path, tsv, capsys):
    run(capsys, "index", "build", "--corpus", tsv, "--kind", "morgan", "--out", tmp_path / "m")
    code, _, err = run(capsys, "prompt", "--task", "mol2cap", "--index", tmp_path / "m",
                       "--smiles", "C1CC")
    assert code == 2 and "not a valid SMILES" in err


def test_corpus_validate(tmp_path, capsys):
    p = tmp_path / "c.tsv"
    p.write_text("CID\tSMILES\tdescription\n1\tCCO\tok\n1\tXx\tdup and bad\n2\tCC\n")
    code, out, _ = run(capsys, "corpus", "validate", p, "--strict")
    assert code == 1
    assert "1 malformed" in out and "1 invalid SMILES" in out and "line 4" in out


def test_console_script_runs(tmp_path, tsv):
    exe = Path(sys.executable).with_name("icma")
    assert exe.exists(), "set-up must install the icma console script"
    done = subprocess.run([str(exe), "index", "build", "--corpus", str(tsv), "--kind", "random",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([str(exe), "retrieve", "--index", str(tmp_path / "r"), "--queries",
                           str(tsv), "--k", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 400


def test_demo_builds_then_reuses_its_cache(tmp_path, capsys):
    code, out, _ = run(capsys, "demo", "--data-dir", tmp_path)
    assert code == 0 and "--- ICMA prompt ---" in out
    assert "finally generate a caption for the molecule:" in out
    built = sorted(p.name for p in (tmp_path / "indexes").iterdir() if p.name != ".locks")
    assert built == ["chebi20-embedded-bm25", "chebi20-embedded-graph"]
    stamp = (tmp_path / "indexes/chebi20-embedded-graph/manifest.json").stat().st_mtime_ns
    assert run(capsys, "demo", "--data-dir", tmp_path)[0] == 0
    assert (tmp_path / "indexes/chebi20-embedded-graph/manifest.json").stat().st_mtime_ns == stamp


def test_cli_reproduces_icma_bm25_neighbour_file(tmp_path, shared, capsys):
    """`icma retrieve --format neighbours` writes ICMA's released file, line for line."""
    data = shared / "data/pubchem324k-iupac"
    assert run(capsys, "index", "build", "--corpus", data / "train.txt", "--kind", "bm25",
               "--out", tmp_path / "bm25")[0] == 0
    out = tmp_path / "neighbours.txt"
    assert run(capsys, "retrieve", "--index", tmp_path / "bm25", "--queries", data / "test.txt",
               "--k", 10, "--exclude-self", "--output", out)[0] == 0
    ours: dict[str, list[str]] = {}
    for line in out.read_text().splitlines():
        ours.setdefault(line.split("\t")[0], []).append(line)
    theirs: dict[str, list[str]] = {}
    for line in (data / "icma-neighbours/test_10_shot_cap2mol_bm25.txt").read_text().splitlines():
        theirs.setdefault(line.split("\t")[0], []).append(line)
    assert ours.keys() == theirs.keys() and len(ours) == 1985
    short = {q for q, lines in theirs.items() if len(lines) == 9}
    assert short == {"8722", "158536"}  # ICMA cut at 10, then dropped the query's own CID
    for q, lines in theirs.items():
        assert len(ours[q]) == 10
        assert ours[q][: len(lines)] == lines, q  # byte-identical lines, scores included


@pytest.mark.parametrize("flags, says", [
    (["--n-shot", "999"], "--n-shot: must be between 0 and"),
    (["--method", "bm25"], "--method: 'bm25' does not retrieve for mol2cap"),
    (["--num-candidates", "3", "--decoding", "greedy"], "--num-candidates: more than one"),
    (["--max-new-tokens", "9999"], "--max-new-tokens: max_new_tokens must be"),
    (["--adapter", "."], "--adapter: . is not a peft adapter folder"),
    (["--decoding", "consensus", "--num-samples", "1"], "--num-samples: must be between 2 and"),
    (["--num-samples", "3"], "--num-samples: num_samples is for decoding 'consensus'"),
    (["--no-repeat-ngram-size", "-2"], "--no-repeat-ngram-size: no_repeat_ngram_size must be"),
])
def test_translate_options_are_checked_before_any_work(flags, says, tmp_path, capsys):
    """``icma translate`` goes through the one options builder; its errors name the flags, and
    nothing is written."""
    src = tmp_path / "in.jsonl"
    src.write_text('"CCO"\n')
    out = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "translate", "--task", "mol2cap", "--input", src, "--output", out,
                       *flags)
    assert code == 2 and f"icma: error: {says}" in err, err
    assert list(tmp_path.iterdir()) == [src]


def test_tune_random_walk_flag_gives_the_strict_schema_numbers(capsys):
    """The request schemas take no "0.2" for 0.2 (RandomWalk is strict); the flag's two words
    become numbers first, and bad ones are one line naming the flag."""
    from icma.cli import build_parser
    from icma.cli.tune import tune_settings
    from icma.tuning import parse_config

    args = build_parser().parse_args(["tune", "--task", "mol2cap", "--name", "x",
                                      "--random-walk", "0.2", "7"])
    walk = parse_config(tune_settings(args)).random_walk
    assert (walk.skip_probability, walk.seed) == (0.2, 7)
    code, _, err = run(capsys, "tune", "--task", "mol2cap", "--name", "x", "--random-walk",
                       "0.2", "seven")
    assert code == 2 and "icma: error: --random-walk: takes a skip probability" in err, err

"""`icma bench quality`: the whole pipeline on a few queries, and its errors."""

from __future__ import annotations

import json
import sys

import pytest

from icma.cli import main


def test_quality_smoke_run_writes_tables_and_plot(tmp_path, tiny_model, monkeypatch, capsys):  # noqa: F811
    from tests.test_default_adapters import shipped_lora

    monkeypatch.setenv("ICMA_DATA_DIR", str(tmp_path / "data"))
    shipped_lora(tiny_model, tmp_path / "shipped" / "tiny-m2c", "mol2cap", seed=3)
    monkeypatch.setenv("ICMA_SHIPPED_ADAPTERS_DIR", str(tmp_path / "shipped"))
    from icma.core.settings import get_settings

    get_settings.cache_clear()
    try:
        code = main(["bench", "quality", "--protocol", "chebi20-val-test", "--queries", "12",
                     "--limit", "4", "--model", str(tiny_model), "--max-new-tokens", "8",
                     "--decodings", "sample,consensus", "--num-samples", "2",
                     "--out", str(tmp_path / "out")])
    finally:
        get_settings.cache_clear()
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "out/quality-chebi20-val-test.json").read_text())
    systems = [(r["task"], r["system"], r["n"]) for r in data["rows"]]
    assert ("mol2cap", "nearest neighbour (graph)", 12) in systems
    assert ("mol2cap", "nearest neighbour (random)", 12) in systems
    assert ("cap2mol", "nearest neighbour (bm25)", 12) in systems
    assert ("mol2cap", "nearest neighbour (graph), first 4", 4) in systems
    assert ("mol2cap", "LLM 2-shot (graph), untuned", 4) in systems
    assert ("cap2mol", "LLM zero-shot, untuned", 4) in systems
    # the shipped default for mol2cap gets rows of its own (each decoding asked for); the
    # untuned rows ask for "base"
    default = [r for r in data["rows"] if r["adapter"] == "tiny-m2c"]
    assert [(r["task"], r["system"]) for r in default] == [
        ("mol2cap", "LLM 2-shot (graph) + default adapter tiny-m2c"),
        ("mol2cap", "LLM 2-shot (graph) + default adapter tiny-m2c, consensus of 2")]
    assert not any(r["extra"]["prime_answer"] for r in default)
    assert all(r["adapter"] is None for r in data["rows"] if "untuned" in r["system"])
    # each LLM row again with consensus decoding, on the same queries
    assert ("cap2mol", "LLM 4-shot (bm25), untuned, consensus of 2", 4) in systems
    assert ("mol2cap", "LLM zero-shot, untuned, consensus of 2", 4) in systems
    voted = next(r for r in data["rows"] if r["system"].endswith("consensus of 2"))
    assert voted["extra"]["decoding"]["num_samples"] == 2
    assert 0 <= voted["extra"]["consensus_sample_wins"] <= 4
    for r in data["rows"]:
        keys = {"bleu2", "meteor", "rougeL"} if r["task"] == "mol2cap" else \
            {"bleu", "exact_match", "validity", "levenshtein"}
        assert keys <= r["scores"].keys()
    nn = next(r for r in data["rows"] if r["system"] == "nearest neighbour (graph)")
    assert 0 < nn["scores"]["bleu2"] < 1  # retrieved captions resemble the references
    md = (tmp_path / "out/quality-chebi20-val-test.md").read_text()
    assert "only the first 12 test queries" in md and "| METEOR |" in md
    llm = next(r for r in data["rows"] if r["system"] == "LLM 2-shot (graph), untuned")
    assert len(llm["extra"]["samples"]) == 3 and "## Sample answers" in md
    assert (tmp_path / "out/quality-chebi20-val-test.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, says", [
    (["--protocol", "mimic"], "unknown protocol"),
    (["--protocol", "pubchem324k-iupac"], "icma download pubchem324k-iupac"),
    (["--protocol", "chebi20-val-test", "--limit", "0"], "--limit"),
    (["--protocol", "chebi20-val-test", "--queries", "0"], "queries"),
    (["--protocol", "chebi20-val-test", "--decodings", "sample,nucleus"], "--decodings"),
    (["--protocol", "chebi20-val-test", "--decodings", "consensus", "--num-samples", "1"],
     "--num-samples"),
    (["--protocol", "chebi20-val-test", "--decodings", "greedy", "--baseline-decodings",
      "sample"], "--baseline-decodings"),
    (["--protocol", "chebi20-val-test", "--answers", "README.md"], "--answers"),
])
def test_quality_bad_arguments_are_one_line_errors(argv, says, capsys, tmp_path):
    assert main(["bench", "quality", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icma: error:") and err.count("\n") == 1 and says in err


def test_quality_without_matplotlib_writes_the_tables_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ICMA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    from icma.core.settings import get_settings

    get_settings.cache_clear()
    try:
        code = main(["bench", "quality", "--protocol", "chebi20-val-test", "--queries", "6",
                     "--tasks", "cap2mol", "--no-llm", "--out", str(tmp_path / "out")])
    finally:
        get_settings.cache_clear()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "matplotlib is not installed (pip install 'icma[plots]')" in err
    assert out.index("nearest neighbour (bm25)") < out.index("without matplotlib")
    md = (tmp_path / "out/quality-chebi20-val-test.md").read_text()
    assert "## cap2mol" in md and ".png" not in md
    assert (tmp_path / "out/quality-chebi20-val-test.json").exists()
    assert not (tmp_path / "out/quality-chebi20-val-test.png").exists()


def test_quality_keeps_answers_and_resumes_an_interrupted_run(tmp_path, tiny_model, monkeypatch,
                                                              capsys):
    """With --answers a row's answers are kept chunk by chunk; a run started again reuses the
    kept ones (an edited kept answer shows up in the results) and generates only the rest."""
    from icma.core.settings import get_settings
    from icma.evaluation import quality

    from tests.test_default_adapters import shipped_lora

    monkeypatch.setenv("ICMA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(quality, "ANSWER_CHUNK", 2)
    naive = tmp_path / "naive-c2m"  # tuned without examples: its row is zero-shot
    shipped_lora(tiny_model, naive, "cap2mol", seed=2, default=False, prompt={"n_shot": 0})
    argv = ["bench", "quality", "--protocol", "chebi20-val-test", "--queries", "6", "--limit",
            "4", "--tasks", "cap2mol", "--model", str(tiny_model), "--max-new-tokens", "6",
            "--no-zero-shot", "--decodings", "greedy,sample", "--baseline-decodings", "greedy",
            "--adapter", str(naive),
            "--answers", str(tmp_path / "answers"), "--out", str(tmp_path / "out")]
    get_settings.cache_clear()
    try:
        assert main(argv) == 0, capsys.readouterr().err
        first = json.loads((tmp_path / "out/quality-chebi20-val-test.json").read_text())
        # no default adapter here: the other rows run only the baseline decoding
        llm = [r for r in first["rows"] if r["engine"] != "nearest-neighbour"]
        assert [(r["system"], r["n_shot"]) for r in llm] == [
            ("LLM 4-shot (bm25), untuned, greedy", 4),
            ("LLM zero-shot + adapter naive-c2m, greedy", 0)]
        kept = next(f for f in (tmp_path / "answers").glob("cap2mol-*.jsonl")
                    if "untuned" in f.read_text().splitlines()[0])
        lines = kept.read_text().splitlines()
        assert json.loads(lines[0])["system"] == "LLM 4-shot (bm25), untuned, greedy"
        assert len(lines) == 5  # the row's identity, then one line per query
        edited = {**json.loads(lines[1]), "answer": "C1CCCCC1O"}  # interrupted after a chunk
        # ... and killed while appending the next one: its half line is dropped, not a crash
        kept.write_text("\n".join([lines[0], json.dumps(edited), lines[2], lines[3][:9]]))
        capsys.readouterr()
        assert main(argv) == 0, capsys.readouterr().err
    finally:
        get_settings.cache_clear()
    assert "resuming after 2 of 4 answers" in capsys.readouterr().out
    again = json.loads((tmp_path / "out/quality-chebi20-val-test.json").read_text())
    row = next(r for r in again["rows"] if r["engine"] != "nearest-neighbour")
    assert row["extra"]["samples"][0]["answer"] == "C1CCCCC1O"  # reused, not generated again
    assert len(kept.read_text().splitlines()) == 5
    # the regenerated chunk is the same as the first run's (greedy)
    assert [json.loads(x)["answer"] for x in kept.read_text().splitlines()[3:]] == \
        [json.loads(x)["answer"] for x in lines[3:]]
    # other weights round differently: a bfloat16 run keeps its own answers, reusing none
    get_settings.cache_clear()
    try:
        assert main(argv + ["--dtype", "bfloat16"]) == 0, capsys.readouterr().err
    finally:
        get_settings.cache_clear()
    assert "resuming" not in capsys.readouterr().out
    rows = {json.loads(f.read_text().splitlines()[0])["dtype"]: f
            for f in (tmp_path / "answers").glob("cap2mol-*.jsonl")
            if "untuned" in f.read_text().splitlines()[0]}
    assert set(rows) == {"float32", "bfloat16"} and rows["float32"] == kept

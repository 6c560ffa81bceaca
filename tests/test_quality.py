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
        ("mol2cap", "LLM 2-shot + default adapter tiny-m2c"),
        ("mol2cap", "LLM 2-shot + default adapter tiny-m2c, consensus of 2")]
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

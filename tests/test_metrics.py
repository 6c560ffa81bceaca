"""Caption metrics pinned to MolT5-large's outputs on ChEBI-20 test (values checked independently)."""

import pytest

from icma.errors import InputError
from icma.metrics import caption_scores, caption_tokens


def test_scibert_word_pieces():
    assert caption_tokens("The molecule is a quinolinemonocarboxylate that is the conjugate base "
                          "of xanthurenic acid.") == (
        "the molecule is a quin ##oline ##mon ##ocar ##box ##ylate that is the conjugate base of "
        "xanth ##uren ##ic acid .").split()


def test_molt5_large_caption_scores(shared):
    lines = (shared / "data/molt5-predictions/molt5-large-smiles2caption.txt").read_text(
        encoding="utf-8").splitlines()[1:]
    rows = [line.split("\t") for line in lines]
    s = caption_scores([r[2] for r in rows], [r[1] for r in rows])
    assert s["n"] == 3300
    for key, want in {"bleu2": 0.588, "bleu4": 0.502, "rouge1": 0.653, "rouge2": 0.508,
                      "rougeL": 0.593}.items():
        assert s[key] == pytest.approx(want, abs=1e-3), key


def test_identical_and_disjoint():
    same = caption_scores(["The molecule is an alkane with five carbons."] * 2,
                          ["The molecule is an alkane with five carbons."] * 2)
    assert same["bleu4"] == pytest.approx(1.0) and same["rougeL"] == pytest.approx(1.0)
    none = caption_scores(["zzz qqq"], ["The molecule is ethanol."])
    assert none["bleu2"] == 0.0 and none["rouge1"] == 0.0
    with pytest.raises(InputError, match="predictions"):
        caption_scores(["a"], [])

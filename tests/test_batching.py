"""Concurrent searches coalesce into one index call and get exactly their own answers."""

import threading

import pytest

from icma.retrieval.batching import SearchBatcher
from icma.core.errors import InputError
from icma.retrieval import Exclusion, build_index
from icma.retrieval.fingerprint import MorganIndex


class GatedMorgan(MorganIndex):
    """A real Morgan index whose first search waits at a gate, so others queue behind it."""

    gate = threading.Event()
    first = True

    def _topk(self, queries, k):
        if GatedMorgan.first:
            GatedMorgan.first = False
            GatedMorgan.gate.wait(10)
        return super()._topk(queries, k)


@pytest.fixture(scope="module")
def corpus(chebi_val):
    return chebi_val.subset(range(300))


def test_concurrent_searches_coalesce_and_match_direct_results(corpus):
    plain = build_index("morgan", corpus)
    gated = GatedMorgan.build(corpus)
    batcher = SearchBatcher(gated)
    jobs = [([corpus.smiles[i]], 1 + i % 4, [Exclusion(cids=frozenset([corpus.cids[i]]))])
            for i in range(12)]
    results = [None] * len(jobs)

    def work(j):
        q, k, ex = jobs[j]
        results[j] = batcher.search(q, k, ex)

    threads = [threading.Thread(target=work, args=(j,)) for j in range(len(jobs))]
    threads[0].start()
    while GatedMorgan.first:  # the first search is inside the index, holding the lead
        pass
    for t in threads[1:]:
        t.start()
    while len(batcher._pending) < len(jobs) - 1:
        pass
    GatedMorgan.gate.set()
    for t in threads:
        t.join(10)
    assert batcher.batches == 2  # the first alone, then the 11 that queued, together
    for (q, k, ex), got in zip(jobs, results):
        assert got == plain.search(q, k, ex)


def test_a_bad_query_fails_only_its_own_request(corpus):
    from icma.retrieval.batching import _Request

    batcher = SearchBatcher(build_index("morgan", corpus))
    good = _Request(["CCO"], 2, [None])
    bad = _Request(["C1CC"], 2, [None])
    batcher._run([good, bad])
    assert len(good.result[0]) == 2 and good.error is None
    assert isinstance(bad.error, InputError)


def test_loop_batcher_runs_one_turns_searches_together(corpus):
    import asyncio

    from icma.retrieval.batching import LoopBatcher

    plain = build_index("morgan", corpus)
    batcher = LoopBatcher(plain)
    jobs = [([corpus.smiles[i]], 1 + i % 4, [Exclusion(cids=frozenset([corpus.cids[i]]))])
            for i in range(6)]

    async def main():
        together = await asyncio.gather(*(batcher.search(*j) for j in jobs))
        # a bad query fails its own request only, inside a shared batch
        mixed = await asyncio.gather(batcher.search(["CCO"], 2), batcher.search(["C1CC"], 2),
                                     return_exceptions=True)
        later = await batcher.search(*jobs[0])  # alone, in a turn of its own
        return together, mixed, later

    together, mixed, later = asyncio.run(main())
    assert batcher.batches == 3
    for (q, k, ex), got in zip(jobs, together):
        assert got == plain.search(q, k, ex)
    assert len(mixed[0][0]) == 2 and isinstance(mixed[1], InputError)
    assert later == together[0]


def test_loop_batcher_splits_at_its_query_limit(corpus):
    import asyncio

    from icma.retrieval.batching import LoopBatcher

    batcher = LoopBatcher(build_index("morgan", corpus), max_queries=4)

    async def main():
        return await asyncio.gather(*(batcher.search(corpus.smiles[i:i + 3], 1)
                                      for i in range(0, 9, 3)))

    out = asyncio.run(main())
    assert batcher.batches == 3  # 3 + 3 > 4: each request is a batch of its own
    assert [h[0].cid for r in out for h in r] == list(corpus.cids[:9])

"""BM25 caption retrieval against rank_bm25 (the oracle) and ICMA's own neighbour file."""

import random

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from icma.core.corpus import Corpus, Record, read_corpus
from icma.core.errors import IndexMismatchError, InputError
from icma.retrieval import Exclusion, build_index, load_index
from icma.retrieval.base import ranked
from icma.retrieval.bm25 import BM25Index, _top_rows, icma_tokenize

IUPAC = "data/pubchem324k-iupac"


@pytest.fixture(scope="module")
def iupac(shared):
    # on_invalid="keep": BM25 indexes captions only, so its documents are every row of the file.
    train, _ = read_corpus(shared / IUPAC / "train.txt", on_invalid="keep")
    test, _ = read_corpus(shared / IUPAC / "test.txt", on_invalid="keep")
    return train, test


@pytest.fixture(scope="module")
def index(iupac):
    return BM25Index.build(iupac[0])


@pytest.fixture(scope="module")
def oracle(iupac):
    return BM25Okapi([icma_tokenize(d) for d in iupac[0].descriptions])


@pytest.fixture(scope="module")
def icma_neighbours(shared):
    ref: dict[str, list[tuple[str, float]]] = {}
    with open(shared / IUPAC / "icma-neighbours/test_10_shot_cap2mol_bm25.txt") as f:
        for line in f:
            q, n, s = line.rstrip("\n").split("\t")
            ref.setdefault(q, []).append((n, float(s)))
    return ref


def corpus_of(captions, name="hand"):
    return Corpus([Record(str(i + 1), "C", "C", c) for i, c in enumerate(captions)], name=name)


def test_tokenize_is_icmas():
    assert icma_tokenize("2-(4-chlorophenyl)-N,N-dimethylethanamine") == [
        "2", "4", "chlorophenyl", "N", "N", "dimethylethanamine"]
    # a leading or trailing separator leaves an empty token (str.split(' ')), and ICMA kept it
    assert icma_tokenize("(2S)-2-aminopropanoic acid") == ["", "2S", "2", "aminopropanoic", "acid"]
    assert icma_tokenize("sodium;2,3-dihydroxypropyl) ") == ["sodium;2", "3", "dihydroxypropyl", ""]
    # dots are deleted, not split; no lower-casing; runs of spaces collapse
    assert icma_tokenize("1.5 Hydrate  of  X") == ["15", "Hydrate", "of", "X"]


def test_reproduces_icma_neighbour_file(iupac, index, icma_neighbours):
    train, test = iupac
    assert set(icma_neighbours) == set(test.cids)
    hits = index.search(test.descriptions, 10,
                        [Exclusion(cids=frozenset([c])) for c in test.cids])
    short = []
    for cid, got in zip(test.cids, hits):
        want = icma_neighbours[cid]
        assert len(got) == 10
        if len(want) < 10:
            short.append(cid)
        assert [h.cid for h in got[:len(want)]] == [n for n, _ in want], cid
        np.testing.assert_allclose([h.score for h in got[:len(want)]], [s for _, s in want],
                                   rtol=0, atol=1e-6)
    # ICMA took its top 10 and then dropped the query's own record: exactly the test queries whose
    # CID is also in train have 9 neighbours; we exclude before the cut, so we return 10.
    in_train = sorted(c for c in test.cids if c in set(train.cids))
    assert sorted(short) == in_train == sorted(["8722", "158536"])


def test_without_exclusion_the_query_finds_itself(iupac, index):
    train, test = iupac
    for cid in ("8722", "158536"):
        q = test.descriptions[test.cids.index(cid)]
        assert cid in [h.cid for h in index.search([q], 10)[0]]


def test_ties_go_to_the_earlier_row():
    c = corpus_of(["alpha beta", "gamma delta", "alpha beta", "alpha gamma", "epsilon zeta"])
    index = BM25Index.build(c)
    hits = index.search(["alpha beta"], 5)[0]
    assert hits[0].score == hits[1].score
    assert [h.row for h in hits[:3]] == [0, 2, 3]
    # the order survives an exclusion that removes the first of the tied pair
    hits = index.search(["alpha beta"], 2, [Exclusion(cids=frozenset(["1"]))])[0]
    assert [h.row for h in hits] == [2, 3]


def test_scores_equal_rank_bm25(iupac, index, oracle):
    train, test = iupac
    rng = random.Random(7)
    queries = rng.sample(test.descriptions, 40) + rng.sample(train.descriptions, 10)
    queries += ["methyl methyl methyl", "no such words here", "(2S)-2-amino", "acid"]
    ours = index.scores(queries)
    for qi, q in enumerate(queries):
        ref = oracle.get_scores(icma_tokenize(q))
        np.testing.assert_allclose(ours[qi], ref, rtol=0, atol=1e-9)
        # the arithmetic mirrors rank_bm25's, so the equality is exact (ties stay ties)
        assert np.array_equal(ours[qi], ref)


@pytest.mark.parametrize("params", [dict(k1=1.2, b=0.5, epsilon=0.1), dict(k1=0.5, b=1.0),
                                    dict(b=0.0, epsilon=0.0)])
def test_parameters_and_negative_idf_floor(params):
    # "the" and "acid" are in most documents: negative idf, floored at epsilon * average idf
    c = corpus_of(["the acid", "the acid of the day", "the base", "an acid salt", "the acid the",
                   "salt", "(the) acid-base"])
    index = BM25Index.build(c, **params)
    ref = BM25Okapi([icma_tokenize(d) for d in c.descriptions], **params)
    for q in ["the acid", "salt the salt", "base", "zzz", "acid acid the"]:
        assert np.array_equal(index.scores([q])[0], ref.get_scores(icma_tokenize(q)))
    assert index.params == {"k1": 1.5, "b": 0.75, "epsilon": 0.25} | {
        k: float(v) for k, v in params.items()}


def test_fast_top_rows_equals_ranked():
    rng = np.random.default_rng(3)
    for n, k, levels in [(5000, 10, 7), (5000, 10, 5000), (300, 50, 3), (40, 40, 4), (40, 39, 2),
                         (12000, 1, 2), (12000, 100, 30)]:
        s = rng.integers(0, levels, n).astype(np.float64) / 3  # many exact ties
        want_s, want_r = ranked(s, k)
        got = _top_rows(s, k)
        assert np.array_equal(got, want_r[0]) and np.array_equal(s[got], want_s[0])


def test_save_load_round_trip(tmp_path, iupac, index):
    train, test = iupac
    queries = test.descriptions[:200]
    index.save(tmp_path / "bm25")
    loaded = load_index(tmp_path / "bm25", kind="bm25", corpus=train)
    assert isinstance(loaded, BM25Index)
    assert loaded.params == {"k1": 1.5, "b": 0.75, "epsilon": 0.25}
    assert loaded.search(queries, 10) == index.search(queries, 10)
    assert np.array_equal(loaded.scores(queries[:5]), index.scores(queries[:5]))
    with pytest.raises(IndexMismatchError):
        load_index(tmp_path / "bm25", kind="graph")


def test_registry_builds_bm25():
    c = corpus_of(["alpha beta", "gamma"])
    index = build_index("bm25", c, k1=2)
    assert isinstance(index, BM25Index) and index.params["k1"] == 2.0


@pytest.mark.parametrize("query", ["", "   ", "\t\n"])
def test_empty_caption_is_an_input_error(index, query):
    with pytest.raises(InputError) as err:
        index.search(["fine caption", query], 10)
    assert err.value.field == "caption"


@pytest.mark.parametrize("params,field", [(dict(k1=-1), "k1"), (dict(k1=0), "k1"),
                                          (dict(b=1.5), "b"),
                                          (dict(epsilon=float("nan")), "epsilon"),
                                          (dict(k1="1.5"), "k1"), (dict(b=True), "b"),
                                          (dict(delta=1), "params")])
def test_invalid_parameters(params, field):
    with pytest.raises(InputError) as err:
        BM25Index.build(corpus_of(["a b"]), **params)
    assert err.value.field == field

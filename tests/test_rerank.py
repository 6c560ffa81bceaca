import pytest

from icma.core.errors import InputError
from icma.core.rerank import RerankConfig, bucket, prompt_order, random_walk, top

TEN = list(range(10))


def test_top_and_reversal():
    assert top(TEN, 3) == [0, 1, 2]
    assert prompt_order([0, 1, 2]) == [2, 1, 0]
    assert prompt_order([0, 1, 2], "ranked") == [0, 1, 2]


def test_bucket_follows_icma_formula():
    # ranks start + k * floor((10 - start) / n)
    assert bucket(TEN, 2) == [0, 5]
    assert bucket(TEN, 3) == [0, 3, 6]
    assert bucket(TEN, 4, start=2) == [2, 4, 6, 8]
    with pytest.raises(InputError, match="buckets"):
        bucket(TEN, 5, start=8)


def test_random_walk_zero_skip_is_top():
    assert random_walk(TEN, 4, 0.0, seed=1, key="q") == top(TEN, 4)


def test_random_walk_is_seeded_and_reaches_lower_ranks():
    a = random_walk(TEN, 2, 0.5, seed=3, key="q")
    assert a == random_walk(TEN, 2, 0.5, seed=3, key="q")
    picks = [tuple(random_walk(TEN, 2, 0.5, seed=s, key="q")) for s in range(200)]
    assert len(set(picks)) > 5
    assert any(max(p) > 2 for p in picks)
    for p in picks:
        assert list(p) == sorted(p) and len(set(p)) == 2


def test_random_walk_fills_from_best_skipped_when_exhausted():
    # with a skip probability close to 1 almost everything is skipped: the best fill in
    picks = [random_walk(TEN, 3, 0.999, seed=s) for s in range(20)]
    assert all(p == [0, 1, 2] for p in picks)


def test_random_walk_skip_rate_matches_probability():
    firsts = [random_walk(TEN, 1, 0.2, seed=s, key="x")[0] for s in range(2000)]
    share_first = firsts.count(0) / len(firsts)
    assert 0.75 < share_first < 0.85


def test_bad_parameters():
    with pytest.raises(InputError, match="skip_prob"):
        random_walk(TEN, 2, 1.0)
    with pytest.raises(InputError, match="n_shot"):
        top(TEN, -1)
    with pytest.raises(InputError, match="rerank"):
        RerankConfig(method="sideways").select(TEN, 2)
    assert RerankConfig(method="bucket").pool_size(2) == 10

"""Decoding that does not degenerate: the repetition control both engines share
(``no_repeat_ngram_size``), and consensus decoding (minimum Bayes risk over the model's samples
and the examples' answers): the pure selection on hand-made pools, the options that ask for it,
and the pipeline on real (tiny) models. Over HTTP, in jobs and in ``icma translate``:
tests/test_worker.py; with vLLM: tests/test_vllm.py."""

from __future__ import annotations

import re

import pytest

from icma.core.errors import InputError
from icma.core.prompts import Example
from icma.core.settings import get_settings
from icma.generation.consensus import (Candidate, caption_similarity, caption_tokens, choose,
                                       most_central, ngram_f1)
from icma.generation.engines import GenerationInput, GenerationParams, banned_tokens, \
    load_engine
from icma.generation.options import DEFAULT_NUM_SAMPLES, build_options
from icma.generation.pipeline import translate
from tests.conftest import LOOP_WORDS

ACID = "The molecule is a monocarboxylic acid anion that is the conjugate base of acetic acid."
ACID_2 = "The molecule is a monocarboxylic acid anion that is the conjugate base of formic acid."
ACID_3 = "The molecule is a monocarboxylic acid that is acetic acid substituted by a methyl group."
STEROID = "The molecule is a steroid that is 17-oxo-19-en-17-en-19-en-19-en-19-en-19-en."

# --- the pure selection -----------------------------------------------------------------------


def test_ngram_f1_is_symmetric_and_graded():
    a, b = caption_tokens(ACID), caption_tokens(ACID_2)
    assert ngram_f1(a, b) == ngram_f1(b, a)
    assert ngram_f1(a, a) == 1.0 and ngram_f1([], []) == 1.0 and ngram_f1(a, []) == 0.0
    assert caption_similarity(ACID, ACID_2) > caption_similarity(ACID, ACID_3) > \
        caption_similarity(ACID, STEROID) > 0
    # locants and hyphens are tokens of their own: 2-hydroxy and 3-hydroxy differ
    assert caption_tokens("(R)-2-Hydroxy") == ["(", "r", ")", "-", "2", "-", "hydroxy"]
    assert caption_similarity("2-hydroxy", "3-hydroxy") < 1.0


def test_the_most_central_caption_wins_wherever_it_stands():
    # ACID agrees most with the others; an outlier (a looping answer) loses
    for samples, examples in (([STEROID, ACID_2, ACID], [Example("CC(=O)O", ACID_3, "176")]),
                              ([STEROID, ACID_2], [Example("CC(=O)[O-]", ACID, "175"),
                                                   Example("CC(=O)O", ACID_3, "176")])):
        c = choose("mol2cap", samples, examples)
        assert c.winner.text == ACID and c.pool == 4 and c.samples == len(samples)
        assert 0 < c.score < 1
    c = choose("mol2cap", [STEROID, ACID_2], [Example("CC(=O)[O-]", ACID, "175"),
                                              Example("CC(=O)O", ACID_3, "176")])
    assert (c.winner.source, c.winner.cid, c.winner.rank, c.winner.sample) == \
        ("example", "175", 1, None)
    assert c.summary() == {"samples": 2, "pool": 4, "source": "example", "sample": None,
                           "cid": "175", "rank": 1, "score": c.score}


def test_ties_go_to_the_earlier_candidate_samples_first():
    # two identical pairs: every candidate scores alike, the first sample wins
    c = choose("mol2cap", [ACID, STEROID], [Example("C", ACID, "1"), Example("C", STEROID, "2")])
    assert (c.winner.source, c.winner.sample) == ("sample", 0)
    c = choose("mol2cap", [STEROID, ACID], [Example("C", ACID, "1"), Example("C", STEROID, "2")])
    assert (c.winner.text, c.winner.sample) == (STEROID, 0)
    # a sample that repeats an example's answer ties with it: the sample wins
    c = choose("mol2cap", [ACID_2, ACID], [Example("C", ACID, "9")])
    assert (c.winner.source, c.winner.sample) == ("sample", 1)
    # pure function: same pool, same order -> same index
    assert most_central(["a b", "a b", "c"], caption_similarity) == (0, 0.5)
    assert most_central(["x"], caption_similarity) == (0, None)


def test_invalid_or_empty_smiles_never_win():
    aspirin, salicylic = "CC(=O)Oc1ccccc1C(=O)O", "O=C(O)c1ccccc1O"
    bad = "C1CC(=O"  # three copies of it would "agree" if it counted
    c = choose("cap2mol", [bad, bad, bad, "", aspirin], [Example(salicylic, "x", "338"),
                                                         Example(aspirin, "y", "2244")])
    assert c.winner.text == aspirin and c.winner.source == "sample" and c.winner.sample == 4
    assert c.pool == 3 and c.samples == 5  # only the parsable ones competed
    # molecules compare as molecules: two spellings of aspirin agree with each other
    c = choose("cap2mol", ["OC(=O)c1ccccc1OC(C)=O", "CCCCCCCC"], [Example(aspirin, "y", "2244")])
    assert (c.winner.text, c.winner.sample) == ("OC(=O)c1ccccc1OC(C)=O", 0)
    assert c.score >= 0.5  # Tanimoto 1 with the example, about 0 with octane
    # nothing valid at all: the first sample, as plain sampling would have answered
    c = choose("cap2mol", [bad, "xx"], [])
    assert (c.winner.text, c.winner.source, c.pool, c.score) == (bad, "sample", 0, None)


def test_banned_tokens_follow_earlier_occurrences_of_the_tail():
    assert banned_tokens([5, 6, 5], 2) == [6]
    assert banned_tokens([5, 6, 7, 5, 6], 3) == [7]
    assert banned_tokens([1, 2, 3], 2) == []
    assert banned_tokens([1, 2, 1], 1) == [1, 2]
    assert banned_tokens([], 3) == [] and banned_tokens([4], 0) == []


# --- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("generation, num_candidates, field", [
    ({"decoding": "consensus", "num_samples": 0}, 1, "generation.num_samples"),
    ({"decoding": "consensus", "num_samples": 1}, 1, "generation.num_samples"),
    ({"decoding": "consensus", "num_samples": 5}, 1, "generation.num_samples"),  # max 4 here
    ({"decoding": "consensus", "num_samples": "3"}, 1, "generation.num_samples"),
    ({"decoding": "consensus", "num_samples": True}, 1, "generation.num_samples"),
    ({"decoding": "sample", "num_samples": 3}, 1, "generation.num_samples"),
    ({"decoding": "greedy", "num_samples": 3}, 1, "generation.num_samples"),
    ({"decoding": "consensus", "num_samples": 3}, 2, "num_candidates"),
    ({"no_repeat_ngram_size": -1}, 1, "generation.no_repeat_ngram_size"),
    ({"no_repeat_ngram_size": 65}, 1, "generation.no_repeat_ngram_size"),
    ({"no_repeat_ngram_size": 2.5}, 1, "generation.no_repeat_ngram_size"),
])
def test_bad_decoding_options_name_their_field(generation, num_candidates, field):
    with pytest.raises(InputError) as e:
        build_options("cap2mol", {"generation": generation, "num_candidates": num_candidates},
                      max_samples=4, max_candidates=4)
    assert e.value.field == field and e.value.status == 422, e.value


def test_consensus_and_repetition_defaults():
    plain = build_options("mol2cap").params
    assert (plain.no_repeat_ngram_size, plain.num_samples, plain.decoding) == (0, 1, "sample")
    c = build_options("mol2cap", {"generation": {"decoding": "consensus"}}).params
    assert c.num_samples == DEFAULT_NUM_SAMPLES and c.temperature == 0.7  # ICMA's sampling
    assert build_options("mol2cap", {"generation": {"decoding": "consensus"}},
                         max_samples=3).params.num_samples == 3
    # sampling colder than 0.01 is greedy: one answer stands for all the samples
    cold = build_options("mol2cap", {"generation": {"decoding": "consensus",
                                                    "temperature": 0.001}}).params
    assert cold.samples_per_prompt == 1 and c.samples_per_prompt == DEFAULT_NUM_SAMPLES


# --- engines and the pipeline -----------------------------------------------------------------

PROMPTS = ["the molecule is a carboxylic", "ethanol"]
LOOP = re.compile(r"\b" + " ".join(LOOP_WORDS) + r"\b")


@pytest.fixture(scope="module")
def looping(looping_model):
    return load_engine("transformers", model=str(looping_model), device="cpu",
                       settings=get_settings())


def test_no_repeat_ngram_size_stops_a_loop(looping):
    items = [GenerationInput("mol2cap", p) for p in PROMPTS]
    for decoding in ("greedy", "sample", "beam"):
        base = {"decoding": decoding, "max_new_tokens": 16, "stop": ()}
        looped = looping.generate(items, GenerationParams(**base))
        assert all(len(LOOP.findall(g.text)) >= 7 for g in looped), (decoding, looped)
        stopped = looping.generate(items, GenerationParams(**base, no_repeat_ngram_size=2))
        assert all(len(LOOP.findall(g.text)) <= 1 for g in stopped), (decoding, stopped)
        assert all(len(g.text.split()) >= 6 for g in stopped)  # it wrote on, elsewhere


def test_repetition_control_ignores_the_prompts_ngrams(looping):
    """The prompt already says "the acid" three times; the answer may still say it once
    (transformers' own no_repeat_ngram_size would ban it from the first token)."""
    out = looping.generate([GenerationInput("mol2cap", "the acid the acid the acid")],
                           GenerationParams(decoding="greedy", max_new_tokens=8, stop=(),
                                            no_repeat_ngram_size=2))[0]
    assert out.text.startswith(" ".join(LOOP_WORDS))


def test_transformers_engine_samples_each_prompt_num_samples_times(tiny_model):
    eng = load_engine("transformers", model=str(tiny_model), device="cpu", batch_size=4,
                      settings=get_settings())
    items = [GenerationInput("mol2cap", p) for p in PROMPTS]
    params = GenerationParams(decoding="consensus", num_samples=3, max_new_tokens=6, stop=())
    first = eng.generate(items, params)
    assert len(first) == 6 and len({g.text for g in first}) > 2  # different samples
    assert [g.text for g in eng.generate(items, params)] == [g.text for g in first]  # seeded
    # a prompt's samples do not depend on the batch size (one generate call per prompt group)
    eng.batch_size = 3
    assert [g.text for g in eng.generate(items[:1], params)] == [g.text for g in first[:3]]


def test_consensus_in_the_pipeline_picks_from_its_pool(tiny_model, looping):
    examples = [Example("CC(=O)[O-]", ACID, "175", 0.9), Example("CC(=O)O", ACID_3, "176", 0.8),
                Example("C(=O)[O-]", ACID_2, "283", 0.7)]
    opts = build_options("mol2cap", {"generation": {"decoding": "consensus", "num_samples": 4,
                                                    "max_new_tokens": 8}, "n_shot": 3})
    # a random model's samples scatter: the examples' answers agree more with each other
    rnd = load_engine("transformers", model=str(tiny_model), device="cpu",
                      settings=get_settings())
    t = translate("mol2cap", ["CCO"], [examples], rnd, opts)[0]
    assert t.consensus.winner.source == "example" and t.consensus.pool == 7
    assert t.answer == next(e.caption for e in examples if e.cid == t.consensus.winner.cid)
    assert translate("mol2cap", ["CCO"], [examples], rnd, opts)[0].answer == t.answer
    # colder than 0.01 is greedy: one answer stands for the samples (and no overflow)
    cold = build_options("mol2cap", {"generation": {"decoding": "consensus", "num_samples": 4,
                                                    "temperature": 1e-300,
                                                    "max_new_tokens": 8}})
    t_cold = translate("mol2cap", ["CCO"], [examples], rnd, cold)[0]
    assert (t_cold.consensus.samples, t_cold.consensus.pool) == (1, 4)
    # a model whose samples agree: a sample wins (all four say the same), the first of them
    t = translate("mol2cap", ["CCO"], [examples], looping, opts)[0]
    assert (t.consensus.winner.source, t.consensus.winner.sample) == ("sample", 0)
    assert LOOP.search(t.answer) and t.completion_tokens == 4 * 8
    # cap2mol: the random model's samples are not molecules, so only examples compete
    c2m = build_options("cap2mol", {"generation": {"decoding": "consensus", "num_samples": 3,
                                                   "max_new_tokens": 8}})
    t = translate("cap2mol", [ACID], [examples], rnd, c2m)[0]
    assert t.valid and t.consensus.winner.source == "example"
    assert t.answer in {e.smiles for e in examples}

"""Prompt-lookup speculation: greedy decoding's answers and sampling's distribution, from fewer
forward passes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from icma.cli import main as cli_main
from icma.core.errors import InputError
from icma.core.prompts import Example
from icma.core.settings import get_settings
from icma.generation.engines import GenerationInput, GenerationParams, load_engine
from icma.generation.options import Options
from icma.generation.pipeline import translate
from icma.generation.speculation import Sampling, _verify_sampled, draft

PROMPTS = ["the molecule is a carboxylic acid the molecule is", "ethanol",
           "a much longer prompt about the conjugate base of an acid and its acid", "the acid"]


def test_a_draft_is_what_followed_the_latest_longest_match():
    # [1, 2, 3] occurred twice before the tail: the later occurrence wins
    assert draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2, 3) == [7, 8]
    # no earlier [9, 1, 2]: the longest shorter n-gram that occurs, [1, 2], drafts
    assert draft([5, 6, 1, 2, 4, 9, 1, 2], 3, 3) == [4, 9, 1]
    assert draft([5, 6, 1, 2, 4, 9, 1, 2], 3, 1) == [4, 9, 1]  # [2] alone, same place
    assert draft([1, 2, 3], 4, 3) == []  # the tail never occurred before
    assert draft([7, 1, 7], 5, 2) == [1, 7]  # what follows may run into the tail itself
    assert draft([1, 2, 1, 2], 0, 3) == [] and draft([], 3, 3) == []


def _engine(model, tokens: int = 8, batch_size: int = 4):
    settings = get_settings().model_copy(update={"speculative_tokens": tokens})
    return load_engine("transformers", model=str(model), device="cpu", batch_size=batch_size,
                       settings=settings)


def _run(eng, items, params, tokens: int, batch_size: int = 4):
    eng.speculative_tokens, eng.batch_size = tokens, batch_size
    return eng.generate(items, params)


@pytest.fixture(scope="module", params=["tiny_model", "looping_model"])
def model_engine(request):
    return request.param, _engine(request.getfixturevalue(request.param))


@pytest.mark.parametrize("extra", [{}, {"repetition_penalty": 0.8},
                                   {"no_repeat_ngram_size": 2},
                                   {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}])
def test_speculation_gives_greedy_decodings_tokens(model_engine, extra):
    """Speculation on (batches of 4, left-padded) against transformers' greedy generate() one
    prompt at a time (transformers penalises padding as if it were text), float32."""
    model, eng = model_engine
    items = [GenerationInput("mol2cap", p) for p in PROMPTS]
    params = GenerationParams(decoding="greedy", max_new_tokens=24, stop=(), **extra)
    on = _run(eng, items, params, 8)
    off = _run(eng, items, params, 0, batch_size=1)
    assert [g.text for g in on] == [g.text for g in off]
    assert [(g.completion_tokens, g.finish_reason) for g in on] == \
        [(g.completion_tokens, g.finish_reason) for g in off]
    assert all(g.accepted_tokens <= g.draft_tokens for g in on)
    if model == "looping_model" and not extra.get("no_repeat_ngram_size"):
        # "the acid the acid ...": the loop's next turn is drafted from its last, and kept
        assert sum(g.accepted_tokens for g in on) > len(PROMPTS) * 24 // 2
    assert all(g.draft_tokens == g.accepted_tokens == 0 for g in off)
    # drafts shorter or longer, the same tokens
    assert [g.text for g in _run(eng, items, params, 2)] == [g.text for g in on]


def test_a_continuous_batch_answers_as_each_prompt_alone(tiny_model, monkeypatch):
    """Nine prompts through two places: rows end and new prompts join mid-batch (left-padded
    to the others' columns, or they to theirs), and columns no row attends to any more are
    dropped; every answer is still the one greedy decoding gives the prompt alone."""
    from icma.generation import speculation

    eng = _engine(tiny_model)
    words = PROMPTS[2].split()
    prompts = [" ".join(words[:n]) for n in (3, 12, 1, 7, 13, 2, 9, 5, 11)]
    items = [GenerationInput("mol2cap", p) for p in prompts]
    free = [g.text.split() for g in _run(eng, items, GenerationParams(
        decoding="greedy", max_new_tokens=12, stop=()), 0, batch_size=1)]
    # stop texts from the answers, so rows end at different steps
    stops = tuple({words[2 + 2 * i] for i, words in enumerate(free[:4:2] + free[1:2])})
    params = GenerationParams(decoding="greedy", max_new_tokens=12, repetition_penalty=1.2,
                              stop=stops)
    widths = []
    keep = speculation._Batch.keep

    def spy(self, kept, staying):
        before = self.mask.shape[1]
        keep(self, kept, staying)
        if self.mask is not None:
            widths.append((before, self.mask.shape[1]))

    monkeypatch.setattr(speculation._Batch, "keep", spy)
    on = _run(eng, items, params, 4, batch_size=2)
    monkeypatch.undo()
    alone = [_run(eng, [x], params, 0, batch_size=1)[0] for x in items]
    assert [g.text for g in on] == [g.text for g in alone]
    assert [g.completion_tokens for g in on] == [g.completion_tokens for g in alone]
    assert len({g.completion_tokens for g in on}) > 2
    assert any(after < before for before, after in widths)  # compacted at least once


def test_the_batch_cache_grows_in_place_and_reads_as_concatenation():
    """A step writes its columns into spare room (a few reallocations in 40 steps, not one
    per step), reads exactly what concatenation gives, and adopts what the batch assigns."""
    from types import SimpleNamespace

    import torch
    from transformers.cache_utils import DynamicLayer

    from icma.generation.speculation import _grow_in_place

    torch.manual_seed(0)
    first = DynamicLayer()
    k, v = torch.randn(3, 2, 50, 4), torch.randn(3, 2, 50, 4)
    first.update(k, v)
    cache = SimpleNamespace(layers=[first])
    _grow_in_place(cache)
    layer = cache.layers[0]
    assert type(layer) is not DynamicLayer and torch.equal(layer.keys, k)
    buffers = set()
    for step in range(40):
        nk, nv = torch.randn(3, 2, 1 + step % 9, 4), torch.randn(3, 2, 1 + step % 9, 4)
        k, v = torch.cat([k, nk], dim=2), torch.cat([v, nv], dim=2)
        got_k, got_v = layer.update(nk, nv)
        assert torch.equal(got_k, k) and torch.equal(got_v, v)
        assert layer.get_seq_length() == k.shape[2]
        buffers.add(layer._kb.data_ptr())
    assert len(buffers) <= 4  # 50 + 195 columns: the first write and a couple of growths
    layer.keys, layer.values = layer.keys[[2, 0]], layer.values[[2, 0]]  # rows leave
    nk, nv = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    got_k, got_v = layer.update(nk, nv)
    assert torch.equal(got_k, torch.cat([k[[2, 0]], nk], dim=2))
    assert torch.equal(got_v, torch.cat([v[[2, 0]], nv], dim=2))


def test_speculation_stops_where_greedy_stops(tiny_model):
    eng = _engine(tiny_model)
    item = [GenerationInput("mol2cap", "the molecule")]
    free = eng.generate(item, GenerationParams(decoding="greedy", max_new_tokens=16, stop=()))[0]
    stop = free.text.split()[2]
    params = GenerationParams(decoding="greedy", max_new_tokens=16, stop=(stop,))
    on, off = (_run(eng, item, params, k)[0] for k in (8, 0))
    assert on.finish_reason == off.finish_reason == "stop"
    assert on.text == off.text and stop not in on.text and free.text.startswith(on.text)
    assert on.completion_tokens < 16


def test_beams_never_speculate_and_sampling_only_when_set(looping_model):
    eng = _engine(looping_model)
    items = [GenerationInput("mol2cap", p) for p in PROMPTS[:2]]
    params = GenerationParams(decoding="sample", max_new_tokens=8, stop=())
    assert all(g.draft_tokens > 0 for g in eng.generate(items, params))  # the loop drafts
    eng.speculative_sampling = False
    assert all(g.draft_tokens == 0 for g in eng.generate(items, params))
    eng.speculative_sampling = True
    out = eng.generate(items, GenerationParams(decoding="beam", max_new_tokens=8, stop=()))
    assert all(g.draft_tokens == 0 for g in out)


@pytest.mark.parametrize("warp", [(0.7, 40, 0.85), (1.3, 0, 0.5), (0.5, 3, 1.0), (1.0, 0, 1.0)])
def test_sampling_probabilities_are_transformers_warped_softmax(warp):
    """``Sampling`` draws from what transformers' generate() samples from: temperature, then
    top-k, then top-p, softmaxed."""
    import torch
    from transformers import (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    temperature, top_k, top_p = warp
    torch.manual_seed(1)
    logits = torch.randn(2, 500) * 3
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    ours = Sampling(temperature, top_k, top_p)
    for row in range(2):
        want = torch.softmax(scores[row], -1)
        got = ours.probabilities(logits[row])
        assert torch.equal(got > 0, want > 0)
        assert torch.allclose(got, want, atol=1e-6)


def test_verifying_drafts_keeps_the_sampling_distribution():
    """Speculative sampling with a prompt-lookup draft, 40,000 times over fixed logits: the
    first token is distributed as the first position's probabilities whatever was drafted,
    and after an accepted draft the second as the second position's."""
    import torch

    sampling = Sampling(temperature=0.8, top_k=4)
    logits = torch.tensor([[2.0, 1.5, 0.3, -1.0, -3.0], [0.0, 2.5, 1.0, 0.5, -2.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0]])
    p = [sampling.probabilities(row) for row in logits]
    n = 40_000
    for drafts in ([0, 1], [2, 3], [4]):  # a likely draft, an unlikely one, a cut one
        gen = torch.Generator().manual_seed(7)
        runs = [_verify_sampled(logits, drafts, [], [], None, sampling, gen) for _ in range(n)]
        first = torch.bincount(torch.tensor([r[0] for r in runs]), minlength=5) / n
        assert torch.allclose(first, p[0], atol=0.01), (drafts, first, p[0])
        after = [r[1] for r in runs if r[0] == drafts[0] and len(r) > 1]
        if len(after) > 1000:  # the draft was kept often enough to measure what follows it
            second = torch.bincount(torch.tensor(after), minlength=5) / len(after)
            assert torch.allclose(second, p[1], atol=0.02), (drafts, second, p[1])
        assert all(len(r) <= len(drafts) + 1 for r in runs)
        assert all(r[:-1] == drafts[:len(r) - 1] for r in runs)  # only drafts before the last


@pytest.fixture(scope="module")
def coin_model(looping_model, tmp_path_factory):
    """``looping_model`` with a soft head: after any word the next is "the" or "acid" (top 2),
    with probabilities that depend on the current word only (attention and MLP are zero)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("coin-llama")
    tok = AutoTokenizer.from_pretrained(looping_model)
    net = LlamaForCausalLM.from_pretrained(looping_model)
    the, acid = tok.convert_tokens_to_ids(["the", "acid"])
    import torch

    with torch.no_grad():
        head = net.lm_head.weight
        head[the, :2] = torch.tensor([0.30, 0.25])  # after "acid"/[SEP] (basis 0), after "the"
        head[acid, :2] = torch.tensor([0.25, 0.33])
    net.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_speculative_sampling_answers_are_distributed_as_sampling(coin_model):
    """600 sampled 4-word answers of a prompt full of what to draft from: the frequency of each
    answer against its exact probability (a chain over "the"/"acid" whose steps are the
    model's sampling probabilities); drafts were verified, not just copied."""
    import itertools

    import torch

    eng = _engine(coin_model)
    prompt = "the acid the the acid acid the acid"
    words = ("the", "acid")
    ids = eng.tokenizer.convert_tokens_to_ids(list(words))
    sampling = Sampling(temperature=1.0, top_k=2)
    step = {}  # word before -> (p(the), p(acid))
    for before in ("[SEP]", *words):
        with torch.inference_mode():
            logits = eng.net(torch.tensor([[eng.tokenizer.convert_tokens_to_ids(before)]])).logits
        probs = sampling.probabilities(logits[0, -1])
        step[before] = (float(probs[ids[0]]), float(probs[ids[1]]))
    assert 0.2 < step["the"][0] < 0.8 and 0.2 < step["acid"][0] < 0.8  # coins, not loops
    counts: dict[tuple[str, ...], int] = {}
    drafted = accepted = 0
    for i in range(10):
        params = GenerationParams(decoding="sample", temperature=1.0, top_k=2, top_p=1.0,
                                  num_samples=60, seed=60 * i, max_new_tokens=4, stop=())
        for g in eng.generate([GenerationInput("mol2cap", prompt)], params):
            counts[tuple(g.text.split())] = counts.get(tuple(g.text.split()), 0) + 1
            drafted, accepted = drafted + g.draft_tokens, accepted + g.accepted_tokens
    assert 0 < accepted < drafted
    n = sum(counts.values())
    worst = 0.0
    for answer in itertools.product(words, repeat=4):
        exact, before = 1.0, "[SEP]"
        for word in answer:
            exact, before = exact * step[before][words.index(word)], word
        sd = (exact * (1 - exact) / n) ** 0.5
        worst = max(worst, abs(counts.pop(answer, 0) / n - exact) / sd)
    assert not counts  # nothing but the two words
    assert worst < 4.0, worst  # 16 cells: every frequency within 4 standard deviations


def test_sampled_answers_follow_their_seed_not_their_batch(tiny_model):
    """A prompt's k-th sample is its answer for seed + k, alone or in a batch of others."""
    eng = _engine(tiny_model)
    items = [GenerationInput("mol2cap", p) for p in PROMPTS]
    params = GenerationParams(decoding="sample", max_new_tokens=10, stop=(), num_samples=3,
                              seed=5)
    together = _run(eng, items, params, 8, batch_size=4)
    assert len(together) == 3 * len(items)
    for i, item in enumerate(items):
        for k in range(3):
            alone = _run(eng, [item], replace(params, num_samples=1, seed=5 + k), 8,
                         batch_size=1)
            assert alone[0].text == together[3 * i + k].text
    assert len({g.text for g in together}) > len(items)  # the samples differ
    again = _run(eng, items, params, 8, batch_size=2)
    assert [g.text for g in again] == [g.text for g in together]


def test_shipped_smollm2_answers_the_same_with_speculation(smollm2, chebi_val):
    recs = chebi_val.records
    examples = [[Example(r.smiles, r.description) for r in recs[10 + 2 * i:12 + 2 * i]]
                for i in range(2)]
    params = GenerationParams.for_task("mol2cap", decoding="greedy", max_new_tokens=40)
    opts = Options(n_shot=2, params=params, prime_answer=True)
    eng = _engine(smollm2)
    runs = []
    for k in (8, 0):
        eng.speculative_tokens = k
        runs.append(translate("mol2cap", [r.smiles for r in recs[:2]], examples, eng, opts))
    assert [t.raw for t in runs[0]] == [t.raw for t in runs[1]]
    assert [t.completion_tokens for t in runs[0]] == [t.completion_tokens for t in runs[1]]
    assert sum(t.accepted_tokens for t in runs[0]) > 0


def test_bad_speculation_settings_are_one_line_errors(monkeypatch, tmp_path, capsys):
    for name, value in [("ICMA_SPECULATIVE_TOKENS", "-1"), ("ICMA_SPECULATIVE_TOKENS", "65"),
                        ("ICMA_SPECULATIVE_NGRAM", "0"), ("ICMA_SPECULATIVE_TOKENS", "eight"),
                        ("ICMA_SPECULATIVE_SAMPLING", "maybe")]:
        monkeypatch.setenv(name, value)
        get_settings.cache_clear()  # (read once per process, and earlier tests read it)
        with pytest.raises(InputError) as e:
            get_settings()
        assert e.value.field == name and repr(value) in e.value.message
        queries = tmp_path / "q.txt"
        queries.write_text("CCO\n")
        assert cli_main(["translate", "--task", "mol2cap", "--input", str(queries),
                         "--output", str(tmp_path / "o.jsonl"),
                         "--engine", "nearest-neighbour"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"icma: error: {name}:") and "\n" not in err
        assert not (tmp_path / "o.jsonl").exists()
        monkeypatch.delenv(name)
    get_settings.cache_clear()  # the next reader sees the environment as it is again

"""Prompt-lookup speculation: greedy decoding's answers, from fewer forward passes."""

from __future__ import annotations

import pytest

from icma.cli import main as cli_main
from icma.core.errors import InputError
from icma.core.prompts import Example
from icma.core.settings import get_settings
from icma.generation.engines import GenerationInput, GenerationParams, load_engine
from icma.generation.options import Options
from icma.generation.pipeline import translate
from icma.generation.speculation import draft

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


def test_sampling_and_beams_never_speculate(looping_model):
    eng = _engine(looping_model)
    items = [GenerationInput("mol2cap", p) for p in PROMPTS[:2]]
    for decoding in ("sample", "beam"):
        out = eng.generate(items, GenerationParams(decoding=decoding, max_new_tokens=8, stop=()))
        assert all(g.draft_tokens == 0 for g in out)


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
                        ("ICMA_SPECULATIVE_NGRAM", "0"), ("ICMA_SPECULATIVE_TOKENS", "eight")]:
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

"""Engines behind one interface, and the translation path every caller shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from icma.generation.engines import Adapter, GenerationInput, GenerationParams, cut_at_stop, load_engine
from icma.core.errors import InputError
from icma.core.prompts import Example
from icma.generation.options import Options
from icma.generation.pipeline import translate
from icma.core.settings import get_settings

ETHANOL = Example("CCO", "The molecule is ethanol.", cid="702", score=0.9)
ACETIC = Example("CC(=O)O", "The molecule is acetic acid.", cid="176", score=0.8)


def test_nearest_neighbour_returns_the_best_examples_answer():
    nn = load_engine("nearest-neighbour", settings=get_settings())
    out = translate("mol2cap", ["CCCO", "CCN"], [[ETHANOL, ACETIC], []], nn)
    assert [t.answer for t in out] == ["The molecule is ethanol.", ""]
    assert out[0].examples == [ETHANOL, ACETIC] and out[0].n_requested == 2
    mols = translate("cap2mol", ["an acid", "an alcohol"], [[ACETIC], [Example("C1CC", "x")]], nn)
    assert [(t.answer, t.valid, t.canonical) for t in mols] == [
        ("CC(=O)O", True, "CC(=O)O"), ("C1CC", False, None)]


def test_translate_rejects_bad_input():
    nn = load_engine("nearest-neighbour", settings=get_settings())
    with pytest.raises(InputError) as e:
        translate("mol2cap", ["CCO"], [], nn)
    assert e.value.field == "examples"
    with pytest.raises(InputError) as e:
        translate("mol2cap", ["CCO", " "], [[], []], nn)
    assert e.value.field == "smiles[1]"
    with pytest.raises(InputError) as e:
        translate("caption2smiles", ["x"], [[]], nn)
    assert e.value.field == "task"
    with pytest.raises(InputError) as e:
        load_engine("llama.cpp", settings=get_settings())
    assert e.value.field == "engine"


def test_generation_params_are_checked():
    assert GenerationParams.for_task("cap2mol").repetition_penalty == 0.8
    assert GenerationParams.for_task("mol2cap").repetition_penalty == 1.0
    for bad in ({"temperature": 0}, {"top_p": 1.5}, {"max_new_tokens": 0},
                {"decoding": "nucleus"}, {"num_beams": 0}):
        with pytest.raises(InputError) as e:
            GenerationParams(**bad).checked()
        assert e.value.field == next(iter(bad))


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("a b</s>c\n\nd", ("\n\n", "</s>")) == ("a b", True)
    assert cut_at_stop("abc", ("</s>",)) == ("abc", False)


def test_transformers_engine_batches_like_it_runs_alone(tiny_model):
    eng = load_engine("transformers", model=str(tiny_model), device="cpu", batch_size=4,
                      settings=get_settings())
    prompts = ["the molecule is", "a much longer prompt about the conjugate base of an acid",
               "ethanol", "the"]
    items = [GenerationInput("mol2cap", p) for p in prompts]
    greedy = GenerationParams(decoding="greedy", max_new_tokens=6, stop=())
    batched = eng.generate(items, greedy)
    eng.batch_size = 1
    alone = eng.generate(items, greedy)
    # left padding: each prompt's continuation does not depend on its batch mates
    assert [g.text for g in batched] == [g.text for g in alone]
    assert all(g.completion_tokens <= 6 for g in batched)
    assert [g.prompt_tokens for g in batched] == [eng.count_tokens(p) for p in prompts]
    sampled = GenerationParams(max_new_tokens=6, stop=(), seed=7)
    assert [g.text for g in eng.generate(items, sampled)] == \
        [g.text for g in eng.generate(items, sampled)]  # one seed, same draws


def test_transformers_engine_stops_at_stop_text(tiny_model):
    eng = load_engine("transformers", model=str(tiny_model), device="cpu", settings=get_settings())
    free = eng.generate([GenerationInput("mol2cap", "the molecule")],
                        GenerationParams(decoding="greedy", max_new_tokens=12, stop=()))[0]
    assert free.finish_reason in ("length", "stop") and free.text.strip()
    words = free.text.split()
    stop = words[min(2, len(words) - 1)]
    cut = eng.generate([GenerationInput("mol2cap", "the molecule")],
                       GenerationParams(decoding="greedy", max_new_tokens=12, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert free.text.startswith(cut.text)


def test_model_folder_errors(tmp_path):
    with pytest.raises(InputError, match="config.json") as e:
        load_engine("transformers", model=str(tmp_path), device="cpu", settings=get_settings())
    assert e.value.field == "model"
    with pytest.raises(InputError, match="does not exist"):
        load_engine("transformers", model=str(tmp_path / "nope"), device="cpu",
                    settings=get_settings())
    with pytest.raises(InputError, match="adapter_config") as e:
        from icma.generation.engines.hf import _check_adapter

        _check_adapter(tmp_path)
    assert e.value.field == "adapter"


def _random_lora(base: Path, out: Path, seed: int) -> Adapter:
    """A LoRA adapter with random (non-zero) B matrices, so that it changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                         LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj",
                                    "down_proj"], init_lora_weights=False))
    net.save_pretrained(out)
    return Adapter(out.name, out)


def test_adapters_switch_per_call_over_one_base_model(tiny_model, tmp_path):
    eng = load_engine("transformers", model=str(tiny_model), device="cpu", settings=get_settings())
    a = _random_lora(tiny_model, tmp_path / "a", 1)
    b = _random_lora(tiny_model, tmp_path / "b.v2", 2)
    items = [GenerationInput("mol2cap", "the molecule is an acid")]
    greedy = GenerationParams(decoding="greedy", max_new_tokens=12, stop=())
    base = eng.generate(items, greedy)[0].text
    with_a = eng.generate(items, greedy, adapter=a)[0].text
    with_b = eng.generate(items, greedy, adapter=b)[0].text
    assert len({base, with_a, with_b}) == 3
    assert eng.generate(items, greedy)[0].text == base  # adapters off again
    assert eng.generate(items, greedy, adapter=a)[0].text == with_a
    # the same adapter given at construction
    assert load_engine("transformers", model=str(tiny_model), device="cpu", adapter=a.path,
                       settings=get_settings()).generate(items, greedy)[0].text == with_a
    with pytest.raises(InputError, match="adapter_config") as e:
        eng.generate(items, greedy, adapter=Adapter("x", tmp_path / "missing"))
    assert e.value.field == "adapter"


def test_shipped_smollm2_converts_and_answers_with_priming(smollm2, chebi_val):
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    eng = load_engine("transformers", model=str(smollm2), device="cpu", settings=get_settings())
    recs = chebi_val.records[:3]
    examples = [[Example(r.smiles, r.description) for r in chebi_val.records[10:12]]] * 3
    params = GenerationParams.for_task("mol2cap", decoding="greedy", max_new_tokens=48)
    primed = translate("mol2cap", [r.smiles for r in recs], examples, eng,
                       Options(n_shot=2, params=params, prime_answer=True))
    assert all(t.answer for t in primed), [t.raw for t in primed]
    assert all(t.prompt_tokens > 100 for t in primed)

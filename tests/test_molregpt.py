"""MolReGPT's prompt style: chat messages with numbered examples and JSON answers, its
defaults, the answer parsing, and the pipeline on engines that render the messages with their
chat template. Through an OpenAI-compatible server (chat API, refusals): tests/test_openai.py."""

from __future__ import annotations

import json

import pytest

from icma.core import molregpt
from icma.core.errors import InputError
from icma.core.prompts import Example
from icma.core.settings import get_settings
from icma.generation.engines import load_engine
from icma.generation.options import build_options
from icma.generation.pipeline import translate

EX = [Example("CC(=O)O", "The molecule is acetic acid.", "176"),
      Example("CCO", 'The molecule is ethanol, a "primary alcohol".', "702"),
      Example("C1=CC=CC=C1C(=O)O" * 3, "The molecule is a long one. " * 6, "9")]


def test_messages_number_the_examples_with_their_json_answers():
    system, user = molregpt.messages("mol2cap", "CCN", EX[:2])
    assert (system["role"], user["role"]) == ("system", "user")
    assert user["content"] == "Input: CCN"
    text = system["content"]
    assert text.index("Example 1:") < text.index("Input: CC(=O)O") < text.index("Example 2:")
    # answers are JSON, quotes escaped, so that the model sees exactly what it must write
    assert json.dumps({"caption": EX[1].caption}) in text
    assert '"caption"' in text.splitlines()[-1] and "JSON" in text.splitlines()[-1]
    system, user = molregpt.messages("cap2mol", "The molecule is ethanol.", EX[:1])
    assert json.dumps({"molecule": "CC(=O)O"}) in system["content"]
    assert "Input: The molecule is acetic acid." in system["content"]
    zero = molregpt.messages("mol2cap", "CCN", [])[0]["content"]
    assert "Example" not in zero and '"caption"' in zero


@pytest.mark.parametrize("task,reply,answer", [
    ("mol2cap", '{"caption": "The molecule is X."}', "The molecule is X."),
    ("mol2cap", 'Sure! ```json\n{"caption": "The molecule is \\"X\\"."}\n```', 'The molecule is "X".'),
    ("mol2cap", '{"note": 1} then {"caption": "second"}', "second"),
    ("cap2mol", '{"molecule": "CCO"}', "CCO"),
    ("cap2mol", '{"smiles": "CCO"}', "CCO"),
    ("cap2mol", '{"predicted_smiles": " CCO "}', "CCO"),
    ("cap2mol", '{"caption": "CCO"}', None),  # the other task's key
    ("mol2cap", 'The molecule is X.', None),
    ("mol2cap", '{"caption": "cut by the length lim', None),
])
def test_the_answer_is_the_first_json_object_with_the_tasks_key(task, reply, answer):
    assert molregpt.parse_answer(task, reply) == answer


def test_a_malformed_reply_still_gives_what_it_says():
    assert molregpt.salvage_answer("mol2cap", '{"caption": "cut by the length lim') == \
        "cut by the length lim"
    assert molregpt.salvage_answer("cap2mol", 'x {"smiles": "C\\\\C=C' + "\n") == "C\\C=C"
    assert molregpt.salvage_answer("mol2cap", "no json at all") == ""
    assert molregpt.longest(EX) == 2


def test_molregpt_requests_get_molregpts_defaults():
    o = build_options("mol2cap", {"prompt_style": "molregpt"},
                      default_adapter=lambda task: pytest.fail("MolReGPT tunes nothing"))
    assert (o.prompt_style, o.n_shot, o.retrieval.method, o.order, o.adapter) == \
        ("molregpt", molregpt.N_SHOT, "rdkit", "ranked", None)
    o = build_options("cap2mol", {"prompt_style": "molregpt", "n_shot": 3,
                                  "retrieval": {"method": "random"}, "order": "reversed"})
    assert (o.n_shot, o.retrieval.method, o.order) == (3, "random", "reversed")
    assert build_options("cap2mol", {}).prompt_style == "icma"
    with pytest.raises(InputError) as e:
        build_options("mol2cap", {"prompt_style": "chatgpt"})
    assert e.value.field == "prompt_style" and "icma, molregpt" in e.value.message


@pytest.fixture(scope="module")
def chat_tiny(tiny_model, tmp_path_factory):
    """conftest's tiny Llama with a chat template (its tokenizer has none)."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    tok.save_pretrained(folder)
    return folder


def test_the_pipeline_renders_the_messages_with_the_chat_template(chat_tiny, tiny_model):
    eng = load_engine("transformers", model=str(chat_tiny), device="cpu",
                      settings=get_settings())
    request = {"prompt_style": "molregpt", "generation": {"decoding": "greedy",
                                                          "max_new_tokens": 12}}
    [whole] = translate("mol2cap", ["CCN"], [EX], eng, build_options("mol2cap", request))
    assert [e.cid for e in whole.examples] == ["176", "702", "9"] and whole.dropped == 0
    cutoff = whole.prompt_tokens + 12 - 1  # one token short of the three examples
    opts = build_options("mol2cap", {**request, "cutoff": cutoff})
    [t] = translate("mol2cap", ["CCN"], [EX], eng, opts)
    assert t.prompt.startswith("[system] You are an expert chemist")
    assert t.prompt.endswith('[user] Input: CCN\n[assistant] {"caption": "')  # primed
    # the random model writes no JSON: what is left of the reply is salvaged or empty
    assert t.answer == molregpt.salvage_answer("mol2cap", '{"caption": "' + t.raw)
    # the budget drops the lowest-ranked examples first: the long third one went
    assert [e.cid for e in t.examples] == ["176", "702"] and t.dropped == 1
    assert t.prompt_tokens <= cutoff - 12
    plain = load_engine("transformers", model=str(tiny_model), device="cpu",
                        settings=get_settings())
    with pytest.raises(InputError) as e:
        translate("mol2cap", ["CCN"], [EX], plain, opts)
    assert e.value.field == "prompt_style" and "chat template" in e.value.message


def test_smollm2_answers_molregpt_prompts_in_json(smollm2, chebi_val):
    """The shipped model, untuned, primed with the JSON object's start: where it ends its
    reply, it has closed the string and the object, and the answer parses without salvage."""
    recs = chebi_val.records
    eng = load_engine("transformers", model=str(smollm2), device="cpu", settings=get_settings())
    opts = build_options("mol2cap", {"prompt_style": "molregpt", "n_shot": 3,
                                     "generation": {"decoding": "greedy",
                                                    "max_new_tokens": 200}})
    examples = [[Example(r.smiles, r.description, r.cid) for r in recs[3 * i + 2:3 * i + 5]]
                for i in range(2)]
    out = translate("mol2cap", [recs[0].smiles, recs[1].smiles], examples, eng, opts)
    for t in out:
        assert "<|im_start|>system" in t.prompt and "Example 3:" in t.prompt
        assert t.answer.startswith("The molecule")
        if t.finish_reason == "stop":
            assert molregpt.parse_answer("mol2cap", '{"caption": "' + t.raw) == t.answer
    assert any(t.finish_reason == "stop" for t in out)

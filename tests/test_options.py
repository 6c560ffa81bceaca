"""The one builder of a translation's options: task defaults, request fields, limits, and the
prompt form an adapter was tuned on (a real registry folder; no model is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icma.core.errors import InputError, NotFoundError
from icma.generation.adapters import AdapterRegistry
from icma.generation.engines import Adapter
from icma.generation.options import build_options


def test_defaults_come_from_the_task():
    m, c = build_options("mol2cap"), build_options("cap2mol")
    assert (m.n_shot, m.retrieval.method, m.params.repetition_penalty) == (2, "graph", 1.0)
    assert (c.n_shot, c.retrieval.method, c.params.repetition_penalty) == (4, "bm25", 0.8)
    assert m.prime_answer and m.order == "reversed" and m.cutoff == 2048 and m.adapter is None


def test_request_fields_become_options():
    opts = build_options("cap2mol", {
        "n_shot": 3, "cutoff": 1024, "num_candidates": 2,
        "retrieval": {"method": "random", "corpus": "mine", "exclude_cids": ["1", "2"],
                      "exclude_same_structure": True, "exclude_same_caption": True,
                      "random_walk": {"skip_probability": 0.2, "seed": 7}},
        "generation": {"decoding": "sample", "temperature": 0.5, "repetition_penalty": None}})
    r = opts.retrieval
    assert (r.method, r.corpus, r.exclude_cids, r.exclude_same) == ("random", "mine",
                                                                    ("1", "2"), True)
    assert r.random_walk == (0.2, 7)
    assert (opts.n_shot, opts.cutoff, opts.num_candidates) == (3, 1024, 2)
    assert opts.params.temperature == 0.5 and opts.params.repetition_penalty == 0.8
    # mol2cap reads its own exclusion field, not cap2mol's
    assert not build_options("mol2cap", {"retrieval": {"exclude_same_caption": True}}) \
        .retrieval.exclude_same


@pytest.mark.parametrize("task, request_, field", [
    ("mol2cap", {"n_shot": 9}, "n_shot"),
    ("mol2cap", {"n_shot": -1}, "n_shot"),
    ("cap2mol", {"num_candidates": 5}, "num_candidates"),
    ("cap2mol", {"num_candidates": 2, "generation": {"decoding": "greedy"}}, "num_candidates"),
    ("mol2cap", {"retrieval": {"method": "bm25"}}, "retrieval.method"),
    ("mol2cap", {"generation": {"temperature": 0}}, "generation.temperature"),
    ("mol2cap", {"generation": {"max_new_tokens": 5000}}, "generation.max_new_tokens"),
    ("mol2cap", {"generation": {"nucleus": 0.9}}, "generation"),
    ("mol2cap", {"order": "sideways"}, "order"),
    ("mol2cap", {"adapter": "a"}, "adapter"),  # no registry given
    ("caption2smiles", {}, "task"),
])
def test_bad_requests_name_their_field(task, request_, field):
    with pytest.raises(InputError) as e:
        build_options(task, request_, max_k=8, max_candidates=4)
    assert e.value.field == field and e.value.status == 422


def adapter_folder(root: Path, name: str, manifest: dict | None) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q"]}))
    if manifest is not None:
        (folder / "icma-adapter.json").write_text(json.dumps(manifest))


def test_an_adapter_is_served_with_the_prompt_form_it_was_tuned_on(tmp_path):
    adapter_folder(tmp_path, "tuned", {"task": "mol2cap",
                                       "prompt": {"prime_answer": True, "order": "ranked"}})
    adapter_folder(tmp_path, "plain", None)
    registry = AdapterRegistry(tmp_path)
    tuned = build_options("mol2cap", {"adapter": "tuned"}, adapters=registry.get)
    assert tuned.adapter == Adapter("tuned", tmp_path / "tuned")
    assert tuned.prime_answer is True and tuned.order == "ranked"
    # the request still decides when it says
    told = build_options("mol2cap", {"adapter": "tuned", "prime_answer": False,
                                     "order": "reversed"}, adapters=registry.get)
    assert told.prime_answer is False and told.order == "reversed"
    # without a manifest: an ICMA-tuned checkpoint writes the marker itself
    plain = build_options("cap2mol", {"adapter": "plain"}, adapters=registry.get)
    assert plain.prime_answer is False and plain.order == "reversed"
    with pytest.raises(InputError) as e:
        build_options("cap2mol", {"adapter": "tuned"}, adapters=registry.get)
    assert e.value.field == "adapter" and "mol2cap" in e.value.message
    with pytest.raises(NotFoundError):
        build_options("mol2cap", {"adapter": "missing"}, adapters=registry.get)
    direct = build_options("mol2cap", {}, adapter=Adapter("new", tmp_path / "tuned"))
    assert direct.adapter.name == "new" and direct.prime_answer is False


@pytest.mark.parametrize("request_, field", [
    ({"n_shot": "2"}, "n_shot"),
    ({"n_shot": True}, "n_shot"),
    ({"retrieval": {"corpus": ""}}, "retrieval.corpus"),  # not the default corpus
    ({"retrieval": {"corpus": "../x"}}, "retrieval.corpus"),
    ({"retrieval": {"exclude_same_structure": "yes"}}, "retrieval.exclude_same_structure"),
    ({"adapter": ""}, "adapter"),  # not the base model
    ({"generation": {"top_k": 40.0}}, "generation.top_k"),
    ({"generation": {"temperature": "0.7"}}, "generation.temperature"),
    ({"generation": {"seed": False}}, "generation.seed"),
    ({"generation": {"repetition_penalty": 1e-300}}, "generation.repetition_penalty"),
    ({"generation": {"top_k": 2**40}}, "generation.top_k"),
])
def test_values_are_not_coerced_whichever_door_they_came_in_by(request_, field, tmp_path):
    with pytest.raises(InputError) as e:
        build_options("mol2cap", request_, adapters=AdapterRegistry(tmp_path).get)
    assert e.value.field == field and e.value.status == 422


def test_sampling_colder_than_the_floor_is_greedy_and_seeds_wrap():
    from icma.generation.engines import MIN_SAMPLING_TEMPERATURE, GenerationParams

    for t in (1e-300, MIN_SAMPLING_TEMPERATURE / 2):
        assert GenerationParams(temperature=t).for_engine().decoding == "greedy"
    kept = GenerationParams(temperature=MIN_SAMPLING_TEMPERATURE).for_engine()
    assert kept.decoding == "sample" and kept.temperature == MIN_SAMPLING_TEMPERATURE
    assert GenerationParams(decoding="beam", temperature=1e-300).for_engine().decoding == "beam"
    last = GenerationParams(seed=2**63 - 1)
    assert last.next_seed(2).seed == 1 and last.next_seed(2).checked()

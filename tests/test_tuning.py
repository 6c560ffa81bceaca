"""In-context molecule tuning: leak-free examples, serving's exact prompt, training, resume,
the saved and registered adapter, and errors before any training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from icma.generation.adapters import MANIFEST, AdapterRegistry
from icma.core.corpus import write_corpus
from icma.generation.engines import GenerationParams, load_engine
from icma.core.errors import InputError
from icma.generation.options import Options, RetrievalOptions
from icma.generation.pipeline import run_batch
from icma.core.prompts import training_text
from icma.core.settings import Settings, get_settings
from icma.retrieval import ExclusionRule, build_index
from icma.retrieval.cache import cached_index
from icma.generation.retrievers import LocalRetriever
from icma.tuning import TuneConfig, parse_config, tune
from icma.tuning.batches import IGNORE, collate
from icma.tuning.data import Tokens, build_training_set
from icma.tuning.loop import Schedule
from tests.conftest import REPO, SERVICE_KINDS
from tests.service_helpers import Recording


@pytest.fixture(scope="module")
def tiny_tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def train32(chebi_val, tmp_path_factory) -> Path:
    """32 ChEBI-20 validation pairs as a corpus file (the training set of the tiny runs)."""
    path = tmp_path_factory.mktemp("train32") / "train32.tsv"
    write_corpus(chebi_val.subset(range(32), name="train32"), path)
    return path


# --- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("change,field", [
    ({"lora_r": 0}, "lora_r"),
    ({"learning_rate": -1e-4}, "learning_rate"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"batch_size": 0}, "batch_size"),
    ({"epochs": 0}, "epochs"),
    ({"lr": 1e-4}, "lr"),  # a typo is not silently ignored
    ({"name": "no spaces"}, "name"),
    ({"name": "base"}, "name"),  # reserved: requests ask for the untuned model by it
    ({"retrieval": "bm25"}, "retrieval"),  # captions cannot be queried with a molecule
    ({"method": "full", "quantization": "8bit"}, "quantization"),
    ({"task": "smiles2iupac"}, "task"),
    ({"eval_decoding": "beam"}, "eval_decoding"),
    ({"eval_decoding": "consensus", "eval_num_samples": 1}, "eval_num_samples"),
    ({"eval_num_samples": 4}, "eval_num_samples"),  # sampling's default decoding pools nothing
])
def test_invalid_settings_name_their_field(change, field):
    with pytest.raises(InputError) as e:
        parse_config({"task": "mol2cap", "name": "ok", **change})
    assert e.value.field == field, str(e.value)


def test_icma_defaults():
    cfg = parse_config({"task": "cap2mol", "name": "x"})
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (32, 64, 0.1)
    assert (cfg.learning_rate, cfg.batch_size * cfg.grad_accum, cfg.epochs) == (2e-4, 32, 10)
    assert cfg.shots == 4 and cfg.method_for_contexts == "bm25" and not cfg.train_on_inputs
    assert cfg.warmup_for(8000) == 1000 and cfg.warmup_for(50) == 6


def test_loop_and_model_load_without_rdkit_faiss_or_pydantic():
    """benchmarks/icmt_device.py trains with this loop on a GPU machine that has torch,
    transformers and peft only: the loop and the model helpers must not import the rest."""
    code = (
        "import sys\n"
        "BLOCK = {'rdkit', 'faiss', 'pydantic', 'fastapi', 'nltk', 'torch_geometric'}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCK:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from icma.tuning.loop import Stopped, train\n"
        "from icma.tuning.model import load_model, store_frozen_in\n"
        "from icma.tuning.batches import collate\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_schedule_visits_every_example_once_per_epoch():
    cfg = parse_config({"task": "mol2cap", "name": "x", "batch_size": 3, "grad_accum": 2,
                        "epochs": 2})
    s = Schedule.plan(10, cfg)
    assert (s.per_epoch, s.total_steps) == (4, 4)
    seen = [i for step in range(s.total_steps) for b in s.micro_batches(step, 7) for i in b]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a new order each epoch
    assert s.micro_batches(3, 7) == s.micro_batches(3, 7)  # a pure function of step and seed


def test_length_grouped_batches_cover_each_epoch_with_little_padding():
    """Grouped micro-batches still visit every example once per epoch in a seed-determined
    order, and pad far less than plain shuffled ones (lengths spread as ICMT prompts' are)."""
    import random

    lengths = [random.Random(i).randint(80, 900) for i in range(500)]
    on = parse_config({"task": "mol2cap", "name": "x", "batch_size": 8, "grad_accum": 2,
                       "epochs": 2})
    off = parse_config({**on.model_dump(), "task": "mol2cap", "group_by_length": False})

    def padding(s):
        batches = [b for step in range(s.total_steps) for b in s.micro_batches(step, 3)]
        pad = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return batches, 1 - 2 * sum(lengths) / pad

    grouped, plain = Schedule.plan(500, on, lengths), Schedule.plan(500, off, lengths)
    (gb, gpad), (pb, ppad) = padding(grouped), padding(plain)
    per_epoch = grouped.per_epoch
    for batches in (gb, pb):
        for e in range(2):
            seen = [i for b in batches[e * per_epoch:(e + 1) * per_epoch] for i in b]
            assert sorted(seen) == list(range(500))
    assert gpad < 0.1 < 0.3 < ppad
    assert gb != pb and grouped.micro_batches(5, 3) == grouped.micro_batches(5, 3)
    assert grouped.micro_batches(5, 3) != grouped.micro_batches(5, 4)
    # micro-batches of one step come from all over the epoch, not from one window
    firsts = [sorted(lengths[i] for i in b)[0] for b in gb[:per_epoch]]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


# --- training examples -----------------------------------------------------------------------

def test_no_training_context_contains_its_own_answer_whole_chebi_val(chebi_val, tiny_tok):
    """Over the whole ChEBI-20 validation split: with the default rule no context is the
    record itself; with structure and caption exclusion the answer appears nowhere in the
    prompt."""
    index = build_index("morgan", chebi_val)
    tokens = Tokens(tiny_tok, "</s>")
    by_cid = {}
    for r in chebi_val.records:
        by_cid.setdefault(r.cid, []).append(r)
    plain = build_training_set("mol2cap", chebi_val.records, index, tokens, n_shot=2,
                               cutoff=4096, prime_answer=True)
    assert len(plain.examples) == len(chebi_val) and not plain.skipped
    for ex in plain.examples:
        assert ex.cid not in {e.cid for e in ex.examples}
    strict = build_training_set(
        "mol2cap", chebi_val.records, index, tokens, n_shot=2, cutoff=4096, prime_answer=True,
        rule=ExclusionRule(self_cid=True, same_structure=True, same_caption=True))
    for rec, ex in zip(chebi_val.records, strict.examples):
        assert len(ex.examples) == 2
        assert rec.description not in ex.prompt  # the answer is only in the completion
        assert all(e.caption != rec.description for e in ex.examples)
        assert ex.completion == f" {rec.description}</s>"


@pytest.mark.parametrize("task", ["mol2cap", "cap2mol"])
@pytest.mark.parametrize("prime", [True, False])
def test_training_text_is_servings_prompt_plus_answer_and_eos(task, prime, svc_dir, tiny_model,
                                                              tiny_tok):
    """A training example's prompt is byte for byte what the worker's pipeline gives the engine
    for the same query (its CID excluded), and prompt + completion is ICMA's training text."""
    from icma.core.corpus import embedded_corpus

    corpus = embedded_corpus()
    kind = "graph" if task == "mol2cap" else "bm25"
    # the service's own index of this corpus
    index = cached_index(kind, corpus, svc_dir, settings=get_settings())
    records = corpus.records[3300:3320]  # ChEBI-20 test molecules, searched against all
    data = build_training_set(task, records, index, Tokens(tiny_tok, "</s>"), n_shot=2,
                              cutoff=2048, prime_answer=prime)
    assert len(data.examples) == 20

    engine = Recording(load_engine("transformers", model=str(tiny_model), device="cpu",
                                   settings=get_settings()))
    retriever = LocalRetriever(Settings(data_dir=svc_dir), SERVICE_KINDS)
    for rec, ex in zip(records, data.examples):
        query = rec.canonical if task == "mol2cap" else rec.description
        answer = rec.description if task == "mol2cap" else rec.smiles
        opts = Options(n_shot=2, retrieval=RetrievalOptions(exclude_cids=(rec.cid,)),
                       prime_answer=prime, cutoff=2048,
                       params=GenerationParams.for_task(task, decoding="greedy",
                                                        max_new_tokens=4))
        out = run_batch(task, [query], opts, retriever, engine)[0]
        assert out.error is None
        assert engine.prompts[-1] == ex.prompt
        assert [e.cid for e in out.translation.examples] == [e.cid for e in ex.examples]
        if prime:
            assert ex.text == ex.prompt + " " + answer + "</s>"
        else:  # ICMA's own training text, exactly
            assert ex.text == training_text(task, query, answer, ex.examples)
        # The prompt's tokens are the engine's tokens for it; the loss is on the rest.
        n_prompt = engine.count_tokens(ex.prompt)
        assert ex.input_ids[:n_prompt] == tiny_tok(ex.prompt)["input_ids"]
        assert all(x == IGNORE for x in ex.labels[:n_prompt])
        assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]


def test_cutoff_drops_lowest_ranked_examples_then_skips(chebi_val, tiny_tok):
    records = chebi_val.records[:40]
    index = build_index("morgan", chebi_val.subset(range(200)))
    tokens = Tokens(tiny_tok, "</s>")
    full = build_training_set("mol2cap", records, index, tokens, n_shot=2, cutoff=4096,
                              prime_answer=True)
    tight = build_training_set("mol2cap", records, index, tokens, n_shot=2, cutoff=160,
                               prime_answer=True)
    assert all(len(e.input_ids) <= 160 for e in tight.examples)
    assert tight.skipped and all("cutoff" in why for _, why in tight.skipped)
    for e in tight.examples:
        f = next(x for x in full.examples if x.cid == e.cid)
        assert [x.cid for x in e.examples] == [x.cid for x in f.examples][:len(e.examples)]


def test_collate_right_pads_with_generation_positions_and_no_fully_masked_row(chebi_val, tiny_tok, tiny_model):
    from icma.tuning.model import config_eos_id

    # BERT's tokenizer has no EOS; the model's config has
    eos = config_eos_id(str(tiny_model))
    assert eos == tiny_tok.sep_token_id
    index = build_index("morgan", chebi_val.subset(range(100)))
    data = build_training_set("mol2cap", chebi_val.records[:2], index,
                              Tokens(tiny_tok, "model", eos), n_shot=1, cutoff=4096,
                              prime_answer=True, train_on_inputs=True)
    a, b = data.examples
    assert a.input_ids[-1] == eos and a.labels[-1] == eos  # eos 'model': the model's EOS id
    assert a.labels[1:-1] == a.input_ids[1:-1]  # train_on_inputs: loss on the prompt too
    batch = collate([a, b], tiny_tok.pad_token_id)
    short = 0 if len(a.input_ids) < len(b.input_ids) else 1
    n = len((a, b)[short].input_ids)
    assert n < batch["input_ids"].shape[1] and batch["attention_mask"][short, n:].sum() == 0
    assert (batch["labels"][short, n:] == IGNORE).all()
    assert batch["position_ids"][short, 0] == 0  # first real token at position 0
    assert batch["position_ids"][short, n - 1] == n - 1
    assert (batch["labels"][:, 0] == IGNORE).all()  # nothing before it to predict it from
    # every row's first key is a real token: no query row is fully masked (CUDA SDPA's NaN)
    assert batch["attention_mask"][:, 0].all()


def test_padding_leaves_the_loss_unchanged(chebi_val, tiny_tok, tiny_model):
    """A padded batch's summed loss is the sum of its examples' losses, each alone."""
    from transformers import AutoModelForCausalLM

    from icma.tuning.loop import _head_split, _loss_sum

    index = build_index("morgan", chebi_val.subset(range(100)))
    data = build_training_set("mol2cap", chebi_val.records[:3], index,
                              Tokens(tiny_tok, "</s>"), n_shot=1, cutoff=4096,
                              prime_answer=True)
    assert len({len(e.input_ids) for e in data.examples}) > 1  # padding is needed
    net = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    split = _head_split(net)
    with torch.no_grad():
        together = _loss_sum(net, collate(data.examples, tiny_tok.pad_token_id), split)
        alone = sum(_loss_sum(net, collate([e], tiny_tok.pad_token_id), split)
                    for e in data.examples)
    assert torch.allclose(together, alone, rtol=1e-4), (together, alone)




# --- training --------------------------------------------------------------------------------

def tiny_config(tiny_model, train32: Path, name: str, **kw) -> TuneConfig:
    base = dict(task="mol2cap", name=name, base_model=str(tiny_model), train=str(train32),
                retrieval="morgan", n_shot=2, cutoff=512, lora_r=8, lora_alpha=16,
                learning_rate=2e-2, warmup_steps=0, max_steps=24, batch_size=8, grad_accum=1,
                save_steps=8, seed=1)
    return parse_config({**base, **kw})


def test_tune_tiny_model_loss_falls_adapter_saved_registered_and_served(tiny_learner, train32,
                                                                        tmp_path):
    tiny_model = tiny_learner
    cfg = tiny_config(tiny_model, train32, "tiny-icmt", eval=str(train32), eval_limit=4,
                      eval_decoding="consensus", eval_num_samples=2, eval_max_new_tokens=8)
    seen = []
    manifest = tune(cfg, data_dir=tmp_path, adapters_dir=tmp_path / "adapters",
                    on_progress=seen.append, settings=get_settings())
    losses = manifest["training"]["losses"]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 1.5, losses  # nats per answer token
    steps = [p for p in seen if p.get("phase") == "training"]
    assert [p["step"] for p in steps] == list(range(1, 25))
    assert all(p["total_steps"] == 24 and p["eta_s"] is not None for p in steps)
    folder = tmp_path / "adapters" / "tiny-icmt"
    assert (folder / "adapter_config.json").is_file() and (folder / MANIFEST).is_file()
    saved = json.loads((folder / MANIFEST).read_text())
    assert saved["task"] == "mol2cap" and saved["prompt"]["prime_answer"] is True
    # One of the 32 does not fit 512 tokens even alone (the word-piece tokenizer splits
    # SMILES finely): it is skipped and counted.
    assert (saved["data"]["examples"], saved["data"]["skipped"]) == (31, 1)
    assert len(saved["base_model_sha256"]) == 64
    assert saved["hyperparameters"]["lora_r"] == 8
    ev = saved["evaluation"]
    assert ev["n"] == 4 and ev["metrics"]["task"] == "mol2cap" and "bleu2" in ev["metrics"]
    assert (ev["decoding"], ev["num_samples"]) == ("consensus", 2)
    answers = [json.loads(x) for x in Path(ev["predictions"]).read_text().splitlines()]
    assert all(a["consensus"]["samples"] == 2 for a in answers)  # each answer chose from a pool
    assert ev["split_sha256"] == saved["data"]["train_sha256"]  # evaluated on train32 itself
    info = AdapterRegistry(tmp_path / "adapters").get("tiny-icmt")
    assert info.task == "mol2cap" and info.r == 8
    assert sorted(info.target_modules) == ["down_proj", "gate_proj", "k_proj", "o_proj",
                                           "q_proj", "up_proj", "v_proj"]
    # The transformers engine applies it: greedy output changes.
    eng = load_engine("transformers", model=str(tiny_model), device="cpu", settings=get_settings())
    from icma.generation.engines import GenerationInput

    items = [GenerationInput("mol2cap", "the molecule is")]
    greedy = GenerationParams(decoding="greedy", max_new_tokens=8, stop=())
    assert eng.generate(items, greedy)[0].text != \
        eng.generate(items, greedy, adapter=info.as_adapter())[0].text
    # The name is taken now.
    with pytest.raises(InputError) as e:
        tune(cfg, data_dir=tmp_path, adapters_dir=tmp_path / "adapters", settings=get_settings())
    assert e.value.field == "name"


def test_output_head_on_labelled_positions_matches_the_full_loss(tiny_model, chebi_val,
                                                                 tiny_tok):
    from transformers import AutoModelForCausalLM

    from icma.tuning.loop import _head_split, _loss_sum

    index = build_index("morgan", chebi_val.subset(range(100)))
    data = build_training_set("mol2cap", chebi_val.records[:3], index, Tokens(tiny_tok, "</s>"),
                              n_shot=2, cutoff=4096, prime_answer=True)
    enc = collate(data.examples, tiny_tok.pad_token_id)
    net = AutoModelForCausalLM.from_pretrained(tiny_model)
    split = _head_split(net)
    assert split is not None
    with torch.no_grad():
        fast = _loss_sum(net, enc, split)
        slow = _loss_sum(net, enc, None)
    assert torch.allclose(fast, slow, rtol=1e-5)


def test_bfloat16_lora_stores_frozen_weights_in_bfloat16_with_autocasts_results(
        tiny_model, chebi_val, tiny_tok):
    """Under bfloat16 LoRA the frozen Linear weights are bfloat16 from the start (no cast in
    every pass), the LoRA weights float32, and loss and gradients are exactly autocast's over
    float32 weights (with the head cast once by the loop)."""
    from icma.tuning.loop import _head_split, _loss_sum
    from icma.tuning.model import load_model, store_frozen_in

    index = build_index("morgan", chebi_val.subset(range(100)))
    data = build_training_set("mol2cap", chebi_val.records[:3], index, Tokens(tiny_tok, "</s>"),
                              n_shot=2, cutoff=4096, prime_answer=True)
    enc = collate(data.examples, tiny_tok.pad_token_id)
    cfg = parse_config({"task": "mol2cap", "name": "x", "lora_r": 4})
    results = []
    for fast in (True, False):
        torch.manual_seed(0)
        net = load_model(cfg, str(tiny_model), "cpu", "bfloat16")
        q = net.get_base_model().model.layers[0].self_attn.q_proj
        assert q.base_layer.weight.dtype == torch.bfloat16
        assert q.lora_A["default"].weight.dtype == torch.float32
        assert net.get_output_embeddings().weight.dtype == torch.float32
        if not fast:
            store_frozen_in(net, "float32")
        net.eval()  # no dropout: the two must agree exactly
        split = _head_split(net, torch.bfloat16 if fast else None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss_sum(net, enc, split)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in net.parameters() if p.requires_grad]))
    (fast_loss, fast_grads), (slow_loss, slow_grads) = results
    assert torch.equal(fast_loss, slow_loss)
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, slow_grads))


def test_lora_dropout_drops_at_its_rate_and_scales_the_rest():
    from icma.tuning.model import fast_dropout

    drop = fast_dropout(0.1)
    x = torch.ones(400, 500)
    torch.manual_seed(1)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.9) < 0.003
    # the mask's four 16-bit lanes of each 64-bit draw are each uniform
    lanes = (y != 0).float().reshape(-1, 4).mean(0)
    assert ((lanes - 0.9).abs() < 0.005).all(), lanes
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.9), rtol=1e-4)
    assert abs(y.mean().item() - 1) < 0.005  # unbiased, as nn.Dropout
    torch.manual_seed(1)
    assert torch.equal(drop(x), y)  # drawn from torch's generator: checkpoints resume it
    assert torch.equal(drop.eval()(x), x)


def test_full_fine_tuning_writes_a_model_folder(tiny_model, train32, tmp_path):
    cfg = tiny_config(tiny_model, train32, "tiny-full", method="full", max_steps=3,
                      learning_rate=1e-3)
    manifest = tune(cfg, data_dir=tmp_path, adapters_dir=tmp_path / "adapters",
                    settings=get_settings())
    folder = tmp_path / "models" / "tiny-full"
    assert (folder / "config.json").is_file() and (folder / MANIFEST).is_file()
    assert manifest["method"] == "full" and not (tmp_path / "adapters" / "tiny-full").exists()
    eng = load_engine("transformers", model=str(folder), device="cpu", settings=get_settings())
    assert eng.count_tokens("the molecule") > 0


def _tune_cmd(tiny_model, train32, data_dir, name, *extra):
    return [sys.executable, "-m", "icma", "tune", "--task", "mol2cap", "--name", name,
            "--base-model", str(tiny_model), "--train", str(train32), "--retrieval", "morgan",
            "--cutoff", "512", "--lora-r", "8", "--learning-rate", "2e-2", "--warmup-steps", "0",
            "--batch-size", "8", "--grad-accum", "1", "--seed", "1",
            "--data-dir", str(data_dir), *extra]


def test_killed_run_resumes_from_its_last_checkpoint(tiny_llama_wide, train32, tmp_path):
    """SIGKILL mid-run; the same command again resumes at the last checkpoint and ends with
    exactly the losses of a run that was never interrupted."""
    env = {**os.environ, "ICMA_PROGRESS": "false"}
    cmd = _tune_cmd(tiny_llama_wide, train32, tmp_path, "killed", "--max-steps", "60",
                    "--save-steps", "5", "--json")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    ckpts = tmp_path / "tuning" / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(ckpts.glob("step-0000010")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "adapters" / "killed").exists()
    kept = sorted(p.name for p in ckpts.glob("step-*"))
    assert kept and kept[-1] < "step-0000060"
    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads(again.stdout)
    assert resumed["training"]["resumed_from_step"] == int(kept[-1].split("-")[1])
    assert resumed["training"]["steps"] == 60
    straight = tune(parse_config({**resumed["hyperparameters"], "name": "straight"}),
                    data_dir=tmp_path / "other", adapters_dir=tmp_path / "other" / "adapters",
                    settings=get_settings())
    assert resumed["training"]["losses"] == pytest.approx(straight["training"]["losses"],
                                                          rel=1e-4)


# --- errors before training ------------------------------------------------------------------

def test_bad_input_fails_before_any_training(tiny_model, train32, tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("CID\tSMILES\tdescription\n")
    no_captions = tmp_path / "molecules.tsv"
    no_captions.write_text("CID\tSMILES\n1\tCCO\n")
    cases = [
        ({"base_model": str(tmp_path / "no-such-model")}, "base_model"),
        ({"base_model": str(train32.parent)}, "base_model"),  # a folder, not a model
        ({"train": str(empty)}, "train"),
        ({"train": str(no_captions)}, "train"),
        ({"train": "no-such-corpus"}, "train"),
        ({"eval": str(tmp_path / "missing.tsv")}, "eval"),
        ({"cutoff": 16}, "cutoff"),  # not one example fits
        ({"target_modules": ["not_a_layer"]}, "target_modules"),
        ({"precision": "float16"}, "precision"),  # the CPU cannot train in float16
        ({"quantization": "4bit"}, "quantization"),  # needs a GPU
        ({"warmup_steps": 50, "max_steps": 10}, "warmup_steps"),
    ]
    for change, field in cases:
        cfg = tiny_config(tiny_model, train32, "bad", **change)
        with pytest.raises(InputError) as e:
            tune(cfg, data_dir=tmp_path, adapters_dir=tmp_path / "adapters",
                 settings=get_settings())
        assert e.value.field == field, (change, str(e.value))
        assert not list((tmp_path / "tuning").glob("bad/checkpoints/step-*")), change
    assert not (tmp_path / "adapters" / "bad").exists()


def test_cli_errors_are_one_line(tiny_model, train32, tmp_path):
    r = subprocess.run(_tune_cmd(tiny_model, train32, tmp_path, "cli-bad", "--lora-r", "0"),
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("icma: error: lora_r:"), r.stderr
    assert "Traceback" not in r.stderr
    bad = tmp_path / "cfg.toml"
    bad.write_text("task = 'mol2cap'\nname = 'x'\nlearning_rat = 0.1\n")
    r = subprocess.run([sys.executable, "-m", "icma", "tune", "--config", str(bad)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "learning_rat" in r.stderr and "unknown" in r.stderr, r.stderr


def test_config_file_and_flags(tmp_path):
    from icma.cli import build_parser
    from icma.cli.tune import tune_settings

    f = tmp_path / "run.yaml"
    f.write_text("task: cap2mol\nname: from-file\nlora_r: 16\nrandom_walk:\n  "
                 "skip_probability: 0.2\n  seed: 3\n")
    args = build_parser().parse_args(["tune", "--config", str(f), "--lora-r", "4",
                                      "--no-prime-answer", "--target-modules", "q_proj",
                                      "v_proj"])
    cfg = parse_config(tune_settings(args))
    assert (cfg.task, cfg.name, cfg.lora_r, cfg.prime_answer) == ("cap2mol", "from-file", 4,
                                                                  False)
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.random_walk.seed == 3


def test_adapter_of_another_base_model_is_a_clear_error(tiny_model, tiny_llama_wide, tmp_path):
    """An adapter tuned on another base model is the caller's mistake (422 in the worker),
    whether it is the first adapter the engine loads or a later one; the engine goes on."""
    from icma.generation.engines import GenerationInput
    from tests.test_engines import _random_lora

    wrong = _random_lora(tiny_llama_wide, tmp_path / "wrong", 1)  # 128 wide, the engine's is 32
    right = _random_lora(tiny_model, tmp_path / "right", 2)
    items = [GenerationInput("mol2cap", "the molecule is")]
    greedy = GenerationParams(decoding="greedy", max_new_tokens=6, stop=())
    for first in (None, right):
        eng = load_engine("transformers", model=str(tiny_model), device="cpu",
                          settings=get_settings())
        if first is not None:
            eng.generate(items, greedy, adapter=first)
        with pytest.raises(InputError) as e:
            eng.generate(items, greedy, adapter=wrong)
        assert e.value.field == "adapter" and "does not fit" in str(e.value)
        assert eng.generate(items, greedy, adapter=right)[0].text
        assert eng.generate(items, greedy)[0].text


def test_submission_checks_do_not_convert_the_default_model(tmp_path):
    """A tune job's submission answers at once: the shipped model is converted by the run, not
    by the check (a minute on 2 cores, longer than a client waits)."""
    from icma.tuning.config import parse_config
    from icma.tuning.run import check_sources
    from icma.tuning.sources import Sources

    cfg = parse_config({"task": "mol2cap", "name": "quick"})
    t0 = time.perf_counter()
    check_sources(cfg, Sources(tmp_path, tmp_path))
    check_sources(cfg, Sources.for_job(tmp_path, tmp_path, tmp_path / "models", False))
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "models").exists()
    with pytest.raises(InputError) as e:
        check_sources(parse_config({"task": "mol2cap", "name": "x", "base_model": "/nope"}),
                      Sources(tmp_path, tmp_path))
    assert e.value.field == "base_model"

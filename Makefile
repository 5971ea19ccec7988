# ReliAPI — `make run` starts the gateway on its built-in defaults, `make test` runs the tests.
# Both create the virtualenv (.venv) on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test bench bench-scale bench-stateful bench-guard lint check screenshot docker clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m gateway $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	@command -v wrk >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -qq wrk >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null 2>&1)); } || \
	  echo "wrk not available: bench falls back to its Python load generator"
	$(PY) bench/run.py $(ARGS)

# 10,000 open streams through one gateway process (and the bare proxy): peak RSS, every stream complete.
bench-scale: $(STAMP)
	$(PY) bench/run.py --scale $(ARGS)

bench-stateful: $(STAMP)
	$(PY) bench/stateful.py $(ARGS)

# Instructions per plain request (callgrind: deterministic) against the committed baseline: fails on +3 %.
# ~20-30 s (one callgrind run per proxy, side by side; see bench/README.md); .ci/run runs it last.
bench-guard: $(STAMP)
	$(PY) bench/instructions.py --check bench/instructions_baseline.json $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check gateway providers policies tests bench
	$(PY) -m gateway --check --config config/gateway.yaml

check: $(STAMP)
	$(PY) -m gateway --check $(ARGS)

# The status page in headless Chromium, desktop and phone width: `make screenshot URL=http://host:port/`.
URL      ?= http://127.0.0.1:8000/
SHOT_DIR ?= build/screenshots
screenshot: $(STAMP)
	$(PY) -m tests.support.browser --screenshot $(SHOT_DIR)/status-1280.png --width 1280 $(URL)
	$(PY) -m tests.support.browser --screenshot $(SHOT_DIR)/status-375.png --width 375 $(URL)

docker:
	docker build -t reliapi .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

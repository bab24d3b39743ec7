# meshlens: `make demo` and `make test` set everything up on a fresh machine (Python 3.11 + pip).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp

.PHONY: demo lab test lint bench browser-deps samples clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,lab]'
	touch $(STAMP)

## demo: ingest the bundled samples, print the summary, run every report, print index.html
## (installs JupyterLab too: `make lab` then opens the notebooks on the demo store)
demo: $(STAMP)
	$(VENV)/bin/meshlens demo --db out/demo.duckdb --samples data/samples --out out/reports

## lab: JupyterLab on a working copy of the notebooks (./meshlens-notebooks), reading the demo store
lab: $(STAMP)
	test -f out/demo.duckdb || $(VENV)/bin/meshlens demo --db out/demo.duckdb --samples data/samples --no-reports
	$(VENV)/bin/meshlens lab --db out/demo.duckdb

## test: lint + the whole test suite (installs headless Chromium for the report browser test when root)
test: $(STAMP) browser-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check .

browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; the browser test will be skipped"; \
	  else echo "note: chromium not installed (needs root apt-get); the browser test will be skipped"; fi; }

## bench: ingest/analysis benchmarks (ratios against baselines measured in the same run)
bench: $(STAMP)
	$(PY) benchmarks/bench_ingest.py
	$(PY) benchmarks/bench_analysis.py

samples: $(STAMP)
	$(VENV)/bin/meshlens simulate --out data/samples

clean:
	rm -rf out .pytest_cache

# `make demo` runs the main job, `make test` the whole suite. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench install clean-venv

install: $(STAMP)

# Reinstall only when the package metadata or the pinned versions change.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vision-eff generate

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# the benchmarks also install the peers they measure side by side (tomesd, DeepCache: pinned in pyproject's bench extra)
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(VENV)/bin/vision-eff bench all

clean-venv:
	rm -rf $(VENV)

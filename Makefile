# release-watcher: set-up, tests and the demo. `make test` and `make demo` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint typecheck bench fuzz faults consul venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/pip || { scripts/install-system-deps --venv $(PYTHON) && rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

venv: $(STAMP)

consul:
	@scripts/install-consul >/dev/null

lint: $(STAMP)
	$(BIN)/ruff check watcher tests bench hooks/examples/http-health-check
	$(BIN)/ruff format --check watcher tests bench hooks/examples/http-health-check

typecheck: $(STAMP)
	$(BIN)/mypy

# Two pytest-xdist workers, a test file each at a time (its cluster is module-scoped):
# most of an integration test is waiting on Consul, a host or a deadline, so two run in
# little more than the time of one. TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2

test: $(STAMP) consul lint typecheck
	scripts/install-system-deps
	CONSUL_BIN=$$(scripts/install-consul) $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: $(STAMP) consul
	CONSUL_BIN=$$(scripts/install-consul) $(BIN)/python scripts/demo.py $(DEMO_ARGS)

# The parsers of outside input (event payloads, KV records, config) under >= 100,000 inputs.
fuzz: $(STAMP)
	WATCHER_FUZZ_PROFILE=long $(BIN)/pytest -q -p no:cacheprovider --timeout=3600 \
		tests/unit/test_fuzz_parsers.py

# Every figure beside its baseline, one table; the figures also in bench/results/*.json.
# BENCH_ARGS="--quick" tries the bench itself out with small sizes.
bench: $(STAMP) consul
	scripts/install-bench-deps
	@# the bytecode a pip install writes: startup figures must not include compiling
	@# watcher/ (PYTHONDONTWRITEBYTECODE=1 in the environment would otherwise redo it)
	$(BIN)/python -m compileall -q watcher bench tests/support >/dev/null
	CONSUL_BIN=$$(scripts/install-consul) $(BIN)/python bench/run.py $(BENCH_ARGS)
	CONSUL_BIN=$$(scripts/install-consul) $(BIN)/python bench/bench_web.py
	CONSUL_BIN=$$(scripts/install-consul) $(BIN)/python bench/bench_predicate.py
	CONSUL_BIN=$$(scripts/install-consul) $(BIN)/python bench/bench_newest.py

# Randomized fault deploys on a real 5-host cluster; FAULTS_ARGS="--deploys 200 --seed N".
faults: $(STAMP) consul
	scripts/install-system-deps
	CONSUL_BIN=$$(scripts/install-consul) $(BIN)/python -m tests.faults.campaign $(FAULTS_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# Entry points. The venv (.venv, an editable install with the dev extras) is assumed to exist.
PYTHON ?= .venv/bin/python
RUFF ?= .venv/bin/ruff
BENCH_ARGS ?=

.PHONY: bench test lint

# Side-by-side benchmark through a real Envoy (about 2 minutes); e.g. make bench BENCH_ARGS="--duration 4".
bench:
	$(PYTHON) bench/run.py $(BENCH_ARGS)

test:
	.ci/run

lint:
	$(RUFF) check .
	$(RUFF) format --check .

# Entry points. The venv (.venv, an editable install with the dev extras) is assumed to exist.
PYTHON ?= .venv/bin/python
RUFF ?= .venv/bin/ruff
BENCH_ARGS ?= --rounds 3

.PHONY: bench test lint

# Side-by-side benchmark through a real Envoy: 3 interleaved rounds, medians (about 6 minutes);
# e.g. make bench BENCH_ARGS="--rounds 1 --sizes 1024".
bench:
	$(PYTHON) bench/run.py $(BENCH_ARGS)

test:
	.ci/run

lint:
	$(RUFF) check .
	$(RUFF) format --check .

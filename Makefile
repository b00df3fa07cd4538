# Entry points. scripts/setup makes the .venv (and installs the Debian servers) when missing.
PYTHON ?= .venv/bin/python
RUFF ?= .venv/bin/ruff
BENCH_ARGS ?= --rounds 3

.PHONY: bench bench-tiers test lint

# Side-by-side benchmark through a real Envoy: 3 interleaved rounds, medians (about 10 minutes), then the
# tiers (bench/tiers.py);
# e.g. make bench BENCH_ARGS="--rounds 1 --sizes 1024".
bench:
	scripts/setup
	$(PYTHON) bench/run.py $(BENCH_ARGS)
	$(PYTHON) bench/tiers.py

# The cache tier, the bridge and the streaming edge (bench/tiers.py: each script's own table).
bench-tiers:
	scripts/setup
	$(PYTHON) bench/tiers.py $(TIERS_ARGS)

test:
	.ci/run

lint:
	$(RUFF) check .
	$(RUFF) format --check .

# adaclip developer entry points. `make demo` and `make test` work on a fresh machine:
# both run `setup` first, which is idempotent (it re-installs only when pyproject.toml or
# constraints.txt changed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test demo lint bench bench-accuracy bench-speed clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check adaclip tests benchmarks
	$(BIN)/ruff format --check adaclip tests benchmarks

demo: setup
	@echo "make demo: not yet available (needs the embedded 'lite' backbone, issue 7)" >&2; exit 2

# Benchmarks are not part of `make test`: they take tens of minutes and write results/ + docs/benchmarks.md.
bench: bench-speed bench-accuracy

bench-speed: setup
	$(BIN)/python -m benchmarks.speed $(BENCH_ARGS)

bench-accuracy: setup
	@echo "make bench-accuracy: not yet available (needs the lite backbone and Fashion-MNIST, issue 5)" >&2; exit 2

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

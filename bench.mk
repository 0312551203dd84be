# `make bench`: every benchmark of rlhf/bench.py, then this project against TRL side by side.
#   make bench                 all of it (long: the 25M jobs take seconds per step, x12 steps)
#   make bench BENCH=quick     only the TRL comparison, 3 steps per job: checks that it runs
#   make bench BENCH=trl       only the TRL comparison, full length
#   make bench BENCH=quick BENCH_ARGS="--jobs sft_0.4M --workdir /tmp/b"   (python -m rlhf.bench trl -h)
# Included by the Makefile; kept in its own file because .venv's bootstrap stamp hashes the
# Makefile, so editing the benchmark does not rebuild the project's venv.
#
# TRL is no dependency of this project: it lives in its own venv, with the same CPU torch wheel
# and the transformers version of .venv (both sides run the same model code). pip's cache is
# shared with .venv's bootstrap.
BENCH       ?= full
BENCH_ARGS  ?=
BENCH_VENV  := .bench-venv
BENCH_PY    := $(BENCH_VENV)/bin/python
BENCH_PIP   := $(BENCH_PY) -m pip --disable-pip-version-check -q
BENCH_PINS  := trl==1.16.0 transformers==5.19.0 accelerate==1.15.0 datasets==5.2.0
BENCH_STAMP := $(BENCH_VENV)/.bootstrap-$(shell echo '$(TORCH) $(BENCH_PINS)' | cksum | cut -d' ' -f1)

.PHONY: bench bench-venv

bench-venv: $(BENCH_STAMP)

$(BENCH_STAMP):
	@echo ">> bootstrapping $(BENCH_VENV) (torch, TRL: for the side-by-side benchmark only)"
	@test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PIP) install --upgrade pip
	$(BENCH_PIP) install "$(TORCH)"
	$(BENCH_PIP) install $(BENCH_PINS)
	$(BENCH_PY) -c "import torch, transformers, trl; print('bench venv: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
	@rm -f $(BENCH_VENV)/.bootstrap-*
	@touch $@

bench: venv bench-venv
ifeq ($(BENCH),quick)
	$(PY) -m rlhf.bench trl --quick --python $(BENCH_PY) $(BENCH_ARGS)
else ifeq ($(BENCH),trl)
	$(PY) -m rlhf.bench trl --python $(BENCH_PY) $(BENCH_ARGS)
else
	$(PY) -m rlhf.bench all
	$(PY) -m rlhf.bench trl --python $(BENCH_PY) $(BENCH_ARGS)
endif

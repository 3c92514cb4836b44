# `make test` and `make demo` set themselves up on a fresh machine: a venv with the pinned stack
# (pyproject.toml) and espeak-ng from apt when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# DeepSpeed JIT-builds a CPU op at its first init; keep the build inside the venv so it happens once.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

DEMO := runs/demo

.PHONY: setup system-deps test-deps test demo clean-demo

setup: $(VENV)/.installed system-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

system-deps:
	@command -v espeak-ng >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq espeak-ng; }

# The Slurm test runs a real two-node cluster on this machine.
test-deps:
	@{ command -v slurmctld && command -v munged; } >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; }

test: setup test-deps
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m data.demo $(DEMO)/corpus
	$(PY) -m data.tokenizer build --manifest $(DEMO)/corpus/train.jsonl --out $(DEMO)/tokenizer
	$(PY) -m data.prepare manifest $(DEMO)/corpus/train.jsonl $(DEMO)/shards/train --shard-size 100
	$(PY) -m data.prepare manifest $(DEMO)/corpus/heldout.jsonl $(DEMO)/shards/heldout
	rm -rf $(DEMO)/asr
	$(PY) -m train recipes/demo/asr.yaml

clean-demo:
	rm -rf $(DEMO)

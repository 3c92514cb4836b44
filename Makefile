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

.PHONY: setup system-deps test-deps test demo demo-data rlhf-demo voice-demo clean-demo

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
	$(PY) -m pytest -q --durations=25 tests

# The demo curriculum (recipes/demo/curriculum.yaml): ASR -> TTS on k-means codes -> a mixture with
# translation and paralinguistic questions -> styled spoken dialogue SFT -> paralinguistic QA, on an espeak
# corpus, on CPU.
demo: demo-data
	$(PY) -m train recipes/demo/curriculum.yaml
	$(PY) -m train.report $(DEMO)/curriculum

demo-data: setup
	$(PY) -m data.tools.demo $(DEMO)/corpus
	$(PY) -m data.text_tokenizer build --manifest $(DEMO)/corpus/texts.jsonl --out $(DEMO)/tokenizer \
		--vocab-size 1024 --num-audio-codes 256
	for t in asr tts s2tt para; do for s in train heldout; do \
		$(PY) -m data.corpus.prepare manifest $(DEMO)/corpus/$$t/$$s.jsonl $(DEMO)/shards/$$t/$$s --shard-size 100 \
			--workers 1 --no-progress || exit 1; done; done
	for s in train heldout; do \
		$(PY) -m data.corpus.prepare conversations $(DEMO)/corpus/dialogue/$$s.jsonl $(DEMO)/shards/dialogue/$$s \
			--shard-size 100 --workers 1 --no-progress || exit 1; done
	# The codes are fitted on all the speech they will encode: the TTS voice and the dialogue's requests and
	# styled answers (slow, quick, high), so that pitch and speed survive the codec.
	$(PY) -m data.codes fit $(DEMO)/shards/tts/train $(DEMO)/shards/dialogue/train --num-codes 256 \
		--out $(DEMO)/kmeans.pt --no-progress
	$(PY) -m data.codes $(DEMO)/shards/tts/train $(DEMO)/shards/tts/heldout $(DEMO)/shards/dialogue/train \
		$(DEMO)/shards/dialogue/heldout --tokenizer kmeans:$(DEMO)/kmeans.pt --no-progress

# RLHF on the demo's styled spoken dialogue (after `make demo`): GRPO x 3 seeds, a placebo, PPO and DPO from
# the dialogue stage's export, measured on held-out requests beside the SFT model and best-of-N from it
# (train/rlhf_demo.py, recipes/demo/rlhf.yaml); runs/rlhf_demo/report.md and WAVs.
rlhf-demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m train.rlhf_demo --demo $(DEMO) --out runs/rlhf_demo

# A custom voice in an afternoon: LoRA on the real voice of asterisk-core-sounds-en-wav, measured with a
# speaker embedding trained on espeak voices (after `make demo`, whose TTS stage is the base).
voice-demo: setup
	@[ -d /usr/share/asterisk/sounds/en ] || { $(SUDO) apt-get update -qq && \
		$(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq asterisk-core-sounds-en-wav; }
	$(PY) -m train.speaker_encoder fit runs/speaker/speaker.pt --asterisk /usr/share/asterisk/sounds/en \
		--transcripts /usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz
	$(PY) -m train.voice_demo --out runs/voice_demo

clean-demo:
	rm -rf $(DEMO)

"""The release's token ids: <|EOT|> 151665 and <tts_pad> 151695 (evidence in data/vocab.py), what chat prompts,
speech answers and exports of that layout use, and no reference id written as a number outside data/vocab.py."""
from __future__ import annotations

import json
import tokenize
from pathlib import Path

import pytest

from data import vocab
from data.tasks.pieces import speech_answer
from data.text_tokenizer import extend_qwen2_tokenizer, special_ids, stop_token_ids
from model.chat import build_prompt
from model.config import preset_config
from model.hf import GENERATION_CONFIG_NAME, ship_remote_code
from model.hf.configuration_step_audio_2 import DEFAULT_AUDIO_PATCH_TOKEN_ID
from tests.test_model_init_parts import qwen_layout_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return extend_qwen2_tokenizer(qwen_layout_tokenizer())


def test_the_extension_puts_eot_and_tts_pad_where_the_evidence_does(tok):
    ids = special_ids(tok)
    assert (ids.end_of_text, ids.eot, ids.bot) == (151643, 151665, 151686)
    assert (ids.audio_start, ids.audio_end, ids.audio_patch, ids.tts_start, ids.tts_end, ids.tts_pad) == (
        151688, 151689, 151690, 151693, 151694, 151695)
    assert (ids.first_audio_code, ids.audio_pad) == (151696, 158257)
    assert vocab.UNVERIFIED_IDS == (vocab.BOT,)  # the one id that is still our choice
    assert len(set(vocab.REFERENCE_IDS.values())) == len(vocab.REFERENCE_IDS)
    # StepFun's configs list [151643, 151645, 151665]: <|endoftext|>, Qwen's <|im_end|>, <|EOT|>.
    assert stop_token_ids(tok) == list(vocab.REFERENCE_EOS_IDS) == [151643, 151645, 151665]
    assert tok.convert_ids_to_tokens(list(vocab.REFERENCE_EOS_IDS)) == ["<|endoftext|>", "<|im_end|>", "<|EOT|>"]


def test_chat_prompts_and_speech_answers_use_the_reference_ids(tok):
    prompt = build_prompt(tok, text="hi", system="be brief").input_ids[0].tolist()
    assert prompt[0] == 151686 and prompt.count(151686) == 3 and prompt.count(151665) == 2
    assert tok.decode(prompt) == "<|BOT|>system\nbe brief<|EOT|><|BOT|>human\nhi<|EOT|><|BOT|>assistant\n"
    body = speech_answer([1000], [0, 1, 2, 3, 4], special_ids(tok))
    assert body == [1000, 151696, 151697, 151698, 151699, 151695, 151700, 158257, 158257, 158257, 151694]


def test_exports_of_the_reference_layout_stop_on_stepfuns_eos_ids(tok, tmp_path):
    eos = [151643, 151645, 151665]
    assert preset_config("mini").to_dict()["text_config"]["eos_token_id"] == eos
    # A model sized to this tokenizer (a small preset has no eos ids of its own): the export takes the
    # tokenizer's, in config.json and generation_config.json.
    config = preset_config("tiny", vocab_size=vocab.REFERENCE_VOCAB_SIZE, audio_patch_token_id=special_ids(tok).audio_patch)
    assert "eos_token_id" not in config.to_dict()["text_config"]
    written = ship_remote_code(config.to_dict(), tmp_path, stop_token_ids(tok), special_ids(tok).end_of_text)
    assert written["text_config"]["eos_token_id"] == eos
    assert json.loads((tmp_path / GENERATION_CONFIG_NAME).read_text()) == {"eos_token_id": eos, "pad_token_id": 151643}
    # A decoder config that names only Qwen's end of text (a model built from Qwen2.5 + Qwen2-Audio parts)
    # still stops on <|EOT|>.
    (tmp_path / GENERATION_CONFIG_NAME).unlink()
    qwen_text = {**config.to_dict(), "text_config": {**config.text_config, "eos_token_id": 151643}}
    assert ship_remote_code(qwen_text, tmp_path, stop_token_ids(tok), 151643)["text_config"]["eos_token_id"] == eos
    assert json.loads((tmp_path / GENERATION_CONFIG_NAME).read_text())["eos_token_id"] == eos
    # The remote code cannot import data.vocab: its default patch id is a copy, kept equal here.
    assert DEFAULT_AUDIO_PATCH_TOKEN_ID == vocab.REFERENCE_IDS[vocab.AUDIO_PATCH]


def test_no_reference_token_id_is_a_number_outside_the_vocabulary_module():
    # Code looks ids up by name (data.text_tokenizer.special_ids); the release's ids live in data/vocab.py only.
    allowed = {REPO / "data" / "vocab.py", REPO / "model" / "hf" / "configuration_step_audio_2.py"}
    first, last = vocab.REFERENCE_IDS[vocab.END_OF_TEXT], vocab.REFERENCE_FIRST_AUDIO_CODE_ID + vocab.REFERENCE_NUM_AUDIO_CODES
    found = []
    for package in ("data", "model", "train", "launch"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path in allowed:
                continue
            with open(path, "rb") as f:
                for token in tokenize.tokenize(f.readline):
                    if token.type == tokenize.NUMBER and token.string.isdigit() and first <= int(token.string) <= last:
                        found.append(f"{path.relative_to(REPO)}:{token.start[0]}: {token.string}")
    assert found == []

"""The byte-level BPE, its Step-Audio 2 extension, save/load and the build CLI."""
import json

import pytest

from data import vocab
from data.text_tokenizer import (build_text_tokenizer, extend_tokenizer, load_tokenizer, main, special_ids,
                            stop_token_ids)

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, hello speech",
         "transcribe the speech please", "numbers like 12 and 345 are split into digits"] * 5
NUM_CODES = 16


@pytest.fixture(scope="module")
def tok():
    return extend_tokenizer(build_text_tokenizer(TEXTS, vocab_size=300), NUM_CODES)


def test_text_vocab_is_bytes_plus_merges():
    text_tok = build_text_tokenizer(TEXTS, vocab_size=300)
    assert len(text_tok) == 300
    # Merges learned from the corpus: a frequent word is one token.
    assert len(text_tok.encode("hello", add_special_tokens=False)) == 1


def test_extension_order_and_ids(tok):
    text_size = 300
    expected = list(vocab.SPECIAL_TOKENS) + [f"<audio_{i}>" for i in range(NUM_CODES + 1)]
    assert len(tok) == text_size + len(expected)
    assert tok.convert_tokens_to_ids(expected) == list(range(text_size, text_size + len(expected)))
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == text_size


def test_special_ids(tok):
    ids = special_ids(tok)
    assert (ids.end_of_text, ids.bot, ids.eot, ids.audio_start, ids.audio_end, ids.audio_patch,
            ids.tts_pad, ids.tts_start, ids.tts_end) == tuple(range(300, 309))
    assert stop_token_ids(tok) == [ids.end_of_text, ids.eot]
    assert (ids.first_audio_code, ids.num_audio_codes, ids.audio_pad) == (309, NUM_CODES, 309 + NUM_CODES)


def test_special_ids_names_missing_token():
    with pytest.raises(ValueError, match=r"tokenizer has no token '<\|endoftext\|>'"):
        special_ids(build_text_tokenizer(TEXTS, vocab_size=300))


def test_round_trip_and_byte_fallback(tok):
    for text in ["hello world, hello speech", "Zyxwvq ünïcödé 你好 😀 \t tabs\nnewline"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert max(ids) < 300  # plain text never produces a special id
        assert tok.decode(ids) == text
    # An unseen word falls back to bytes: the 4-byte emoji is 4 byte tokens.
    assert len(tok.encode("😀", add_special_tokens=False)) == 4


def test_special_strings_in_text_are_single_tokens(tok):
    ids = special_ids(tok)
    encoded = tok.encode("hi<audio_start><audio_patch><audio_end><audio_3><|endoftext|>", add_special_tokens=False)
    assert encoded[-5:] == [ids.audio_start, ids.audio_patch, ids.audio_end, ids.first_audio_code + 3,
                            ids.end_of_text]
    assert tok.decode(encoded, skip_special_tokens=True) == "hi"


def test_save_load_identical_ids(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    text = "hello <tts_start>world<tts_end> 123 ünï<audio_16>"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert special_ids(loaded) == special_ids(tok)
    assert len(loaded) == len(tok)


def test_load_missing_folder_names_it(tmp_path):
    with pytest.raises(ValueError, match="tokenizer folder .*nowhere.* has no tokenizer.json"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_cli_build(tmp_path, capsys):
    manifests = []
    for i, chunk in enumerate([TEXTS[:10], TEXTS[10:]]):
        path = tmp_path / f"m{i}.jsonl"
        path.write_text("".join(json.dumps({"text": t, "audio": "x.wav"}) + "\n" for t in chunk))
        manifests += ["--manifest", str(path)]
    main(["build", *manifests, "--out", str(tmp_path / "out"), "--vocab-size", "280", "--num-audio-codes", "8"])
    assert "vocabulary size 298" in capsys.readouterr().out  # 280 + 9 special + 9 audio (8 codes + pad)
    built = load_tokenizer(str(tmp_path / "out"))
    assert special_ids(built).audio_pad == 297


def test_cli_rejects_bad_manifest_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string \"text\" field"):
        main(["build", "--manifest", str(path), "--out", str(tmp_path / "out")])

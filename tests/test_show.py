"""`python -m data.tools.show`: the exact report for one speech-to-speech sample, and its errors."""
import io
import json
import math

import numpy as np
import pytest
import soundfile
import webdataset

from data.features import SAMPLE_RATE
from data.tools.show import main
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer


def _member(write, *args, **kw):
    buf = io.BytesIO()
    write(buf, *args, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("show")
    extend_tokenizer(build_text_tokenizer(["the cat sat", "hallo welt"] * 3, vocab_size=300), 16).save_pretrained(
        root / "tok")
    wave = (0.3 * np.sin(2 * math.pi * 220 * np.arange(SAMPLE_RATE // 2) / SAMPLE_RATE)).astype(np.float32)
    flac = _member(soundfile.write, wave, SAMPLE_RATE, format="FLAC")
    with webdataset.TarWriter(str(root / "shard-000000.tar")) as writer:
        writer.write({"__key__": "a0", "flac": flac, "json": json.dumps({"text": "the cat"}).encode()})
        writer.write({"__key__": "s0", "flac": flac, "json": json.dumps(
            {"task": "s2st", "text": "the cat", "translation": "hallo welt", "speaker": "spk1"}).encode(),
            "target.codes.npy": _member(np.save, np.array([2, 7, 1, 8, 2, 8, 1, 8, 2], dtype=np.int16))})
    return root


def test_report_of_a_speech_to_speech_sample(data, capsys):
    assert main([str(data / "shard-000000.tar"), "s0", "--tokenizer", str(data / "tok")]) == 0
    assert capsys.readouterr().out == """\
key: s0 (shard-000000.tar)
task: s2st
meta: {"speaker": "spk1", "task": "s2st", "text": "the cat", "translation": "hallo welt"}
members: flac, json, target.codes.npy
tokens: 95, labelled: 17, audio chunks: 1 (mel frames [52])
L = labelled (loss falls there); a TA4 group is: text token | audio codes (pad = audio pad)

  <|BOT|>
  'system\\nTranslate the speech and speak the translation.'
  <|EOT|>
  <|BOT|>
  'human\\n'
  <audio_start> <audio_patch>x6 <audio_end>
  <|EOT|>
  <|BOT|>
  'assistant\\n'
  <tts_start>
L 'hallo' | 2 7 1 8
L ' welt' | 2 8 1 8
L <tts_pad> | 2 pad pad pad
L <tts_end>
L <|EOT|>
"""


def test_task_override_and_base_format(data, capsys):
    assert main([str(data / "shard-000000.tar"), "s0", "--task", "asr", "--tokenizer", str(data / "tok")]) == 0
    assert capsys.readouterr().out.split("\n")[1:] == [
        "task: asr",
        'meta: {"speaker": "spk1", "task": "s2st", "text": "the cat", "translation": "hallo welt"}',
        "members: flac, json, target.codes.npy",
        "tokens: 31, labelled: 3, audio chunks: 1 (mel frames [52])",
        "L = labelled (loss falls there); a TA4 group is: text token | audio codes (pad = audio pad)",
        "",
        "  'Transcribe the speech.'",
        "  <audio_start> <audio_patch>x6 <audio_end>",
        "L 'the cat'",
        "L <|endoftext|>",
        ""]


def test_errors_name_the_sample(data, capsys):
    assert main([str(data), "s0", "--tokenizer", str(data / "tok")]) == 2  # a folder without index.json
    assert "has no index.json" in capsys.readouterr().err
    tar = str(data / "shard-000000.tar")
    assert main([tar, "zz", "--tokenizer", str(data / "tok")]) == 2
    assert capsys.readouterr().err == f"error: no sample with key 'zz' in ['{tar}'] (2 samples searched)\n"
    assert main([tar, "a0", "--task", "tts", "--tokenizer", str(data / "tok")]) == 2
    assert capsys.readouterr().err == ("error: sample 'a0' cannot be rendered as task tts: missing_codes: no member "
                                       "'codes.npy' (run data.codes on the shards)\n")

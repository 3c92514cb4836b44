"""Custom voice: the one-speaker data command, the speaker-similarity net, and the demo's measuring pieces."""
from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from data.audio import read_audio
from data.codes.tokenizers import KMeansTokenizer
from data.tools.demo import speak
from data.features import mel_frames
from data.corpus.formats import PrepareError, describe
from data.shards import file_sha256
from data.tools.voice import main as voice_main
from data.tools.voice import prepare_voice, read_transcribed_folder, speaker_corpus, split_heldout, spoken_text
from model.speaker import SpeakerEncoder, SpeakerNet
from tests.conftest import REPO
from train.evaluate import code_hits
from train.speaker_encoder import equal_error_rate, fit_speaker_encoder
from train.speaker_encoder import main as speaker_encoder_main
from train.voice_demo import measure, read_records

torch.set_num_threads(1)
SENTENCES = ["two quiet cats paint the red table", "three happy dogs push the green chair",
             "four tiny birds find the blue box", "five brave frogs follow the yellow door",
             "six lazy horses watch the purple car", "seven clever robots clean the orange boat"]


@pytest.fixture(scope="module")
def kmeans_spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("kmeans") / "kmeans.pt"
    KMeansTokenizer(torch.randn(16, 128, generator=torch.Generator().manual_seed(0))).save(str(path))
    return f"kmeans:{path}"


def _speaker_folder(root, num: int = 5):
    """An espeak "speaker" folder: wav + .txt pairs, one wav with no transcript, one unreadable wav."""
    spk = root / "amy"
    spk.mkdir(parents=True)
    for i, text in enumerate(SENTENCES[:num]):
        speak(text, "en+f2", str(spk / f"utt{i}.wav"))
        (spk / f"utt{i}.txt").write_text(text + "\n")
    speak("no words written down", "en+f2", str(spk / "orphan.wav"))
    (spk / "broken.wav").write_bytes(b"RIFF this is not audio")
    (spk / "broken.txt").write_text("broken")
    return spk


def test_folder_to_tokenized_shards(tmp_path, kmeans_spec):
    folder = _speaker_folder(tmp_path)
    out = tmp_path / "out"
    summary = prepare_voice(str(folder), str(out), "amy", kmeans_spec, num_heldout=1, workers=1, progress=False)
    assert summary["splits"]["train"]["num_samples"] == 4 and summary["splits"]["heldout"]["num_samples"] == 1
    reasons = {r["file"]: r["reason"] for r in summary["splits"]["train"]["rejects"]}
    assert sorted(reasons) == ["broken.wav", "orphan.wav"] and summary["num_rejects"] == 2
    assert reasons["orphan.wav"].startswith("no transcript") and "unreadable audio" in reasons["broken.wav"]
    assert json.loads((out / "voice.json").read_text())["num_rejects"] == 2

    records = read_records(str(out / "train")) + read_records(str(out / "heldout"))
    assert sorted(r["text"] for r in records) == sorted(SENTENCES[:5])
    tok = KMeansTokenizer.load(kmeans_spec.split(":", 1)[1])
    for r in records:
        # 16 kHz in the shard, codes of exactly that audio at 25 Hz
        source = read_audio(str(folder / f"utt{SENTENCES.index(r['text'])}.wav"))
        assert len(r["wave"]) == len(source)
        np.testing.assert_array_equal(r["codes"], tok.encode(r["wave"]))
        assert len(r["codes"]) == mel_frames(len(r["wave"])) // 4 > 20
    meta = json.loads(next(iter(_tar_members(out / "train", ".json"))))
    assert meta["speaker"] == "amy" and meta["task"] == "tts" and meta["sample_rate"] == 16000

    before = {p: file_sha256(str(p)) for p in sorted(out.rglob("*.tar"))}
    assert voice_main([str(folder), str(out), "--speaker", "amy", "--audio-tokenizer", kmeans_spec,
                       "--heldout", "1", "--workers", "1", "--no-progress"]) == 0
    assert {p: file_sha256(str(p)) for p in sorted(out.rglob("*.tar"))} == before  # resumed: nothing redone


def _tar_members(folder, suffix):
    import tarfile
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for info in tar:
                if info.name.endswith(suffix):
                    yield tar.extractfile(info).read()


def test_asterisk_transcripts(tmp_path):
    root = tmp_path / "sounds"
    (root / "digits").mkdir(parents=True)
    for name in ("hello", "digits/1", "beep", "extra"):
        sf.write(str(root / f"{name}.wav"), np.zeros(800, np.int16), 8000)
    listing = tmp_path / "core-sounds-en.txt.gz"
    with gzip.open(listing, "wt", encoding="utf-8") as f:
        f.write("; Core Sounds\n\nhello: Hello  there.\ndigits/1: one\nbeep: [a simple beep tone]\n"
                "gone: Gone away.\nletters/at: at [@]\n")
    corpus = read_transcribed_folder(str(root), str(listing))
    assert [(c.key, c.record["text"], c.source) for c in corpus.candidates] == [
        ("hello", "Hello there.", "hello.wav"), ("digits_1", "one", "digits/1.wav")]
    assert [(r.where["file"], r.kind) for r in corpus.rejects] == [
        ("beep.wav", "no speech"), ("gone", "no audio file"), ("letters/at", "no audio file"),
        ("extra.wav", "no transcript")]
    assert spoken_text("letters at [@]") == "letters at" and spoken_text("(1 second of silence)") == ""

    records = speaker_corpus(str(root), "allison", str(listing)).candidates
    assert {c.record["speaker"] for c in records} == {"allison"}
    train, held = split_heldout(speaker_corpus(str(root), "allison", str(listing)), 1)
    reversed_corpus = speaker_corpus(str(root), "allison", str(listing))
    reversed_corpus.candidates.reverse()
    assert [c.key for c in split_heldout(reversed_corpus, 1)[1].candidates] == [c.key for c in held.candidates]
    assert len(train.candidates) == 1 and len(train.rejects) == 4 and held.rejects == []

    empty = tmp_path / "empty.txt"
    empty.write_text("; nothing but a comment\n\n")
    with pytest.raises(PrepareError, match=r"empty.txt' holds no 'name: text' line"):
        read_transcribed_folder(str(root), str(empty))
    with pytest.raises(PrepareError, match=r"--heldout 2: expected 0 <= N < 2"):
        split_heldout(speaker_corpus(str(root), "allison", str(listing)), 2)


@pytest.mark.parametrize("compressed", [False, True])
def test_a_bad_transcript_line_rejects_that_line_only(compressed, tmp_path):
    """Not UTF-8, no colon, a name transcribed twice: each line is rejected by itself, named by file and line;
    the lines around it (and every audio file they name) are kept, gzip'd or not."""
    root = tmp_path / "sounds"
    (root / "digits").mkdir(parents=True)
    for name in ("hello", "digits/1", "digits/2", "goodbye"):
        sf.write(str(root / f"{name}.wav"), np.zeros(800, np.int16), 8000)
    data = (b"; Core Sounds\nhello: Hello there.\ndigits/1: one\n\xff\xfe\ndigits/2: tw\xc3o\n"
            b"this line has no colon\nhello: Hello again.\ngoodbye: Goodbye.\n")
    listing = tmp_path / ("core-sounds-en.txt.gz" if compressed else "core-sounds-en.txt")
    listing.write_bytes(gzip.compress(data) if compressed else data)
    corpus = read_transcribed_folder(str(root), str(listing))
    assert [(c.key, c.record["text"], c.source) for c in corpus.candidates] == [
        ("hello", "Hello there.", "hello.wav"), ("digits_1", "one", "digits/1.wav"),
        ("goodbye", "Goodbye.", "goodbye.wav")]
    assert [(r.where, r.reason) for r in corpus.rejects] == [
        ({"file": str(listing), "line": 4}, "not valid UTF-8 at byte 0"),
        ({"file": str(listing), "line": 5}, "not valid UTF-8 at byte 12"),
        ({"file": str(listing), "line": 6}, "'this line has no colon' is not a transcript line: expected "
                                            "'name: text' (e.g. 'digits/1: one')"),
        ({"file": str(listing), "line": 7}, "'hello' is transcribed twice (first on line 2)"),
        ({"file": "digits/2.wav"}, f"no transcript: {listing} has no line 'digits/2: ...'")]
    assert [r.kind for r in corpus.rejects] == ["invalid UTF-8", "invalid UTF-8", "not a transcript line",
                                                "repeated name", "no transcript"]
    assert describe(corpus.rejects[0].where) == f"file {str(listing)!r} line 4"


def test_speaker_net_separates_two_voices(tmp_path):
    voices = {"low": "en-us+m3", "high": "en+f4"}
    waves: dict = {}
    for name, voice in voices.items():
        for i, text in enumerate(SENTENCES):
            path = str(tmp_path / f"{name}{i}.wav")
            speak(text, voice, path)
            waves.setdefault(name, []).append(read_audio(path))
    train_w = [w for n in voices for w in waves[n][:4]]
    train_l = [n for n in voices for _ in range(4)]
    encoder = fit_speaker_encoder(train_w, train_l, 16000, steps=40, batch_size=16, channels=32, dim=16)
    same = [encoder.similarity(waves[n][4:], waves[n][:4]) for n in voices]
    cross = [encoder.similarity(waves["low"][4:], waves["high"][:4]),
             encoder.similarity(waves["high"][4:], waves["low"][:4])]
    assert min(same) > 0.8 and max(cross) < min(same) - 0.3, (same, cross)

    encoder.save(str(tmp_path / "spk.pt"))
    loaded = SpeakerEncoder.load(str(tmp_path / "spk.pt"))
    assert torch.equal(loaded.embed(waves["low"][:2], 16000), encoder.embed(waves["low"][:2], 16000))
    with pytest.raises(ValueError, match="is not a speaker encoder file"):
        SpeakerEncoder.load(str(tmp_path / "low0.wav"))


def test_speaker_encoder_fit_command(tmp_path):
    out = tmp_path / "speaker" / "speaker.pt"
    assert speaker_encoder_main(["fit", str(out), "--work", str(tmp_path / "work"), "--speakers", "3",
                                 "--heldout-speakers", "2", "--heldout-variants", "2", "--per-speaker", "2",
                                 "--steps", "3"]) == 0
    figures = json.loads(out.with_suffix(".json").read_text())
    assert figures["train"] == {"speakers": 3, "recordings": 6}
    held = figures["heldout_espeak"]
    assert (held["num_voices"], held["num_recordings"]) == (2, 4) and 0.0 <= held["pair_eer"] <= 1.0
    assert SpeakerEncoder.load(str(out)).config == figures["config"]
    assert figures["config"]["num_speakers"] == 3 and len(figures["config"]["heldout_variants"]) == 2
    # The command's old home says where it went instead of doing nothing.
    old = subprocess.run([sys.executable, "-m", "model.speaker", "fit", str(out)], cwd=REPO, capture_output=True,
                         text=True, check=False)
    assert (old.returncode, old.stdout, old.stderr) == (1, "", "error: `python -m model.speaker fit` is now "
                                                         "`python -m train.speaker_encoder fit` (same options)\n")


def test_measuring_functions_on_known_inputs():
    torch.manual_seed(0)
    encoder = SpeakerEncoder(SpeakerNet(channels=16, dim=8), {"n_mels": 40, "dim": 8})
    t = torch.arange(16000) / 16000
    tone, buzz = 0.3 * torch.sin(2 * math.pi * 220 * t), 0.3 * torch.sign(torch.sin(2 * math.pi * 97 * t))
    out = measure(encoder, [tone, buzz], {"same": [buzz, tone], "silent": [torch.zeros(1000)]})
    assert out["same"] == pytest.approx(1.0, abs=1e-5) and math.isnan(out["silent"])

    # ids: 5 = <audio_0>, codes 5..8, 9 = audio pad; labels follow inputs shifted by one position
    labels = torch.tensor([-100, 6, 8, 9, 2])
    logits = torch.full((5, 10), -10.0)
    logits[0, 6] = 5.0   # predicts label 6: right
    logits[1, 7] = 5.0   # predicts 7 where 8 came: wrong
    logits[2, 9] = 5.0   # the audio pad does not count
    correct, total, nll = code_hits(logits, labels, first_code=5, num_codes=4)
    expected = -torch.log_softmax(logits[0], -1)[6] - torch.log_softmax(logits[1], -1)[8]
    assert (correct, total) == (1, 2) and nll == pytest.approx(float(expected), rel=1e-6)

    assert equal_error_rate([0.9, 0.8], [0.1, 0.2]) == 0.0
    assert equal_error_rate([0.9, 0.3], [0.5, 0.1]) == 0.5

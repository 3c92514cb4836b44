"""Speech out and trying a checkpoint: the k-means vocoder gives back a tone's pitch, and `python -m model.chat`
answers exactly what model.generate answers for the same chat prompt, writing speech when codes come out."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import model.chat as chat
from data.codes.tokenizers import KMeansTokenizer, fit_kmeans, pooled_mel_NM
from data.features import SAMPLE_RATE, log_mel, num_audio_tokens
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, special_ids
from model.checkpoint import save_stepfun
from model.config import padded_vocab_size, preset_config
from model.generate import generate, split_ta4
from model.lalm import StepAudio2ForCausalLM
from model.vocoder import KMEANS_SAMPLES_PER_CODE, KMeansVocoder, Token2WavVocoder, Vocoder, load_vocoder
from tests.conftest import run_cli

torch.set_num_threads(1)
TONES_HZ = (300, 500, 800, 1200, 2000)
NUM_CODES = 8


def tone(freq_hz: float, seconds: float = 1.0) -> torch.Tensor:
    t = torch.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    return 0.5 * torch.sin(2 * torch.pi * freq_hz * t)


def dominant_hz(wave_T: torch.Tensor) -> float:
    return float(torch.fft.rfft(wave_T).abs().argmax()) * SAMPLE_RATE / len(wave_T)


@pytest.fixture(scope="module")
def kmeans_file(tmp_path_factory) -> Path:
    centroids = fit_kmeans(torch.cat([pooled_mel_NM(tone(f)) for f in TONES_HZ]), NUM_CODES, seed=0)
    path = tmp_path_factory.mktemp("kmeans") / "kmeans.pt"
    KMeansTokenizer(centroids).save(str(path))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny random model in StepFun's layout with its tokenizer (8 audio codes) inside."""
    tok = extend_tokenizer(build_text_tokenizer(["hello there", "how are you today", "fine thanks"], 300), NUM_CODES)
    ids = special_ids(tok)
    torch.manual_seed(3)
    config = preset_config("tiny", vocab_size=padded_vocab_size(len(tok)), audio_patch_token_id=ids.audio_patch)
    model = StepAudio2ForCausalLM(config)
    return save_stepfun(model.state_dict(), config, tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer=tok)


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("in") / "in.wav"
    sf.write(str(path), tone(440, 0.6).numpy(), SAMPLE_RATE, subtype="PCM_16")
    return path


def test_kmeans_vocoder_round_trip_keeps_length_and_pitch(kmeans_file):
    tokenizer = KMeansTokenizer.load(str(kmeans_file))
    vocoder = KMeansVocoder(str(kmeans_file))
    assert isinstance(vocoder, Vocoder) and vocoder.sample_rate == 16000
    for freq in (500, 1200):
        codes = tokenizer.encode(tone(freq, 0.5))
        assert len(codes) == 13  # (8000 + 479) // 160 = 52 mel frames, 4 per code
        wave_T = vocoder.codes_to_wave(codes)
        assert len(wave_T) == KMEANS_SAMPLES_PER_CODE * len(codes) == 640 * 13
        assert bool(torch.isfinite(wave_T).all())
        assert abs(dominant_hz(wave_T) - freq) <= 0.1 * freq
        # log_mel keeps absolute level: the 0.354 RMS tone comes back within a factor of 2.
        assert 0.18 < float(wave_T.pow(2).mean().sqrt()) < 0.7
    # Deterministic (no random phase), and a code outside the tokenizer is refused.
    assert torch.equal(vocoder.codes_to_wave([1, 2, 3]), vocoder.codes_to_wave([1, 2, 3]))
    assert len(vocoder.codes_to_wave([])) == 0
    with pytest.raises(ValueError, match=r"codes must be in 0\.\.7, got 0\.\.8"):
        vocoder.codes_to_wave([0, 8])
    assert isinstance(load_vocoder(f"kmeans:{kmeans_file}"), KMeansVocoder)
    with pytest.raises(ValueError, match=r"expected one of kmeans:\.\.\., token2wav:\.\.\. "
                                         r"\('kmeans:FILE.pt' or 'token2wav:MODULE:ATTR'\)"):
        load_vocoder("griffin")


def test_token2wav_wrapper_passes_codes_and_prompt_and_decodes_bytes(tmp_path):
    seen = []

    def token2wav(codes, prompt_wav):
        seen.append((codes, prompt_wav))
        path = tmp_path / "out.wav"
        sf.write(str(path), np.full(2400, 0.25, dtype=np.float32), 24000, subtype="PCM_16")
        return path.read_bytes()

    vocoder = Token2WavVocoder(token2wav, prompt_wav="voice.wav", sample_rate=22050)
    wave_T = vocoder.codes_to_wave(np.array([5, 6561 - 1]))
    assert seen == [([5, 6560], "voice.wav")]
    assert vocoder.sample_rate == 24000 and len(wave_T) == 2400
    assert torch.allclose(wave_T, torch.full((2400,), 0.25))
    # An array result is taken as mono at the given rate.
    assert Token2WavVocoder(lambda c, p: np.ones((1, 10)), sample_rate=24000).codes_to_wave([1]).tolist() == [1.0] * 10


def expected_answer(ckpt: Path, wav: Path, text: str, max_new_tokens: int):
    """What model.generate answers for the hand-built prompt `<|BOT|>human\\n{text}{audio}<|EOT|><|BOT|>assistant\\n`."""
    from data.text_tokenizer import load_tokenizer
    from model.checkpoint import load_stepfun
    tok = load_tokenizer(str(ckpt))
    ids = special_ids(tok)
    wave_T = torch.from_numpy(sf.read(str(wav), dtype="float32")[0])
    mel_MF = log_mel(wave_T)
    audio = [ids.audio_start] + [ids.audio_patch] * num_audio_tokens(mel_MF.shape[1]) + [ids.audio_end]
    prompt = ([ids.bot] + tok.encode("human\n" + text, add_special_tokens=False) + audio + [ids.eot, ids.bot]
              + tok.encode("assistant\n", add_special_tokens=False))
    model = load_stepfun(str(ckpt)).eval()
    new = generate(model, torch.tensor([prompt]), mels=mel_MF[None], mel_lengths=torch.tensor([mel_MF.shape[1]]),
                   max_new_tokens=max_new_tokens, stop_token_ids=[ids.eot, ids.end_of_text])[0]
    text_ids, _ = split_ta4(new, ids.audio_start, ids.first_audio_code, ids.num_audio_codes)
    return tok.decode(text_ids, skip_special_tokens=True), new


def test_chat_cli_prints_what_generate_answers(ckpt, wav, tmp_path):
    want, new = expected_answer(ckpt, wav, "hello", 12)
    assert want.strip() and len(new) >= 1  # a random model still says something
    proc = run_cli(sys.executable, "-m", "model.chat", str(ckpt), "--audio", str(wav), "--text", "hello",
                   "--max-new-tokens", "12", "--out", str(tmp_path / "a.wav"))
    assert proc.stdout == want + "\n"


def test_chat_speech_writes_the_codes_as_a_wav(ckpt, wav, kmeans_file, tmp_path, monkeypatch, capsys):
    from data.text_tokenizer import load_tokenizer
    tok = load_tokenizer(str(ckpt))
    ids = special_ids(tok)
    hi = tok.encode("fine", add_special_tokens=False)
    codes = [1, 2, 3, 4, 5, 6, 7, 0, 3]
    # A TA4 answer: text, codes in groups of 4, the audio pad, <tts_pad> and <tts_end> (dropped by split_ta4).
    stream = [hi[0]] + [ids.first_audio_code + c for c in codes[:4]] + [ids.tts_pad] + \
             [ids.first_audio_code + c for c in codes[4:8]] + hi[1:] + [ids.first_audio_code + codes[8]] + \
             [ids.audio_pad] * 3 + [ids.tts_end]
    prompts = []

    def fake_generate(model, input_ids, **kwargs):
        prompts.append(input_ids[0].tolist())
        return [stream]

    monkeypatch.setattr(chat, "generate", fake_generate)
    out = tmp_path / "sub" / "answer.wav"
    assert chat.main([str(ckpt), "--audio", str(wav), "--speech", "--vocoder", f"kmeans:{kmeans_file}",
                      "--out", str(out), "--system", "Be brief."]) == 0
    assert capsys.readouterr().out == "fine\n"
    assert prompts[0][-1] == ids.tts_start  # a speech answer is asked for
    assert prompts[0][:1] + tok.encode("system\nBe brief.", add_special_tokens=False) + [ids.eot] == \
        prompts[0][:prompts[0].index(ids.eot) + 1]
    wave, rate = sf.read(str(out), dtype="float32")
    assert rate == 16000 and len(wave) == 640 * len(codes)
    reference = KMeansVocoder(str(kmeans_file)).codes_to_wave(codes).numpy()
    assert np.abs(wave - reference).max() < 1e-3  # PCM_16 rounding only


def test_chat_errors_name_the_flag_or_file(ckpt, wav, tmp_path):
    def error(argv):
        with pytest.raises(SystemExit) as info:
            chat.main(argv)
        return str(info.value)

    assert error([str(tmp_path / "nope"), "--audio", str(wav)]) == (
        f"error: checkpoint {str(tmp_path / 'nope')!r} is not a model folder (no config.json); expected a "
        f"StepFun-layout export with the tokenizer inside")
    assert error([str(ckpt), "--audio", str(tmp_path / "missing.wav")]) == \
        f"error: --audio file not found: {tmp_path / 'missing.wav'}"
    assert error([str(ckpt), "--audio", str(wav), "--speech"]).startswith("error: --speech needs --vocoder")
    assert error([str(ckpt)]) == "error: a chat turn needs --audio or --text (both were empty)"


def test_a_new_vocoder_is_one_entry_and_bad_specs_are_named(monkeypatch):
    from model import vocoder as V

    class Silence:
        sample_rate = 16000

        def __init__(self, ms):
            self.ms = int(ms)

        def codes_to_wave(self, codes):
            return torch.zeros(len(codes) * self.ms * 16)

    monkeypatch.setitem(V.VOCODERS, "silence", lambda rest, prompt_wav: Silence(rest))
    assert len(load_vocoder("silence:40").codes_to_wave([1, 2])) == 2 * 40 * 16
    with pytest.raises(ValueError, match=r"vocoder spec 'griffin': expected one of kmeans:..., token2wav:..., "
                                         r"silence:..."):
        load_vocoder("griffin")
    with pytest.raises(ValueError, match=r"vocoder 'token2wav:nomodule': expected token2wav:MODULE:ATTR"):
        load_vocoder("token2wav:nomodule")
    with pytest.raises(ValueError, match=r"vocoder 'token2wav:no_such_module_x:make': cannot load "
                                         r"no_such_module_x.make"):
        load_vocoder("token2wav:no_such_module_x:make")

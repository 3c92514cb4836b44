"""Rewards for spoken answers: speaking rate against the style's target, the degenerate-audio guard,
intelligibility through the vocoder and an ASR export, and speaker similarity to a reference folder."""
from __future__ import annotations

import math

import pytest
import soundfile as sf
import torch

from data.audio import read_audio
from data.codes.tokenizers import KMeansTokenizer, fit_kmeans, pooled_mel_NM
from data.tools.demo import STYLES as DEMO_STYLES
from data.tools.demo import speak
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, special_ids
from model.checkpoint import save_stepfun
from model.config import padded_vocab_size, preset_config
from model.lalm import StepAudio2ForCausalLM
from model.vocoder import KMeansVocoder
from train.rl import speech_rewards as sr
from train.config import RewardConfig
from train.rl.rewards import Rewards
from train.rl.rollout import RolloutSample
from train.speaker_encoder import fit_speaker_encoder

torch.set_num_threads(1)
SENTENCES = ["two quiet cats paint the red table", "three happy dogs push the green chair",
             "four tiny birds find the blue box", "five brave frogs follow the yellow door",
             "six lazy horses watch the purple car", "seven clever robots clean the orange boat"]


def sample(codes, style=None, text="two quiet cats paint the red table", **meta) -> RolloutSample:
    record = {"text": text, **({"style": style} if style is not None else {}), **meta}
    return RolloutSample(key="k", meta=record, prompt_ids=[], answer_ids=[], finished=True, audio_codes=list(codes))


def varied(n: int, seed: int = 0) -> list:
    return torch.randint(0, 48, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ------------------------------------------------------------------------------------------ records

def test_requested_style_and_words_from_demo_records():
    assert {sr.requested_style({"style": s}) for s in DEMO_STYLES} == {"slow", "fast", "high"}
    assert sr.requested_style({}) == "normal" and sr.requested_style({"style": "Whisper"}) == "whisper"
    with pytest.raises(ValueError, match="style='sarcastically' is not a known style"):
        sr.requested_style({"style": "sarcastically"})
    dialogue = {"style": "slowly", "messages": [{"role": "system", "text": "x"}, {"role": "user", "audio": "a.wav"},
                                                {"role": "assistant", "text": "two cats", "audio": "b.wav"}]}
    assert sr.requested_words(dialogue) == "two cats" and sr.requested_words({"text": "hi there"}) == "hi there"
    with pytest.raises(ValueError, match="nothing says which words"):
        sr.requested_words({"messages": []})


# -------------------------------------------------------------------------------------------- rate

def test_speaking_rate_scores_seconds_per_word_against_the_style():
    words = 7  # 0.34 s/word is 59.5 codes for 7 words
    def codes_for(s_per_word: float) -> list:
        return varied(round(s_per_word * words * 25))
    normal, slow, fast = codes_for(0.34), codes_for(0.34 * 1.62), codes_for(0.34 / 1.52)  # espeak's own ratios
    scores = sr.speaking_rate([sample(normal), sample(slow, "slowly"), sample(fast, "quickly"),
                               sample(normal, "in a high voice")])
    assert scores == [1.0, 1.0, 1.0, 1.0]
    # Normal pace asked slowly: 1/1.4 short of the target, linear in log time to 0 at 1.5x short.
    got = sr.speaking_rate([sample(normal, "slowly"), sample(fast, "slowly"), sample(slow, "quickly"),
                            sample(slow, None), sample([], "slowly")])
    expected_normal_for_slow = 1 - math.log(0.34 * 1.4 / (len(normal) / 25 / words)) / math.log(1.5)
    assert got[0] == pytest.approx(expected_normal_for_slow, abs=1e-6) and 0.1 < got[0] < 0.3
    slow_for_normal = 1 - math.log(len(slow) / 25 / words / (0.34 * 1.2)) / math.log(1.5)
    assert got[1:] == [0.0, 0.0, pytest.approx(slow_for_normal), 0.0]
    # Per-style targets are arguments.
    assert sr.speaking_rate([sample(normal, "slowly")], slow=1.0) == [1.0]
    with pytest.raises(ValueError, match="falloff > 1"):
        sr.speaking_rate([sample(normal)], falloff=1.0)


# ------------------------------------------------------------------------------------------- guard

@pytest.fixture(scope="module")
def two_voices(tmp_path_factory) -> dict:
    """Six sentences each from two espeak voices (16 kHz waves), written under ROOT/<voice>/."""
    root = tmp_path_factory.mktemp("voices")
    out = {}
    for name, voice in (("low", "en-us+m3"), ("high", "en+f4")):
        (root / name).mkdir()
        for i, text in enumerate(SENTENCES):
            speak(text, voice, str(root / name / f"{i}.wav"))
        out[name] = [read_audio(str(root / name / f"{i}.wav")) for i in range(len(SENTENCES))]
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def codec(two_voices, tmp_path_factory) -> str:
    frames = torch.cat([pooled_mel_NM(w) for name in ("low", "high") for w in two_voices[name]])
    path = tmp_path_factory.mktemp("codec") / "kmeans.pt"
    KMeansTokenizer(fit_kmeans(frames, 48, seed=0, iterations=10)).save(str(path))
    return str(path)


def test_guard_flags_degenerate_codes(two_voices, codec):
    tokenizer = KMeansTokenizer.load(codec)
    speech = [tokenizer.encode(w).tolist() for w in two_voices["low"][:2]]
    silent = sr._silent_codes(f"kmeans:{codec}", 40.0)
    quiet = int(silent.nonzero()[0])
    loud = [c for c in varied(200) if not silent[c]]
    frozen = next(c for c in loud if c not in loud[29:31])
    held = loud[:30] + [frozen] * 40 + loud[30:60]  # a 1.6 s frozen frame inside varied codes
    mostly_silent = [quiet if i % 5 else loud[i // 5] for i in range(60)]  # 80% silence
    samples = [sample(speech[0]), sample(speech[1]), sample(loud[:60]), sample([5] * 60), sample([1, 2, 3] * 20),
               sample(held), sample([]), sample(mostly_silent)]
    scores = sr.audio_guard(samples, codes=f"kmeans:{codec}")
    assert scores[:3] == [1.0, 1.0, 1.0]  # espeak speech through the codec, and varied loud codes
    assert scores[3:5] == [0.0, 0.0] and scores[6] == 0.0  # one code held, a 3-code loop, no audio
    assert scores[5] == pytest.approx(1 - (40 / 25 - 0.8) / 1.6)  # the run's ramp: 0.8 s -> 1, 2.4 s -> 0
    distinct = len(set(mostly_silent)) / 60
    distinct_factor = min(1.0, 1 - (0.25 - distinct) / (0.25 - 0.0625))
    assert scores[7] == pytest.approx(distinct_factor * (1 - (0.8 - 0.4) / 0.5)) and scores[7] < 0.3
    # Without a codec there is no silence measure; the code statistics still apply.
    assert sr.audio_guard(samples[3:]) == [0.0, 0.0, scores[5], 0.0, pytest.approx(distinct_factor)]
    with pytest.raises(ValueError, match="outside the codec"):
        sr.audio_guard([sample([100] * 20)], codes=f"kmeans:{codec}")


# ----------------------------------------------------------------------------------- intelligibility

@pytest.fixture(scope="module")
def asr_export(tmp_path_factory, codec) -> str:
    """A tiny random model in StepFun's layout, its tokenizer (48 audio codes) inside."""
    tok = extend_tokenizer(build_text_tokenizer(SENTENCES, 300), 48)
    ids = special_ids(tok)
    torch.manual_seed(0)
    config = preset_config("tiny", vocab_size=padded_vocab_size(len(tok)), audio_patch_token_id=ids.audio_patch)
    return str(save_stepfun(StepAudio2ForCausalLM(config).state_dict(), config,
                            tmp_path_factory.mktemp("asr") / "asr", tokenizer=tok))


def test_intelligibility_decodes_transcribes_and_scores(two_voices, codec, asr_export, monkeypatch):
    tokenizer = KMeansTokenizer.load(codec)
    codes = [tokenizer.encode(w).tolist() for w in two_voices["low"][:3]]
    samples = [sample(c, text=t) for c, t in zip(codes, SENTENCES)] + [sample([1, 2], text=SENTENCES[3])]
    args = {"asr_model": asr_export, "codes": f"kmeans:{codec}", "max_new_tokens": 8}
    random_model = sr.intelligibility(samples, **args)
    assert len(random_model) == 4 and all(0.0 <= x <= 1.0 for x in random_model) and random_model[3] == 0.0
    assert sr._asr.cache_info().currsize == 1  # loaded once, reused
    sr.intelligibility(samples[:1], **args)
    assert sr._asr.cache_info().hits >= 1

    heard = {}
    def fake_transcribe(waves, asr_model, device, max_new_tokens, batch_size, instruction):
        heard["waves"] = waves
        return [SENTENCES[0].upper() + ".", SENTENCES[0], "something else entirely"][:len(waves)]
    monkeypatch.setattr(sr, "transcribe", fake_transcribe)
    scores = sr.intelligibility(samples, **args)
    # 1 for the words asked for (case and punctuation do not count); 1 - tanh(3 x WER) otherwise.
    wer = sr.word_error_rate(SENTENCES[0], SENTENCES[1])
    assert scores[0] == 1.0 and scores[1] == pytest.approx(1 - math.tanh(3 * wer)) and scores[3] == 0.0
    assert scores[2] == pytest.approx(1 - math.tanh(3.0))  # every word wrong: WER 1
    # The vocoder gave 640 samples (16 kHz) per code.
    assert [len(w) for w in heard["waves"]] == [640 * len(c) for c in codes]

    # As an rl.rewards component, through the same interface the trainer uses.
    spec = RewardConfig(name="asr", function="train.rl.speech_rewards:intelligibility", args=args)
    total, parts = Rewards([spec])(samples, [])
    assert parts["asr"].tolist() == pytest.approx(scores)


# ------------------------------------------------------------------------------------ speaker

def test_speaker_similarity_prefers_the_reference_voice(two_voices, codec, tmp_path):
    tokenizer = KMeansTokenizer.load(codec)
    vocoder = KMeansVocoder(codec)
    # The net learns the two voices as the vocoder gives them back (answers are vocoded codes).
    waves = {n: [vocoder.codes_to_wave(tokenizer.encode(w)) for w in two_voices[n]] for n in ("low", "high")}
    encoder = fit_speaker_encoder([w for n in waves for w in waves[n][:4]], [n for n in waves for _ in range(4)],
                                  16000, steps=40, batch_size=16, channels=32, dim=16)
    model_path = str(tmp_path / "spk.pt")
    encoder.save(model_path)
    reference = tmp_path / "ref"
    reference.mkdir()
    for i, w in enumerate(two_voices["low"][:4]):
        sf.write(str(reference / f"{i}.wav"), w.numpy(), 16000)
    answers = [sample(tokenizer.encode(two_voices[n][i]).tolist()) for n in ("low", "high") for i in (4, 5)]
    scores = sr.speaker_similarity(answers + [sample([1])], model_path, str(reference), f"kmeans:{codec}")
    same, other = scores[:2], scores[2:4]
    assert all(0.0 <= x <= 1.0 for x in scores) and scores[4] == 0.0
    assert min(same) > max(other) + 0.2, (same, other)
    with pytest.raises(ValueError, match="no such folder"):
        sr.speaker_similarity(answers, model_path, str(tmp_path / "missing"), f"kmeans:{codec}")
